"""Finance use cases: the resumable batch scoring job, the real-time scorer, alert persistence and the demo."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from sqlalchemy import Boolean, Column, Float, MetaData, String, Table, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from apps.finance.adapters import (
    SqlSource,
    StreamValidator,
    parse_source,
    parse_transaction,
    read_source,
    validate,
    write_quarantine,
    write_table,
)
from apps.finance.encode import timestamp_micros
from apps.finance.predictor import FraudDetector
from apps.finance.repository import save_alerts
from core.errors import AdapterError, ConfigError, InputValidationError

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("transaction_id", "score", "is_alert", "model_version", "scored_at")
"""Columns of every scoring output, in order."""
_ALERT_EXTRA = ("account_id", "timestamp", "amount")
MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 100_000


@dataclass
class ScoreReport:
    """What a scoring job did.

    Attributes:
        rows: transactions scored; rejected: rows quarantined; alerts: rows at or above the threshold.
        chunks: chunks in the input; resumed_chunks: chunks found already done by an earlier run.
        seconds: wall time; rows_per_second: rows / seconds.
        output: where the scores went; quarantine: the side file of rejected rows, if any.
        alert_rows: the alerts (transaction_id, account_id, timestamp, amount, score).
        model_version: the scoring model.
    """

    rows: int
    rejected: int
    alerts: int
    chunks: int
    resumed_chunks: int
    seconds: float
    rows_per_second: float
    output: str
    quarantine: str | None
    alert_rows: pd.DataFrame
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "alert_rows"}


# ---------------------------------------------------------------------- batch job
def _chunks(src: Any, chunk_size: int, format: str, columns: Any) -> Iterator[pd.DataFrame]:
    return read_source(src, format=format, columns=columns, chunksize=chunk_size)


def _warm(detector: FraudDetector, history: Any, chunk_size: int, format: str, columns: Any) -> Any:
    state = detector.new_state()
    if history is not None:
        checker = StreamValidator("raise")
        for chunk in _chunks(history, chunk_size, format, columns):
            valid, _ = checker.validate(chunk)
            detector.encoder_.encode(valid, state)
    return state


def _atomic_write(df: pd.DataFrame, path: Path) -> None:
    """Write a table next to `path` then rename it over `path` (readers never see a partial file)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".csv.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    write_table(df, tmp)
    os.replace(tmp, path)


