"""Save and query functions for the education tables; each takes the caller's Session and never commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from apps.education.orm import Assignment
from core.errors import InputValidationError

if TYPE_CHECKING:
    from apps.education.service import Recommendation


def add_assignments(
    session: Session,
    student_id: str,
    recommendations: Sequence[Recommendation],
    *,
    assigned_by: str,
    model_dir: Optional[str] = None,
    note: Optional[str] = None,
) -> list[Assignment]:
    """Assign recommended exercises to a student (added and flushed, not committed).

    Args:
        session: The caller's session.
        student_id: The student.
        recommendations: What to assign (`service.recommend` output).
        assigned_by: Who assigns them (non-empty).
        model_dir: The model that recommended them.
        note: Optional tutor note stored on every row.

    Returns:
        The new rows (with ids).

    Raises:
        InputValidationError: Empty student id or assigner.
    """
    if not str(student_id).strip():
        raise InputValidationError("student_id: expected a non-empty student id.")
    if not assigned_by or not assigned_by.strip():
        raise InputValidationError("assigned_by: expected who assigns the exercises (a non-empty name).")
    rows = [
        Assignment(
            student_id=str(student_id),
            item_id=r.item_id,
            skill_id=r.skill_id,
            p_correct=float(r.p_correct),
            reason=r.reason,
            note=note or None,
            assigned_by=assigned_by.strip(),
            model_dir=model_dir,
        )
        for r in recommendations
    ]
    session.add_all(rows)
    session.flush()
    return rows


def list_assignments(
    session: Session, *, student_id: Optional[str] = None, limit: Optional[int] = None
) -> list[Assignment]:
    """Assignments, newest first, optionally of one student only."""
    query = select(Assignment).order_by(Assignment.created_at.desc(), Assignment.id.desc())
    if student_id is not None:
        query = query.where(Assignment.student_id == str(student_id))
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))
