"""spikewalze: train, evaluate and sample Spike-Walze language models on German Wikipedia."""

__version__ = "0.1.0"
