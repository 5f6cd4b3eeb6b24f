"""`spikewalze generate`: a continuation of a prompt, printed token by token as it is sampled.

The prompt is fed one token at a time through the model's `step`, which keeps a fixed-size state,
so each new token costs the same however long the text already is. A prompt longer than the
training context passes through that rolling state and is not cut. The gpt baseline keeps a
key/value cache that grows with the text. It is fed only the last `context` tokens of the prompt,
and its cache is rebuilt from the last `context / 2` tokens whenever it is full.

Every prompt starts after a `<|doc|>` token, because training packs its units with `<|doc|>`
between them. Generation stops at the next `<|doc|>`, at the end of the unit the model writes, or
after `max_new_tokens` tokens.

Output: stdout gets the prompt and then the continuation, written as soon as each character is
complete. Token ids are decoded as one growing list, so a UTF-8 character split over two byte
tokens appears whole. A summary line (tokens, tokens/s, spike rate) goes to stderr. Interactive
prompts are not echoed, because the user has just typed them.
"""

from __future__ import annotations

import logging
import sys
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.text import Text

from spikewalze_cli.config import GenerateConfig
from spikewalze_cli.console import console, stdout_console
from spikewalze_cli.errors import UserError
from spikewalze_cli.device import resolve_device
from spikewalze_cli.evaluation import inference_config

log = logging.getLogger(__name__)

# Styles of a token by the share of layers that sent it to the expert, from none to all.
SPIKE_STYLES = ("default", "green", "yellow", "dark_orange", "bold red")


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seen_ids: Sequence[int] = (),
) -> int:
    """Pick the next token id from `logits` [V].

    The repetition penalty divides the positive logits of tokens in `seen_ids` and multiplies
    their negative ones. Temperature 0 takes the most likely token. Otherwise the logits are
    divided by the temperature, cut to the `top_k` most likely tokens, then to the smallest set
    whose probability reaches `top_p`, and one token is drawn with `generator`.
    """
    logits = logits.detach().float().cpu().clone()  # [V]

    if repetition_penalty != 1.0 and len(seen_ids) > 0:
        ids = torch.as_tensor(list(seen_ids), dtype=torch.long).unique()
        values = logits[ids]
        logits[ids] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)

    if temperature == 0:
        return int(torch.argmax(logits))

    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)

    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)

    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class GeneratedToken:
    """One sampled token and the gates its own step set: [n_layer] 0/1, or None for gpt."""

    id: int
    gates: torch.Tensor | None


@torch.no_grad()
def stream_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    settings: GenerateConfig,
    *,
    stop_ids: Sequence[int] = (),
    banned_ids: Sequence[int] = (),
    device: torch.device | str = "cpu",
    max_cache: int | None = None,
) -> Iterator[GeneratedToken]:
    """Feed `prompt_ids` through `model.step` and yield sampled tokens until a stop id or the limit.

    The generator is seeded with `settings.seed` on every call, so the same prompt, settings and
    seed give the same tokens. A stop id ends the stream without being yielded. `banned_ids`
    (the padding token) are never sampled. Each yielded token has already been fed to the model,
    so its gates are the expert decisions for that token.

    `max_cache` is for a model whose state grows (the gpt baseline). Only the last `max_cache`
    prompt tokens are fed, and a state that contains `max_cache` tokens is rebuilt from the last
    `max_cache // 2` of them, so positions stay within the trained context.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must contain at least one token")
    generator = torch.Generator().manual_seed(settings.seed)
    banned = torch.as_tensor(list(banned_ids), dtype=torch.long)
    stops = set(stop_ids)
    history = list(prompt_ids) if max_cache is None else list(prompt_ids[-max_cache:])

    def feed(tokens: Sequence[int]):
        state = model.init_state(1, device)
        for token in tokens:
            logits, state, _ = model.step(torch.tensor([token], device=device), state)  # logits [1, V]
        return logits, state

    logits, state = feed(history)
    seen = [token for token in prompt_ids if token not in stops]

    for _ in range(settings.max_new_tokens):
        next_logits = logits[0].float().cpu()
        if len(banned):
            next_logits[banned] = float("-inf")
        token = sample_next(
            next_logits,
            generator,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            settings.repetition_penalty,
            seen,
        )
        if token in stops:
            return

        if max_cache is not None and state.position >= max_cache:
            _, state = feed(history[-(max_cache // 2) :])
        logits, state, gates = model.step(torch.tensor([token], device=device), state)
        history.append(token)
        seen.append(token)
        yield GeneratedToken(token, None if gates is None else gates[:, 0].float().cpu())


# ----------------------------------------------------------------------------------------------
# Prompts and text output


def clean_prompt(text: str) -> str:
    """Return `text` without control characters other than newline and tab.

    Raises UserError when nothing but whitespace remains. Lone surrogates (undecodable bytes in a
    command-line argument) are removed as well, because the tokenizer cannot encode them.
    """
    cleaned = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"))
    if not cleaned.strip():
        raise UserError("the prompt is empty (control characters are removed); pass some text with --prompt")
    if len(cleaned) != len(text):
        log.warning("removed %d control characters from the prompt", len(text) - len(cleaned))
    return cleaned


class IncrementalDecoder:
    """Decode token ids one at a time and return the text they complete.

    Ids whose decoded text ends in U+FFFD (maybe an incomplete UTF-8 character) are held back
    until a later token completes it, and `finish` returns whatever is left. UTF-8 decoding
    restarts cleanly after each complete character. So decoding only the held-back ids gives the
    same text as decoding the whole list, at constant cost per token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.count = 0  # tokens pushed
        self.pending: list[int] = []  # ids after the last complete character

    def push(self, token_id: int) -> str:
        self.count += 1
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False) if self.pending else ""
        self.pending = []
        return text


