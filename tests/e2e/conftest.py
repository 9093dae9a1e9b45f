"""The whole stack for the end-to-end tests, with a scorer tuned for test-sized pools."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.cli.stack import Stack

# Small pools: the scorer must reach its auto-accept threshold within a test-sized corpus.
SCORER_ENV = {
    "TANDEM_SCORER_MIN_HUMAN_LABELS": "12",
    "TANDEM_SCORER_REFIT_EVERY": "4",
    "TANDEM_SCORER_REFIT_SECONDS": "0.5",
    "TANDEM_DRAIN_SECONDS": "5",
}


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, extra_env=SCORER_ENV)
    await asyncio.to_thread(s.start)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)
