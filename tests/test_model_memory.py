"""Peak memory of a training step grows linearly with the sequence length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model import build_model

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process per sequence length. Writing 5 to /proc/self/clear_refs resets the peak
# resident size (VmHWM, Linux 4.0 and later) after the model is built, so the peak during the step
# minus the resident size before it is the step's memory, whatever imports peaked at earlier.
STEP_SCRIPT = """
import json, sys
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
def status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")
before = status_kib("VmRSS")
out = model(idx[:, :-1], idx[:, 1:])
(out.loss + out.aux_loss).backward()
after = status_kib("VmHWM")
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
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    short = step_memory_kib(4096)
    long = step_memory_kib(16384)
    # Four times the tokens: a linear model needs about 4x the memory, a T x T term 16x. The
    # measured ratio was 4.0 to 4.8 (allocator noise), so the band leaves room on both sides.
    assert long / short > 2.5, (short, long)
    assert long / short < 6.5, (short, long)


class LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def largest_tensor(length: int, gate_mode: str) -> int:
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=32, context=64, window=16), 64)
    model.set_gate_override(0.5 if gate_mode == "hard" else None)
    idx = torch.randint(0, 64, (1, length + 1))
    with LargestTensor() as tracker:
        out = model(idx[:, :-1], idx[:, 1:], gate_mode=gate_mode)
        out.loss.backward()
    return tracker.numel


@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
def test_no_tensor_grows_quadratically(gate_mode: str) -> None:
    """An exact check beside the noisy one above: every tensor of a step is linear in T."""
    short = largest_tensor(256, gate_mode)
    long = largest_tensor(1024, gate_mode)
    assert long == 4 * short
    assert long < 1024 * 1024 // 4  # a single T x T matrix would be four times this bound
