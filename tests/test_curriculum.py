"""Curriculum schedules: easier units early, harder late, on real tokenized German units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spikewalze_cli.config import CurriculumConfig
from spikewalze_cli.errors import UserError
from spikewalze_cli.tokenizer import TokenStore
from spikewalze_cli.training import train
from spikewalze_cli.training.batches import DOC, TrainBatches, UnitPool, plan_sequence, validation_batches
from spikewalze_cli.training.curriculum import Curriculum
from spikewalze_cli.training.metrics import read_records

STEPS = 100
CONTEXT = 32

# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")



def unit_scores_per_step(tokens: TokenStore, schedule: str, sequences_per_step: int = 8) -> np.ndarray:
    """Mean difficulty score (per token) of the units sampled at each of STEPS steps."""
    curriculum = Curriculum(CurriculumConfig(schedule=schedule), len(tokens.stages))
    batches = TrainBatches(tokens, curriculum, CONTEXT, seed=3)
    scores = [batches.next_step(step / STEPS, sequences_per_step, 1, 0, 1).mean_unit_score for step in range(STEPS)]
    return np.array(scores)


def first_and_last_tenth(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tenth = len(scores) // 10
    return scores[:tenth], scores[-tenth:]


@pytest.mark.parametrize("schedule", ["staged", "competence"])
def test_schedule_moves_to_harder_units(tiny_run_inputs, schedule: str):
    early, late = first_and_last_tenth(unit_scores_per_step(TokenStore(tiny_run_inputs.tokenizer), schedule))

    assert early.mean() < late.mean()


def test_none_schedule_is_flat(tiny_run_inputs):
    early, late = first_and_last_tenth(unit_scores_per_step(TokenStore(tiny_run_inputs.tokenizer), "none"))

    standard_error = math.sqrt(early.var(ddof=1) / len(early) + late.var(ddof=1) / len(late))
    assert abs(early.mean() - late.mean()) < 3 * standard_error


def test_adaptive_admits_stages_during_training(tiny_train_config):
    # A margin of 50% is never reached, so every second evaluation admits the next stage.
    config = tiny_train_config(
        "curriculum.schedule=adaptive",
        "curriculum.adaptive_margin=0.5",
        "curriculum.adaptive_patience=1",
        "train.max_steps=20",
        "train.eval_interval=2",
        "train.eval_batches=4",
        "train.checkpoint_interval=100",
    )

    run_dir = train(config)

    records = read_records(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    admitted = [r["curriculum"]["admitted"] for r in records if r["kind"] == "validation"]
    assert admitted == [1, 2, 2, 3, 3, 4, 4, 4, 4, 4]
    assert steps[0]["stage_mix"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    assert steps[-1]["stage_mix"]["D"] > 0.0
    early, late = first_and_last_tenth(np.array([r["unit_score"] for r in steps]))
    assert early.mean() < late.mean()


def test_competence_ramp():
    curriculum = Curriculum(CurriculumConfig(schedule="competence", initial_competence=0.1, competence_steps=0.5), 4)

    assert curriculum.competence(0.0) == pytest.approx(0.1)
    assert curriculum.competence(0.25) == pytest.approx(math.sqrt(0.5 * 0.99 + 0.01))
    assert curriculum.competence(0.5) == 1.0
    assert curriculum.competence(0.9) == 1.0


def test_staged_weights_fade_in():
    curriculum = Curriculum(CurriculumConfig(schedule="staged", stage_steps=[0.0, 0.25, 0.5, 0.75]), 4)

    assert curriculum.stage_weights(0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert curriculum.stage_weights(0.125).tolist() == [1.0, 0.5, 0.0, 0.0]
    assert curriculum.stage_weights(0.6).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.4])
    assert curriculum.stage_weights(1.0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_staged_rejects_wrong_stage_count():
    with pytest.raises(UserError, match="stage_steps has 4 entries but the data has 3 stages"):
        Curriculum(CurriculumConfig(schedule="staged"), 3)


def test_adaptive_state_round_trip():
    config = CurriculumConfig(schedule="adaptive", adaptive_margin=0.1, adaptive_patience=2)
    curriculum = Curriculum(config, 4)
    stages = ["A", "B", "C", "D"]

    assert curriculum.observe_validation({"A": 5.0, "B": 6.0}, stages) is None
    assert curriculum.observe_validation({"A": 4.8, "B": 6.0}, stages) is None
    assert curriculum.observe_validation({"A": 4.7, "B": 6.0}, stages) == "B"

    restored = Curriculum(config, 4)
    restored.load_state(dict(curriculum.state))
    assert restored.state == {"admitted": 2, "best_loss": None, "stale_evaluations": 0}
    assert restored.stage_weights(0.5).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_packed_sequences_hold_real_units(tiny_run_inputs):
    tokens = TokenStore(tiny_run_inputs.tokenizer)
    pool = UnitPool(tokens, "train")
    rng = np.random.default_rng(0)
    seq_len = 300  # longer than most units, so sequences pack several

    for _ in range(20):
        plan = plan_sequence(pool, rng, seq_len, lambda r: r.integers(len(pool)))
        ids, byte_weights = pool.materialize(plan, seq_len)

        assert sum(chunk.count for chunk in plan) == seq_len
        position = 0
        for index, chunk in enumerate(plan):
            piece = ids[position : position + chunk.count]
            if chunk.unit == DOC:
                assert piece.tolist() == [tokens.doc_id]
                assert byte_weights[position] == 0.0
            else:
                stage = tokens.stages[pool.stage_of[chunk.unit]]
                begin = pool.offset[chunk.unit] + chunk.start
                assert piece.tolist() == tokens.tokens("train", stage)[begin : begin + chunk.count].tolist()
                if chunk.count == pool.length[chunk.unit]:  # a whole unit carries exactly its UTF-8 bytes
                    assert byte_weights[position : position + chunk.count].sum() == pytest.approx(pool.bytes[chunk.unit])
                assert index == 0 or chunk.start == 0  # only the first unit may start inside
                next_is_doc = index + 1 < len(plan) and plan[index + 1].unit == DOC
                assert next_is_doc or index == len(plan) - 1
            position += chunk.count


def test_validation_batches_are_fixed(tiny_run_inputs):
    tokens = TokenStore(tiny_run_inputs.tokenizer)

    first = validation_batches(tokens, CONTEXT, 4, 8, seed=7)
    second = validation_batches(tokens, CONTEXT, 4, 8, seed=7)

    assert [batch.stage for batch in first] == ["A", "A", "B", "B", "C", "C", "D", "D"]
    for a, b in zip(first, second):
        assert torch.equal(a.inputs, b.inputs)
        assert a.target_bytes == b.target_bytes
        assert 0 < a.target_bytes < 4 * CONTEXT * 8
