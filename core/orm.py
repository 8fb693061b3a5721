"""Tables owned by the core: the registry of trained model runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UTCDateTime, utc_now


class ModelRun(Base):
    """One trained model directory registered with its evaluation metrics.

    Attributes:
        id: surrogate key.
        model_dir: path of the model directory (``config.json`` + ``model.safetensors`` + ``app.json``).
        app: the app that trained it (``finance``, ``medical``, ``education``).
        domain: optional sub-domain the run is specialised to (a channel, a modality, a subject).
        metrics: metric name -> value as written to ``metrics.json`` (JSON-serialisable, finite numbers).
        data_fingerprint: hash of the training data (from ``app.json``), to tell runs on different data apart.
        code_version: version of the code that trained it (package version or git revision).
        created_at: registration time, timezone-aware UTC.
    """

    __tablename__ = "model_runs"
    __table_args__ = (Index("ix_model_runs_app_created_at", "app", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_dir: Mapped[str] = mapped_column(String(1024))
    app: Mapped[str] = mapped_column(String(32))
    domain: Mapped[Optional[str]] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    data_fingerprint: Mapped[str] = mapped_column(String(128))
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)

    def metrics_summary(self, digits: int = 4) -> str:
        """The metrics on one line, e.g. ``auc=0.9312 precision_at_100=0.41``."""
        parts = []
        for name, value in self.metrics.items():
            text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
            parts.append(f"{name}={text}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the row (``created_at`` as an ISO 8601 string with its UTC offset)."""
        return {
            "id": self.id,
            "app": self.app,
            "domain": self.domain,
            "model_dir": self.model_dir,
            "metrics": dict(self.metrics),
            "data_fingerprint": self.data_fingerprint,
            "code_version": self.code_version,
            "created_at": self.created_at.isoformat(),
        }

    def __repr__(self) -> str:
        return (
            f"ModelRun(id={self.id!r}, app={self.app!r}, domain={self.domain!r}, "
            f"model_dir={self.model_dir!r}, created_at={self.created_at!r})"
        )
