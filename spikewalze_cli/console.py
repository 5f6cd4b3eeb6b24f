"""The rich consoles and logging set-up that every command shares.

Logs, progress bars and tables go to stderr, so stdout carries only a command's product (the
generated text of `generate`, for example) and can be piped.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
stdout_console = Console()


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler = RichHandler(console=console, show_path=debug, show_time=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("datasets", "huggingface_hub", "urllib3", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        # The dataset loaders log a read error and then raise it, and the command reports it as
        # one line, so their own multi-line record would only repeat it.
        logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
