"""AppTest of the fraud dashboard: it renders alerts from the database and an analyst action persists."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

import apps.finance.orm  # noqa: F401 - registers the finance tables
from apps.finance import service
from apps.finance.orm import AlertAction
from apps.finance.synthetic import write
from core.db import make_engine, make_session_factory, upgrade_database
from core.repository import record_model_run

PAGE = str(Path(__file__).resolve().parents[3] / "apps" / "finance" / "ui.py")


@pytest.fixture
def dashboard_env(trained, tmp_path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(url)
    # The 30 accounts with the highest scores, so the queue has alerts whatever the tiny model learned.
    scores = pd.Series(trained.detector.predict_proba(trained.test), index=trained.test.index)
    keep = scores.groupby(trained.test["account_id"]).max().sort_values(ascending=False).index[:30]
    source = write(trained.test[trained.test["account_id"].isin(keep)], tmp_path / "incoming.parquet")
    report = service.score(trained.model_dir, source, tmp_path / "scores.csv", 5000, progress=False)
    assert report.alerts > 0
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        record_model_run(
            session,
            model_dir=trained.model_dir,
            app="finance",
            metrics={"average_precision": 0.5},
            data_fingerprint="x",
            code_version="t",
        )
        service.persist_alerts(session, report, source=str(source))
    engine.dispose()
    monkeypatch.setenv("VERTICALS_DB_URL", url)
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    return url


def test_confirming_an_alert_persists_the_analyst_and_time(dashboard_env) -> None:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    at.text_input(key="finance_analyst").input("alice").run()
    at.button(key="finance_confirm").click().run()

    assert not at.exception, at.exception
    engine = make_engine(dashboard_env)
    with make_session_factory(engine)() as session:
        actions = list(session.scalars(select(AlertAction)))
    engine.dispose()
    assert [(a.action, a.analyst) for a in actions] == [("confirm_fraud", "alice")]
    assert actions[0].created_at is not None


def test_an_action_without_analyst_name_shows_an_error(dashboard_env) -> None:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.button(key="finance_false_positive").click().run()

    assert not at.exception
    assert any("analyst" in e.value for e in at.error)
