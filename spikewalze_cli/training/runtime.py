"""Process set-up for training: device, distributed data parallel, signals and RNG states."""

from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from spikewalze_cli.device import resolve_device
from spikewalze_cli.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Placement of this process: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Return True on every rank when `flag` is True on at least one rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def launcher(self) -> str:
        """Return the command prefix that starts this run again, for the printed resume command."""
        return f"torchrun --nproc-per-node {self.world} -m spikewalze_cli" if self.distributed else "spikewalze"

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_runtime(device_name: str) -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name, "train.device")
    if world <= 1:
        return Runtime(rank=0, world=1, device=device)

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        logging.getLogger("spikewalze_cli").setLevel(logging.WARNING)
    return Runtime(rank=rank, world=world, device=device)


class StopSignal:
    """Records SIGINT/SIGTERM so the loop can finish the current step, save and exit cleanly."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave the default handlers in place
                log.debug("cannot install a handler for %s outside the main thread", number)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(number).name
        log.warning("%s received: finishing this step, then saving a checkpoint", self.received)

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --------------------------------------------------------------------------- RNG states as JSON


def rng_state() -> dict[str, Any]:
    """Return the Python, NumPy (global) and torch RNG states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": _numpy_state_to_json(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _numpy_state_to_json(state: tuple) -> list:
    kind, keys, position, has_gauss, cached = state
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]
