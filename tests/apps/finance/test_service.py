"""Tests of the batch scoring job (resumable, idempotent, quarantine, SQL), the real-time scorer and alerts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

import apps.finance.orm  # noqa: F401 - registers the finance tables
from apps.finance import service
from apps.finance.repository import alerts_per_day, list_alerts, record_action, save_alerts
from apps.finance.synthetic import write
from core.errors import InputValidationError


def _files(trained, tmp_path: Path, accounts: int = 60) -> tuple[Path, Path, pd.DataFrame]:
    keep = trained.test["account_id"].drop_duplicates().iloc[:accounts]
    test = trained.test[trained.test["account_id"].isin(keep)]
    history = trained.train[trained.train["account_id"].isin(keep)]
    return write(history, tmp_path / "history.parquet"), write(test, tmp_path / "input.csv"), test


def test_a_job_killed_mid_way_completes_on_rerun_with_exact_rows(trained, tmp_path, monkeypatch) -> None:
    history, source, test = _files(trained, tmp_path)
    service.score(trained.model_dir, source, tmp_path / "ref.parquet", 300, history, progress=False)
    calls = {"n": 0}
    real_write = service.write_part

    def crash_on_third_part(df: pd.DataFrame, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        real_write(df, path)

    monkeypatch.setattr(service, "write_part", crash_on_third_part)
    out = tmp_path / "scores.csv"
    with pytest.raises(KeyboardInterrupt):
        service.score(trained.model_dir, source, out, 300, history, progress=False)
    assert not out.exists()
    monkeypatch.setattr(service, "write_part", real_write)
    report = service.score(trained.model_dir, source, out, 300, history, progress=False)

    scores = pd.read_csv(out)
    expected = pd.read_parquet(tmp_path / "ref.parquet")
    assert report.resumed_chunks == 2
    assert list(scores.columns) == list(service.OUTPUT_COLUMNS)
    assert not scores["transaction_id"].duplicated().any()
    assert set(scores["transaction_id"]) == set(test["transaction_id"])
    merged = scores.merge(expected, on="transaction_id", suffixes=("", "_ref"))
    np.testing.assert_allclose(merged["score"], merged["score_ref"], atol=1e-6)
    assert not Path(f"{out}.parts").exists()


def test_rerunning_a_finished_job_rewrites_the_same_rows(trained, tmp_path) -> None:
    history, source, test = _files(trained, tmp_path, accounts=20)
    out = tmp_path / "scores.parquet"
    service.score(trained.model_dir, source, out, 500, history, progress=False)
    first = pd.read_parquet(out)
    service.score(trained.model_dir, source, out, 500, history, progress=False)
    second = pd.read_parquet(out)

    assert len(second) == len(test) and not second["transaction_id"].duplicated().any()
    np.testing.assert_allclose(second["score"], first["score"])


def test_sql_output_has_no_duplicates_after_a_rerun(trained, tmp_path) -> None:
    history, source, test = _files(trained, tmp_path, accounts=20)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    for _ in range(2):
        service.score(trained.model_dir, source, f"{url}::scores", 250, history, progress=False)
    engine = create_engine(url)
    with engine.connect() as connection:
        count, distinct = connection.execute(
            text("SELECT count(*), count(DISTINCT transaction_id) FROM scores")
        ).one()
    engine.dispose()

    assert count == distinct == len(test)


def test_quarantine_sets_bad_rows_aside_and_scores_the_rest(trained, tmp_path) -> None:
    _, _, test = _files(trained, tmp_path, accounts=10)
    bad = test.copy()
    bad.iloc[3, bad.columns.get_loc("amount")] = -5.0
    source = write(bad, tmp_path / "bad.csv")
    out = tmp_path / "scores.csv"

    with pytest.raises(InputValidationError, match="amount"):
        service.score(trained.model_dir, source, out, 1000, progress=False)
    report = service.score(trained.model_dir, source, out, 1000, on_invalid="quarantine", progress=False)

    assert report.rejected == 1 and report.rows == len(test) - 1
    rejected = pd.read_csv(report.quarantine)
    assert len(rejected) == 1 and "amount" in rejected["reject_reason"].iloc[0]


def test_realtime_scores_equal_batch_scores(trained) -> None:
    keep = trained.test["account_id"].drop_duplicates().iloc[:25]
    test = trained.test[trained.test["account_id"].isin(keep)]
    history = trained.train[trained.train["account_id"].isin(keep)]
    batch = trained.detector.predict_proba(test, history=history)
    scorer = service.RealtimeScorer(trained.detector, history=history)
    realtime = [scorer.score(row).score for row in test.drop(columns=["scenario"]).to_dict("records")]

    np.testing.assert_allclose(realtime, batch, atol=1e-5)


def test_realtime_rejects_a_repeated_transaction(trained) -> None:
    scorer = service.RealtimeScorer(trained.detector)
    row = trained.test.drop(columns=["scenario"]).iloc[0].to_dict()
    scorer.score(row)

    with pytest.raises(InputValidationError, match="already scored"):
        scorer.score(row)


def test_alerts_are_stored_once_and_actions_keep_who_and_when(db_session) -> None:
    alerts = pd.DataFrame(
        {
            "transaction_id": ["t1", "t2"],
            "account_id": ["a", "b"],
            "timestamp": pd.to_datetime(["2024-01-01T10:00Z", "2024-01-02T10:00Z"]),
            "amount": [10.0, 2000.0],
            "score": [0.7, 0.95],
        }
    )
    assert save_alerts(db_session, alerts, model_version="v1") == 2
    assert save_alerts(db_session, alerts, model_version="v1") == 0
    queue = list_alerts(db_session)
    record_action(db_session, queue[0].id, "confirm_fraud", "alice")

    assert [a.transaction_id for a in queue] == ["t2", "t1"]
    assert list_alerts(db_session, open_only=True)[0].transaction_id == "t1"
    action = list_alerts(db_session)[0].actions[0]
    assert action.analyst == "alice" and action.created_at.tzinfo is not None
    assert [d.confirmed for d in alerts_per_day(db_session)] == [0, 1]
    with pytest.raises(InputValidationError, match="action must be one of"):
        record_action(db_session, queue[0].id, "maybe", "alice")
