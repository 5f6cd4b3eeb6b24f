"""`spikewalze evaluate`: loss, bits per byte, spike rates and FLOPs of a trained model.

Each curriculum stage of the chosen split is evaluated on its own token stream: `<|doc|>`, then
every unit of that stage in dataset order, each followed by `<|doc|>`, the way training packs its
sequences. The tokens come from the run's tokenizer directory, or, with `--data DIR`, from the
units of another prepared data directory tokenized here with the run's tokenizer.

A stream of N tokens is cut into windows of `context` input tokens with stride `context`, so every
token except the leading `<|doc|>` is a target exactly once, and the last window may be shorter.
With `eval.max_batches` set, at most `max_batches * batch_size` windows per stage are scored,
evenly spaced over the stream. The windows do not depend on the gate mode, so soft and hard gate
see the same tokens. Nothing is sampled, so the same checkpoint and data give the same figures;
only `tokens_per_second` depends on the machine.

Bits per byte divide the summed loss by the UTF-8 bytes of the scored text, so runs with different
tokenizers compare: `bits_per_byte = loss * tokens / (bytes * ln 2)`. The bytes of a unit come from
the unit index. `<|doc|>` targets add their loss but no bytes, as in the validation during
training. A window that starts or ends inside a unit scores only part of it, and that unit counts
with the share `scored tokens / unit tokens` of its bytes. This is exact for whole units and an
approximation for cut ones, because bytes per token vary within a unit. Totals over stages are
sums of nats, tokens and bytes, so the overall loss is the token-weighted mean of the stages.

JSON written by `--json FILE` (figures are floats unless noted, null where they do not apply):

    target, checkpoint, step (int), arch, split, data_dir, tokenizer_dir, vocab_size (int)
    settings: the effective `eval` config section
    results: one object per context length and gate mode, with
        context (int), gate_mode ("soft", "hard", or "none" for the gpt baseline, which has no gate)
        loss (nats per token), perplexity, bits_per_byte, tokens (int, scored), bytes (scored)
        spike_rate: mean gate value over layers and tokens (hard gate: the share of tokens sent
            to the expert); null for gpt
        spike_rate_per_layer: list with one rate per layer; null for gpt
        flops_per_token: forward FLOPs per token; with the hard gate at the measured spike rate,
            with the soft gate the dense figure, because the soft gate runs the expert for every
            token (except with spike.mode never, where no token runs it)
        flops_per_token_dense: forward FLOPs per token with the expert run for every token
        tokens_per_second: scored tokens over the wall time of the forward passes
        per_stage: {stage letter: {loss, perplexity, bits_per_byte, tokens, bytes, spike_rate,
            spike_rate_per_layer}}
    gaps: one object per context length when both gate modes ran, hard minus soft:
        context, loss, bits_per_byte, spike_rate, per_stage {stage: {loss, spike_rate}}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spikewalze_cli.config import Config, ModelConfig, config_to_dict, parse_override, read_yaml, validate_config
from spikewalze_cli.console import console
from spikewalze_cli.device import resolve_device
from spikewalze_cli.errors import UserError

log = logging.getLogger(__name__)

INFERENCE_SECTIONS = ("eval", "generate")


# ----------------------------------------------------------------------------------------------
# Config and device, shared with `generate`


def inference_config(run_config: Config, config_path: Path | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """Merge the settings of `evaluate` and `generate` into the config the run was trained with.

    The model, data and training sections always come from the run, because the checkpoint was
    built with them. `--config` contributes only its `eval` and `generate` sections, and `--set`
    accepts only keys under `eval.` and `generate.`.
    """
    tree = config_to_dict(run_config)

    if config_path is not None:
        file_tree = read_yaml(config_path)
        validate_config(file_tree, str(config_path))  # report a bad file by its own name
        for section in INFERENCE_SECTIONS:
            tree[section] = file_tree.get(section, {})

    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section not in INFERENCE_SECTIONS or not name:
            raise UserError(
                f"--set {key}: only eval.* and generate.* keys can be changed here, because the model, data "
                "and training settings come from the run; train a new run to change them"
            )
        tree[section][name] = value  # a nested name such as eval.a.b fails validation as an unknown key

    return validate_config(tree, "--config/--set")


# ----------------------------------------------------------------------------------------------
# Token streams and windows


class StageStream:
    """The evaluation stream of one stage: `<|doc|>`, then each unit followed by `<|doc|>`.

    The stream is never built in memory. `read` assembles any slice from the units' token ids
    (a memmap for a stored split), so a large split costs memory only for its unit index.
    """

    def __init__(self, stage: str, tokens: np.ndarray, units: np.ndarray, doc_id: int):
        self.stage = stage
        self.tokens = tokens  # [sum of unit lengths] token ids of the units, concatenated
        self.doc_id = doc_id
        self.offsets = units["offset"].astype(np.int64)  # where each unit starts in `tokens`
        self.lengths = units["length"].astype(np.int64)
        # The same rows with offsets into the stream: one <|doc|> more before each unit.
        self.units = units.copy()
        self.units["offset"] = self.offsets + np.arange(len(units)) + 1

    def __len__(self) -> int:
        return 1 + int(self.lengths.sum()) + len(self.lengths)

    def read(self, begin: int, end: int) -> np.ndarray:
        """Return the stream positions [begin, end) as int64 token ids."""
        positions = np.arange(begin, end, dtype=np.int64)
        starts = self.units["offset"].astype(np.int64)
        unit = np.searchsorted(starts, positions, side="right") - 1  # -1 before the first unit
        inside = positions - starts[np.maximum(unit, 0)]
        is_token = (unit >= 0) & (inside < self.lengths[np.maximum(unit, 0)])

        ids = np.full(len(positions), self.doc_id, dtype=np.int64)
        sources = self.offsets[unit[is_token]] + inside[is_token]
        ids[is_token] = np.asarray(self.tokens[sources], dtype=np.int64)
        return ids


def token_windows(num_tokens: int, context: int) -> list[tuple[int, int]]:
    """Return (start, length) of the windows that make every token but the first a target once.

    A window's inputs are tokens[start : start + length] and its targets are shifted by one.
    """
    windows = []
    for start in range(0, max(num_tokens - 1, 0), context):
        windows.append((start, min(context, num_tokens - 1 - start)))
    return windows


def spread(windows: list[tuple[int, int]], limit: int | None) -> list[tuple[int, int]]:
    """Return at most `limit` windows, evenly spaced over the list and in order."""
    if limit is None or len(windows) <= limit:
        return windows
    picks = np.linspace(0, len(windows) - 1, num=limit).round().astype(np.int64)
    return [windows[i] for i in picks]


def scored_bytes(units: np.ndarray, ranges: list[tuple[int, int]]) -> float:
    """Return the UTF-8 bytes of the text behind the token ranges [begin, end).

    A unit inside a range counts with all its bytes. A unit that a range cuts counts with the
    share of its tokens inside the range, an approximation because bytes per token vary.
    Tokens between units belong to none and count zero bytes.
    """
    if len(units) == 0 or not ranges:
        return 0.0
    offsets = units["offset"].astype(np.int64)
    lengths = units["length"].astype(np.int64)
    unit_bytes = units["bytes"].astype(np.float64)
    bytes_before = np.concatenate([[0.0], np.cumsum(unit_bytes)])  # [units + 1]

    def cumulative(position: np.ndarray) -> np.ndarray:
        # Bytes of the text before token `position`, linear inside each unit.
        unit = np.clip(np.searchsorted(offsets, position, side="right") - 1, 0, len(units) - 1)
        inside = np.clip(position - offsets[unit], 0, lengths[unit])
        share = np.where(lengths[unit] > 0, inside / np.maximum(lengths[unit], 1), 1.0)
        return bytes_before[unit] + share * unit_bytes[unit]

    begins = np.array([begin for begin, _ in ranges], dtype=np.int64)
    ends = np.array([end for _, end in ranges], dtype=np.int64)
    return float(np.sum(cumulative(ends) - cumulative(begins)))


def batches(stream: StageStream, windows: list[tuple[int, int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Yield [B, length + 1] LongTensors of consecutive windows with equal length."""
    group: list[np.ndarray] = []
    for start, length in windows:
        chunk = stream.read(start, start + length + 1)
        if group and (len(group) == batch_size or len(group[0]) != len(chunk)):
            yield torch.from_numpy(np.stack(group))
            group = []
        group.append(chunk)
    if group:
        yield torch.from_numpy(np.stack(group))