def _write_json(data: Mapping[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        TextColumn("{task.fields[rate]:,.0f} rows/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def score(
    model_dir: str | os.PathLike[str],
    input_src: Any,
    output_dst: str | os.PathLike[str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    history: Any = None,
    *,
    format: str = "canonical",
    columns: Any = None,
    on_invalid: str = "raise",
    console: Any = None,
    progress: bool = True,
    detector: FraudDetector | None = None,
    backend: str = "torch",
) -> ScoreReport:
    """Score a transaction source chunk by chunk, keeping each account's history across chunks.

    File outputs (`.csv`, `.csv.gz`, `.parquet`) are resumable: each chunk's scores go to a part file in
    `<output>.parts/` written atomically, and `manifest.json` lists the finished chunks; a rerun after a
    crash re-reads (but does not re-score) finished chunks to rebuild the account histories, scores the
    rest, then assembles the output atomically and removes the parts. Rerunning a finished job rewrites
    the same rows. SQL outputs (`URL::table`) replace each chunk's rows in one transaction keyed by
    `transaction_id` (a rerun re-scores every chunk and leaves no duplicate).

    Args:
        model_dir: A finance model directory.
        input_src: File path or `URL::TABLE` / `URL::SELECT ...` spec (see `apps.finance.sources`).
        output_dst: File path or `URL::TABLE`.
        chunk_size: Rows per chunk.
        history: Optional earlier transactions of the same accounts (context only, not scored).
        format, columns: Input format preset and column mapping (see `adapters.read_source`).
        on_invalid: "raise" (first bad row -> InputValidationError) or "quarantine" (bad rows to
            `<output>.rejected.csv`, the rest scored).
        console: rich Console for the progress bar.
        progress: Show the progress bar.
        detector: An already loaded detector (skips loading `model_dir`).
        backend: "torch" or "onnx" (ONNX Runtime, exported once into `<model_dir>/onnx`; same scores to ~1e-6).

    Returns:
        A `ScoreReport`.

    Raises:
        InputValidationError, AdapterError, ConfigError: Bad input, unreadable source, bad options.
    """
    started = time.perf_counter()
    detector = detector or FraudDetector.load(model_dir, backend=backend)
    target = parse_source(output_dst) if not isinstance(output_dst, SqlSource) else output_dst
    if isinstance(target, SqlSource) and target.table is None:
        raise ConfigError(f"output {output_dst}: a SQL output must name a table (URL::TABLE), not a query")
    state = _warm(detector, history, chunk_size, format, columns)
    checker = StreamValidator(on_invalid)
    version = detector.model_version_
    if isinstance(target, SqlSource):
        sink: _Sink = _SqlSink(target)
        quarantine_path = None
    else:
        sink = _FileSink(Path(target.path), str(input_src), version, chunk_size)
        quarantine_path = Path(f"{target.path}.rejected.csv")
    rows = rejected_rows = resumed = chunks = 0
    rejected_parts: list[pd.DataFrame] = []
    with _progress(console, progress) as bar:
        task = bar.add_task("scoring", total=None, rate=0.0)
        for index, chunk in enumerate(_chunks(input_src, chunk_size, format, columns)):
            chunks += 1
            valid, rejected = checker.validate(chunk)
            rejected_rows += len(rejected)
            if len(rejected):
                rejected_parts.append(rejected)
            windows = detector.encoder_.encode(valid, state)
            if sink.is_done(index):
                resumed += 1
            elif len(valid):
                scores = detector.score_windows(windows, len(valid))
                out = pd.DataFrame(
                    {
                        "transaction_id": valid["transaction_id"].to_numpy(dtype=object),
                        "score": scores.astype(np.float64),
                        "is_alert": scores >= detector.threshold_,
                        "model_version": version,
                        "scored_at": pd.Timestamp.now(tz="UTC").isoformat(),
                        # `.array` keeps the timestamp column's datetime dtype (`to_numpy` would build
                        # one Python Timestamp object per row).
                        **{c: valid[c].array for c in _ALERT_EXTRA},
                    }
                )
                sink.write(index, out)
            else:
                sink.write(index, None)
            rows += len(valid)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=rows, rate=rows / elapsed)
    alerts = sink.finish()
    if quarantine_path is not None and rejected_parts:
        write_quarantine(pd.concat(rejected_parts), quarantine_path)
    elif quarantine_path is not None and quarantine_path.exists():
        quarantine_path.unlink()
    seconds = time.perf_counter() - started
    return ScoreReport(
        rows=rows,
        rejected=rejected_rows,
        alerts=len(alerts),
        chunks=chunks,
        resumed_chunks=resumed,
        seconds=round(seconds, 3),
        rows_per_second=round(rows / max(seconds, 1e-9), 1),
        output=str(output_dst),
        quarantine=str(quarantine_path) if quarantine_path is not None and rejected_parts else None,
        alert_rows=alerts,
        model_version=version,
    )


class _Sink(Protocol):
    """Where a job's chunks go: `is_done` (finished by an earlier run), `write` one chunk, `finish`."""

    def is_done(self, index: int) -> bool: ...

    def write(self, index: int, scored: pd.DataFrame | None) -> None: ...

    def finish(self) -> pd.DataFrame: ...


class _FileSink:
    """Part files + manifest beside the output; the final file is assembled and renamed into place."""

    def __init__(self, path: Path, source: str, version: str, chunk_size: int) -> None:
        self.path = path
        self.parts = Path(f"{path}.parts")
        self.key = {"input": source, "model_version": version, "chunk_size": chunk_size}
        manifest = self.parts / MANIFEST
        self.done: list[int] = []
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if {k: saved.get(k) for k in self.key} == self.key:
                self.done = [int(i) for i in saved["done"]]
            else:
                logger.warning("%s belongs to another job (%s); starting over", self.parts, saved)
                shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)

    def _part(self, index: int) -> Path:
        return self.parts / f"part-{index:06d}.parquet"

    def is_done(self, index: int) -> bool:
        return index in self.done and self._part(index).is_file()

    def write(self, index: int, scored: pd.DataFrame | None) -> None:
        if scored is None:
            scored = pd.DataFrame({c: [] for c in (*OUTPUT_COLUMNS, *_ALERT_EXTRA)})
        write_part(scored, self._part(index))
        self.done.append(index)
        _write_json({**self.key, "done": sorted(set(self.done))}, self.parts / MANIFEST)

    def finish(self) -> pd.DataFrame:
        frames = [pd.read_parquet(self._part(i)) for i in sorted(set(self.done))]
        frames = [f for f in frames if len(f)]
        full = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame({c: [] for c in (*OUTPUT_COLUMNS, *_ALERT_EXTRA)})
        )
        if full["transaction_id"].duplicated().any():
            raise InputValidationError(
                f"{self.parts}: duplicate transaction ids across parts; delete it and rerun"
            )
        _atomic_write(full[list(OUTPUT_COLUMNS)], self.path)
        shutil.rmtree(self.parts)
        alerts = full[full["is_alert"].astype(bool)]
        return alerts[["transaction_id", *_ALERT_EXTRA, "score"]].reset_index(drop=True)


