"""The clinician review page, headless: login required, an override with a reason writes an audit row."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apps.medical import repository, service
from apps.medical.predictor import Diagnoser
from core.db import make_engine, make_session_factory, upgrade_database

PAGE = str(Path(__file__).resolve().parents[3] / "apps" / "medical" / "ui.py")
PASSWORD = "review-pass-123"


@pytest.fixture
def review_db(tmp_path, monkeypatch, trained):
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    diagnoser = Diagnoser.load(trained.model_dir)
    with factory() as session, session.begin():
        service.create_clinician(session, "dana", password=PASSWORD)
        service.create_clinician(session, "rex", role="reviewer", password=PASSWORD)
        case = trained.test[5]
        service.diagnose(
            session, diagnoser, series_dir=case.series_dir, record_file=case.record_file, secret="k" * 32
        )
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path))
    monkeypatch.setenv("VERTICALS_DB_URL", url)
    yield factory
    engine.dispose()


def _login(username: str, password: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.text_input(key="medical_login_username").input(username)
    at.text_input(key="medical_login_password").input(password)
    return at.button(key="medical_login").click().run()


def test_the_queue_needs_a_login_and_a_wrong_password_is_refused(review_db):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception and not at.dataframe  # nothing of the queue before login
    at = _login("dana", "wrong-password")
    assert not at.exception and "login failed" in at.error[0].value


def test_override_with_a_reason_writes_an_audit_row(review_db):
    at = _login("dana", PASSWORD)
    assert not at.exception, at.exception
    assert at.dataframe[0].value["patient"].iloc[0] != "hidden"
    at.radio(key="medical_action").set_value("override").run()
    at.selectbox(key="medical_final_label").set_value("tuberculosis")
    at.text_area(key="medical_reason").input("cavity on slice 5, TB contact")
    at.button(key="medical_submit").click().run()
    assert not at.exception and not at.error
    with review_db() as session:
        events = repository.list_reviews(session)
        assert [(e.action, e.final_label, e.reason) for e in events] == [
            ("override", "tuberculosis", "cavity on slice 5, TB contact")
        ]
        assert repository.list_cases(session)[0].status == "overridden"


def test_an_override_without_reason_shows_an_error_and_writes_nothing(review_db):
    at = _login("dana", PASSWORD)
    at.radio(key="medical_action").set_value("override").run()
    at.button(key="medical_submit").click().run()
    assert "needs a reason" in at.error[0].value
    with review_db() as session:
        assert repository.list_reviews(session) == []


def test_a_reviewer_sees_no_patient_identifier(review_db):
    at = _login("rex", PASSWORD)
    assert not at.exception
    assert list(at.dataframe[0].value["patient"]) == ["hidden"]
