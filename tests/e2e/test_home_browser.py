"""The suite's Home page in headless Chromium: registered models are listed and the console stays clean."""

from __future__ import annotations

import pytest

from core.db import make_engine, make_session_factory, upgrade_database
from core.repository import record_model_run

from .conftest import start_suite, stop_suite


@pytest.fixture
def suite(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db_url = f"sqlite:///{home / 'verticals.db'}"
    upgrade_database(db_url)
    engine = make_engine(db_url)
    with make_session_factory(engine)() as session, session.begin():
        record_model_run(
            session,
            model_dir=str(home / "models" / "finance"),
            app="finance",
            metrics={"average_precision": 0.71, "roc_auc": 0.93},
            data_fingerprint="abc123",
            code_version="test",
        )
    engine.dispose()
    server = start_suite(home, db_url)
    yield server
    stop_suite(server)


def test_home_page_lists_registered_models_without_console_errors(suite, browser_page) -> None:
    page = browser_page.page
    page.goto(suite.url, wait_until="networkidle")
    page.get_by_text("Registered model runs").wait_for(timeout=30_000)
    page.get_by_text("Latest model per app").wait_for()
    # st.metric renders after the layout: wait for the finance model's metric to appear.
    page.get_by_text("average_precision").first.wait_for(timeout=30_000)
    page.get_by_text("No model yet").first.wait_for()
    browser_page.screenshot("home")
    assert browser_page.console_errors == []
