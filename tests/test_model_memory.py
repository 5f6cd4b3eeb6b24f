"""Peak memory of a training step grows linearly with the sequence length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process, so ru_maxrss (the peak resident size, in KiB on Linux) belongs to one
# sequence length only. The increase over the peak after building the model is the step's memory.
STEP_SCRIPT = """
import json, resource, sys
from pathlib import Path

import torch
from spikewalze_cli.config import load_config
from spikewalze_cli.model import build_model

torch.set_num_threads(2)
torch.manual_seed(0)
length = int(sys.argv[1])
cfg = load_config(Path(sys.argv[2])).model.model_copy(update={"window": 128})
model = build_model(cfg, 4096)
idx = torch.randint(0, 4096, (1, length + 1))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = model(idx[:, :-1], idx[:, 1:])
(out.loss + out.aux_loss).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": out.loss.item(), "peak_kib": after - before}))
"""


def step_memory_kib(length: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", STEP_SCRIPT, str(length), str(REPO / "configs" / "tiny.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loss"] == pytest.approx(8.3, abs=0.5)  # about ln(4096) for a fresh model
    return report["peak_kib"]


@pytest.mark.slow
def test_training_step_memory_is_linear() -> None:
    short = step_memory_kib(4096)
    long = step_memory_kib(16384)
    # Four times the tokens: a linear model needs about 4x the memory, a T x T term 16x.
    assert 3.0 < long / short < 5.5, (short, long)
