"""Review persistence: password hashing, pseudonymised diagnoses, append-only audit rows, the secret."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

import apps.medical.orm  # noqa: F401 - registers the medical tables
from apps.medical import repository, service
from apps.medical.auth import hash_password, verify_password
from apps.medical.predictor import Diagnoser
from apps.medical.records import pseudonymise
from core.db import make_engine, upgrade_database
from core.errors import ConfigError, InputValidationError

SECRET = "s" * 32


def test_password_hash_accepts_the_password_and_rejects_others():
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert hash_password("correct horse") != stored  # salted
    with pytest.raises(InputValidationError, match="at least 8"):
        hash_password("short")


def test_authenticate_rejects_a_wrong_password_and_an_unknown_user(db_session):
    _, password = service.create_clinician(db_session, "alice", role="reviewer")
    assert service.authenticate(db_session, "alice", password).role == "reviewer"
    with pytest.raises(InputValidationError, match="login failed"):
        service.authenticate(db_session, "alice", password + "x")
    with pytest.raises(InputValidationError, match="login failed"):
        service.authenticate(db_session, "bob", password)
    with pytest.raises(InputValidationError, match="exists already"):
        service.create_clinician(db_session, "alice")


@pytest.fixture
def diagnosed(db_session, trained):
    diagnoser = Diagnoser.load(trained.model_dir)
    case = trained.test[2]
    stored, explanation = service.diagnose(
        db_session, diagnoser, series_dir=case.series_dir, record_file=case.record_file, secret=SECRET
    )
    clinician, _ = service.create_clinician(db_session, "carol")
    return stored, explanation, clinician, case


def test_diagnose_stores_a_pseudonymised_case_with_model_version_and_input_hash(
    db_session, trained, diagnosed
):
    stored, explanation, _, case = diagnosed
    assert stored.patient_pseudonym == pseudonymise(case.record.patient_id, SECRET)
    assert case.record.patient_id not in str(stored.evidence) and stored.status == "pending"
    assert stored.prediction == explanation.label and len(stored.model_version) == 16
    assert stored.input_hash == service.input_hash(case.series_dir, case.record_file)
    again, _ = service.diagnose(
        db_session,
        Diagnoser.load(trained.model_dir),
        series_dir=case.series_dir,
        record_file=case.record_file,
        secret=SECRET,
    )
    assert again.id == stored.id  # same inputs, same model: no duplicate row


def test_override_needs_a_reason_and_appends_an_audit_row(db_session, diagnosed):
    stored, _, clinician, _ = diagnosed
    with pytest.raises(InputValidationError, match="needs a reason"):
        service.review_case(
            db_session, case_id=stored.id, clinician=clinician, action="override", final_label="normal"
        )
    service.review_case(db_session, case_id=stored.id, clinician=clinician, action="accept")
    service.review_case(
        db_session,
        case_id=stored.id,
        clinician=clinician,
        action="override",
        final_label="normal",
        reason="old scar",
    )
    events = repository.list_reviews(db_session, stored.id)
    assert [e.action for e in events] == ["accept", "override"]
    assert events[1].reason == "old scar" and events[1].model_version == stored.model_version
    assert stored.status == "overridden" and stored.final_label == "normal"


def test_audit_rows_cannot_be_updated_or_deleted_through_the_orm(db_session, diagnosed):
    stored, _, clinician, _ = diagnosed
    event = service.review_case(db_session, case_id=stored.id, clinician=clinician, action="accept")
    with pytest.raises(InputValidationError, match="append-only"), db_session.begin_nested():
        db_session.delete(event)
        db_session.flush()
    with pytest.raises(InputValidationError, match="append-only"), db_session.begin_nested():
        event.reason = "rewritten"
        db_session.flush()
    assert [e.reason for e in repository.list_reviews(db_session, stored.id)] == [""]


def test_the_migrated_database_refuses_raw_updates_of_audit_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO clinicians (username, password_hash, role, created_at) VALUES ('a', 'h', 'clinician', '2026-01-01')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO diagnosis_cases (patient_pseudonym, record_path, input_hash, model_dir, model_version, "
                    "config_hash, prediction, probabilities, evidence, status, created_at) VALUES "
                    "('p', 'r', 'h', 'm', 'v', 'c', 'normal', '{}', '{}', 'pending', '2026-01-01')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO review_events (case_id, clinician_id, action, final_label, reason, model_version, "
                    "input_hash, created_at) VALUES (1, 1, 'accept', 'normal', '', 'v', 'h', '2026-01-01')"
                )
            )
        for statement in ("UPDATE review_events SET reason = 'x'", "DELETE FROM review_events"):
            with pytest.raises(DatabaseError, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def test_secret_comes_from_the_environment_or_is_generated_once(tmp_path):
    generated = service.load_secret(tmp_path, {})
    assert len(generated) == 64 and service.load_secret(tmp_path, {}) == generated
    assert (tmp_path / service.SECRET_FILE).stat().st_mode & 0o077 == 0
    assert service.load_secret(tmp_path, {"VERTICALS_SECRET": SECRET}) == SECRET
    with pytest.raises(ConfigError, match="at least 16"):
        service.load_secret(tmp_path, {"VERTICALS_SECRET": "short"})


def test_validation_split_is_deterministic_and_keeps_every_label_of_a_label_cycle(trained):
    cases = trained.train  # listed in a cycle of the five base labels
    train, validation = service.split_cases(cases)
    assert len(validation) == len(cases) // 5 and len(train) + len(validation) == len(cases)
    assert {c.label for c in validation} == {c.label for c in cases}
    assert [c.case_id for c in service.split_cases(cases)[1]] == [c.case_id for c in validation]