def write_part(scored: pd.DataFrame, path: Path) -> None:
    """Write one chunk's scores atomically (a crash leaves either the whole part or none)."""
    _atomic_write(scored, path)


class _SqlSink:
    """Each chunk's rows replace any earlier rows of the same transaction ids, in one transaction."""

    def __init__(self, target: SqlSource) -> None:
        self.engine = create_engine(target.url)
        schema, _, name = target.table.rpartition(".")
        self.table = Table(
            name,
            MetaData(schema=schema or None),
            Column("transaction_id", String(128), primary_key=True),
            Column("score", Float, nullable=False),
            Column("is_alert", Boolean, nullable=False),
            Column("model_version", String(64), nullable=False),
            Column("scored_at", String(40), nullable=False),
        )
        self.alerts: list[pd.DataFrame] = []
        try:
            self.table.metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            raise AdapterError(f"cannot create output table {target}: {e}") from e

    def is_done(self, index: int) -> bool:
        return False

    def write(self, index: int, scored: pd.DataFrame | None) -> None:
        if scored is None or scored.empty:
            return
        ids = scored["transaction_id"].astype(str).tolist()
        records = scored[list(OUTPUT_COLUMNS)].assign(transaction_id=ids).to_dict("records")
        for record in records:
            record["is_alert"] = bool(record["is_alert"])
        with self.engine.begin() as connection:
            for start in range(0, len(ids), 500):
                connection.execute(
                    self.table.delete().where(self.table.c.transaction_id.in_(ids[start : start + 500]))
                )
            connection.execute(self.table.insert(), records)
        alerts = scored[scored["is_alert"]]
        self.alerts.append(alerts[["transaction_id", *_ALERT_EXTRA, "score"]])

    def finish(self) -> pd.DataFrame:
        self.engine.dispose()
        frames = [a for a in self.alerts if len(a)]
        return (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame(columns=["transaction_id", *_ALERT_EXTRA, "score"])
        )


def persist_alerts(session: Session, report: ScoreReport, source: str | None = None) -> int:
    """Store a job's alerts in the database (already stored transactions are skipped); returns how many were new."""
    return save_alerts(session, report.alert_rows, model_version=report.model_version, source=source)


# ---------------------------------------------------------------------- real time
@dataclass(frozen=True)
class RealtimeScore:
    """The score of one transaction: id, probability, alert flag, model version and the latency in ms."""

    transaction_id: str
    score: float
    is_alert: bool
    model_version: str
    milliseconds: float