def spike_style(spiked_layers: int, n_layer: int) -> str:
    """Return the rich style of a token that `spiked_layers` of `n_layer` layers sent to the expert."""
    index = round(spiked_layers / max(n_layer, 1) * (len(SPIKE_STYLES) - 1))
    return SPIKE_STYLES[index]


# ----------------------------------------------------------------------------------------------
# The command


class GenerationSession:
    """A loaded model with its tokenizer and sampling settings, continuing one prompt at a time."""

    def __init__(self, loaded, settings: GenerateConfig, device: torch.device, show_spikes: bool):
        self.model = loaded.model
        self.cfg = loaded.config.model
        self.tokens = loaded.tokens
        self.settings = settings
        self.device = device
        self.show_spikes = show_spikes and self.cfg.arch == "spikewalze"
        if show_spikes and not self.show_spikes:
            log.warning("--show-spikes has no effect: the gpt baseline has no spike gate")
        # The gpt cache grows with the text, so it is kept within the trained context.
        self.max_cache = self.cfg.context if self.cfg.arch == "gpt" else None

    def prompt_ids(self, prompt: str) -> list[int]:
        """Return `<|doc|>` and the token ids of the prompt."""
        ids = [self.tokens.doc_id, *self.tokens.tokenizer.encode(prompt, add_special_tokens=False).ids]
        if self.max_cache is not None and len(ids) > self.max_cache:
            log.warning(
                "the prompt has %d tokens, but the gpt baseline is fed only the last %d (its context)",
                len(ids),
                self.max_cache,
            )
        return ids

    def continue_prompt(self, prompt: str, echo: bool) -> None:
        """Write the continuation of `prompt` to stdout as it is sampled, then a summary to stderr."""
        if echo:
            stdout_console.print(Text(prompt, style="bold"), end="", soft_wrap=True)

        decoder = IncrementalDecoder(self.tokens.tokenizer)
        gate_rows: list[torch.Tensor] = []
        started = time.perf_counter()
        for token in stream_tokens(
            self.model,
            self.prompt_ids(prompt),
            self.settings,
            stop_ids=[self.tokens.doc_id],
            banned_ids=[self.tokens.pad_id],
            device=self.device,
            max_cache=self.max_cache,
        ):
            style = ""
            if token.gates is not None:
                gate_rows.append(token.gates)
                if self.show_spikes:
                    style = spike_style(int(token.gates.sum()), self.cfg.n_layer)
            piece = decoder.push(token.id)
            if piece:
                stdout_console.print(Text(piece, style=style), end="", soft_wrap=True)
        seconds = time.perf_counter() - started

        stdout_console.print(Text(decoder.finish()), soft_wrap=True)  # ends the line
        self._summary(decoder.count, seconds, gate_rows)

    def _summary(self, count: int, seconds: float, gate_rows: list[torch.Tensor]) -> None:
        parts = [f"{count} tokens", f"{count / seconds:.1f} tokens/s" if seconds > 0 else ""]
        if gate_rows:
            gates = torch.stack(gate_rows)  # [tokens, n_layer]
            per_layer = " ".join(f"{rate:.2f}" for rate in gates.mean(dim=0).tolist())
            parts.append(f"spike rate {gates.mean():.3f} (per layer {per_layer})")
        console.print(f"[dim]{', '.join(part for part in parts if part)}[/]", highlight=False)


def generate(
    target: Path,
    config_path: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    prompt: str | None = None,
    show_spikes: bool = False,
) -> None:
    """Continue `prompt`, or each prompt typed on a terminal or read line by line from stdin."""
    from spikewalze_cli.checkpoint import load_for_inference

    if prompt is not None:
        prompt = clean_prompt(prompt)

    loaded = load_for_inference(Path(target), device="cpu")
    config = inference_config(loaded.config, config_path, overrides)
    device = resolve_device(config.generate.device, "generate.device")
    loaded.model.to(device).eval()
    session = GenerationSession(loaded, config.generate, device, show_spikes)

    if session.show_spikes:
        legend = Text("expert layers per token: ")
        for spiked in range(session.cfg.n_layer + 1):
            legend.append(f"{spiked} ", style=spike_style(spiked, session.cfg.n_layer))
        console.print(legend)

    if prompt is not None:
        session.continue_prompt(prompt, echo=True)
    elif sys.stdin.isatty():
        _interactive(session)
    else:
        _prompts_from_stdin(session)


def _prompts_from_stdin(session: GenerationSession) -> None:
    """Continue each non-empty line of stdin as a prompt, skipping lines of only control characters."""
    continued = 0
    for number, line in enumerate(sys.stdin, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            text = clean_prompt(line)
        except UserError:
            log.warning("stdin line %d contains no text after removing control characters; skipped", number)
            continue
        if continued:
            stdout_console.print()  # a blank line between continuations
        session.continue_prompt(text, echo=True)
        continued += 1
    if not continued:
        raise UserError("stdin contained no prompt; pass --prompt TEXT or one prompt per line on stdin")


def _interactive(session: GenerationSession) -> None:
    """Read prompts in a loop with line editing and history; Ctrl-C stops a continuation, Ctrl-D exits."""
    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:  # not built on every platform
        pass

    console.print("[dim]Type a prompt and press Enter. Ctrl-C stops the text, Ctrl-D exits.[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            continue

        if not line.strip():
            continue
        try:
            text = clean_prompt(line)
        except UserError as error:
            console.print(f"[red]{error}[/]", highlight=False)
            continue

        try:
            session.continue_prompt(text, echo=False)
        except KeyboardInterrupt:
            stdout_console.print()
            console.print("[yellow]stopped[/]")
