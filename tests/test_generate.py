"""Sampling, incremental decoding and prompt cleaning of `generate`, on real randomly initialized models."""

from __future__ import annotations

import pytest
import torch

from spikewalze_cli.config import GenerateConfig, ModelConfig
from spikewalze_cli.errors import UserError
from spikewalze_cli.generation import IncrementalDecoder, clean_prompt, sample_next, spike_style, stream_tokens
from spikewalze_cli.model import build_model

VOCAB = 97
PROMPT = [5, 17, 3, 88, 42, 7, 61, 0, 12]
GREEDY = GenerateConfig(temperature=0.0, top_k=None, top_p=1.0, repetition_penalty=1.0, max_new_tokens=40)


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch: str, target_rate: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch,
        n_layer=2,
        n_head=2,
        d_model=32,
        context=32,
        window=8,
        walze_width=4,
        mlp_ratio=2.0,
        spike={"target_rate": target_rate},
    )
    model = build_model(cfg, VOCAB).eval()
    if arch == "spikewalze":
        # Freshly initialized detectors give nearly the same score to every token; wider weights
        # make the untrained gate spike some tokens and not others.
        with torch.no_grad():
            for layer in model.layers:
                torch.nn.init.normal_(layer.detector.fc.weight, std=1.0)
                torch.nn.init.normal_(layer.detector.out.weight, std=1.0)
    return model


# ----------------------------------------------------------------------------------------------
# sample_next


def test_greedy_takes_argmax():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, generator, temperature=0.0) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, generator, temperature=5.0, top_k=1) for _ in range(20)}
    assert draws == {int(logits.argmax())}


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([3.0, 2.9, 2.8, -5.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, generator, temperature=1.0, top_k=2) for _ in range(300)}
    assert draws == {0, 1}


def test_top_p_keeps_smallest_set_reaching_mass():
    # Probabilities 0.5, 0.3, 0.2: top_p 0.7 needs the first two, top_p 0.5 only the first.
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, generator, temperature=1.0, top_p=0.7) for _ in range(300)} == {0, 1}
    assert {sample_next(logits, generator, temperature=1.0, top_p=0.5) for _ in range(50)} == {0}


def test_repetition_penalty_divides_positive_logits():
    logits = torch.tensor([2.0, 1.5, -1.0])
    generator = torch.Generator().manual_seed(0)
    # 2.0 / 1.5 = 1.33 < 1.5, so the unseen token 1 wins.
    assert sample_next(logits, generator, temperature=0.0, repetition_penalty=1.5, seen_ids=[0]) == 1
    assert sample_next(logits, generator, temperature=0.0, repetition_penalty=1.0, seen_ids=[0]) == 0


def test_repetition_penalty_multiplies_negative_logits():
    logits = torch.tensor([-1.0, -1.2])
    generator = torch.Generator().manual_seed(0)
    # -1.0 * 1.5 = -1.5 < -1.2, so the unseen token 1 wins.
    assert sample_next(logits, generator, temperature=0.0, repetition_penalty=1.5, seen_ids=[0, 0]) == 1


def test_same_generator_seed_same_draws():
    logits = torch.zeros(1000)
    first = [sample_next(logits, torch.Generator().manual_seed(7), temperature=1.0) for _ in range(3)]
    second = [sample_next(logits, torch.Generator().manual_seed(7), temperature=1.0) for _ in range(3)]
    assert first == second
    generator = torch.Generator().manual_seed(7)
    sequence = [sample_next(logits, generator, temperature=1.0) for _ in range(10)]
    assert len(set(sequence)) > 1


def test_sampling_leaves_logits_unchanged():
    logits = torch.tensor([1.0, 2.0, 3.0])
    sample_next(logits, torch.Generator().manual_seed(0), temperature=0.5, top_k=2, top_p=0.9, repetition_penalty=2.0, seen_ids=[2])
    assert logits.tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------------
# stream_tokens against the full forward pass


@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
def test_incremental_greedy_matches_forward(arch):
    model = tiny_model(arch)
    generated = list(stream_tokens(model, PROMPT, GREEDY))
    ids = [token.id for token in generated]
    assert len(ids) == GREEDY.max_new_tokens

    sequence = torch.tensor([PROMPT + ids])  # 49 tokens, beyond the 32-token context
    out = model(sequence, gate_mode="hard")
    predicted = out.logits[0].argmax(dim=-1)[len(PROMPT) - 1 : -1].tolist()
    assert ids == predicted