class RealtimeScorer:
    """Scores one transaction at a time from a per-account state (its last K-1 encoded transactions,
    running amount statistics and the delayed-label merchant store), updated as transactions arrive.

    A transaction gets the same score as in the batch job given the same earlier transactions. With a
    detector loaded with `backend="onnx"` the window runs straight through the ONNX Runtime session (numpy
    in, the last token's logits out). A service should call `gc.freeze()` once the scorer is warmed up, so
    the long-lived account state is not rescanned by the garbage collector (fewer latency spikes).

    Args:
        detector: A fitted or loaded `FraudDetector`.
        history: Earlier transactions (canonical, validated) to warm the state with.
    """

    def __init__(self, detector: FraudDetector, history: pd.DataFrame | None = None) -> None:
        self.detector = detector
        self.state = detector.new_state()
        if history is not None and len(history):
            detector.encoder_.encode(history, self.state)
        self._seen: set[str] = set()
        model = detector.model_
        config = getattr(model, "config", None)
        last_token_logits = getattr(config, "classifier_pooling", None) == "last"
        session, meta = getattr(model, "session", None), getattr(model, "meta", None)
        self._onnx_inputs: dict[str, Any] | None = None
        if last_token_logits and session is not None and meta and "logits" in meta.get("outputs", ()):
            self._onnx_inputs = meta["inputs"]
        self._last_token_logits = last_token_logits

    def score(self, record: Mapping[str, Any]) -> RealtimeScore:
        """Validate, encode and score one transaction, then add it to its account's history.

        Args:
            record: Canonical fields (see `adapters.parse_transaction`).

        Raises:
            InputValidationError: Invalid fields, a repeated transaction id, or a timestamp earlier than
                the account's latest transaction.
        """
        started = time.perf_counter()
        tx = parse_transaction(record)
        if tx.transaction_id in self._seen:
            raise InputValidationError(f"transaction_id {tx.transaction_id!r} was already scored")
        history = self.state.accounts.get(tx.account_id)
        micros = timestamp_micros(tx.timestamp)
        if history is not None and history.last_us is not None and micros < history.last_us:
            raise InputValidationError(
                f"transaction {tx.transaction_id!r}: timestamp {tx.timestamp.isoformat()} is earlier than the "
                f"account's latest transaction; transactions of an account must arrive in time order"
            )
        example, position = self.detector.encoder_.encode_one(tx, self.state)
        self._seen.add(tx.transaction_id)
        probability = self._probability(example, position)
        return RealtimeScore(
            tx.transaction_id,
            probability,
            probability >= self.detector.threshold_,
            self.detector.model_version_,
            round(1000 * (time.perf_counter() - started), 3),
        )

    def _probability(self, example: Mapping[str, Any], position: int) -> float:
        """Fraud probability of the token at `position` (the window's last token) of one example."""
        last = position == len(example["time_delta"]) - 1
        if self._onnx_inputs is not None and last:
            (logits,) = self.detector.model_.session.run(["logits"], _onnx_feed(example, self._onnx_inputs))
            return float(1.0 / (1.0 + np.exp(float(logits[0, 0]) - float(logits[0, 1]))))  # softmax[1]
        with torch.inference_mode():
            out = self.detector.model_(**_single_batch(example))
            if self._last_token_logits and last:
                logits = out.logits  # (1, 2): the pooled logits are the last token's
            else:
                logits = self.detector.model_.classifier(out.hidden_states[:, position])  # (1, 2)
            return float(torch.softmax(logits.float(), dim=-1)[0, 1])


