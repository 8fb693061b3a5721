"""Tests of the Streamlit suite shell: the Home page and the router, run headless with AppTest."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.db import make_engine, make_session_factory, upgrade_database
from core.repository import record_model_run

APPS_DIR = Path(__file__).resolve().parents[2] / "apps"
HOME_PAGE = str(APPS_DIR / "home.py")
ROUTER = str(APPS_DIR / "streamlit_app.py")


@pytest.fixture
def suite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the pages at a fresh, migrated SQLite database under a temporary home; returns its URL."""
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(url)
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    monkeypatch.setenv("VERTICALS_DB_URL", url)
    return url


def _add_run(url: str) -> None:
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        record_model_run(
            session,
            model_dir="/models/finance/run-1",
            app="finance",
            domain="card",
            metrics={"auc": 0.9312, "precision_at_100": 0.41},
            data_fingerprint="sha256:abc",
            code_version="0.1.0",
            created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        )
    engine.dispose()


def test_home_shows_registered_model(suite_env: str) -> None:
    _add_run(suite_env)
    at = AppTest.from_file(HOME_PAGE, default_timeout=30).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["model dir"]) == ["/models/finance/run-1"]
    assert list(table["app"]) == ["finance"]
    assert "auc=0.9312" in table["metrics"][0]
    assert {m.label for m in at.metric} == {"auc", "precision_at_100"}
    assert any("ui.db" in md.value for md in at.markdown)
    assert not at.info


def test_home_filter_by_app(suite_env: str) -> None:
    _add_run(suite_env)
    at = AppTest.from_file(HOME_PAGE, default_timeout=30).run()
    at.selectbox(key="home_app_filter").select("finance").run()
    assert not at.exception
    assert len(at.dataframe[0].value) == 1


def test_home_empty_database_says_what_to_run(suite_env: str) -> None:
    at = AppTest.from_file(HOME_PAGE, default_timeout=30).run()
    assert not at.exception
    assert "verticals demo" in at.info[0].value
    assert not at.dataframe


def test_home_unmigrated_database_shows_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    monkeypatch.setenv("VERTICALS_DB_URL", f"sqlite:///{tmp_path / 'blank.db'}")
    at = AppTest.from_file(HOME_PAGE, default_timeout=30).run()
    assert not at.exception
    assert "verticals db upgrade" in at.error[0].value


def test_home_masks_database_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    monkeypatch.setenv("VERTICALS_DB_URL", "postgresql+nosuchdriver://alice:s3cret@db.example/v")
    at = AppTest.from_file(HOME_PAGE, default_timeout=30).run()
    assert not at.exception
    assert at.error  # the driver is missing: a typed error, shown as st.error
    page_text = " ".join(md.value for md in at.markdown) + " ".join(e.value for e in at.error)
    assert "s3cret" not in page_text and "alice:***@db.example" in page_text


def test_router_renders_home(suite_env: str) -> None:
    _add_run(suite_env)
    at = AppTest.from_file(ROUTER, default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "verticals"
    assert at.dataframe
