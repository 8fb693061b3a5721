"""Patient records: JSON and CSV reading, unit validation and conversion, missing fields, pseudonymisation."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from apps.medical.adapters import pseudonymise, read_record
from apps.medical.records import EXPECTED_FIELDS, UnknownFieldWarning, record_to_dict, validate_record
from apps.medical.schema import Measurement
from core.errors import AdapterError, ConfigError, InputValidationError

SECRET = "a-test-secret-of-32-characters!!"

RECORD = {
    "patient_id": "P001",
    "age": 63,
    "sex": "female",
    "vitals": {"temperature": {"value": 101.3, "unit": "°F"}, "heart_rate": {"value": 96, "unit": "bpm"}},
    "labs": [
        {"name": "CRP", "value": 8.5, "unit": "mg/dL"},
        {"name": "white_cells", "value": 13200, "unit": "/µL"},
    ],
    "history": {"fever": True, "weight_loss": "no"},
    "smoking": {"status": "Former", "pack_years": 30},
    "notes": "productive cough for 5 days",
}

CSV_RECORD = """field,value,unit
patient_id,P001,
age,63,years
sex,F,
vitals.temperature,38.5,°C
vitals.heart_rate,96,/min
labs.CRP,85,mg/L
labs.WBC,13.2,10^9/L
history.fever,true,
history.weight_loss,false,
smoking.status,former,
smoking.pack_years,30,pack-years
notes,productive cough for 5 days,
"""


def _write_json(tmp_path, record, name="record.json"):
    path = tmp_path / name
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def test_json_record_is_read_and_converted_to_canonical_units(tmp_path):
    record = read_record(_write_json(tmp_path, RECORD))
    assert record.patient_id == "P001" and record.age == 63 and record.sex == "F"
    assert record.vital("temperature").value == pytest.approx(38.5)
    assert record.vital("temperature").unit == "°C"
    assert record.lab("CRP") == Measurement("CRP", pytest.approx(85.0), "mg/L")
    assert record.lab("WBC").value == pytest.approx(13.2) and record.lab("WBC").unit == "10^9/L"
    assert record.history == {"fever": True, "weight_loss": False}
    assert record.smoking_status == "former" and record.pack_years == 30
    assert record.notes == "productive cough for 5 days"
    assert record.missing == ()


def test_csv_record_reads_like_the_json_one(tmp_path):
    path = tmp_path / "record.csv"
    path.write_text(CSV_RECORD, encoding="utf-8")
    from_csv = read_record(path)
    from_json = read_record(_write_json(tmp_path, RECORD))
    assert from_csv.lab("CRP").value == pytest.approx(from_json.lab("CRP").value)
    assert from_csv.vital("temperature").value == pytest.approx(from_json.vital("temperature").value)
    assert (from_csv.history, from_csv.smoking_status, from_csv.missing) == (
        from_json.history,
        from_json.smoking_status,
        from_json.missing,
    )


def test_missing_fields_are_allowed_and_marked(tmp_path):
    record = read_record(_write_json(tmp_path, {"patient_id": "P002", "vitals": {"temperature": None}}))
    assert record.age is None and record.sex is None and record.vitals == () and record.labs == ()
    assert record.missing == EXPECTED_FIELDS
    partial = validate_record({**RECORD, "labs": [RECORD["labs"][0]]})
    assert partial.missing == ("labs.WBC",)


@pytest.mark.parametrize(
    ("section", "entry", "pattern"),
    [
        (
            "labs",
            [{"name": "CRP", "value": 5, "unit": "mmol/L"}],
            r"'labs\.CRP': unit 'mmol/L' is not accepted; expected mg/L",
        ),
        (
            "labs",
            [{"name": "WBC", "value": 7, "unit": "g/L"}],
            r"'labs\.WBC': unit 'g/L' is not accepted; expected 10\^9/L",
        ),
        ("labs", [{"name": "CRP", "value": 5}], r"'labs\.CRP': the unit is missing; expected mg/L"),
        ("vitals", {"temperature": {"value": 38, "unit": "K"}}, r"'vitals\.temperature': unit 'K'"),
        (
            "vitals",
            {"heart_rate": {"value": 80, "unit": "Hz"}},
            r"'vitals\.heart_rate': unit 'Hz'.*expected /min",
        ),
        (
            "vitals",
            {"temperature": {"value": 98.6, "unit": "°C"}},
            r"'vitals\.temperature' is 98\.6 °C.*25\.\.45",
        ),
        (
            "vitals",
            {"temperature": {"value": "warm", "unit": "°C"}},
            r"'vitals\.temperature' is 'warm'; expected a number",
        ),
        ("vitals", {"pulse_pressure": {"value": 40, "unit": "mmHg"}}, r"'vitals\.pulse_pressure' is unknown"),
    ],
    ids=[
        "crp-unit",
        "wbc-unit",
        "no-unit",
        "temperature-unit",
        "heart-rate-unit",
        "out-of-range",
        "not-a-number",
        "unknown-vital",
    ],
)
def test_wrong_units_and_values_are_rejected_naming_the_field(tmp_path, section, entry, pattern):
    path = _write_json(tmp_path, {**RECORD, section: entry})
    with pytest.raises(InputValidationError, match=pattern) as info:
        read_record(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"patient_id": ""}, "'patient_id' is missing"),
        ({"sex": "unknown"}, "'sex' is 'unknown'; expected M, F or O"),
        ({"age": 250}, r"'age' is 250.*0\.\.130"),
        ({"smoking": {"status": "sometimes"}}, "'smoking.status' is 'sometimes'"),
        ({"history": {"fever": "maybe"}}, r"'history\.fever' is 'maybe'; expected true/false"),
    ],
)
def test_invalid_scalar_fields_are_rejected(change, pattern):
    with pytest.raises(InputValidationError, match=pattern):
        validate_record({**RECORD, **change})


def test_unknown_lab_is_kept_with_a_warning():
    with pytest.warns(UnknownFieldWarning, match="ferritin"):
        record = validate_record({**RECORD, "labs": [{"name": "ferritin", "value": 300, "unit": "ng/mL"}]})
    assert record.lab("ferritin") == Measurement("ferritin", 300.0, "ng/mL")


def test_repeated_csv_field_is_rejected_naming_the_row(tmp_path):
    path = tmp_path / "record.csv"
    path.write_text(CSV_RECORD + "labs.CRP,90,mg/L\n", encoding="utf-8")
    with pytest.raises(InputValidationError, match=r"row 14: field 'labs\.CRP' repeated"):
        read_record(path)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("record.json", "{not json", "invalid JSON at line 1"),
        ("record.txt", "patient_id: 1", "unsupported record format '.txt'"),
        ("absent.json", None, "cannot read the record"),
    ],
)
def test_unreadable_record_files_are_adapter_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(AdapterError, match=pattern):
        read_record(path)


def test_record_dict_round_trips(tmp_path):
    record = validate_record(RECORD)
    assert read_record(_write_json(tmp_path, record_to_dict(record))) == record


def test_pseudonym_is_a_keyed_hmac_sha256():
    pseudonym = pseudonymise("P001", SECRET)
    assert pseudonym == hmac.new(SECRET.encode(), b"P001", hashlib.sha256).hexdigest()
    assert len(pseudonym) == 64 and "P001" not in pseudonym
    assert pseudonymise(" P001 ", SECRET) == pseudonym
    assert pseudonymise("P001", SECRET.upper()) != pseudonym
    assert pseudonymise("P002", SECRET) != pseudonym
    assert pseudonym != hashlib.sha256(b"P001").hexdigest()  # not guessable by hashing candidate ids


def test_pseudonymise_rejects_a_short_secret_and_an_empty_id():
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        pseudonymise("P001", "short")
    with pytest.raises(InputValidationError, match="patient_id is empty"):
        pseudonymise("  ", SECRET)
