"""Finance: the ``fraud_alerts`` and ``alert_actions`` tables.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = ("finance",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fraud_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("transaction_time", core.db.UTCDateTime(), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=True),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fraud_alerts")),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_fraud_alerts_transaction_id")),
    )
    with op.batch_alter_table("fraud_alerts", schema=None) as batch_op:
        batch_op.create_index("ix_fraud_alerts_score", ["score"], unique=False)
        batch_op.create_index(op.f("ix_fraud_alerts_account_id"), ["account_id"], unique=False)
    op.create_table(
        "alert_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("analyst", sa.String(length=128), nullable=False),
        sa.Column("note", sa.String(length=1024), nullable=True),
        sa.Column("created_at", core.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"], ["fraud_alerts.id"], name=op.f("fk_alert_actions_alert_id_fraud_alerts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_actions")),
    )
    with op.batch_alter_table("alert_actions", schema=None) as batch_op:
        batch_op.create_index(op.f("ix_alert_actions_alert_id"), ["alert_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alert_actions", schema=None) as batch_op:
        batch_op.drop_index(op.f("ix_alert_actions_alert_id"))
    op.drop_table("alert_actions")
    with op.batch_alter_table("fraud_alerts", schema=None) as batch_op:
        batch_op.drop_index(op.f("ix_fraud_alerts_account_id"))
        batch_op.drop_index("ix_fraud_alerts_score")
    op.drop_table("fraud_alerts")
