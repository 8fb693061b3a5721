"""Education: the ``education_assignments`` table (exercises assigned to students).

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-29 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = ("education",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "education_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("student_id", sa.String(length=128), nullable=False),
        sa.Column("item_id", sa.String(length=256), nullable=False),
        sa.Column("skill_id", sa.String(length=256), nullable=False),
        sa.Column("p_correct", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("assigned_by", sa.String(length=128), nullable=False),
        sa.Column("model_dir", sa.String(length=1024), nullable=True),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_education_assignments")),
    )
    with op.batch_alter_table("education_assignments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_education_assignments_student_created_at", ["student_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("education_assignments", schema=None) as batch_op:
        batch_op.drop_index("ix_education_assignments_student_created_at")
    op.drop_table("education_assignments")
