"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real German data folder beside the checkout; tests that need it skip without it."""
    if not (SHARED_DATA / "dewiki-articles.parquet").is_file():
        pytest.skip(f"real German data not found at {SHARED_DATA} (only developer and CI machines have it)")
    return SHARED_DATA
