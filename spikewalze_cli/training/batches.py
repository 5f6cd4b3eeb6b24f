"""Training and validation batches packed from tokenized units.

A sequence holds context + 1 tokens: units drawn one after another, each followed by the `<|doc|>`
token, the last one cut where the sequence is full. A unit longer than the whole sequence starts
at a random offset, so the ends of long units are trained on too. Inputs are tokens[:-1], targets
tokens[1:].

Sampling is deterministic: one NumPy Generator, whose state is the whole data position, plans the
sequences of a step from the unit index (lengths and stages) alone. Every rank plans the same
global batch and reads only its own disjoint share of sequences, so N processes see exactly the
batch that one process with N times the gradient accumulation would see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spikewalze_cli.errors import UserError
from spikewalze_cli.training.curriculum import Curriculum

DOC = -1  # marks a <|doc|> token in a sequence plan


@dataclass
class Chunk:
    unit: int  # index into the pool of all units of the split
    start: int  # first token inside the unit
    count: int  # tokens taken; unit == DOC means one <|doc|> token


class UnitPool:
    """All units of one split across stages, with their token memmaps and index columns."""

    def __init__(self, tokens: Any, split: str):
        self.stages: list[str] = list(tokens.stages)
        self.doc_id = int(tokens.doc_id)
        self.memmaps = [tokens.tokens(split, stage) for stage in self.stages]
        tables = [tokens.units(split, stage) for stage in self.stages]

        self.counts = np.array([len(table) for table in tables], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)  # pool index of each stage's first unit
        self.stage_of = np.repeat(np.arange(len(self.stages)), self.counts)
        self.offset = np.concatenate([table["offset"] for table in tables]).astype(np.int64)
        self.length = np.concatenate([table["length"] for table in tables]).astype(np.int64)
        self.bytes = np.concatenate([table["bytes"] for table in tables]).astype(np.int64)
        self.score = np.concatenate([table["score"] for table in tables]).astype(np.float64)
        self.by_score = np.argsort(self.score, kind="stable")  # easiest first, for competence sampling

    def __len__(self) -> int:
        return len(self.length)

    @property
    def total_tokens(self) -> int:
        return int(self.length.sum())

    def materialize(self, plan: list[Chunk], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the token ids [seq_len] and UTF-8 bytes per token [seq_len] of one planned sequence."""
        ids = np.empty(seq_len, dtype=np.int64)
        byte_weights = np.zeros(seq_len, dtype=np.float64)
        position = 0
        for chunk in plan:
            if chunk.unit == DOC:
                ids[position] = self.doc_id
                position += 1
                continue
            stage = self.stage_of[chunk.unit]
            begin = self.offset[chunk.unit] + chunk.start
            ids[position : position + chunk.count] = self.memmaps[stage][begin : begin + chunk.count]
            byte_weights[position : position + chunk.count] = self.bytes[chunk.unit] / max(self.length[chunk.unit], 1)
            position += chunk.count
        return ids, byte_weights


