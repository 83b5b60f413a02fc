"""A real browser for the console's tests: Debian's chromium, driven by Playwright.

Screenshots of each step go to $AP4K_SCREENSHOT_DIR (default: a temporary directory, printed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
# A screenshot of the page, by name: `await shot("1-queues")`.
Shot = Callable[[str], Awaitable[None]]


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("AP4K_SCREENSHOT_DIR")
    folder = Path(given) if given else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots in {folder}")
    return folder


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip("chromium is not installed")
    async with async_playwright() as p:
        # Playwright cannot download its own browser here: Debian's chromium it is.
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1300, "height": 860})
    opened = await context.new_page()
    yield opened
    await context.close()


@pytest.fixture
def shot(page: Page, screenshots: Path) -> Shot:
    async def take(name: str) -> None:
        await page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)

    return take
