"""The prepared data and tokenizer a run trains on, checked to belong together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spikewalze_cli.errors import UserError
from spikewalze_cli.io import sha256_file


@dataclass
class RunInputs:
    data_dir: Path
    tokenizer_dir: Path
    tokens: Any  # spikewalze_cli.tokenizer.TokenStore
    tokenizer_sha256: str
    data_manifest_sha256: str

    def describe(self) -> dict[str, str]:
        """Return the run.json fields that tie a run to its inputs."""
        return {
            "data_dir": str(self.data_dir),
            "tokenizer_dir": str(self.tokenizer_dir),
            "tokenizer_sha256": self.tokenizer_sha256,
            "data_manifest_sha256": self.data_manifest_sha256,
        }


def open_inputs(data_dir: Path, tokenizer_dir: Path) -> RunInputs:
    """Open the tokenizer directory and check that it was built from `data_dir` as it is now."""
    from spikewalze_cli.tokenizer import TokenStore

    data_dir, tokenizer_dir = Path(data_dir).resolve(), Path(tokenizer_dir).resolve()
    data_manifest = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise UserError(f"prepared data directory not found: {data_dir}; run `spikewalze prepare-data --out {data_dir}` or pass --data")
    if not data_manifest.is_file():
        raise UserError(f"prepared data directory {data_dir} is incomplete (no manifest.json); run `spikewalze prepare-data --out {data_dir}` again")

    tokens = TokenStore(tokenizer_dir)
    data_sha256 = sha256_file(data_manifest)
    if tokens.manifest.get("data_manifest_sha256") != data_sha256:
        raise UserError(
            f"the tokenizer in {tokenizer_dir} was built from other data than {data_dir} "
            f"(built from {tokens.manifest.get('data_dir')}); rebuild it with "
            f"`spikewalze build-tokenizer --data {data_dir} --out {tokenizer_dir}` or pass the matching --data"
        )
    return RunInputs(
        data_dir=data_dir,
        tokenizer_dir=tokenizer_dir,
        tokens=tokens,
        tokenizer_sha256=str(tokens.manifest["tokenizer_sha256"]),
        data_manifest_sha256=data_sha256,
    )
