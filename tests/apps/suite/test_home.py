"""The home page shows the routing heat map of a registered suite model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.db import make_engine, make_session_factory, upgrade_database
from core.repository import record_model_run

HOME_PAGE = str(Path(__file__).resolve().parents[3] / "apps" / "home.py")


def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> AppTest:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(url)
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    monkeypatch.setenv("VERTICALS_DB_URL", url)
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        record_model_run(
            session,
            model_dir=model_dir,
            app="suite",
            metrics={"on_group_min": 0.9},
            data_fingerprint="x",
            code_version="0",
        )
    engine.dispose()
    return AppTest.from_file(HOME_PAGE, default_timeout=30).run()


def test_home_shows_the_suite_routing_chart(suite_run, tmp_path, monkeypatch):
    at = _home(tmp_path, monkeypatch, suite_run.model_dir)
    assert not at.exception
    assert any(s.value == "Suite model routing" for s in at.subheader)
    assert at.get("vega_lite_chart")
    assert not at.warning


def test_home_warns_when_the_suite_directory_is_gone(tmp_path, monkeypatch):
    at = _home(tmp_path, monkeypatch, tmp_path / "missing")
    assert not at.exception
    assert "not a suite model directory" in at.warning[0].value
