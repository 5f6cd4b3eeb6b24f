"""The `spikewalze` command line. It parses options, loads the config and calls the library.

Every subcommand takes `--config PATH`, repeatable `--set dotted.key=value` overrides and `--debug`.
Path flags override the matching config keys. Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from spikewalze_cli import __version__
from spikewalze_cli.config import Config, load_config
from spikewalze_cli.console import console, setup_logging
from spikewalze_cli.errors import UserError

app = typer.Typer(
    name="spikewalze",
    help="Train, evaluate and sample Spike-Walze language models on German Wikipedia.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (see configs/). Default: built-in defaults.", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set train.max_steps=100. The value is parsed as YAML. Repeatable.",
        show_default=False,
    ),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
# evaluate and generate take the model, data and training settings from the run.
InferenceConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file whose eval and generate sections replace the run's.", show_default=False),
]
InferenceSetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        help="Override an eval.* or generate.* key, e.g. --set eval.max_batches=10. The value is parsed as YAML. Repeatable.",
        show_default=False,
    ),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spikewalze {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, evaluate and sample Spike-Walze language models on German Wikipedia."""


def _print_error(label: str, message: str) -> None:
    """Print one error line; the message is escaped, so brackets in paths or errors print as they are."""
    console.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _run(debug: bool, action: Callable[[], Any]) -> None:
    """Run `action`, turning known failures into one line on stderr and a non-zero exit."""
    setup_logging(debug)
    try:
        action()
    except UserError as error:
        if debug:
            console.print_exception()
        _print_error("error", str(error))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            console.print_exception()
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            # Writers outside spikewalze_cli.io (Arrow, datasets, safetensors) raise a bare OSError.
            _print_error("error", f"{error}; free space and run the command again")
            raise typer.Exit(2) from None
        if not debug:
            _print_error("internal error", f"{type(error).__name__}: {error} (rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def _config(path: Optional[Path], overrides: Optional[list[str]], extra: dict[str, Any]) -> Config:
    """Load the config and apply path flags, which win over both the file and `--set`."""
    flag_overrides = [f"{key}={value}" for key, value in extra.items() if value is not None]
    return load_config(path, [*(overrides or []), *flag_overrides])


@app.command("prepare-data")
def prepare_data_command(
    config: ConfigOption = None,
    input: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--input",
            "-i",
            help="Local parquet, JSONL, .txt or MediaWiki .xml/.xml.bz2 file. Repeatable. Default: stream the hub.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output data directory. Default: data.out.", show_default=False)] = None,
    max_articles: Annotated[
        Optional[int], typer.Option(help="Read at most N articles. Default: data.max_articles (all).", show_default=False)
    ] = None,
    set: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Read German Wikipedia, clean it, score each unit's difficulty and split it into stages."""

    def action() -> None:
        from spikewalze_cli.data import prepare_data

        extra: dict[str, Any] = {"data.out": _quoted(out), "data.max_articles": max_articles}
        if input:
            extra["data.inputs"] = "[" + ", ".join(_yaml_quote(str(path)) for path in input) + "]"
        prepare_data(_config(config, set, extra))

    _run(debug, action)


@app.command("build-tokenizer")
def build_tokenizer_command(
    config: ConfigOption = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Prepared data directory. Default: tokenizer.data, else data.out.", show_default=False)
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output tokenizer directory. Default: tokenizer.out.", show_default=False)] = None,
    set: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Train a byte-level BPE tokenizer on the training split and tokenize every split once."""

    def action() -> None:
        from spikewalze_cli.tokenizer import build_tokenizer

        build_tokenizer(_config(config, set, {"tokenizer.data": _quoted(data), "tokenizer.out": _quoted(out)}))

    _run(debug, action)


@app.command("train")
def train_command(
    config: ConfigOption = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared data directory. Default: train.data, else data.out.", show_default=False)] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option(help="Tokenizer directory. Default: train.tokenizer, else tokenizer.out.", show_default=False)
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory. Default: train.out.", show_default=False)] = None,
    set: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Train a model on prepared data, following the difficulty curriculum."""

    def action() -> None:
        from spikewalze_cli.training import train

        extra = {"train.data": _quoted(data), "train.tokenizer": _quoted(tokenizer), "train.out": _quoted(out)}
        train(_config(config, set, extra))

    _run(debug, action)


@app.command("resume")
def resume_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `spikewalze train`.", show_default=False)],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint directory to resume from. Default: the newest complete one.", show_default=False)
    ] = None,
    set: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Continue an interrupted run exactly where its checkpoint stopped."""

    def action() -> None:
        from spikewalze_cli.training import resume

        resume(run_dir, checkpoint=checkpoint, overrides=list(set or []))

    _run(debug, action)


@app.command("evaluate")
def evaluate_command(
    target: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.", show_default=False)],
    data: Annotated[Optional[Path], typer.Option(help="Prepared data directory. Default: the one the run used.", show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option(help="train or validation. Default: eval.split (validation).", show_default=False)] = None,
    context: Annotated[
        Optional[list[int]],
        typer.Option("--context", help="Context length in tokens. Repeatable. Default: the training context.", show_default=False),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.", show_default=False)] = None,
    config: InferenceConfigOption = None,
    set: InferenceSetOption = None,
    debug: DebugOption = False,
) -> None:
    """Report loss, perplexity, bits per byte, spike rates and FLOPs per token, soft and hard gate."""

    def action() -> None:
        from spikewalze_cli.evaluation import evaluate

        overrides = list(set or [])
        if split is not None:
            overrides.append(f"eval.split={split}")
        if context:
            overrides.append(f"eval.contexts=[{', '.join(str(n) for n in context)}]")
        evaluate(target, config_path=config, overrides=overrides, data=data, json_path=json_path)

    _run(debug, action)


@app.command("generate")
def generate_command(
    target: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.", show_default=False)],
    prompt: Annotated[
        Optional[str],
        typer.Option(help="Prompt text. Default: an interactive prompt on a terminal, else one prompt per stdin line.", show_default=False),
    ] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate. Default: generate.max_new_tokens (200).", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature; 0 is greedy. Default: generate.temperature (0.8).", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens. Default: generate.top_k (50).", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus mass in (0, 1]. Default: generate.top_p (0.95).", show_default=False)] = None,
    repetition_penalty: Annotated[
        Optional[float],
        typer.Option(help="Penalty >= 1 for tokens already seen; 1 disables it. Default: generate.repetition_penalty (1.1).", show_default=False),
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed. Default: generate.seed (0).", show_default=False)] = None,
    show_spikes: Annotated[bool, typer.Option("--show-spikes", help="Colour each token by how many layers ran the expert.")] = False,
    config: InferenceConfigOption = None,
    set: InferenceSetOption = None,
    debug: DebugOption = False,
) -> None:
    """Generate German text token by token with the hard gate and constant-size decoding state."""

    def action() -> None:
        from spikewalze_cli.generation import generate

        overrides = list(set or [])
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        overrides += [f"generate.{key}={value}" for key, value in sampling.items() if value is not None]
        generate(target, config_path=config, overrides=overrides, prompt=prompt, show_spikes=show_spikes)

    _run(debug, action)


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quoted(path: Optional[Path]) -> Optional[str]:
    return None if path is None else _yaml_quote(str(path))


def main() -> None:
    app(prog_name="spikewalze")


if __name__ == "__main__":
    sys.exit(main())
