"""Tables of the education app: exercises assigned to students from the recommendations."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import Float, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UTCDateTime, utc_now


class Assignment(Base):
    """One exercise assigned to a student (usually a recommendation a tutor accepted).

    Attributes:
        id: Surrogate key.
        student_id: The student (`user_id` of the interaction data).
        item_id: The assigned item (question).
        skill_id: Its skill.
        p_correct: Predicted success when it was assigned (None when assigned by hand).
        reason: Why it was assigned (the recommendation's reason, or the tutor's words).
        note: Optional tutor note.
        assigned_by: Who assigned it (tutor name, `"demo"`, `"cli"`).
        model_dir: The model that recommended it, for audit (None when assigned by hand).
        created_at: When it was assigned (UTC).
    """

    __tablename__ = "education_assignments"
    __table_args__ = (Index("ix_education_assignments_student_created_at", "student_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    student_id: Mapped[str] = mapped_column(String(128))
    item_id: Mapped[str] = mapped_column(String(256))
    skill_id: Mapped[str] = mapped_column(String(256))
    p_correct: Mapped[Optional[float]] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    note: Mapped[Optional[str]] = mapped_column(Text)
    assigned_by: Mapped[str] = mapped_column(String(128))
    model_dir: Mapped[Optional[str]] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def __repr__(self) -> str:
        return (
            f"Assignment(id={self.id!r}, student_id={self.student_id!r}, item_id={self.item_id!r}, "
            f"assigned_by={self.assigned_by!r})"
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the row."""
        return {
            "id": self.id,
            "student_id": self.student_id,
            "item_id": self.item_id,
            "skill_id": self.skill_id,
            "p_correct": self.p_correct,
            "reason": self.reason,
            "note": self.note,
            "assigned_by": self.assigned_by,
            "model_dir": self.model_dir,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }
