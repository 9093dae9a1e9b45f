"""The browser tier (`make test-ui`): Debian's Chromium, headless, driven by Playwright.

Playwright's own browser download needs the internet; the system Chromium does not. The tier
is skipped, with the reason, where it is missing (`make test-ui` installs it first).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ViewportSize, async_playwright

CHROMIUM = Path(os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium"))
# Screenshots of every screen: into a temporary folder by default (a test run leaves the tree as
# it found it); `make screens` sends them to docs/screens for the README.
SCREENS = Path(os.environ.get("TANDEM_UI_SCREENS") or Path(tempfile.gettempdir()) / "tandem-ui-screens")
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test-ui` installs Debian's chromium")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        # --no-sandbox: the tier also runs as root in containers, where Chromium's sandbox cannot start.
        browser = await pw.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()
