"""prepare-data: German Wikipedia in, difficulty-scored curriculum units out (see prepare.py)."""

from spikewalze_cli.data.prepare import assign_stages, prepare_data, stage_thresholds

__all__ = ["assign_stages", "prepare_data", "stage_thresholds"]
