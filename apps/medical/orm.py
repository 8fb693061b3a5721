"""Tables of the medical app: clinician accounts, diagnosed cases, and the append-only review audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, ForeignKey, Index, String, Text, event
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UTCDateTime, utc_now
from core.errors import InputValidationError

ROLES = ("clinician", "reviewer", "admin")
CASE_STATUSES = ("pending", "accepted", "overridden")
REVIEW_ACTIONS = ("accept", "override")


class Clinician(Base):
    """A local account of the review UI.

    Attributes:
        id: surrogate key.
        username: unique login name.
        password_hash: ``scrypt$n$r$p$salt$hash`` (see `apps.medical.auth`); never the password.
        role: ``clinician``, ``reviewer`` or ``admin``.
        created_at: creation time, UTC.
    """

    __tablename__ = "clinicians"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="clinician")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def __repr__(self) -> str:
        return f"Clinician(id={self.id!r}, username={self.username!r}, role={self.role!r})"


class DiagnosisCase(Base):
    """One diagnosed case: the model's output with everything needed to audit it later.

    Attributes:
        id: surrogate key.
        patient_pseudonym: HMAC-SHA256 pseudonym of the patient id (`apps.medical.records.pseudonymise`).
        series_path: the CT series folder the model read (None: a case without CT).
        record_path: the record file the model read.
        input_hash: SHA-256 over the series files and the record file as read.
        model_dir: the model directory used.
        model_version: first 16 hex digits of the SHA-256 of the model weights.
        config_hash: hash of the model's config.json.
        prediction: the predicted diagnosis.
        probabilities: class -> probability.
        evidence: CT attention map, top slices/regions and record-field effects (`Explanation.to_dict`).
        status: ``pending`` until reviewed, then ``accepted`` or ``overridden`` (the last review decides).
        final_label: the diagnosis after review (None while pending).
        created_at: diagnosis time, UTC.
    """

    __tablename__ = "diagnosis_cases"
    __table_args__ = (Index("ix_diagnosis_cases_status_created_at", "status", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_pseudonym: Mapped[str] = mapped_column(String(64), index=True)
    series_path: Mapped[Optional[str]] = mapped_column(String(1024))
    record_path: Mapped[str] = mapped_column(String(1024))
    input_hash: Mapped[str] = mapped_column(String(64))
    model_dir: Mapped[str] = mapped_column(String(1024))
    model_version: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    prediction: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    final_label: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def __repr__(self) -> str:
        return (
            f"DiagnosisCase(id={self.id!r}, prediction={self.prediction!r}, status={self.status!r}, "
            f"model_version={self.model_version!r})"
        )


class ReviewEvent(Base):
    """One clinician decision on a case: an append-only audit row (never updated or deleted).

    Attributes:
        id: surrogate key.
        case_id: the reviewed case.
        clinician_id: who decided.
        action: ``accept`` or ``override``.
        final_label: the diagnosis the clinician settled on.
        reason: the clinician's reason (required for an override).
        model_version: the model version the decision was made against.
        input_hash: the case's input hash at decision time.
        created_at: decision time, UTC.
    """

    __tablename__ = "review_events"
    __table_args__ = (Index("ix_review_events_case_id_created_at", "case_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("diagnosis_cases.id"))
    clinician_id: Mapped[int] = mapped_column(ForeignKey("clinicians.id"))
    action: Mapped[str] = mapped_column(String(16))
    final_label: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[str] = mapped_column(String(64))
    input_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def __repr__(self) -> str:
        return (
            f"ReviewEvent(id={self.id!r}, case_id={self.case_id!r}, clinician_id={self.clinician_id!r}, "
            f"action={self.action!r}, final_label={self.final_label!r})"
        )


@event.listens_for(ReviewEvent, "before_update")
def _refuse_update(mapper: Any, connection: Any, target: ReviewEvent) -> None:
    raise InputValidationError(
        f"review_events row {target.id}: audit rows are append-only; record a new review instead of editing"
    )


@event.listens_for(ReviewEvent, "before_delete")
def _refuse_delete(mapper: Any, connection: Any, target: ReviewEvent) -> None:
    raise InputValidationError(
        f"review_events row {target.id}: audit rows are append-only and cannot be deleted"
    )
