"""Drive the Streamlit suite in a real browser: start a server, wait for script runs, act on each app's page.

Shared by the end-to-end tests (`tests/e2e/`) and `scripts/screenshots.py`, so the documented screenshots
come from the same user flows the tests check. Pages are always reached through the sidebar, as a user does:
loading a deep URL such as ``/finance`` directly makes Streamlit probe ``/finance/_stcore/health`` first,
which logs a 404 console error.

Elements are found by their visible labels (the Playwright way); `st.dataframe` cells are read from the
accessible table the grid renders next to its canvas (visible rows only).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 1800  # about 3 min on an idle 2-core machine; far more when it is shared
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Page titles in the sidebar (apps/streamlit_app.py).
NAV = {
    "home": "Home",
    "finance": "Fraud detection",
    "medical": "CT + record diagnosis",
    "education": "Knowledge tracing",
}
# A script run on a loaded 2-core machine (first model load, class mastery) can take a while.
RUN_TIMEOUT_MS = 180_000
ELEMENT_TIMEOUT_MS = 60_000
# Printed once by the medical demo (apps/medical/service.py).
_DEMO_ACCOUNT = re.compile(r"review UI account (\S+) / password (\S+)")
_IDLE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return app !== null && app.getAttribute('data-test-connection-state') === 'CONNECTED'
    && app.getAttribute('data-test-script-state') === 'notRunning';
}"""
_MAIN_HEIGHT = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  return Math.ceil(main ? main.scrollHeight : document.documentElement.scrollHeight);
}"""
# Scroll an element to the top of the main block, below Streamlit's header bar.
_SCROLL_TO = """(el) => {
  el.scrollIntoView({block: 'start'});
  const main = el.closest('[data-testid="stMain"]');
  if (main) main.scrollBy(0, -72);
}"""
_GRID = """([required, match]) => {
  for (const frame of document.querySelectorAll('[data-testid="stDataFrame"]')) {
    if (frame.closest('[data-stale="true"]')) continue;
    const columns = Array.from(frame.querySelectorAll('table[role="grid"] thead th'), (c) => c.textContent.trim());
    const rows = Array.from(frame.querySelectorAll('table[role="grid"] tbody tr'),
      (row) => Array.from(row.querySelectorAll('td'), (cell) => cell.textContent.trim()));
    if (rows.length === 0 || !required.every((name) => columns.includes(name))) continue;
    const matches = (row) => Object.entries(match).every(([name, text]) => row[columns.indexOf(name)] === text);
    if (Object.keys(match).length === 0 || rows.some(matches)) return {columns, rows};
  }
  return null;
}"""


# ---------------------------------------------------------------------- demo home
@dataclass(frozen=True)
class DemoHome:
    """A home folder prepared by `verticals demo --no-ui`, with the demo clinician's login printed once."""

    home: Path
    db_url: str
    clinician: str
    password: str
    output: str


def run_demo(home: Path, timeout_s: float = DEMO_TIMEOUT_S) -> DemoHome:
    """Run `verticals --home HOME demo --no-ui` as a user would, in a subprocess, and parse its output.

    Raises:
        RuntimeError: the demo failed, timed out or printed no demo account (with the output's tail).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERTICALS_")}
    # One line per message (rich wraps at 80 columns when not on a terminal), no tqdm bars in the log.
    env.update(COLUMNS="200", TQDM_DISABLE="1")
    command = [sys.executable, "-m", "apps.cli", "--home", str(home), "demo", "--no-ui"]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`verticals demo --no-ui` did not finish within {timeout_s} s") from e
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"`verticals demo --no-ui` exited {completed.returncode}:\n{output[-4000:]}")
    account = _DEMO_ACCOUNT.search(completed.stdout)
    if account is None:
        raise RuntimeError(f"`verticals demo --no-ui` printed no demo review account:\n{output[-4000:]}")
    return DemoHome(
        home=home,
        db_url=f"sqlite:///{home / 'verticals.db'}",
        clinician=account.group(1),
        password=account.group(2),
        output=completed.stdout,
    )


# ---------------------------------------------------------------------- server and browser
def chromium_path() -> str | None:
    """Debian's chromium on PATH, or None (the tests then skip; never a browser download)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SuiteServer:
    """A Streamlit suite started on a free local port against its own home folder and database."""

    url: str
    home: Path
    db_url: str
    process: subprocess.Popen = field(repr=False)


