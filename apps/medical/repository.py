"""Save and query functions for the medical tables; every function takes the caller's Session and never commits.

The review audit trail is append-only: this module only inserts `ReviewEvent` rows and reads them (the ORM
refuses updates and deletes of them, and the migration adds database triggers that do the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from apps.medical.orm import CASE_STATUSES, REVIEW_ACTIONS, ROLES, Clinician, DiagnosisCase, ReviewEvent
from core.errors import InputValidationError


def add_clinician(
    session: Session, *, username: str, password_hash: str, role: str = "clinician"
) -> Clinician:
    """Create an account (flushed, not committed).

    Raises:
        InputValidationError: an empty or taken username, or an unknown role.
    """
    username = username.strip()
    if not username:
        raise InputValidationError("username: expected a non-empty login name")
    if role not in ROLES:
        raise InputValidationError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if get_clinician(session, username) is not None:
        raise InputValidationError(f"username {username!r} exists already; choose another")
    clinician = Clinician(username=username, password_hash=password_hash, role=role)
    session.add(clinician)
    session.flush()
    return clinician


def get_clinician(session: Session, username: str) -> Clinician | None:
    """The account called `username`, None when there is none."""
    return session.scalars(select(Clinician).where(Clinician.username == username.strip())).first()


def add_case(
    session: Session,
    *,
    patient_pseudonym: str,
    series_path: str | None,
    record_path: str,
    input_hash: str,
    model_dir: str,
    model_version: str,
    config_hash: str,
    prediction: str,
    probabilities: Mapping[str, float],
    evidence: Mapping[str, Any],
) -> DiagnosisCase:
    """Store a diagnosis as a pending case (flushed, not committed)."""
    case = DiagnosisCase(
        patient_pseudonym=patient_pseudonym,
        series_path=series_path,
        record_path=record_path,
        input_hash=input_hash,
        model_dir=model_dir,
        model_version=model_version,
        config_hash=config_hash,
        prediction=prediction,
        probabilities=dict(probabilities),
        evidence=dict(evidence),
        status="pending",
    )
    session.add(case)
    session.flush()
    return case


def get_case(session: Session, case_id: int) -> DiagnosisCase:
    """The case with this id.

    Raises:
        InputValidationError: no such case.
    """
    case = session.get(DiagnosisCase, case_id)
    if case is None:
        raise InputValidationError(f"case {case_id}: no such diagnosis case")
    return case


def list_cases(session: Session, status: str | None = None) -> list[DiagnosisCase]:
    """Cases, oldest first (the review queue order); only those with `status` when given."""
    stmt = select(DiagnosisCase).order_by(DiagnosisCase.created_at, DiagnosisCase.id)
    if status is not None:
        if status not in CASE_STATUSES:
            raise InputValidationError(f"status: expected one of {', '.join(CASE_STATUSES)}, got {status!r}")
        stmt = stmt.where(DiagnosisCase.status == status)
    return list(session.scalars(stmt))


def find_case_by_inputs(session: Session, input_hash: str, model_version: str) -> DiagnosisCase | None:
    """A case already diagnosed from the same inputs by the same model (so reruns do not duplicate it)."""
    stmt = select(DiagnosisCase).where(
        DiagnosisCase.input_hash == input_hash, DiagnosisCase.model_version == model_version
    )
    return session.scalars(stmt).first()


def add_review(
    session: Session,
    case: DiagnosisCase,
    clinician: Clinician,
    *,
    action: str,
    final_label: str,
    reason: str,
) -> ReviewEvent:
    """Append an audit row for a decision and set the case's status and final label (flushed, not committed).

    Raises:
        InputValidationError: an unknown action, or an override without a reason.
    """
    if action not in REVIEW_ACTIONS:
        raise InputValidationError(f"action: expected one of {', '.join(REVIEW_ACTIONS)}, got {action!r}")
    if action == "override" and not reason.strip():
        raise InputValidationError(f"case {case.id}: an override needs a reason; say why the model is wrong")
    event = ReviewEvent(
        case_id=case.id,
        clinician_id=clinician.id,
        action=action,
        final_label=final_label,
        reason=reason.strip(),
        model_version=case.model_version,
        input_hash=case.input_hash,
    )
    session.add(event)
    case.status = "accepted" if action == "accept" else "overridden"
    case.final_label = final_label
    session.flush()
    return event


def list_reviews(session: Session, case_id: int | None = None) -> list[ReviewEvent]:
    """Audit rows, oldest first; only one case's when `case_id` is given."""
    stmt = select(ReviewEvent).order_by(ReviewEvent.created_at, ReviewEvent.id)
    if case_id is not None:
        stmt = stmt.where(ReviewEvent.case_id == case_id)
    return list(session.scalars(stmt))


def clinician_names(session: Session, ids: list[int] | set[int]) -> dict[int, str]:
    """Account id -> username for the given ids."""
    if not ids:
        return {}
    rows = session.execute(select(Clinician.id, Clinician.username).where(Clinician.id.in_(list(ids))))
    return {row.id: row.username for row in rows}
