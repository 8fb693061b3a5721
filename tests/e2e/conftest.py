"""Fixtures for end-to-end tests in a real browser: the Streamlit suite on a demo home and a headless Chromium.

The browser is Debian's `chromium` (installed by `make test` / CI as root; never a browser download), driven
by Playwright's Python package with `executable_path`; without it every test here skips, before the demo
runs. Screenshots go to `test-artifacts/screenshots/`. Any console error or uncaught page error fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .suite import (
    CHROMIUM_FLAGS,
    ELEMENT_TIMEOUT_MS,
    ROOT,
    SuiteServer,
    chromium_path,
    screenshot_full,
    start_suite,
    stop_suite,
    watch_console,
)

ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
VIEWPORT = {"width": 1400, "height": 1000}


def require_chromium() -> str:
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "Debian chromium is not installed (make test installs it when run as root: apt-get install chromium)"
        )
    return executable


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def demo_suite(browser, demo_home) -> Iterator[SuiteServer]:
    """The suite served against the session's demo home (after the browser, so no demo runs without one)."""
    server = start_suite(demo_home.home, demo_home.db_url)
    yield server
    stop_suite(server)


@dataclass
class BrowserPage:
    """A Playwright page plus the console errors it logged."""

    page: object
    console_errors: list[str]

    def screenshot(self, name: str) -> Path:
        """Save the whole page content to test-artifacts/screenshots/NAME.png."""
        return screenshot_full(self.page, ARTIFACTS / f"{name}.png")

    def assert_clean_console(self) -> None:
        """No console error, no uncaught page error, and no Python exception drawn by Streamlit."""
        assert self.console_errors == [], f"browser console errors: {self.console_errors}"
        exceptions = self.page.get_by_test_id("stException").all_inner_texts()
        assert exceptions == [], f"exceptions shown in the page: {exceptions}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def new_page(browser, request: pytest.FixtureRequest) -> Iterator[object]:
    """A factory of pages, each in its own browser context (a new Streamlit session), all watched for errors.

    When the test fails, each page's last state is saved as test-artifacts/screenshots/FAILED-<test>-<n>.png.
    """
    contexts, pages = [], []

    def make() -> BrowserPage:
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(ELEMENT_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        pages.append(BrowserPage(page=page, console_errors=watch_console(page)))
        return pages[-1]

    yield make
    if request.node.stash.get(_CALL_FAILED, False):
        for number, page in enumerate(pages):
            page.screenshot(f"FAILED-{request.node.name}-{number}")
    errors = [error for page in pages for error in page.console_errors]
    for context in contexts:
        context.close()
    if errors:
        pytest.fail(f"browser console errors: {errors}")


@pytest.fixture
def browser_page(new_page) -> BrowserPage:
    return new_page()
