"""Tests of the finance adapters: every source kind, every format preset, every rejection rule, quarantine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from apps.finance.adapters import (
    REFUND_COLUMN,
    StreamValidator,
    parse_source,
    parse_transaction,
    read_source,
    validate,
    write_quarantine,
)
from apps.finance.schema import CANONICAL_COLUMNS, CANONICAL_DTYPES, REJECT_REASON_COLUMN, SOURCE_ROW
from apps.finance.sources import FileSource, SqlSource
from core.errors import AdapterError, ConfigError, InputValidationError

SHARED_DATA = Path(__file__).parents[3] / ".." / "shared" / "data" / "finance"

# Three cards, eight transactions; mixed timestamp forms (Z, +01:00 offset, epoch seconds) and an extra column.
CANONICAL_CSV = """\
transaction_id,account_id,timestamp,amount,merchant_id,merchant_category,channel,country,is_fraud,note
T1,A1,2024-03-01T08:15:00Z,12.50,M1,5411,chip,US,0,first
T2,A1,2024-03-01T12:40:00Z,3.20,M2,5814,contactless,US,0,
T3,A2,2024-03-01T13:05:00+01:00,250.00,M3,5732,online,GB,0,
T4,A1,1709312400,45.00,M1,5411,chip,US,0,epoch seconds
T5,A2,2024-03-02T09:00:00Z,0.99,M4,5818,online,GB,1,
T6,A3,2024-03-02T10:30:00Z,60.00,M5,5541,swipe,CA,0,
T7,A2,2024-03-02T09:05:00Z,480.00,M6,5944,online,MX,1,
T8,A3,2024-03-03T18:00:00Z,22.10,M1,5411,chip,US,0,
"""

TABFORMER_CSV = """\
User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,Merchant State,Zip,MCC,Errors?,Is Fraud?
0,0,2002,9,1,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,,No
0,0,2002,9,1,06:42,$38.48,Swipe Transaction,-727612092139916043,Monterey Park,CA,91754.0,5411,,No
0,0,2002,9,2,17:45,$-128.95,Swipe Transaction,3414527459579106770,Monterey Park,CA,91754.0,5651,,No
0,1,2015,11,15,12:55,$287.13,Online Transaction,-8194607650924472520,ONLINE,,,3001,,Yes
0,1,2015,11,16,9:10,$2.40,Chip Transaction,-7421093378627544099,Cancun,Mexico,,5812,"Bad PIN,Insufficient Balance",No
"""

HANDBOOK_CSV = """\
TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_TIME_SECONDS,TX_TIME_DAYS,TX_FRAUD,TX_FRAUD_SCENARIO
0,2018-04-01 00:00:31,596,3156,57.16,31,0,0,0
1,2018-04-01 00:02:10,4961,3412,81.51,130,0,0,0
2,2018-04-01 00:07:56,2,1365,146.0,476,0,0,0
3,2018-04-01 00:09:29,596,8737,264.49,569,0,1,2
"""


def _write(tmp_path: Path, text: str, name: str = "tx.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _with_field(column: str, row: int, value: str) -> str:
    """CANONICAL_CSV with one field replaced (row is the 1-based data row)."""
    lines = CANONICAL_CSV.splitlines()
    index = lines[0].split(",").index(column)
    fields = lines[row].split(",")
    fields[index] = value
    lines[row] = ",".join(fields)
    return "\n".join(lines) + "\n"


def _source_frame() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(CANONICAL_CSV), dtype={"merchant_category": str})


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'bank.db'}"
    engine = sa.create_engine(url)
    try:
        _source_frame().to_sql("transactions", engine, index=False)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def baseline(tmp_path: Path) -> pd.DataFrame:
    valid, rejected = validate(read_source(_write(tmp_path, CANONICAL_CSV)))
    assert rejected.empty
    return valid


# ----------------------------------------------------------------------------------------------------------
# Happy paths, one per source
# ----------------------------------------------------------------------------------------------------------


def test_csv_becomes_typed_canonical_frame_with_extras_and_source_rows(tmp_path: Path) -> None:
    valid, rejected = validate(read_source(_write(tmp_path, CANONICAL_CSV)))

    assert rejected.empty and len(valid) == 8
    assert list(valid.columns) == [*CANONICAL_COLUMNS, "note"]
    assert {c: valid[c].dtype for c in CANONICAL_COLUMNS} == CANONICAL_DTYPES
    assert valid.index.name == SOURCE_ROW and list(valid.index) == list(range(1, 9))
    times = valid["timestamp"]
    assert times[3] == pd.Timestamp("2024-03-01T12:05:00Z")  # +01:00 offset converted to UTC
    assert times[4] == pd.Timestamp("2024-03-01T17:00:00Z")  # epoch seconds
    assert valid.loc[4, "note"] == "epoch seconds"


@pytest.mark.parametrize("name", ["tx.csv.gz", "tx.parquet"])
def test_csv_gz_and_parquet_read_like_csv(tmp_path: Path, baseline: pd.DataFrame, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        _source_frame().to_parquet(path, index=False)
    else:
        _source_frame().to_csv(path, index=False, compression="gzip")

    valid, _ = validate(read_source(path))

    pd.testing.assert_frame_equal(valid[list(CANONICAL_COLUMNS)], baseline[list(CANONICAL_COLUMNS)])


def test_sql_table_reads_like_csv(tmp_path: Path, baseline: pd.DataFrame) -> None:
    valid, _ = validate(read_source(f"{_sqlite(tmp_path)}::transactions"))

    pd.testing.assert_frame_equal(valid[list(CANONICAL_COLUMNS)], baseline[list(CANONICAL_COLUMNS)])


def test_sql_query_reads_only_selected_rows(tmp_path: Path) -> None:
    src = f"{_sqlite(tmp_path)}::SELECT * FROM transactions WHERE amount >= 40 ORDER BY transaction_id"

    valid, _ = validate(read_source(src))

    assert list(valid["transaction_id"]) == ["T3", "T4", "T6", "T7"]
    assert list(valid.index) == [1, 2, 3, 4]  # rows of the query result


def test_sql_spec_syntax() -> None:
    table = parse_source("sqlite:///bank.db::main.transactions")
    query = parse_source("postgresql://u:secret@[::1]:5432/bank::SELECT amount::float FROM tx")

    assert table == SqlSource("sqlite:///bank.db", table="main.transactions")
    assert isinstance(query, SqlSource) and query.url == "postgresql://u:secret@[::1]:5432/bank"
    assert query.query == "SELECT amount::float FROM tx"
    assert "secret" not in str(query)
    assert parse_source("data/tx.CSV.GZ") == FileSource(Path("data/tx.CSV.GZ"), "csv")


@pytest.mark.parametrize("kind", ["csv", "parquet", "sql"])
def test_chunked_reads_equal_one_read_and_keep_source_rows(
    tmp_path: Path, baseline: pd.DataFrame, kind: str
) -> None:
    if kind == "csv":
        src = str(_write(tmp_path, CANONICAL_CSV))
    elif kind == "parquet":
        src = str(tmp_path / "tx.parquet")
        _source_frame().to_parquet(src, index=False)
    else:
        src = f"{_sqlite(tmp_path)}::transactions"
    checker = StreamValidator()

    parts = [checker.validate(chunk)[0] for chunk in read_source(src, chunksize=3)]

    assert [len(p) for p in parts] == [3, 3, 2]
    pd.testing.assert_frame_equal(
        pd.concat(parts)[list(CANONICAL_COLUMNS)], baseline[list(CANONICAL_COLUMNS)]
    )
    assert checker.rows_valid == 8 and checker.rows_rejected == 0


# ----------------------------------------------------------------------------------------------------------
# Format presets and column mapping
# ----------------------------------------------------------------------------------------------------------


def test_tabformer_preset(tmp_path: Path) -> None:
    valid, rejected = validate(read_source(_write(tmp_path, TABFORMER_CSV), format="tabformer"))

    assert rejected.empty
    assert list(valid["account_id"]) == ["0-0", "0-0", "0-0", "0-1", "0-1"]
    assert list(valid["transaction_id"]) == ["0-0-1", "0-0-2", "0-0-3", "0-1-4", "0-1-5"]
    assert valid.loc[5, "timestamp"] == pd.Timestamp("2015-11-16T09:10:00Z")
    assert list(valid["channel"]) == ["swipe", "swipe", "swipe", "online", "chip"]
    assert valid["country"].tolist()[:3] == ["US", "US", "US"]
    assert pd.isna(valid.loc[4, "country"]) and valid.loc[5, "country"] == "Mexico"
    assert valid.loc[1, "merchant_id"] == "3527213246127876953"  # 64-bit hash kept exactly
    assert valid.loc[1, "merchant_category"] == "5300"
    assert list(valid["is_fraud"]) == [0, 0, 0, 1, 0]
    # A refund keeps its row: absolute amount plus the flag.
    assert valid.loc[3, "amount"] == 128.95 and list(valid[REFUND_COLUMN]) == [
        False,
        False,
        True,
        False,
        False,
    ]
    assert valid.loc[5, "Errors?"] == "Bad PIN,Insufficient Balance"
    assert {"Merchant City", "Merchant State", "Zip"} <= set(valid.columns)


def test_tabformer_ids_do_not_depend_on_chunk_size(tmp_path: Path) -> None:
    path = _write(tmp_path, TABFORMER_CSV)

    chunked = pd.concat(read_source(path, format="tabformer", chunksize=2))

    assert list(chunked["transaction_id"]) == list(read_source(path, format="tabformer")["transaction_id"])


def test_handbook_preset_drops_label_derived_and_redundant_columns(tmp_path: Path) -> None:
    valid, _ = validate(read_source(_write(tmp_path, HANDBOOK_CSV), format="handbook"))

    assert list(valid.columns) == list(CANONICAL_COLUMNS)
    assert list(valid["account_id"]) == ["596", "4961", "2", "596"]
    assert list(valid["merchant_id"]) == ["3156", "3412", "1365", "8737"]
    assert valid.loc[4, "timestamp"] == pd.Timestamp("2018-04-01T00:09:29Z")
    assert list(valid["is_fraud"]) == [0, 0, 0, 1]
    assert valid["channel"].isna().all()


def test_column_mapping_json_reads_another_schema(tmp_path: Path) -> None:
    text = CANONICAL_CSV.replace(
        "transaction_id,account_id,timestamp,amount,merchant_id", "txn,card_no,ts,amt,shop", 1
    )
    mapping = {
        "transaction_id": "txn",
        "account_id": "card_no",
        "timestamp": "ts",
        "amount": "amt",
        "merchant_id": "shop",
    }
    mapping_path = tmp_path / "mapping.json"
    mapping_path.write_text(json.dumps(mapping))

    valid, _ = validate(read_source(_write(tmp_path, text), columns=mapping_path))

    assert list(valid.columns) == [*CANONICAL_COLUMNS, "note"]
    assert list(valid["account_id"]) == ["A1", "A1", "A2", "A1", "A2", "A3", "A2", "A3"]


@pytest.mark.parametrize(
    ("mapping", "format", "match"),
    [
        ({"amount_usd": "amt"}, "canonical", "unknown canonical column.*amount_usd"),
        ({"amount": "x", "merchant_id": "x"}, "canonical", "mapped more than once"),
        ({"amount": "amt"}, "tabformer", "applies to format 'canonical' only"),
    ],
)
def test_bad_column_mapping_is_a_config_error(tmp_path: Path, mapping: dict, format: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_source(_write(tmp_path, CANONICAL_CSV), format=format, columns=mapping)


# ----------------------------------------------------------------------------------------------------------
# Rejection rules: each names the column, the row and the value
# ----------------------------------------------------------------------------------------------------------


def test_missing_required_column_lists_found_and_expected(tmp_path: Path) -> None:
    text = CANONICAL_CSV.replace(",amount,", ",amt,", 1)

    with pytest.raises(InputValidationError) as info:
        read_source(_write(tmp_path, text))

    message = str(info.value)
    assert "tx.csv" in message and "['amount']" in message
    assert "found ['transaction_id', 'account_id', 'timestamp', 'amt'" in message
    assert "expected ['transaction_id', 'account_id', 'timestamp', 'amount', 'merchant_id']" in message


def test_missing_required_column_of_a_preset_names_the_preset(tmp_path: Path) -> None:
    with pytest.raises(
        InputValidationError, match=r"missing required column\(s\) \['Amount'\] for format 'tabformer'"
    ):
        read_source(_write(tmp_path, TABFORMER_CSV.replace("Amount", "Amt", 1)), format="tabformer")


@pytest.mark.parametrize(
    ("column", "row", "value", "expected"),
    [
        ("timestamp", 5, "yesterday", "column 'timestamp': cannot parse 'yesterday' as a time"),
        ("timestamp", 5, "", "column 'timestamp': missing value"),
        ("amount", 5, "12,5€", "column 'amount': cannot parse '12"),
        ("amount", 5, "-3.50", "column 'amount': negative value -3.5"),
        ("amount", 5, "inf", "column 'amount': non-finite value inf"),
        ("account_id", 5, "", "column 'account_id': missing value; expected a non-empty id"),
        ("merchant_id", 5, " ", "column 'merchant_id': missing value; expected a non-empty id"),
        ("is_fraud", 5, "yes", "column 'is_fraud': value 'yes'; expected 0 or 1"),
        ("is_fraud", 5, "2", "column 'is_fraud': value 2; expected 0 or 1"),
        ("transaction_id", 6, "T2", "column 'transaction_id': duplicate value 'T2' (first at row 2)"),
        (
            "timestamp",
            8,
            "2024-03-01T00:00:00Z",
            "'2024-03-01T00:00:00Z' is earlier than a previous transaction of account 'A3'",
        ),
    ],
)
def test_invalid_value_raises_naming_column_row_and_value(
    tmp_path: Path, column: str, row: int, value: str, expected: str
) -> None:
    text = _with_field(column, row, value)
    if value == "12,5€":  # a decimal comma must be quoted in CSV
        text = text.replace("12,5€", '"12,5€"')

    with pytest.raises(InputValidationError) as info:
        validate(read_source(_write(tmp_path, text)))

    message = str(info.value)
    assert f"tx.csv: row {row} " in message
    assert expected in message
    assert "1 of 8 rows are invalid" in message and "on_invalid='quarantine'" in message


def test_tabformer_bad_value_names_the_source_columns(tmp_path: Path) -> None:
    text = TABFORMER_CSV.replace("$38.48", "$38.48.1")

    with pytest.raises(
        InputValidationError, match=r"row 2 .*column 'amount' \(from Amount\): cannot parse '38.48.1'"
    ):
        validate(read_source(_write(tmp_path, text), format="tabformer"))


def test_duplicate_id_across_chunks_is_rejected(tmp_path: Path) -> None:
    checker = StreamValidator()
    chunks = read_source(_write(tmp_path, _with_field("transaction_id", 6, "T1")), chunksize=5)
    checker.validate(next(chunks))

    with pytest.raises(InputValidationError, match=r"row 6 .*'T1' was already seen earlier in the stream"):
        checker.validate(next(chunks))


def test_step_back_in_time_across_chunks_is_rejected(tmp_path: Path) -> None:
    checker = StreamValidator()
    chunks = read_source(_write(tmp_path, _with_field("timestamp", 7, "2024-03-01T00:00:00Z")), chunksize=5)
    checker.validate(next(chunks))

    with pytest.raises(
        InputValidationError, match=r"row 7 .*earlier than a previous transaction of account 'A2'"
    ):
        checker.validate(next(chunks))


def test_time_order_check_can_be_disabled(tmp_path: Path) -> None:
    frame = read_source(_write(tmp_path, _with_field("timestamp", 8, "2024-03-01T00:00:00Z")))

    valid, rejected = validate(frame, require_time_order=False)

    assert len(valid) == 8 and rejected.empty


# ----------------------------------------------------------------------------------------------------------
# Quarantine
# ----------------------------------------------------------------------------------------------------------


def test_quarantine_keeps_valid_rows_and_sets_the_rest_aside_with_reasons(tmp_path: Path) -> None:
    text = _with_field("amount", 2, "-1")
    text = text.replace("T5,A2,2024-03-02T09:00:00Z", "T5,A2,not a time")
    text = text.replace(
        "T7,A2,2024-03-02T09:05:00Z,480.00,M6,5944,online,MX,1",
        "T3,A2,2024-03-02T09:05:00Z,480.00,,5944,online,MX,7",
    )
    frame = read_source(_write(tmp_path, text))

    valid, rejected = validate(frame, on_invalid="quarantine")

    assert list(rejected.index) == [2, 5, 7] and list(valid.index) == [1, 3, 4, 6, 8]
    assert sorted([*valid.index, *rejected.index]) == list(frame.index)  # nothing lost, nothing doubled
    reasons = rejected[REJECT_REASON_COLUMN]
    assert "negative value -1" in reasons[2]
    assert "cannot parse 'not a time'" in reasons[5]
    assert all(f"column '{c}'" in reasons[7] for c in ("transaction_id", "merchant_id", "is_fraud"))

    path = write_quarantine(rejected, tmp_path / "rejected.csv")
    written = pd.read_csv(path)
    assert list(written[SOURCE_ROW]) == [2, 5, 7]
    assert list(written.columns) == [SOURCE_ROW, *frame.columns, REJECT_REASON_COLUMN]


def test_unknown_on_invalid_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"on_invalid must be one of \['raise', 'quarantine'\]; got 'drop'"):
        validate(read_source(_write(tmp_path, CANONICAL_CSV)), on_invalid="drop")


# ----------------------------------------------------------------------------------------------------------
# Unreadable sources and the real-time record
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "match"),
    [
        ("missing.csv", "does not exist"),
        ("tx.xlsx", "cannot tell the type of source"),
        ("sqlite:///x.db::DROP TABLE tx", "neither a table name nor a query"),
    ],
)
def test_unreadable_source_is_an_adapter_error(tmp_path: Path, src: str, match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        read_source(src if src.startswith("sqlite") else tmp_path / src)


def test_missing_sql_table_is_an_adapter_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"cannot read SQL source .*::nowhere"):
        read_source(f"{_sqlite(tmp_path)}::nowhere")


def test_non_positive_chunksize_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chunksize must be a positive number"):
        read_source(_write(tmp_path, CANONICAL_CSV), chunksize=0)


def test_parse_transaction_applies_the_same_rules() -> None:
    record = {
        "transaction_id": "T9",
        "account_id": "A1",
        "timestamp": "2024-03-04T10:00:00+02:00",
        "amount": "9.90",
    }
    transaction = parse_transaction({**record, "merchant_id": 17, "channel": "online", "device": "ios"})

    assert transaction.timestamp == pd.Timestamp("2024-03-04T08:00:00Z").to_pydatetime()
    assert transaction.amount == 9.9 and transaction.merchant_id == "17" and transaction.is_fraud is None
    assert transaction.extras == {"device": "ios"}
    assert transaction.as_dict()["device"] == "ios"
    with pytest.raises(InputValidationError, match=r"transaction 'T9': column 'amount': negative value -2.0"):
        parse_transaction({**record, "merchant_id": "M1", "amount": -2.0})


# ----------------------------------------------------------------------------------------------------------
# Real shared data (skipped where ../shared/data is absent)
# ----------------------------------------------------------------------------------------------------------

TABFORMER_SAMPLE = SHARED_DATA / "tabformer-user0-sample" / "User0_credit_card_transactions.csv"
HANDBOOK_MONTH = SHARED_DATA / "fraud-handbook-simulated" / "transactions_2018-07.csv.gz"


@pytest.mark.shared_data
@pytest.mark.skipif(not TABFORMER_SAMPLE.is_file(), reason=f"shared data absent: {TABFORMER_SAMPLE}")
def test_real_tabformer_sample_loads_and_validates() -> None:
    valid, rejected = validate(read_source(TABFORMER_SAMPLE, format="tabformer"))

    assert rejected.empty and len(valid) == 19_963
    assert valid["account_id"].nunique() == 5 and int(valid["is_fraud"].sum()) == 27
    assert int(valid[REFUND_COLUMN].sum()) > 0 and (valid["amount"] >= 0).all()
    assert set(valid["channel"]) == {"swipe", "chip", "online"}


@pytest.mark.shared_data
@pytest.mark.skipif(not HANDBOOK_MONTH.is_file(), reason=f"shared data absent: {HANDBOOK_MONTH}")
def test_real_handbook_month_loads_and_validates() -> None:
    checker = StreamValidator()
    first = next(read_source(HANDBOOK_MONTH, format="handbook", chunksize=50_000))

    valid, rejected = checker.validate(first)

    assert rejected.empty and len(valid) == 50_000
    assert list(valid.columns) == list(CANONICAL_COLUMNS)
    assert 0.001 < valid["is_fraud"].mean() < 0.05
    assert valid["timestamp"].is_monotonic_increasing
    assert np.isfinite(valid["amount"]).all()
