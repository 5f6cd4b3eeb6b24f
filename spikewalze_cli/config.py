"""The typed configuration shared by every command.

One YAML file contains all sections (data, tokenizer, model, train, curriculum, eval, generate). Each
command reads the sections it needs; `--set dotted.key=value` overrides any key, with the value
parsed as YAML. Validation errors name the key, the value and what is allowed, and unknown keys
name the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spikewalze_cli.errors import UserError


class Section(BaseModel):
    # inf and nan pass every range check, so they are rejected as values in any section.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    """prepare-data: where articles come from and how they become scored training units."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Local parquet, JSONL, plain text or MediaWiki XML (.xml, .xml.bz2) files; empty streams the hub.",
    )
    hub_dataset: str = Field("wikimedia/wikipedia", description="Hugging Face hub dataset to stream.")
    hub_config: str = Field("20231101.de", description="Configuration (dump date and language) of the hub dataset.")
    max_articles: int | None = Field(None, ge=1, description="Read at most this many articles; null reads all.")
    out: str = Field("runs/data", description="Output data directory.")
    num_stages: int = Field(4, ge=1, le=26, description="Curriculum stages, A (easiest) onward, by score quantiles.")
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="Share of articles in the validation split.")
    seed: int = Field(0, description="Seed of the article split.")
    min_unit_chars: int = Field(200, ge=1, description="Shorter paragraphs are joined with the next one.")
    max_unit_chars: int = Field(2000, ge=64, description="Longer paragraphs are cut at sentence ends.")
    min_paragraph_chars: int = Field(20, ge=0, description="Drop paragraphs shorter than this (headings, stubs).")
    num_proc: int | None = Field(None, ge=1, description="Worker processes; null uses all cores.")
    max_vocab: int = Field(
        500_000, ge=1000, description="Word types kept for the rarity feature's corpus frequencies; rarer ones count as unseen."
    )

    @model_validator(mode="after")
    def _check_unit_bounds(self) -> DataConfig:
        if self.min_unit_chars > self.max_unit_chars:
            raise ValueError(
                f"min_unit_chars ({self.min_unit_chars}) must not exceed max_unit_chars ({self.max_unit_chars})"
            )
        return self