def plan_sequence(pool: UnitPool, rng: np.random.Generator, seq_len: int, draw_unit) -> list[Chunk]:
    """Plan one packed sequence of `seq_len` tokens from units returned by `draw_unit(rng)`."""
    plan: list[Chunk] = []
    need = seq_len
    while need > 0:
        unit = int(draw_unit(rng))
        length = int(pool.length[unit])
        start = 0
        if not plan and length > need:
            start = int(rng.integers(0, length - need + 1))
        take = min(length - start, need)
        if take > 0:
            plan.append(Chunk(unit, start, take))
            need -= take
        if need > 0:
            plan.append(Chunk(DOC, 0, 1))
            need -= 1
    return plan


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and statistics of the global batch."""

    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]  # (inputs [B, T], targets [B, T]) per micro-step
    mean_unit_score: float  # mean difficulty score of the units in the global batch, per token
    stage_mix: dict[str, float]  # share of the global batch's tokens per stage


class TrainBatches:
    """Deterministic curriculum sampler of training sequences; `state()` is the data position."""

    def __init__(self, tokens: Any, curriculum: Curriculum, context: int, seed: int):
        self.pool = UnitPool(tokens, "train")
        self.curriculum = curriculum
        self.context = context
        self.rng = np.random.default_rng(seed)
        self.sequences_planned = 0
        if len(self.pool) == 0 or self.pool.total_tokens == 0:
            raise UserError("the training split has no tokens; prepare more data (data.max_articles) and rebuild the tokenizer")

    def state(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state, "sequences_planned": self.sequences_planned}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.sequences_planned = int(state["sequences_planned"])

    def _unit_drawer(self, progress: float):
        pool = self.pool
        competence = self.curriculum.competence(progress)
        if competence < 1.0:
            eligible = max(1, math.ceil(competence * len(pool)))
            return lambda rng: pool.by_score[rng.integers(eligible)]

        weights = self.curriculum.stage_weights(progress) * pool.counts
        if weights.sum() <= 0:  # the admitted stages are empty: fall back to every unit
            weights = pool.counts.astype(np.float64)
        probabilities = weights / weights.sum()
        stage_ids = np.arange(len(pool.stages))

        def draw(rng: np.random.Generator) -> int:
            stage = int(rng.choice(stage_ids, p=probabilities)) if len(stage_ids) > 1 else 0
            return int(pool.first[stage] + rng.integers(pool.counts[stage]))

        return draw

    def next_step(self, progress: float, micro_batch_size: int, accumulation: int, rank: int, world: int) -> StepBatch:
        """Plan the global batch of one optimizer step and load this rank's sequences."""
        seq_len = self.context + 1
        draw = self._unit_drawer(progress)
        plans = [plan_sequence(self.pool, self.rng, seq_len, draw) for _ in range(micro_batch_size * accumulation * world)]
        self.sequences_planned += len(plans)

        # Statistics over the global batch, from the plan alone (token-weighted).
        stage_tokens = np.zeros(len(self.pool.stages))
        score_sum = 0.0
        for plan in plans:
            for chunk in plan:
                if chunk.unit != DOC:
                    stage_tokens[self.pool.stage_of[chunk.unit]] += chunk.count
                    score_sum += chunk.count * self.pool.score[chunk.unit]
        total = max(stage_tokens.sum(), 1.0)

        # Micro-step a of rank r owns global sequences [(a * world + r) * B, (a * world + r + 1) * B).
        micro_batches = []
        for step in range(accumulation):
            first = (step * world + rank) * micro_batch_size
            rows = [self.pool.materialize(plan, seq_len)[0] for plan in plans[first : first + micro_batch_size]]
            data = torch.from_numpy(np.stack(rows))
            micro_batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
        return StepBatch(
            micro_batches=micro_batches,
            mean_unit_score=score_sum / total,
            stage_mix={stage: float(count / total) for stage, count in zip(self.pool.stages, stage_tokens)},
        )


@dataclass
class ValidationBatch:
    stage: str
    inputs: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    target_bytes: float  # UTF-8 bytes covered by the targets (<|doc|> tokens count zero)


def validation_batches(tokens: Any, context: int, batch_size: int, batches: int, seed: int) -> list[ValidationBatch]:
    """Build the fixed validation set: `batches` batches in total, spread evenly over the stages.

    The same seed gives the same sequences in every evaluation and every run. Stages without
    validation units are left out.
    """
    pool = UnitPool(tokens, "validation")
    stage_tokens = [pool.length[pool.first[index] : pool.first[index] + count].sum() for index, count in enumerate(pool.counts)]
    present = [index for index, tokens_in_stage in enumerate(stage_tokens) if tokens_in_stage > 0]
    if not present:
        raise UserError("the validation split has no tokens; prepare more articles or raise data.validation_fraction")
    per_stage = max(1, math.ceil(batches / len(present)))
    seq_len = context + 1

    result = []
    for stage in present:
        rng = np.random.default_rng([seed, stage])

        def draw(rng: np.random.Generator, stage: int = stage) -> int:
            return int(pool.first[stage] + rng.integers(pool.counts[stage]))

        for _ in range(per_stage):
            rows, weights = [], []
            for _ in range(batch_size):
                ids, byte_weights = pool.materialize(plan_sequence(pool, rng, seq_len, draw), seq_len)
                rows.append(ids)
                weights.append(byte_weights[1:].sum())
            data = torch.from_numpy(np.stack(rows))
            result.append(ValidationBatch(pool.stages[stage], data[:, :-1].contiguous(), data[:, 1:].contiguous(), float(sum(weights))))
    return result
