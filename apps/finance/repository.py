"""Save and query fraud alerts and analyst actions; every function takes the caller's Session and never commits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from apps.finance.orm import ALERT_ACTIONS, AlertAction, FraudAlert
from core.errors import InputValidationError

ALERT_COLUMNS = ("transaction_id", "account_id", "timestamp", "amount", "score")


def save_alerts(
    session: Session, alerts: pd.DataFrame, *, model_version: str, source: str | None = None
) -> int:
    """Store alerts, skipping transactions that already have one (so a rerun of a job adds nothing twice).

    Args:
        session: the caller's session.
        alerts: one row per alert with `transaction_id, account_id, timestamp, amount, score`.
        model_version: the scoring model's version.
        source: the input the transactions came from.

    Returns:
        The number of new alerts added (flushed, not committed).

    Raises:
        InputValidationError: A column is missing.
    """
    missing = [c for c in ALERT_COLUMNS if c not in alerts.columns]
    if missing:
        raise InputValidationError(f"alerts: missing column(s) {missing}; expected {list(ALERT_COLUMNS)}")
    if alerts.empty:
        return 0
    ids = alerts["transaction_id"].astype(str).tolist()
    existing: set[str] = set()
    for start in range(0, len(ids), 500):
        existing.update(
            session.scalars(
                select(FraudAlert.transaction_id).where(
                    FraudAlert.transaction_id.in_(ids[start : start + 500])
                )
            )
        )
    added = 0
    for row in alerts.itertuples(index=False):
        if str(row.transaction_id) in existing:
            continue
        existing.add(str(row.transaction_id))
        session.add(
            FraudAlert(
                transaction_id=str(row.transaction_id),
                account_id=str(row.account_id),
                transaction_time=pd.Timestamp(row.timestamp).to_pydatetime(),
                amount=float(row.amount),
                score=float(row.score),
                model_version=model_version,
                source=source,
            )
        )
        added += 1
    session.flush()
    return added


def list_alerts(session: Session, *, open_only: bool = False, limit: int | None = None) -> list[FraudAlert]:
    """Alerts by descending score (with their actions loaded); `open_only` keeps those without an action."""
    query = select(FraudAlert).options(selectinload(FraudAlert.actions)).order_by(FraudAlert.score.desc())
    if open_only:
        query = query.where(~FraudAlert.actions.any())
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def get_alert(session: Session, alert_id: int) -> FraudAlert:
    """The alert with this id.

    Raises:
        InputValidationError: No such alert.
    """
    alert = session.get(FraudAlert, alert_id)
    if alert is None:
        raise InputValidationError(f"alert {alert_id} does not exist")
    return alert


def record_action(
    session: Session,
    alert_id: int,
    action: str,
    analyst: str,
    note: str | None = None,
    when: datetime | None = None,
) -> AlertAction:
    """Append an analyst's decision on an alert.

    Raises:
        InputValidationError: Unknown action, empty analyst name, or no such alert.
    """
    if action not in ALERT_ACTIONS:
        raise InputValidationError(f"action must be one of {list(ALERT_ACTIONS)}; got {action!r}")
    if not analyst or not analyst.strip():
        raise InputValidationError("analyst name is required to record an action")
    alert = get_alert(session, alert_id)
    row = AlertAction(alert=alert, action=action, analyst=analyst.strip(), note=note)
    if when is not None:
        row.created_at = when
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class DailyAlerts:
    """Alert volume of one day (by transaction date)."""

    day: str
    alerts: int
    confirmed: int
    false_positives: int


def alerts_per_day(session: Session) -> list[DailyAlerts]:
    """Alerts per transaction day with the count of each latest analyst decision."""
    days: dict[str, list[int]] = {}
    for alert in list_alerts(session):
        counts = days.setdefault(alert.transaction_time.strftime("%Y-%m-%d"), [0, 0, 0])
        counts[0] += 1
        if alert.actions:
            counts[1 if alert.actions[-1].action == "confirm_fraud" else 2] += 1
    return [DailyAlerts(day, *counts) for day, counts in sorted(days.items())]


def count_alerts(session: Session) -> int:
    return int(session.scalar(select(func.count(FraudAlert.id))) or 0)
