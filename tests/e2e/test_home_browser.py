"""The suite's Home page in headless Chromium after `verticals demo`: every app's model is listed."""

from __future__ import annotations

import pytest

from .suite import dataframe, heading, open_suite

# A real browser on the demo home: minutes, with the session's demo run (shared with the CLI test).
pytestmark = pytest.mark.slow


def test_home_page_lists_each_demo_model(demo_suite, browser_page) -> None:
    page = browser_page.page
    open_suite(page, demo_suite.url)
    heading(page, "Latest model per app").wait_for()
    heading(page, "Registered model runs").wait_for()
    # Each app's column shows its latest model's metrics (st.metric is drawn once its code has loaded).
    for app in ("finance", "medical", "education"):
        column = page.get_by_test_id("stColumn").filter(has=page.get_by_text(app, exact=True))
        column.get_by_test_id("stMetric").first.wait_for()
    assert page.get_by_text("No model yet").count() == 0
    runs = dataframe(page, "app", "model dir", "metrics")
    assert {row["app"] for row in runs} >= {"finance", "medical", "education"}
    browser_page.screenshot("home")
    browser_page.assert_clean_console()
