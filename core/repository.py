"""Save and query functions for the core tables; every function takes the caller's Session and never commits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import utc_now
from core.errors import InputValidationError
from core.orm import ModelRun


def _checked_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise InputValidationError(
            f"metrics: expected a mapping of name -> value, got {type(metrics).__name__}"
        )
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise InputValidationError(f"metrics: expected string keys, got {key!r}")
        try:
            # allow_nan=False: NaN/inf are not JSON, and PostgreSQL's JSON type rejects them.
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputValidationError(
                f"metrics[{key!r}]: expected a JSON value with finite numbers, got {value!r}"
            ) from e
    return dict(metrics)


def record_model_run(
    session: Session,
    *,
    model_dir: str | Path,
    app: str,
    metrics: Mapping[str, Any],
    data_fingerprint: str,
    code_version: str,
    domain: str | None = None,
    created_at: datetime | None = None,
) -> ModelRun:
    """Register a trained model directory and its metrics.

    The row is added and flushed (so it has an ``id``), not committed: the caller's ``session.begin()``
    block commits it.

    Args:
        session: the caller's session.
        model_dir: the model directory.
        app: app name, e.g. ``"finance"``.
        metrics: metric name -> JSON value (finite numbers), e.g. ``{"auc": 0.93}``.
        data_fingerprint: hash of the training data.
        code_version: version of the code that trained the model.
        domain: optional sub-domain.
        created_at: registration time (aware); now in UTC when None.

    Returns:
        The new `ModelRun`.

    Raises:
        InputValidationError: empty app name, metrics that are not JSON with finite numbers, or a naive
            `created_at`.
    """
    if not app or not app.strip():
        raise InputValidationError(f"app: expected a non-empty app name such as 'finance', got {app!r}")
    if created_at is not None and created_at.tzinfo is None:
        raise InputValidationError(
            f"created_at: expected a timezone-aware datetime, got naive {created_at.isoformat()}; "
            "use datetime.now(timezone.utc)"
        )
    run = ModelRun(
        model_dir=str(model_dir),
        app=app,
        domain=domain,
        metrics=_checked_metrics(metrics),
        data_fingerprint=data_fingerprint,
        code_version=code_version,
        created_at=created_at if created_at is not None else utc_now(),
    )
    session.add(run)
    session.flush()
    return run


def list_model_runs(session: Session, app: str | None = None) -> list[ModelRun]:
    """Registered runs, newest first.

    Args:
        session: the caller's session.
        app: only this app's runs; every app when None.
    """
    stmt = select(ModelRun).order_by(ModelRun.created_at.desc(), ModelRun.id.desc())
    if app is not None:
        stmt = stmt.where(ModelRun.app == app)
    return list(session.scalars(stmt))


def latest_model_run(session: Session, app: str) -> ModelRun | None:
    """The newest run of an app, None when the app has no registered run yet."""
    stmt = (
        select(ModelRun)
        .where(ModelRun.app == app)
        .order_by(ModelRun.created_at.desc(), ModelRun.id.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()