def _onnx_feed(example: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ONNX Runtime inputs of one example (batch of one); ids come from the saved vocabularies, so in range."""
    dtypes = {"bool": np.bool_, "int64": np.int64, "float32": np.float32}
    length = len(example["time_delta"])
    values = {
        "attention_mask": np.ones((1, length), np.bool_),
        **{f"categorical.{name}": ids[None] for name, ids in example["categorical"].items()},
        "numeric": example["numeric"][None],
        "numeric_mask": example["numeric_mask"][None],
        "time_delta": example["time_delta"][None],
        "domain_ids": example["domain_ids"][None],
    }
    missing = sorted(set(inputs) - set(values))
    if missing:
        raise ConfigError(f"the ONNX graph needs inputs {missing} that the finance encoder does not make")
    return {
        name: np.ascontiguousarray(values[name], dtype=dtypes[spec["dtype"]]) for name, spec in inputs.items()
    }


def _single_batch(example: Mapping[str, Any]) -> dict[str, Any]:
    """The model inputs of one example as a batch of one (what `collate([example])` gives, without padding)."""
    length = len(example["time_delta"])
    return {
        "attention_mask": torch.ones(1, length, dtype=torch.bool),
        "categorical": {
            name: torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[None]
            for name, ids in example["categorical"].items()
        },
        "numeric": torch.from_numpy(np.ascontiguousarray(example["numeric"], dtype=np.float32))[None],
        "numeric_mask": torch.from_numpy(np.ascontiguousarray(example["numeric_mask"], dtype=bool))[None],
        "time_delta": torch.from_numpy(np.ascontiguousarray(example["time_delta"], dtype=np.float32))[None],
        "domain_ids": torch.from_numpy(np.ascontiguousarray(example["domain_ids"], dtype=np.int64))[None],
    }


# ---------------------------------------------------------------------- demo
DEMO_ACCOUNTS = 600
DEMO_DAYS = 35
DEMO_SCORE_DAYS = 7
DEMO_ALERTS_PER_DAY = 15.0


def demo(home: Path, session_factory: sessionmaker[Session], console: Any) -> None:
    """Generate demo transactions, train and register a small model, score the last week, store alerts.

    A second run reuses the data, the model and the alerts that exist.
    """
    from apps.finance.synthetic import generate, write
    from core.repository import record_model_run
    from core.train import code_version

    folder = Path(home) / "finance"
    folder.mkdir(parents=True, exist_ok=True)
    history_path, incoming_path = folder / "history.parquet", folder / "incoming.parquet"
    model_dir, scores_path = folder / "model", folder / "scores.csv"
    if not (history_path.is_file() and incoming_path.is_file()):
        console.print(f"finance: generating {DEMO_ACCOUNTS} accounts x {DEMO_DAYS} days of transactions")
        df = generate(DEMO_ACCOUNTS, DEMO_DAYS, seed=0)
        cut = df["timestamp"].min().normalize() + pd.Timedelta(days=DEMO_DAYS - DEMO_SCORE_DAYS)
        write(df[df["timestamp"] < cut], history_path)
        write(df[df["timestamp"] >= cut], incoming_path)
    if not (model_dir / "app.json").is_file():
        console.print("finance: training the fraud model (two stages, about a minute on 2 cores)")
        train_df, _ = validate(read_source(history_path))
        detector = FraudDetector(
            epochs=4, pretrain_epochs=0.5, batch_size=64, learning_rate=2e-3, alert_budget=DEMO_ALERTS_PER_DAY
        ).fit(train_df)
        detector.save(model_dir)
        scalar = {k: v for k, v in detector.metrics_.items() if isinstance(v, int | float)}
        with session_factory() as session, session.begin():
            record_model_run(
                session,
                model_dir=model_dir,
                app="finance",
                metrics=scalar,
                data_fingerprint=detector.data_fingerprint_,
                code_version=code_version(),
            )
    report = score(
        model_dir, incoming_path, scores_path, chunk_size=20_000, history=history_path, console=console
    )
    with session_factory() as session, session.begin():
        added = persist_alerts(session, report, source=str(incoming_path))
    console.print(
        f"finance: scored {report.rows:,} transactions ({report.rows_per_second:,.0f}/s), "
        f"{report.alerts} alerts ({added} new in the database); scores in {scores_path}"
    )


# ---------------------------------------------------------------------- dashboard helpers
def account_timeline(
    detector: FraudDetector, source: str, transaction_id: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The account history of a transaction with the transactions that drove its score flagged.

    Args:
        detector: The scoring model.
        source: The source the transaction was read from (an alert's `source`).
        transaction_id: The alerted transaction.

    Returns:
        (timeline, explanation): the account's transactions up to and including this one with columns
        `transaction_id, timestamp, amount, merchant_id, channel, country, role` (role: "scored",
        "drove the score" or ""), and `FraudDetector.explain`'s result.

    Raises:
        InputValidationError, AdapterError: The source cannot be read or lacks the transaction.
    """
    frame, _ = validate(read_source(source))
    hits = frame.index[frame["transaction_id"] == transaction_id]
    if len(hits) == 0:
        raise InputValidationError(f"transaction {transaction_id!r} is not in {source}")
    account = frame.loc[hits[0], "account_id"]
    history = frame[frame["account_id"] == account]
    history = history[history["timestamp"] <= frame.loc[hits[0], "timestamp"]]
    explanation = detector.explain(history, transaction_id)
    drivers = {item["transaction_id"] for item in explanation["top_transactions"]}
    timeline = history[["transaction_id", "timestamp", "amount", "merchant_id", "channel", "country"]].copy()
    timeline["role"] = np.where(
        timeline["transaction_id"] == transaction_id,
        "scored",
        np.where(timeline["transaction_id"].isin(drivers), "drove the score", ""),
    )
    return timeline.reset_index(drop=True), explanation
