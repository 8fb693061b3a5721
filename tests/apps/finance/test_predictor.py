"""Tests of FraudDetector: fitted state, learning, no look-ahead, persistence, explanations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from apps.finance.config import NUMERIC_FIELDS
from apps.finance.encode import FeatureEncoder
from apps.finance.labels import LabelStore
from apps.finance.predictor import FraudDetector
from core.errors import ConfigError, InputValidationError, NotFittedError


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


def test_explain_names_past_transactions_and_fields(trained) -> None:
    # Its latency (< 200 ms per alert) is measured by `bench/finance_bench.py --sections explain`.
    df = pd.concat([trained.train, trained.test])
    account = df["account_id"].value_counts().index[0]
    target = df[df["account_id"] == account]["transaction_id"].iloc[40]

    result = trained.detector.explain(df, target)

    assert len(result["top_transactions"]) == 5
    earlier = set(df[df["account_id"] == account]["transaction_id"].iloc[:40])
    assert {t["transaction_id"] for t in result["top_transactions"]} <= earlier
    assert {e["field"] for e in result["field_effects"]} >= {"amount", "merchant", "merchant_risk"}


def test_explain_unknown_transaction_is_rejected(trained) -> None:
    with pytest.raises(InputValidationError, match="not found"):
        trained.detector.explain(trained.test, "no-such-id")


def _frame(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    """Canonical transactions from (account, ISO time, amount, merchant) tuples."""
    return pd.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(len(rows))],
            "account_id": [r[0] for r in rows],
            "timestamp": pd.to_datetime([r[1] for r in rows], utc=True),
            "amount": [r[2] for r in rows],
            "merchant_id": [r[3] for r in rows],
            "merchant_category": ["5411"] * len(rows),
            "channel": ["pos"] * len(rows),
            "country": ["US"] * len(rows),
            "is_fraud": [0] * len(rows),
        }
    )


def test_spending_windows_count_only_the_accounts_earlier_transactions_inside_each_window(trained) -> None:
    encoder: FeatureEncoder = trained.detector.encoder_
    df = _frame(
        [
            ("a", "2024-01-01T00:00Z", 10.0, "m"),
            ("b", "2024-01-01T01:00Z", 99.0, "m"),
            ("a", "2024-01-01T02:00Z", 30.0, "m"),
            (
                "a",
                "2024-01-02T01:00Z",
                500.0,
                "m",
            ),  # 25 h after the first: only the 02:00 one is within 1 day
        ]
    )
    raw, present = encoder._raw_numeric(df, encoder.new_state(), update=True)
    column = {name: j for j, name in enumerate(NUMERIC_FIELDS)}

    counts = np.expm1(raw[:, [column[f"account_log_count_{w}d"] for w in (1, 7, 30)]]).round()
    assert counts.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 2, 2]]
    assert not present[0, column["amount_vs_account_1d"]] and present[3, column["amount_vs_account_1d"]]
    np.testing.assert_allclose(raw[3, column["amount_vs_account_1d"]], np.log1p(500) - np.log1p(30))
    np.testing.assert_allclose(
        raw[3, column["amount_vs_account_7d"]], np.log1p(500) - (np.log1p(10) + np.log1p(30)) / 2
    )


def test_encoding_in_chunks_gives_the_same_tokens_as_one_pass(trained) -> None:
    encoder: FeatureEncoder = trained.detector.encoder_
    df = _some_accounts(pd.concat([trained.train, trained.test]), 30).reset_index(drop=True)
    whole, _ = encoder._featurize(df, trained.detector.new_state())
    state = trained.detector.new_state()
    half = len(df) // 2
    parts = [encoder._featurize(df.iloc[:half], state)[0], encoder._featurize(df.iloc[half:], state)[0]]

    np.testing.assert_allclose(np.concatenate([p.numeric for p in parts]), whole.numeric, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([p.numeric_mask for p in parts]), whole.numeric_mask)
    np.testing.assert_allclose(np.concatenate([p.time_delta for p in parts]), whole.time_delta)


@pytest.mark.slow  # one ONNX export (about 10 s on an idle core)
def test_onnx_backend_scores_like_torch_in_batch_and_real_time(trained, tmp_path) -> None:
    import shutil

    from apps.finance import service

    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    sample = _some_accounts(trained.test, 15)
    history = _some_accounts(trained.train, 15)
    onnx = FraudDetector.load(model_dir, backend="onnx")
    expected = trained.detector.predict_proba(sample, history=history)
    scorer = service.RealtimeScorer(onnx, history=history)
    realtime = [scorer.score(r).score for r in sample.drop(columns=["scenario"]).to_dict("records")]

    assert (model_dir / "onnx" / "model.onnx").is_file()
    np.testing.assert_allclose(onnx.predict_proba(sample, history=history), expected, atol=1e-5)
    np.testing.assert_allclose(realtime, expected, atol=1e-5)
    assert FraudDetector.load(model_dir, backend="onnx").model_.model_dir == model_dir / "onnx"  # reused
    with pytest.raises(ConfigError, match="backend must be one of"):
        FraudDetector.load(model_dir, backend="tpu")