def test_incremental_gates_match_forward():
    model = tiny_model("spikewalze")
    sampled = GREEDY.model_copy(update={"temperature": 1.0, "seed": 3})  # greedy repeats a few tokens
    generated = list(stream_tokens(model, PROMPT, sampled))
    step_gates = torch.stack([token.gates for token in generated], dim=1)  # [n_layer, tokens]

    sequence = torch.tensor([PROMPT + [token.id for token in generated]])
    forward_gates = model(sequence, gate_mode="hard").gates[:, 0, len(PROMPT) :]
    assert torch.equal(step_gates, forward_gates)
    assert 0.0 < float(step_gates.mean()) < 1.0, "the test needs both spiked and unspiked tokens"


def test_stream_same_seed_same_tokens():
    model = tiny_model("spikewalze")
    settings = GenerateConfig(temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=25, seed=11)
    first = [token.id for token in stream_tokens(model, PROMPT, settings)]
    second = [token.id for token in stream_tokens(model, PROMPT, settings)]
    other = [token.id for token in stream_tokens(model, PROMPT, settings.model_copy(update={"seed": 12}))]
    assert first == second
    assert first != other


def test_stream_stops_at_stop_id_and_skips_banned():
    model = tiny_model("spikewalze")
    free = [token.id for token in stream_tokens(model, PROMPT, GREEDY)]
    stop = free[5]
    stopped = [token.id for token in stream_tokens(model, PROMPT, GREEDY, stop_ids=[stop])]
    assert stopped == free[: free.index(stop)]

    banned = [token.id for token in stream_tokens(model, PROMPT, GREEDY, banned_ids=[free[0]])]
    assert banned[0] != free[0]


def test_gpt_cache_is_rebuilt_within_context():
    model = tiny_model("gpt")
    settings = GREEDY.model_copy(update={"max_new_tokens": 60})
    long_prompt = PROMPT * 5  # 45 tokens, more than the 32-token context
    ids = [token.id for token in stream_tokens(model, long_prompt, settings, max_cache=32)]
    assert len(ids) == 60

    # The first token sees the last 32 prompt tokens only.
    out = model(torch.tensor([long_prompt[-32:]]))
    assert ids[0] == int(out.logits[0, -1].argmax())


# ----------------------------------------------------------------------------------------------
# Prompts, decoding and styles


def test_clean_prompt_removes_control_characters():
    assert clean_prompt("Die\x00 Stadt\x1b[0m\tAachen\r\n") == "Die Stadt[0m\tAachen\n"
    assert clean_prompt("Köln 😀") == "Köln 😀"


@pytest.mark.parametrize("text", ["", "   ", "\x00\x01\x02", "\x7f\n\t", "\udcff"])
def test_clean_prompt_rejects_empty(text):
    with pytest.raises(UserError, match="prompt is empty"):
        clean_prompt(text)


def german_tokenizer():
    """Train a small byte-level BPE on German sentences; umlauts stay split into byte tokens."""
    from tokenizers import pre_tokenizers, trainers

    from spikewalze_cli.tokenizer import SPECIAL_TOKENS, new_tokenizer

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["Die Stadt Aachen liegt im Westen.", "Der Dom ist alt."] * 20, trainer=trainer)
    return tokenizer


def test_incremental_decoder_prints_whole_characters():
    tokenizer = german_tokenizer()
    text = "Grüße aus Köln 😀!"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text), "multi-byte characters must span several tokens for this test"

    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoder_matches_full_decode_on_any_ids():
    tokenizer = german_tokenizer()
    ids = torch.randint(2, tokenizer.get_vocab_size(), (2000,), generator=torch.Generator().manual_seed(0)).tolist()

    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(token) for token in ids) + decoder.finish()
    assert text == tokenizer.decode(ids, skip_special_tokens=False)
    assert "\ufffd" in text, "random byte tokens must include invalid UTF-8 for this test"
    assert decoder.count == 2000


def test_spike_style_spans_none_to_all():
    assert spike_style(0, 4) == "default"
    assert spike_style(4, 4) == "bold red"
    assert spike_style(2, 4) == "yellow"
    assert spike_style(1, 2) == "yellow"