def load_streams(loaded, data: Path | None, split: str) -> list[StageStream]:
    """Return the streams of every stage of `split`, from the run's tokenizer directory or `data`.

    With `data` pointing at another prepared data directory, its units are tokenized here with the
    run's tokenizer, the same way `build-tokenizer` does it.
    """
    store = loaded.tokens
    if data is None or Path(data).resolve() == Path(store.manifest["data_dir"]).resolve():
        return [
            StageStream(stage, store.tokens(split, stage), store.units(split, stage), store.doc_id)
            for stage in store.stages
        ]

    from spikewalze_cli.tokenizer import UNIT_DTYPE, open_units

    # Per stage: token ids, byte count and score of each unit of the split, in dataset order.
    found: dict[str, tuple[list[np.ndarray], list[int], list[float]]] = {}
    units = open_units(Path(data))
    for batch in units.select_columns(["text", "split", "stage", "score"]).iter(batch_size=1024):
        picked = [i for i, unit_split in enumerate(batch["split"]) if unit_split == split]
        texts = [batch["text"][i] for i in picked]
        encodings = store.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        for i, text, encoding in zip(picked, texts, encodings):
            ids, sizes, scores = found.setdefault(batch["stage"][i], ([], [], []))
            ids.append(np.asarray(encoding.ids, dtype=np.int64))
            sizes.append(len(text.encode("utf-8")))
            scores.append(batch["score"][i])
    log.info("tokenized the %s split of %s with the run's tokenizer", split, data)

    streams = []
    for stage in sorted(found):
        ids, sizes, scores = found[stage]
        lengths = np.array([len(unit_ids) for unit_ids in ids], dtype=np.int64)
        index = np.zeros(len(ids), dtype=UNIT_DTYPE)
        index["offset"] = np.cumsum(lengths) - lengths
        index["length"] = lengths
        index["bytes"] = sizes
        index["score"] = scores
        streams.append(StageStream(stage, np.concatenate(ids), index, store.doc_id))
    return streams


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Tally:
    """Running sums of one stage (or all stages) in one gate mode at one context length."""

    nats: float = 0.0
    tokens: int = 0
    bytes: float = 0.0
    gate_sums: np.ndarray | None = None  # [n_layer] summed gate values over tokens
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.seconds += other.seconds
        if other.gate_sums is not None:
            self.gate_sums = other.gate_sums.copy() if self.gate_sums is None else self.gate_sums + other.gate_sums

    def figures(self) -> dict:
        """Return loss, perplexity, bits per byte and spike rates; None where nothing was scored."""
        loss = self.nats / self.tokens if self.tokens else None
        per_layer = None if self.gate_sums is None or not self.tokens else (self.gate_sums / self.tokens).tolist()
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
            "bits_per_byte": self.nats / (self.bytes * math.log(2)) if self.bytes else None,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "spike_rate": float(np.mean(per_layer)) if per_layer is not None else None,
            "spike_rate_per_layer": per_layer,
        }


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    stream: StageStream,
    context: int,
    gate_mode: str,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
) -> Tally:
    """Score one stage's stream with the model in `gate_mode` and return the sums."""
    limit = None if max_batches is None else max_batches * batch_size
    windows = spread(token_windows(len(stream), context), limit)
    tally = Tally(bytes=scored_bytes(stream.units, [(start + 1, start + 1 + length) for start, length in windows]))

    for batch in batches(stream, windows, batch_size):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each

        started = time.perf_counter()
        out = model(inputs, targets, gate_mode=gate_mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tally.seconds += time.perf_counter() - started

        count = targets.numel()
        tally.nats += float(out.loss) * count
        tally.tokens += count
        if out.gates is not None:
            gate_sums = out.gates.float().sum(dim=(1, 2)).cpu().numpy().astype(np.float64)  # [n_layer]
            tally.gate_sums = gate_sums if tally.gate_sums is None else tally.gate_sums + gate_sums
    return tally


# ----------------------------------------------------------------------------------------------
# The command


def evaluate(
    target: Path,
    config_path: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: Path | None = None,
    json_path: Path | None = None,
) -> dict:
    """Evaluate a run or checkpoint on every stage of a split; print the tables and return the report."""
    from spikewalze_cli.checkpoint import load_for_inference

    loaded = load_for_inference(Path(target), device="cpu")
    config = inference_config(loaded.config, config_path, overrides)
    cfg = config.eval
    device = resolve_device(cfg.device, "eval.device")
    model = loaded.model.to(device).eval()
    model_cfg = config.model

    contexts = cfg.contexts or [model_cfg.context]
    gate_modes = list(cfg.gate_modes) if model_cfg.arch == "spikewalze" else ["none"]
    streams = load_streams(loaded, data, cfg.split)
    if not any(stream.lengths.sum() > 0 for stream in streams):
        raise UserError(f"the {cfg.split} split has no tokens to evaluate; prepare more data or choose another --split")

    results = []
    for context in contexts:
        for gate_mode in gate_modes:
            results.append(_evaluate_setting(model, streams, config, loaded.tokens.vocab_size, context, gate_mode, device))

    report = {
        "target": str(target),
        "checkpoint": str(loaded.checkpoint_dir),
        "step": int(loaded.step),
        "arch": model_cfg.arch,
        "split": cfg.split,
        "data_dir": str(Path(data).resolve()) if data is not None else loaded.tokens.manifest["data_dir"],
        "tokenizer_dir": str(loaded.tokens.dir.resolve()),
        "vocab_size": loaded.tokens.vocab_size,
        "settings": cfg.model_dump(mode="json"),
        "results": results,
        "gaps": _gaps(results, contexts),
    }
    _print_report(report)
    if json_path is not None:
        from spikewalze_cli.io import atomic_write_json

        atomic_write_json(Path(json_path), report)
        log.info("wrote %s", json_path)
    return report


def _evaluate_setting(model, streams, config: Config, vocab_size: int, context: int, gate_mode: str, device) -> dict:
    """Score every stage at one context length in one gate mode and return its result entry."""
    cfg = config.eval
    forward_mode = "hard" if gate_mode == "none" else gate_mode  # gpt ignores the gate mode
    total = Tally()
    per_stage = {}
    with console.status("") as status:
        for stream in streams:
            if not stream.lengths.sum():
                log.warning("stage %s of the %s split has no tokens; skipped", stream.stage, cfg.split)
                continue
            status.update(f"evaluating context {context}, {gate_mode} gate, stage {stream.stage}")
            tally = score_stream(model, stream, context, forward_mode, cfg.batch_size, cfg.max_batches, device)
            per_stage[stream.stage] = tally.figures()
            total.add(tally)

    result = {"context": context, "gate_mode": gate_mode, **total.figures()}
    result.update(_flops(config.model, vocab_size, context, gate_mode, result["spike_rate"]))
    result["tokens_per_second"] = total.tokens / total.seconds if total.seconds > 0 else None
    result["per_stage"] = per_stage
    return result


def _flops(cfg: ModelConfig, vocab_size: int, context: int, gate_mode: str, spike_rate: float | None) -> dict:
    """Return forward FLOPs per token, actual at the measured spike rate and dense."""
    from spikewalze_cli.model.flops import forward_flops_per_token

    if gate_mode == "soft":
        # The soft gate scales the expert output, so the expert runs for every token, whatever
        # the mean gate value. None counts that (and no expert at all with spike.mode never).
        spike_rate = None
    # NOTE: the count takes one rate for all layers. Layer cost is linear in the rate except for
    # the key/value projections, counted in every layer while the mean rate is above 0, so a layer
    # that spikes no token at all is overcounted by those projections.
    count = forward_flops_per_token(cfg, vocab_size, context, spike_rate=spike_rate)
    return {"flops_per_token": float(count.actual), "flops_per_token_dense": float(count.dense)}


def _difference(hard: float | None, soft: float | None) -> float | None:
    return None if hard is None or soft is None else hard - soft


def _gaps(results: list[dict], contexts: list[int]) -> list[dict]:
    """Return hard minus soft per context length, where both gate modes ran."""
    gaps = []
    for context in contexts:
        by_mode = {r["gate_mode"]: r for r in results if r["context"] == context}
        if "soft" not in by_mode or "hard" not in by_mode:
            continue
        soft, hard = by_mode["soft"], by_mode["hard"]
        gaps.append(
            {
                "context": context,
                "loss": _difference(hard["loss"], soft["loss"]),
                "bits_per_byte": _difference(hard["bits_per_byte"], soft["bits_per_byte"]),
                "spike_rate": _difference(hard["spike_rate"], soft["spike_rate"]),
                "per_stage": {
                    stage: {
                        "loss": _difference(hard["per_stage"][stage]["loss"], figures["loss"]),
                        "spike_rate": _difference(hard["per_stage"][stage]["spike_rate"], figures["spike_rate"]),
                    }
                    for stage, figures in soft["per_stage"].items()
                    if stage in hard["per_stage"]
                },
            }
        )
    return gaps


# ----------------------------------------------------------------------------------------------
# Terminal output


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _si(value: float | None) -> str:
    """Format a count with an SI prefix: 1234567 -> 1.23M."""
    if value is None:
        return "-"
    prefix = ""
    for name, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            prefix, value = name, value / scale
            break
    if abs(value) < 10:
        digits = 2
    elif abs(value) < 100:
        digits = 1
    else:
        digits = 0
    return f"{value:.{digits}f}{prefix}"


def _print_report(report: dict) -> None:
    from rich.table import Table

    console.print(f"[dim]checkpoint {report['checkpoint']}[/]", highlight=False)
    table = Table(title=f"{report['arch']} at step {report['step']}, {report['split']} split", title_justify="left")
    for name in ("context", "gate", "loss", "ppl", "bpb", "spikes", "FLOP/tok", "dense", "tok/s"):
        table.add_column(name, justify="left" if name == "gate" else "right")
    for r in report["results"]:
        table.add_row(
            str(r["context"]),
            r["gate_mode"],
            _number(r["loss"]),
            _number(r["perplexity"], 1),
            _number(r["bits_per_byte"]),
            _number(r["spike_rate"]),
            _si(r["flops_per_token"]),
            _si(r["flops_per_token_dense"]),
            _si(r["tokens_per_second"]),
        )
    console.print(table)

    stages = Table(title="per curriculum stage (A easiest)", title_justify="left")
    for name in ("context", "gate", "stage", "loss", "bpb", "spikes", "tokens"):
        stages.add_column(name, justify="left" if name in ("gate", "stage") else "right")
    for r in report["results"]:
        for stage, figures in r["per_stage"].items():
            stages.add_row(
                str(r["context"]),
                r["gate_mode"],
                stage,
                _number(figures["loss"]),
                _number(figures["bits_per_byte"]),
                _number(figures["spike_rate"]),
                f"{figures['tokens']:,}",
            )
    console.print(stages)

    for r in report["results"]:
        if r["spike_rate_per_layer"]:
            rates = " ".join(f"{rate:.3f}" for rate in r["spike_rate_per_layer"])
            console.print(f"spike rate per layer, context {r['context']}, {r['gate_mode']} gate: {rates}", highlight=False)
    for gap in report["gaps"]:
        console.print(
            f"hard minus soft gate, context {gap['context']}: loss {_signed(gap['loss'])}, "
            f"bits/byte {_signed(gap['bits_per_byte'])}, spike rate {_signed(gap['spike_rate'])}",
            highlight=False,
        )


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
