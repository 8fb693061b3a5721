"""Medical app: ``clinicians``, ``diagnosis_cases`` and the append-only ``review_events`` audit trail.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-29 10:00:00

Besides the ORM guard in ``apps.medical.orm``, the database itself refuses UPDATE and DELETE on
``review_events`` (a trigger on SQLite and on PostgreSQL), so raw SQL cannot rewrite the audit trail either.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db

revision: str = "0004"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = ("medical",)
depends_on: str | Sequence[str] | None = None

_APPEND_ONLY = "review_events is append-only"


def upgrade() -> None:
    op.create_table(
        "clinicians",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clinicians")),
        sa.UniqueConstraint("username", name=op.f("uq_clinicians_username")),
    )
    op.create_table(
        "diagnosis_cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_pseudonym", sa.String(length=64), nullable=False),
        sa.Column("series_path", sa.String(length=1024), nullable=True),
        sa.Column("record_path", sa.String(length=1024), nullable=False),
        sa.Column("input_hash", sa.String(length=64), nullable=False),
        sa.Column("model_dir", sa.String(length=1024), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("prediction", sa.String(length=64), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("final_label", sa.String(length=64), nullable=True),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_diagnosis_cases")),
    )
    with op.batch_alter_table("diagnosis_cases", schema=None) as batch_op:
        batch_op.create_index("ix_diagnosis_cases_patient_pseudonym", ["patient_pseudonym"], unique=False)
        batch_op.create_index("ix_diagnosis_cases_status_created_at", ["status", "created_at"], unique=False)
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("clinician_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("final_label", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("input_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["diagnosis_cases.id"], name=op.f("fk_review_events_case_id_diagnosis_cases")
        ),
        sa.ForeignKeyConstraint(
            ["clinician_id"], ["clinicians.id"], name=op.f("fk_review_events_clinician_id_clinicians")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_events")),
    )
    with op.batch_alter_table("review_events", schema=None) as batch_op:
        batch_op.create_index("ix_review_events_case_id_created_at", ["case_id", "created_at"], unique=False)

    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER review_events_no_{verb.lower()} BEFORE {verb} ON review_events "
                f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION review_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER review_events_append_only BEFORE UPDATE OR DELETE ON review_events "
            "FOR EACH ROW EXECUTE FUNCTION review_events_append_only()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS review_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS review_events_no_delete")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS review_events_append_only ON review_events")
        op.execute("DROP FUNCTION IF EXISTS review_events_append_only()")
    with op.batch_alter_table("review_events", schema=None) as batch_op:
        batch_op.drop_index("ix_review_events_case_id_created_at")
    op.drop_table("review_events")
    with op.batch_alter_table("diagnosis_cases", schema=None) as batch_op:
        batch_op.drop_index("ix_diagnosis_cases_status_created_at")
        batch_op.drop_index("ix_diagnosis_cases_patient_pseudonym")
    op.drop_table("diagnosis_cases")
    op.drop_table("clinicians")