class TokenizerConfig(Section):
    """build-tokenizer: byte-level BPE trained on the training split."""

    data: str | None = Field(None, description="Prepared data directory; null uses data.out.")
    out: str = Field("runs/tokenizer", description="Output tokenizer directory.")
    # At least the 256 byte tokens plus the special tokens <|doc|> and <|pad|>.
    vocab_size: int = Field(
        8192, ge=256 + 2, le=1_000_000, description="Vocabulary size including the 256 byte tokens and 2 special tokens."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_units: int | None = Field(
        None, ge=1, description="Train BPE on at most this many training units, evenly spread; null uses all."
    )
    batch_units: int = Field(1000, ge=1, description="Units per encode_batch call when tokenizing the splits.")


class SpikeConfig(Section):
    """The spike detector and what it routes to the expert."""

    mode: Literal["learned", "always", "never"] = Field(
        "learned", description="learned gate, or the ablations: expert for every token, or for none."
    )
    expert: Literal["attention", "block"] = Field(
        "attention", description="Gate only the attention, or attention and feed-forward together."
    )
    target_rate: float = Field(0.3, ge=0.0, le=1.0, description="Mean gate value the regularizer pulls toward.")
    rate_loss_weight: float = Field(1.0, ge=0.0, description="Weight of the spike-rate regularizer in the loss.")
    detector_hidden: int = Field(32, ge=1, description="Hidden width of the spike detector MLP.")
    temperature_start: float = Field(1.0, gt=0.0, description="Gate temperature at the start of training.")
    temperature_end: float = Field(0.1, gt=0.0, description="Gate temperature at the end of training.")


class ModelConfig(Section):
    """Architecture and size. `arch: gpt` is the full-attention Transformer baseline."""

    arch: Literal["spikewalze", "gpt"] = Field("spikewalze", description="Model architecture.")
    n_layer: int = Field(4, ge=1, description="Number of layers.")
    n_head: int = Field(4, ge=1, description="Attention heads.")
    d_model: int = Field(256, ge=8, description="Hidden width.")
    mlp_ratio: float = Field(4.0, ge=0.0, description="Feed-forward width as a multiple of d_model; 0 removes it.")
    context: int = Field(256, ge=8, description="Training sequence length in tokens.")
    walze_kernel: int = Field(3, ge=1, description="Walze taps at the short lags 0..k-1.")
    walze_width: int = Field(16, ge=0, description="Grid width W: extra taps at lags W-1, W, W+1; 0 disables them.")
    window: int = Field(64, ge=1, description="Expert attention window in tokens (the token itself included).")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalization layer.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    rope_base: float = Field(10000.0, gt=1.0, description="RoPE frequency base.")
    tie_embeddings: bool = Field(True, description="Share input embedding and output projection weights.")
    spike: SpikeConfig = Field(default_factory=SpikeConfig)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(f"head size d_model/n_head ({self.d_model // self.n_head}) must be even for RoPE")
        if self.arch == "spikewalze" and self.window > self.context:
            raise ValueError(f"window ({self.window}) must not exceed context ({self.context})")
        return self


class TrainConfig(Section):
    """train and resume: optimisation, checkpoints and logging."""

    data: str | None = Field(None, description="Prepared data directory; null uses data.out.")
    tokenizer: str | None = Field(None, description="Tokenizer directory; null uses tokenizer.out.")
    out: str = Field("runs/train", description="Run directory.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_tokens: int = Field(8192, ge=8, description="Tokens per optimizer step (across all ranks).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass; the rest is accumulated.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0.0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup in optimizer steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (not applied to norms, biases, embeddings).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient norm clip; 0 disables it.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast with fp32 master weights, or fp32.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    seed: int = Field(1337, description="Seed of initialisation and data sampling.")
    eval_interval: int = Field(100, ge=1, description="Validate every this many steps.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    log_interval: int = Field(10, ge=1, description="Log metrics every this many steps.")
    checkpoint_interval: int = Field(100, ge=1, description="Save a checkpoint every this many steps.")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the newest K checkpoints (plus the best).")
    max_nonfinite_steps: int = Field(5, ge=1, description="Stop after this many non-finite losses in a row.")
    peak_flops: float | None = Field(None, gt=0.0, description="Peak FLOP/s for MFU; null measures it once.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard.")

    @model_validator(mode="after")
    def _check_lr(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class CurriculumConfig(Section):
    """Curriculum: the order in which training draws units of each difficulty stage."""

    schedule: Literal["none", "staged", "competence", "adaptive"] = Field(
        "competence", description="Sampling schedule over the difficulty stages."
    )
    stage_steps: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75],
        description="staged: fraction of training at which each stage's weight peaks.",
    )
    initial_competence: float = Field(0.1, gt=0.0, le=1.0, description="competence: share of the CDF open at step 0.")
    competence_steps: float = Field(0.5, gt=0.0, le=1.0, description="competence: fraction of training to reach 1.0.")
    adaptive_margin: float = Field(0.01, ge=0.0, description="adaptive: minimum relative validation loss gain.")
    adaptive_patience: int = Field(2, ge=1, description="adaptive: evaluations without gain before the next stage.")


class EvalConfig(Section):
    """evaluate: which split, how much of it, at which lengths."""

    split: Literal["train", "validation"] = Field("validation", description="Split to evaluate.")
    max_batches: int | None = Field(
        None, ge=1, description="Score at most this many batches per stage, evenly spread; null scores all."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per batch.")
    contexts: list[int] = Field(default_factory=list, description="Context lengths; empty uses model.context.")
    gate_modes: list[Literal["soft", "hard"]] = Field(
        default_factory=lambda: ["soft", "hard"], description="Gate modes to evaluate."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")

    @model_validator(mode="after")
    def _check_contexts(self) -> EvalConfig:
        invalid = [n for n in self.contexts if n < 1]
        if invalid:
            raise ValueError(f"contexts must be positive token counts, got {invalid}")
        return self


class GenerateConfig(Section):
    """generate: sampling settings."""

    max_new_tokens: int = Field(200, ge=1, description="Tokens to generate per prompt.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_k: int | None = Field(50, ge=1, description="Sample from the k most likely tokens; null disables it.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(
        1.1,
        ge=1.0,
        description="Penalize tokens already seen: positive logits are divided by it, negative ones multiplied; 1 disables it.",
    )
    seed: int = Field(0, description="Sampling seed; the same seed gives the same text.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")


class Config(Section):
    """The whole configuration file."""

    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)


def _closest_key(section: type[BaseModel] | None, key: str) -> str | None:
    if section is None:
        return None
    matches = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _section_at(path: tuple) -> type[BaseModel] | None:
    """Return the schema class that contains the last key of `path`."""
    section: type[BaseModel] = Config
    for key in path[:-1]:
        field = section.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section


def _describe_error(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        hint = _closest_key(_section_at(error["loc"]), str(error["loc"][-1]))
        suggestion = f"; did you mean '{'.'.join([*map(str, error['loc'][:-1]), hint])}'?" if hint else ""
        return f"{source}: unknown config key '{key}'{suggestion}"
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):
        return f"{source}: invalid config section '{key or 'top level'}': {message}"
    return f"{source}: invalid value {value!r} for config key '{key}': {message}"


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted_key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.key=value` and parse the value as YAML, so `1e-3`, `[1, 2]` and `null` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"invalid override {text!r}: expected dotted.key=value, for example train.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise UserError(f"invalid override {text!r}: the value is not valid YAML ({error})") from None
    return key.strip(), value


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, with errors that give the file and line."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{path}: YAML syntax error{line}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data, model, train, ...)")
    return tree


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (or the defaults when None), apply `--set` overrides and validate the result.

    An error in a key that an override set names the command line as its source, not the file.
    """
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    override_keys = []
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        override_keys.append(key)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        from_override = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in override_keys)
        raise UserError(_describe_error(first, "command line" if from_override else source)) from None


def validate_config(tree: dict, source: str = "config") -> Config:
    """Validate a config mapping; raise UserError naming the first bad key."""
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise UserError(_describe_error(error.errors()[0], source)) from None


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")


def config_hash(section: BaseModel) -> str:
    """Return a short SHA-256 of a config section, stable across runs and key order."""
    text = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_effective_config(config: Config, directory: Path) -> Path:
    """Write the effective config (after overrides) as `config.yaml` into `directory`."""
    from spikewalze_cli.io import atomic_write_text

    target = directory / "config.yaml"
    atomic_write_text(target, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))
    return target
