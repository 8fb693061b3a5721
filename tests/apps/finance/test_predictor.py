"""Tests of FraudDetector: fitted state, learning, no look-ahead, persistence, explanations."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from apps.finance.encode import FeatureEncoder
from apps.finance.labels import LabelStore
from apps.finance.predictor import FraudDetector
from core.errors import InputValidationError, NotFittedError


def _some_accounts(df: pd.DataFrame, n: int) -> pd.DataFrame:
    accounts = df["account_id"].drop_duplicates().iloc[:n]
    return df[df["account_id"].isin(accounts)]


def test_predict_before_fit_raises_not_fitted(trained) -> None:
    with pytest.raises(NotFittedError, match="Call 'fit'"):
        FraudDetector().predict_proba(trained.test)


def test_training_on_a_tiny_generated_set_beats_random_average_precision(trained) -> None:
    scores = trained.detector.predict_proba(trained.test, history=trained.train)
    base_rate = trained.test["is_fraud"].mean()

    assert scores.shape == (len(trained.test),) and np.isfinite(scores).all()
    assert average_precision_score(trained.test["is_fraud"], scores) > 3 * base_rate


def test_changing_a_later_transaction_never_changes_an_earlier_score(trained) -> None:
    df = _some_accounts(pd.concat([trained.train, trained.test]), 40).copy()
    cut = df["timestamp"].quantile(0.5)
    before = trained.detector.predict_proba(df)
    later = (df["timestamp"] > cut).to_numpy()
    changed = df.copy()
    changed.loc[later, "amount"] = changed.loc[later, "amount"] * 50 + 1
    changed.loc[later, "merchant_id"] = "M_NEW"
    changed.loc[later, "country"] = "ZZ"
    changed.loc[later, "is_fraud"] = 1 - changed.loc[later, "is_fraud"]
    after = trained.detector.predict_proba(changed)

    np.testing.assert_allclose(after[~later], before[~later], atol=1e-6)
    assert not np.allclose(after[later], before[later], atol=1e-3)


def test_merchant_risk_counts_only_labels_older_than_the_delay() -> None:
    store = LabelStore(delay_seconds=7 * 86_400)
    day = 86_400
    store.add(
        np.array(["a", "b"]),
        np.array(["m", "m"]),
        np.array([1_700_000_000, 1_700_000_000 + 5 * day]),
        np.array([1, 1]),
    )
    n, frauds = store.counts(
        np.array(["m", "m", "x"]), np.array([1_700_000_000, 1_700_000_001, 1_700_000_001])
    )

    assert n.tolist() == [0, 1, 0] and frauds.tolist() == [0, 1, 0]


def test_encoder_scores_every_row_once_with_at_most_k_minus_one_earlier_transactions(trained) -> None:
    encoder: FeatureEncoder = trained.detector.encoder_
    windows = encoder.encode(_some_accounts(trained.train, 10))
    rows = np.concatenate(windows.rows)

    assert sorted(rows.tolist()) == list(range(len(_some_accounts(trained.train, 10))))
    assert max(len(e["time_delta"]) for e in windows.examples) <= encoder.history_window


def test_save_then_load_gives_identical_scores(trained) -> None:
    loaded = FraudDetector.load(trained.model_dir)
    sample = _some_accounts(trained.test, 20)

    np.testing.assert_allclose(
        loaded.predict_proba(sample), trained.detector.predict_proba(sample), atol=1e-6
    )
    assert loaded.threshold_ == trained.detector.threshold_


def test_explain_names_past_transactions_and_fields_within_200_ms(trained) -> None:
    df = pd.concat([trained.train, trained.test])
    account = df["account_id"].value_counts().index[0]
    target = df[df["account_id"] == account]["transaction_id"].iloc[40]
    trained.detector.explain(df, target)  # warm-up

    started = time.perf_counter()
    result = trained.detector.explain(df, target)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.2
    assert len(result["top_transactions"]) == 5
    earlier = set(df[df["account_id"] == account]["transaction_id"].iloc[:40])
    assert {t["transaction_id"] for t in result["top_transactions"]} <= earlier
    assert {e["field"] for e in result["field_effects"]} >= {"amount", "merchant", "merchant_risk"}


def test_explain_unknown_transaction_is_rejected(trained) -> None:
    with pytest.raises(InputValidationError, match="not found"):
        trained.detector.explain(trained.test, "no-such-id")
