"""Finance tables: scored alerts and the analysts' actions on them."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlalchemy import Float, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, UTCDateTime, utc_now

ALERT_ACTIONS: tuple[str, ...] = ("confirm_fraud", "false_positive")
"""What an analyst can decide on an alert."""


class FraudAlert(Base):
    """A transaction whose score reached the model's alert threshold.

    Attributes:
        id: surrogate key (the alert id).
        transaction_id: the scored transaction (unique: an alert is raised once per transaction).
        account_id: its account.
        transaction_time: when the transaction happened (UTC).
        amount: its amount.
        score: fraud probability in [0, 1].
        model_version: the model that scored it (from the model directory's app.json).
        source: the input the transaction was read from (audit reference).
        created_at: when the alert was stored (UTC).
    """

    __tablename__ = "fraud_alerts"
    __table_args__ = (Index("ix_fraud_alerts_score", "score"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(128), unique=True)
    account_id: Mapped[str] = mapped_column(String(128), index=True)
    transaction_time: Mapped[datetime] = mapped_column(UTCDateTime())
    amount: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    source: Mapped[Optional[str]] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    actions: Mapped[list[AlertAction]] = relationship(
        back_populates="alert", order_by="AlertAction.created_at", cascade="all, delete-orphan"
    )

    def __repr__(self) -> str:
        return f"FraudAlert(id={self.id!r}, transaction_id={self.transaction_id!r}, score={self.score!r})"


class AlertAction(Base):
    """An analyst's decision on an alert (append-only; the latest one is the alert's status).

    Attributes:
        id: surrogate key.
        alert_id: the alert.
        action: one of `ALERT_ACTIONS`.
        analyst: who decided.
        note: optional free text.
        created_at: when (UTC).
    """

    __tablename__ = "alert_actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("fraud_alerts.id"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    analyst: Mapped[str] = mapped_column(String(128))
    note: Mapped[Optional[str]] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    alert: Mapped[FraudAlert] = relationship(back_populates="actions")

    def __repr__(self) -> str:
        return f"AlertAction(id={self.id!r}, alert_id={self.alert_id!r}, action={self.action!r}, analyst={self.analyst!r})"
