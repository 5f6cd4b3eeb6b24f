"""Crash-safe file writes shared by every command.

A file is written to a temporary name in the same directory, flushed to disk and renamed over
the target, so a reader sees either the old complete file or the new complete file. Directories
that several files make up are marked complete by a manifest written last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from spikewalze_cli.errors import UserError


def fsync_directory(directory: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain_os_error(error: OSError, target: Path) -> UserError:
    if error.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing {target}; free space and run the command again")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {target}: permission denied; choose a writable output directory")
    return UserError(f"failed to write {target}: {error.strerror or error}")


@contextmanager
def atomic_open(target: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `target` that replaces it only when the block ends without error."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _explain_os_error(error, target) from error
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, target)
        fsync_directory(target.parent)
    except OSError as error:
        temp_path.unlink(missing_ok=True)
        raise _explain_os_error(error, target) from error
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_open(target, "wb") as handle:
        handle.write(data)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(target: Path, payload: Any) -> None:
    atomic_write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, raising UserError that names `what` the file should have been."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what} is corrupt: {path} ({error}); recreate it") from None


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
