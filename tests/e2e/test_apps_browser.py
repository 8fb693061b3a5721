"""Each app's page in headless Chromium after `verticals demo`, driven as a user: the fraud analyst marks
alerts, the demo clinician overrides a case, the tutor opens a student and assigns an exercise. Every action
is checked in the page, again in a new browser session, and in the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.orm import Session

from core.db import make_engine, make_session_factory

from .suite import (
    assign_exercise,
    choose,
    dataframe,
    go_to,
    heading,
    mark_alert,
    open_student,
    open_suite,
    override_case,
    sign_in,
    wait_for_run,
)

# A real browser on the demo home: minutes, with the session's demo run (shared with the CLI test).
pytestmark = pytest.mark.slow

ANALYST = "e2e-analyst"
TUTOR = "e2e-tutor"


@contextmanager
def database(db_url: str) -> Iterator[Session]:
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def recent(when: datetime) -> bool:
    return datetime.now(timezone.utc) - when < timedelta(minutes=30)


def rows_by(rows: list[dict[str, str]], column: str) -> dict[str, dict[str, str]]:
    return {row[column]: row for row in rows}


def test_fraud_analyst_marks_alerts_and_the_decisions_persist(demo_suite, new_page) -> None:
    from apps.finance.repository import get_alert

    first = new_page()
    page = first.page
    open_suite(page, demo_suite.url)
    go_to(page, "finance")
    heading(page, "Alert queue").wait_for()
    queue = dataframe(page, "alert", "status", "decided by")
    assert queue and {row["status"] for row in queue} <= {"open", "confirm_fraud", "false_positive"}
    scores = [float(row["score"]) for row in queue]
    assert scores == sorted(scores, reverse=True)
    # The selected alert's account timeline and explanation are drawn below the queue.
    heading(page, "Account ").wait_for()
    page.get_by_test_id("stVegaLiteChart").nth(2).wait_for()  # score distribution, alerts per day, timeline
    confirmed = mark_alert(page, ANALYST, "Confirm fraud", position=0)
    dismissed = mark_alert(page, ANALYST, "False positive", position=1)
    assert confirmed != dismissed
    first.screenshot("finance")
    first.assert_clean_console()

    # A new browser session (not a cached page) shows both decisions with who made them.
    second = new_page()
    page = second.page
    open_suite(page, demo_suite.url)
    go_to(page, "finance")
    shown = rows_by(
        dataframe(page, "decided by", where={"alert": str(dismissed), "status": "false_positive"}), "alert"
    )
    assert shown[str(confirmed)]["status"] == "confirm_fraud"
    assert shown[str(dismissed)]["status"] == "false_positive"
    assert shown[str(confirmed)]["decided by"].startswith(f"{ANALYST} at ")
    second.screenshot("finance-reopened")
    second.assert_clean_console()

    with database(demo_suite.db_url) as session:
        for alert_id, action in ((confirmed, "confirm_fraud"), (dismissed, "false_positive")):
            last = get_alert(session, alert_id).actions[-1]
            assert (last.action, last.analyst) == (action, ANALYST)
            assert recent(last.created_at)


def test_clinician_overrides_a_case_and_the_audit_row_is_stored(demo_suite, demo_home, new_page) -> None:
    from apps.medical import repository

    first = new_page()
    page = first.page
    open_suite(page, demo_suite.url)
    go_to(page, "medical")
    first.screenshot("medical-login")
    sign_in(page, demo_home.clinician, demo_home.password)
    assert len(dataframe(page, "case", "prediction", "status")) >= 2, (
        "the review queue is empty after the demo"
    )
    choose(page, "Case", 1)  # open a case other than the preselected first one
    wait_for_run(page)
    # The slice viewer shows the CT with the evidence overlay, next to the model output.
    image = page.get_by_test_id("stImage").locator("img").first
    image.wait_for()
    assert image.evaluate("(img) => img.complete && img.naturalWidth > 0")
    reason = "e2e: lesion pattern and record favour another diagnosis"
    decided = override_case(page, reason)
    audit = dataframe(page, "clinician", where={"action": "override", "reason": reason})
    assert any(
        row["action"] == "override" and row["reason"] == reason and row["clinician"] == demo_home.clinician
        for row in audit
    ), audit
    first.screenshot("medical")
    first.assert_clean_console()

    # Signed in again in a new session: the case is in the overridden queue with its audit row.
    second = new_page()
    page = second.page
    open_suite(page, demo_suite.url)
    go_to(page, "medical")
    sign_in(page, demo_home.clinician, demo_home.password)
    choose(page, "Queue", "overridden")
    wait_for_run(page)
    choose(page, "Case", str(decided["case_id"]))
    wait_for_run(page)
    assert dataframe(page, "clinician", where={"action": "override", "reason": reason})
    second.screenshot("medical-audit")
    second.assert_clean_console()

    with database(demo_suite.db_url) as session:
        case = repository.get_case(session, decided["case_id"])
        assert (case.status, case.final_label) == ("overridden", decided["final_label"])
        event = repository.list_reviews(session, case.id)[-1]
        names = repository.clinician_names(session, {event.clinician_id})
        assert (event.action, event.reason, event.final_label) == ("override", reason, decided["final_label"])
        assert names[event.clinician_id] == demo_home.clinician
        assert event.model_version == case.model_version and event.input_hash == case.input_hash
        assert recent(event.created_at)


def test_tutor_opens_a_student_sees_recommendations_and_assigns_one(demo_suite, new_page) -> None:
    from apps.education import repository

    with database(demo_suite.db_url) as session:
        demo_assignments = repository.list_assignments(session)
    if not demo_assignments:
        pytest.fail("the education demo assigned no exercise: no student has recommendations")
    student = demo_assignments[-1].student_id

    browser = new_page()
    page = browser.page
    open_suite(page, demo_suite.url)
    go_to(page, "education")
    heading(page, "Class overview").wait_for()
    page.get_by_test_id("stVegaLiteChart").first.wait_for()  # the class mastery heat map
    open_student(page, student)
    page.get_by_test_id("stGraphVizChart").locator("svg").first.wait_for()
    recommendations = dataframe(page, "item_id", "p_correct", "reason")
    assert recommendations and all(row["reason"] for row in recommendations), recommendations
    item = recommendations[0]["item_id"]
    assign_exercise(page, item, TUTOR, "e2e")
    assigned = dataframe(page, "item_id", where={"item_id": item, "assigned_by": TUTOR})
    assert any(row["item_id"] == item and row["assigned_by"] == TUTOR for row in assigned), assigned
    browser.screenshot("education")
    browser.assert_clean_console()

    with database(demo_suite.db_url) as session:
        stored = repository.list_assignments(session, student_id=student)
    assert any(a.item_id == item and a.assigned_by == TUTOR and a.note == "e2e" for a in stored)
