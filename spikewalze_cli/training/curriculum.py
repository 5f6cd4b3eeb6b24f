"""Curriculum schedules: which training units are eligible at each step.

Every schedule returns, per step, the probability with which each training unit is drawn: a
weight per difficulty stage, except for `competence`, which opens a prefix of all units sorted by
difficulty score.

- none: every unit equally likely (the ablation baseline).
- staged: stage s fades in linearly between the peaks of stage s-1 and stage s
  (`curriculum.stage_steps`, as fractions of training) and then stays; all admitted stages are
  weighted by their unit counts, so easier text stays in the mix.
- competence: the sqrt competence schedule of Platanios et al. (2019), "Competence-based curriculum
  learning for neural machine translation": at progress p the easiest
  c(p) = min(1, sqrt(p / p_full * (1 - c0^2) + c0^2)) share of units (by score rank) is eligible.
- adaptive: starts with stage A only and admits the next stage when the validation loss on the
  admitted stages has not improved by `adaptive_margin` (relative) for `adaptive_patience`
  evaluations in a row.

The mutable part (adaptive only) is a plain dict, saved in every checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spikewalze_cli.config import CurriculumConfig
from spikewalze_cli.errors import UserError


class Curriculum:
    """Per-step sampling weights over stages (or a competence share), plus the adaptive state."""

    def __init__(self, cfg: CurriculumConfig, num_stages: int):
        self.cfg = cfg
        self.num_stages = num_stages
        if cfg.schedule == "staged":
            peaks = cfg.stage_steps
            if len(peaks) != num_stages:
                raise UserError(
                    f"curriculum.stage_steps has {len(peaks)} entries but the data has {num_stages} stages; "
                    f"give one fraction per stage, for example --set 'curriculum.stage_steps={_even_peaks(num_stages)}'"
                )
            if any(b < a for a, b in zip(peaks, peaks[1:])) or not all(0.0 <= p <= 1.0 for p in peaks):
                raise UserError(f"curriculum.stage_steps {peaks} must rise from 0 to at most 1")
        # adaptive: stages admitted so far, best validation loss on them, evaluations without gain
        self.state: dict[str, Any] = {"admitted": 1, "best_loss": None, "stale_evaluations": 0}

    # ----------------------------------------------------------------------- sampling weights

    def stage_weights(self, progress: float) -> np.ndarray:
        """Relative probability of drawing a unit from each stage (before unit counts), shape [num_stages]."""
        weights = np.zeros(self.num_stages)
        schedule = self.cfg.schedule
        if schedule in ("none", "competence"):
            weights[:] = 1.0
        elif schedule == "staged":
            peaks = self.cfg.stage_steps
            weights[0] = 1.0
            for stage in range(1, self.num_stages):
                start, peak = peaks[stage - 1], peaks[stage]
                weights[stage] = 1.0 if progress >= peak else max(0.0, (progress - start) / max(peak - start, 1e-9))
        else:
            weights[: self.state["admitted"]] = 1.0
        return weights

    def competence(self, progress: float) -> float:
        """Share of units (easiest first) eligible at `progress`; 1.0 for every schedule but competence."""
        if self.cfg.schedule != "competence":
            return 1.0
        c0 = self.cfg.initial_competence
        ramp = min(1.0, progress / self.cfg.competence_steps)
        return min(1.0, math.sqrt(ramp * (1.0 - c0**2) + c0**2))

    # ----------------------------------------------------------------------- adaptive gating

    def observe_validation(self, stage_losses: dict[str, float], stages: list[str]) -> str | None:
        """Feed one evaluation's per-stage validation loss; return the newly admitted stage, if any."""
        if self.cfg.schedule != "adaptive" or self.state["admitted"] >= self.num_stages:
            return None
        admitted = [stages[i] for i in range(self.state["admitted"]) if stages[i] in stage_losses]
        if not admitted:
            return None
        loss = float(np.mean([stage_losses[stage] for stage in admitted]))

        best = self.state["best_loss"]
        if best is None or loss < best * (1.0 - self.cfg.adaptive_margin):
            self.state["best_loss"] = loss
            self.state["stale_evaluations"] = 0
            return None
        self.state["stale_evaluations"] += 1
        if self.state["stale_evaluations"] < self.cfg.adaptive_patience:
            return None

        self.state["admitted"] += 1
        self.state["best_loss"] = None
        self.state["stale_evaluations"] = 0
        return stages[self.state["admitted"] - 1]

    def load_state(self, state: dict[str, Any]) -> None:
        self.state = {"admitted": int(state["admitted"]), "best_loss": state["best_loss"], "stale_evaluations": int(state["stale_evaluations"])}


def _even_peaks(num_stages: int) -> list[float]:
    return [round(stage / num_stages, 3) for stage in range(num_stages)]
