"""Regenerate the README's screenshots (docs/screenshots/*.png) from the demo, in Debian's headless chromium.

Usage:
    .venv/bin/python scripts/screenshots.py                      # a fresh demo in a temporary home
    .venv/bin/python scripts/screenshots.py --home /tmp/vt-shots  # keep the demo home afterwards
    .venv/bin/python scripts/screenshots.py --home ~/.verticals --password PASSWORD   # an existing demo home
        [--clinician NAME]    # another review account of that home (`verticals medical user add NAME`)

A new home runs `verticals demo --no-ui` first (a few minutes on 2 cores) and reads the demo clinician's
password from its output (printed once); an existing home needs `--password`. The suite is started on a
free port and each page is driven through the same user flows as the browser tests (tests/e2e/suite.py):
two alerts marked, a case overridden, an exercise assigned. Screenshots are of the viewport (1280 x 800 by
default), scrolled to each page's main content.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import suite  # noqa: E402 - the repository root is put on the path first

OUT = ROOT / "docs" / "screenshots"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, help="demo home (new: the demo runs; default a temporary one)")
    parser.add_argument("--password", help="the demo clinician's password, for a home that exists")
    parser.add_argument("--clinician", default="demo", help="review account for a home that exists")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    return parser.parse_args(argv)


def prepare_home(home: Path | None, password: str | None, clinician: str) -> suite.DemoHome:
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="verticals-screenshots-")) / "home"
    home = home.expanduser().resolve()
    if (home / "verticals.db").is_file():
        if password is None:
            raise SystemExit(
                f"error: {home} already holds a demo; pass --password (printed by its first run)"
            )
        return suite.DemoHome(home, f"sqlite:///{home / 'verticals.db'}", clinician, password, "")
    print(f"running `verticals demo --no-ui` in {home} (a few minutes) ...", flush=True)
    return suite.run_demo(home)


def demo_student(db_url: str) -> str:
    """A student the education demo assigned exercises to (so the page shows recommendations)."""
    from apps.education.repository import list_assignments
    from core.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            assignments = list_assignments(session)
    finally:
        engine.dispose()
    if not assignments:
        raise SystemExit("error: the education demo assigned no exercise; no student to show")
    return assignments[-1].student_id


def take(page, out: Path, name: str, anchor=None) -> None:
    path = suite.screenshot_at(page, out / f"{name}.png", anchor)
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def capture(
    demo: suite.DemoHome, server: suite.SuiteServer, out: Path, viewport: dict[str, int]
) -> list[str]:
    """Drive every page and save the screenshots; returns the browser console errors seen."""
    from playwright.sync_api import sync_playwright

    executable = suite.chromium_path()
    if executable is None:
        raise SystemExit("error: Debian chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=suite.CHROMIUM_FLAGS)
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(suite.ELEMENT_TIMEOUT_MS)
        page = context.new_page()
        errors = suite.watch_console(page)
        suite.open_suite(page, server.url)
        suite.heading(page, "Latest model per app").wait_for()
        take(page, out, "home")

        suite.go_to(page, "finance")
        suite.mark_alert(page, "analyst-1", "Confirm fraud", position=0)
        suite.mark_alert(page, "analyst-1", "False positive", position=1)
        take(page, out, "finance", suite.heading(page, "Fraud alerts"))
        take(page, out, "finance-account", suite.heading(page, "Account "))

        suite.go_to(page, "medical")
        suite.sign_in(page, demo.clinician, demo.password)
        page.get_by_test_id("stImage").locator("img").first.wait_for()
        take(page, out, "medical", page.locator(".st-key-medical_case"))
        suite.override_case(page, "Ground-glass pattern and raised CRP favour pneumonia.")
        take(page, out, "medical-audit", suite.heading(page, "Decision"))

        suite.go_to(page, "education")
        suite.heading(page, "Class overview").wait_for()
        take(page, out, "education", suite.heading(page, "Education"))
        suite.open_student(page, demo_student(demo.db_url))
        item = suite.dataframe(page, "item_id", "p_correct", "reason")[0]["item_id"]
        suite.assign_exercise(page, item, "tutor-1", "before Friday")
        take(page, out, "education-student", suite.heading(page, "Student"))
        take(page, out, "education-recommendations", page.get_by_text("Knowledge gaps", exact=True))
        browser.close()
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = prepare_home(args.home, args.password, args.clinician)
    server = suite.start_suite(demo.home, demo.db_url)
    try:
        print(f"suite on {server.url}; screenshots to {args.out}", flush=True)
        errors = capture(demo, server, args.out, {"width": args.width, "height": args.height})
    finally:
        suite.stop_suite(server)
    if errors:
        print(f"error: browser console errors: {errors}", file=sys.stderr)
        return 1
    print(f"demo home kept in {demo.home} (review login {demo.clinician} / {demo.password})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
