"""Tests of the synthetic transaction generator: schema, label rate, scenario mix, determinism, no label leaks."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from apps.finance.adapters import read_source, validate
from apps.finance.schema import CANONICAL_COLUMNS, CANONICAL_DTYPES, SCENARIO_COLUMN
from apps.finance.synthetic import SCENARIOS, generate, write
from core.errors import ConfigError


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return generate(accounts=400, days=30, seed=7)


def test_output_is_valid_canonical_data(transactions: pd.DataFrame) -> None:
    valid, rejected = validate(transactions)  # includes unique ids and per-account time order

    assert rejected.empty and len(valid) == len(transactions)
    assert list(transactions.columns) == [*CANONICAL_COLUMNS, SCENARIO_COLUMN]
    assert {c: transactions[c].dtype for c in CANONICAL_COLUMNS} == CANONICAL_DTYPES
    assert transactions[list(CANONICAL_COLUMNS)].notna().all().all()


def test_label_rate_is_between_half_and_two_percent(transactions: pd.DataFrame) -> None:
    assert 0.005 <= transactions["is_fraud"].mean() <= 0.02


def test_every_scenario_is_present_and_matches_the_label(transactions: pd.DataFrame) -> None:
    counts = transactions[SCENARIO_COLUMN].value_counts()

    assert set(counts.index) == set(SCENARIOS)
    assert (counts.drop("genuine") >= 10).all()
    assert ((transactions[SCENARIO_COLUMN] != "genuine") == (transactions["is_fraud"] == 1)).all()


def test_times_are_sorted_per_account_and_amounts_non_negative(transactions: pd.DataFrame) -> None:
    assert transactions.groupby("account_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    assert transactions["timestamp"].is_monotonic_increasing
    assert transactions["transaction_id"].is_monotonic_increasing and transactions["transaction_id"].is_unique
    assert (transactions["amount"] >= 0).all()
    start = pd.Timestamp("2024-01-01", tz="UTC")
    assert transactions["timestamp"].between(start, start + pd.Timedelta(days=30), inclusive="left").all()


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    pd.testing.assert_frame_equal(generate(60, 10, seed=3), generate(60, 10, seed=3))
    assert not generate(60, 10, seed=3).equals(generate(60, 10, seed=4))


def test_no_field_value_is_used_by_fraud_rows_only(transactions: pd.DataFrame) -> None:
    genuine = transactions[transactions["is_fraud"] == 0]
    fraud = transactions[transactions["is_fraud"] == 1]
    for column in ("merchant_id", "merchant_category", "channel", "country"):
        assert fraud[column].isin(set(genuine[column])).all(), column
    for column in ("transaction_id", "account_id", "merchant_id"):
        assert set(fraud[column].str[0]) <= set(genuine[column].str[0]), column  # same id prefixes


def test_fraud_is_about_sequences_not_one_amount_band(transactions: pd.DataFrame) -> None:
    micro = transactions[transactions["amount"] < 3]
    large = transactions[transactions["amount"] > 500]

    assert micro["is_fraud"].mean() < 0.25 and large["is_fraud"].mean() < 0.5  # genuine rows share the bands
    takeover = transactions[transactions[SCENARIO_COLUMN] == "account_takeover"].groupby("account_id").first()
    earlier = transactions.merge(
        takeover[["timestamp", "country"]], on="account_id", suffixes=("", "_takeover")
    )
    earlier = earlier[earlier["timestamp"] < earlier["timestamp_takeover"]]
    seen = (earlier["country"] == earlier["country_takeover"]).groupby(earlier["account_id"]).any()
    assert 1 - seen.reindex(takeover.index, fill_value=False).mean() > 0.5  # most come from a new country


@pytest.mark.parametrize("name", ["tx.csv", "tx.csv.gz", "tx.parquet"])
def test_written_file_reads_back_unchanged(tmp_path: Path, name: str) -> None:
    frame = generate(20, 5, seed=1)

    valid, _ = validate(read_source(write(frame, tmp_path / name)))

    pd.testing.assert_frame_equal(valid, frame, check_dtype=False)
    assert {c: valid[c].dtype for c in CANONICAL_COLUMNS} == CANONICAL_DTYPES


@pytest.mark.parametrize(("accounts", "days"), [(0, 10), (10, -1), (2.5, 10)])
def test_bad_sizes_are_config_errors(accounts: int, days: int) -> None:
    with pytest.raises(ConfigError, match="must be a positive integer"):
        generate(accounts, days, seed=0)


def test_thousand_accounts_for_a_month_take_seconds() -> None:
    started = time.perf_counter()
    frame = generate(1_000, 30, seed=0)

    assert time.perf_counter() - started < 10.0  # ~0.2 s on one core; generous for a shared machine
    assert len(frame) > 50_000