def start_suite(home: Path, db_url: str, timeout_s: float = 90.0) -> SuiteServer:
    """Start `streamlit run apps/streamlit_app.py` and wait for its health endpoint.

    Raises:
        RuntimeError: the server exited or did not answer within `timeout_s` (with its log).
    """
    port = free_port()
    env = {**os.environ, "VERTICALS_HOME": str(home), "VERTICALS_DB_URL": db_url}
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "apps" / "streamlit_app.py"),
        "--server.headless=true",
        f"--server.port={port}",
        "--server.address=127.0.0.1",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
    ]
    log_path = home / "streamlit.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited early:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return SuiteServer(url=url, home=home, db_url=db_url, process=process)
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout_s} s:\n{log_path.read_text()}")


def stop_suite(server: SuiteServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


def watch_console(page: Page) -> list[str]:
    """Collect console errors and uncaught page errors of `page` into the returned (live) list."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    return errors


# ---------------------------------------------------------------------- generic Streamlit actions
def wait_for_run(page: Page, settle_ms: int = 300) -> None:
    """Wait until the app is connected and no script run is in progress; fail if the run raised.

    A short settle time first: a widget change reaches the server asynchronously, so right after an action
    the app can still report the previous run as finished.
    """
    page.wait_for_timeout(settle_ms)
    page.wait_for_function(_IDLE, timeout=RUN_TIMEOUT_MS)
    exceptions = page.get_by_test_id("stException").all_inner_texts()
    if exceptions:
        raise AssertionError(f"the page shows a Python exception: {exceptions[0][:2000]}")


def open_suite(page: Page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    wait_for_run(page)


def go_to(page: Page, name: str) -> None:
    """Open a page of the suite through its sidebar link (`name`: home, finance, medical, education)."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=NAV[name]).click()
    page.wait_for_url(re.compile(rf"/{'' if name == 'home' else name}$"))
    wait_for_run(page)


def combobox(page: Page, label: str) -> Locator:
    """The input of the selectbox or multiselect labelled `label`."""
    return page.get_by_role("combobox", name=label, exact=True)


def selectbox_value(page: Page, label: str) -> str:
    return combobox(page, label).input_value()


def choose(page: Page, label: str, option: str | int) -> str:
    """Pick an option of a selectbox or multiselect by its text or its index; returns the option's text."""
    box = combobox(page, label)
    open_list(page, box)
    if isinstance(option, str):
        box.fill(option)  # filters long lists (the option list is virtualised)
        item = page.get_by_role("option", name=option, exact=True)
    else:
        item = page.get_by_role("option").nth(option)
    text = item.inner_text().strip()
    item.click()
    return text


def open_list(page: Page, box: Locator, attempts: int = 3) -> None:
    """Click a combobox until its option list shows (a click during a rerun can be lost on a busy machine)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for attempt in range(attempts):
        box.click()
        try:
            page.get_by_role("option").first.wait_for(timeout=10_000)
            return
        except PlaywrightTimeoutError:
            if attempt == attempts - 1:
                raise
            wait_for_run(page)


def options(page: Page, label: str) -> list[str]:
    """The option texts of a (short) selectbox; the list is closed again afterwards."""
    box = combobox(page, label)
    open_list(page, box)
    texts = [text.strip() for text in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    return texts


def fill_text(page: Page, label: str, value: str) -> None:
    """Type into a text input or text area and leave it (the value is applied on blur, as for a user)."""
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.blur()


def click_button(page: Page, name: str) -> None:
    page.get_by_role("button", name=name, exact=True).click()


def alert_text(page: Page, pattern: str) -> str:
    """Wait for an `st.success`/`st.error`/`st.info` box whose text matches `pattern`; returns its text."""
    box = page.get_by_test_id("stAlert").filter(has_text=re.compile(pattern)).first
    box.wait_for(timeout=ELEMENT_TIMEOUT_MS)
    return box.inner_text()


def dataframe(page: Page, *columns: str, where: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The visible rows of the first non-empty `st.dataframe` that has all these `columns`, as column -> text.

    Waits for it (a dataframe's rows are drawn after its frame, and its accessible table can lag a frame
    behind the canvas); with `where`, also until one row has these exact cell texts.
    """
    match = where or {}
    required = [*columns, *match]
    found = page.wait_for_function(_GRID, arg=[required, match], timeout=ELEMENT_TIMEOUT_MS).json_value()
    return [dict(zip(found["columns"], cells, strict=False)) for cells in found["rows"]]


def screenshot_full(page: Page, path: Path) -> Path:
    """Screenshot the whole page content (Streamlit scrolls inside its main block, not the document)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    viewport = page.viewport_size or {"width": 1280, "height": 800}
    height = max(viewport["height"], min(page.evaluate(_MAIN_HEIGHT), 12_000))
    page.set_viewport_size({"width": viewport["width"], "height": height})
    try:
        page.wait_for_timeout(500)  # charts re-layout after a resize
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(viewport)
    return path


def screenshot_at(page: Page, path: Path, anchor: Locator | None = None) -> Path:
    """Screenshot the viewport, scrolled so that `anchor` (a heading, say) is at the top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if anchor is not None:
        anchor.evaluate(_SCROLL_TO)
        page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    return path


# ---------------------------------------------------------------------- the apps' user flows
def heading(page: Page, text: str | re.Pattern[str]) -> Locator:
    return page.get_by_test_id("stHeading").filter(has_text=text).first


def mark_alert(page: Page, analyst: str, action: str, position: int = 0) -> int:
    """On the fraud dashboard: sign the analyst name, pick the `position`-th alert, mark it; returns its id.

    `action` is the button text: "Confirm fraud" or "False positive".
    """
    fill_text(page, "Analyst name", analyst)
    wait_for_run(page)
    label = choose(page, "Alert", position)
    wait_for_run(page)
    alert_id = int(re.match(r"#(\d+)", label).group(1))
    click_button(page, action)
    alert_text(page, rf"alert #{alert_id}: \w+ recorded by {re.escape(analyst)}")
    wait_for_run(page)
    return alert_id


def sign_in(page: Page, username: str, password: str) -> None:
    fill_text(page, "Username", username)
    fill_text(page, "Password", password)
    wait_for_run(page)
    click_button(page, "Sign in")
    page.get_by_test_id("stSidebar").get_by_text(f"Signed in as {username}").wait_for(timeout=RUN_TIMEOUT_MS)
    wait_for_run(page)


def override_case(page: Page, reason: str) -> dict[str, Any]:
    """Override the selected case with another label and `reason`; returns case id, prediction, final label."""
    case_id = int(selectbox_value(page, "Case"))
    prediction = heading(page, "Model: ").inner_text().removeprefix("Model: ").strip()
    page.get_by_test_id("stRadio").get_by_text("override", exact=True).click()
    wait_for_run(page)
    final_label = next(label for label in options(page, "Final diagnosis") if label != prediction)
    choose(page, "Final diagnosis", final_label)
    wait_for_run(page)
    fill_text(page, "Reason (required to override)", reason)
    wait_for_run(page)
    click_button(page, "Submit decision")
    alert_text(page, rf"case {case_id}: override recorded")
    wait_for_run(page)
    return {"case_id": case_id, "prediction": prediction, "final_label": final_label}


def open_student(page: Page, student: str) -> None:
    choose(page, "Student", student)
    wait_for_run(page)
    page.get_by_text("Recommended exercises").wait_for()


def assign_exercise(page: Page, item_id: str, tutor: str, note: str) -> None:
    """Assign one recommended exercise of the open student (the form under the recommendations)."""
    choose(page, "Exercises to assign", item_id)
    page.keyboard.press("Escape")  # a multiselect's list stays open after a pick
    fill_text(page, "Assigned by", tutor)
    fill_text(page, "Note (optional)", note)
    click_button(page, "Assign")
    alert_text(page, r"Assigned 1 exercise\(s\) to ")
    wait_for_run(page)
