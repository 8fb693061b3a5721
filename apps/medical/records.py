"""Patient records from JSON or CSV: unit validation and conversion to canonical units, and pseudonymisation.

JSON (one patient)::

    {"patient_id": "P001", "age": 63, "sex": "F",
     "vitals": {"temperature": {"value": 38.4, "unit": "°C"}, "heart_rate": {"value": 96, "unit": "/min"}},
     "labs": [{"name": "CRP", "value": 85, "unit": "mg/L"}, {"name": "WBC", "value": 13.2, "unit": "10^9/L"}],
     "history": {"fever": true, "weight_loss": false},
     "smoking": {"status": "former", "pack_years": 30},
     "notes": "productive cough for 5 days"}

``vitals`` and ``labs`` may each be a list of ``{"name", "value", "unit"}`` or a mapping name ->
``{"value", "unit"}``. CSV (one patient, long format, one field per row)::

    field,value,unit
    patient_id,P001,
    age,63,years
    vitals.temperature,38.4,°C
    labs.CRP,85,mg/L
    history.fever,true,
    smoking.pack_years,30,pack-years

Every measurement needs a unit. Known fields accept their canonical unit and a few explicit alternatives,
converted on reading (°F -> °C, mg/dL -> mg/L, /µL -> 10^9/L ...); any other unit, or a value outside
the field's physiological range, is an `InputValidationError` naming the field. Absent fields are allowed
and listed in `PatientRecord.missing`.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from apps.medical.schema import Measurement, PatientRecord
from core.errors import AdapterError, ConfigError, InputValidationError

logger = logging.getLogger(__name__)


class UnknownFieldWarning(UserWarning):
    """A record field or lab this reader does not know: kept as given (labs) or ignored (other keys)."""


def _scale(factor: float) -> Callable[[float], float]:
    return lambda value: value * factor


_SAME = _scale(1.0)

# Accepted units per canonical unit: normalised spelling (see `_unit_key`) -> conversion to canonical.
_UNIT_CONVERSIONS: Mapping[str, Mapping[str, Callable[[float], float]]] = MappingProxyType(
    {
        "°C": {
            "°c": _SAME,
            "c": _SAME,
            "degc": _SAME,
            "celsius": _SAME,
            "°f": lambda f: (f - 32.0) * 5.0 / 9.0,
        },
        "/min": {
            "/min": _SAME,
            "1/min": _SAME,
            "min-1": _SAME,
            "bpm": _SAME,
            "beats/min": _SAME,
            "breaths/min": _SAME,
        },
        "mmHg": {"mmhg": _SAME, "kpa": _scale(7.50062)},
        "%": {"%": _SAME, "percent": _SAME},
        "kg": {"kg": _SAME, "lb": _scale(0.453592)},
        "cm": {"cm": _SAME, "m": _scale(100.0), "mm": _scale(0.1)},
        "mg/L": {"mg/l": _SAME, "mg/dl": _scale(10.0)},
        "10^9/L": {
            "10^9/l": _SAME,
            "10^3/ul": _SAME,
            "10^3/mm3": _SAME,
            "/nl": _SAME,
            "k/ul": _SAME,
            "/ul": _scale(1e-3),
            "/mm3": _scale(1e-3),
            "cells/ul": _scale(1e-3),
        },
        "g/dL": {"g/dl": _SAME, "g/l": _scale(0.1), "mmol/l": _scale(1.611)},
        "ng/mL": {"ng/ml": _SAME, "ug/l": _SAME},
        "U/L": {"u/l": _SAME, "iu/l": _SAME},
        "years": {"years": _SAME, "year": _SAME, "y": _SAME, "yr": _SAME},
        "pack-years": {"pack-years": _SAME, "packyears": _SAME, "py": _SAME},
    }
)

# field -> (canonical unit, plausible range in that unit)
VITAL_UNITS: Mapping[str, tuple[str, tuple[float, float]]] = MappingProxyType(
    {
        "temperature": ("°C", (25.0, 45.0)),
        "heart_rate": ("/min", (10.0, 300.0)),
        "respiratory_rate": ("/min", (2.0, 80.0)),
        "systolic_bp": ("mmHg", (40.0, 300.0)),
        "diastolic_bp": ("mmHg", (20.0, 200.0)),
        "spo2": ("%", (30.0, 100.0)),
        "weight": ("kg", (0.5, 400.0)),
        "height": ("cm", (30.0, 250.0)),
    }
)
LAB_UNITS: Mapping[str, tuple[str, tuple[float, float]]] = MappingProxyType(
    {
        "CRP": ("mg/L", (0.0, 1000.0)),
        "WBC": ("10^9/L", (0.0, 500.0)),
        "neutrophils": ("10^9/L", (0.0, 500.0)),
        "lymphocytes": ("10^9/L", (0.0, 500.0)),
        "hemoglobin": ("g/dL", (1.0, 25.0)),
        "procalcitonin": ("ng/mL", (0.0, 1000.0)),
        "LDH": ("U/L", (0.0, 20000.0)),
    }
)
_LAB_ALIASES = MappingProxyType(
    {
        **{name.lower(): name for name in LAB_UNITS},
        "c-reactive protein": "CRP",
        "white_cells": "WBC",
        "white_blood_cells": "WBC",
        "leukocytes": "WBC",
        "haemoglobin": "hemoglobin",
        "hb": "hemoglobin",
        "pct": "procalcitonin",
    }
)
SEX_CODES = MappingProxyType({"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"})
SMOKING_STATUSES = ("never", "former", "current")
# Fields whose absence is recorded in `PatientRecord.missing`.
EXPECTED_FIELDS = (
    "age",
    "sex",
    "vitals.temperature",
    "vitals.heart_rate",
    "labs.CRP",
    "labs.WBC",
    "history.fever",
    "history.weight_loss",
    "smoking.status",
    "smoking.pack_years",
)
_TOP_LEVEL = ("patient_id", "age", "sex", "vitals", "labs", "history", "smoking", "notes")
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")
MIN_SECRET_BYTES = 16


def _unit_key(unit: str) -> str:
    key = unit.strip().lower().replace(" ", "").replace("µ", "u").replace("μ", "u").replace("×", "x")
    key = key.replace("x10", "10").replace("10*", "10^").replace("10e", "10^").replace("deg", "°")
    return {"°": "°c", "°celsius": "°c", "℃": "°c", "℉": "°f", "f": "°f", "fahrenheit": "°f"}.get(key, key)


def _is_absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise InputValidationError(f"{where} is {value!r}; expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise InputValidationError(f"{where} is {value!r}; expected a number") from e
    if not math.isfinite(number):
        raise InputValidationError(f"{where} is {value!r}; expected a finite number")
    return number


def _convert(value: Any, unit: Any, canonical: str, bounds: tuple[float, float], where: str) -> float:
    """`value` in `unit` -> canonical unit, range-checked."""
    number = _number(value, where)
    if _is_absent(unit):
        raise InputValidationError(f"{where}: the unit is missing; expected {canonical}")
    accepted = _UNIT_CONVERSIONS[canonical]
    key = _unit_key(str(unit))
    if key not in accepted:
        raise InputValidationError(
            f"{where}: unit {unit!r} is not accepted; expected {canonical} (or one of {', '.join(accepted)})"
        )
    converted = accepted[key](number)
    low, high = bounds
    if not low <= converted <= high:
        raise InputValidationError(
            f"{where} is {number} {unit} = {converted:.4g} {canonical}; expected {low:g}..{high:g} {canonical} "
            f"(a wrong unit?)"
        )
    return converted


def _items(section: Any, source: str, name: str) -> list[tuple[str, Any, Any]]:
    """``(name, value, unit)`` triples from a list of dicts or a mapping name -> {value, unit} (or null)."""
    if _is_absent(section):
        return []
    if isinstance(section, Mapping):
        triples = []
        for key, entry in section.items():
            if entry is None:
                triples.append((str(key), None, None))
            elif isinstance(entry, Mapping):
                triples.append((str(key), entry.get("value"), entry.get("unit")))
            else:
                raise InputValidationError(
                    f"{source}: field '{name}.{key}' is {entry!r}; expected {{'value': ..., 'unit': ...}}"
                )
        return triples
    if isinstance(section, list):
        triples = []
        for index, entry in enumerate(section):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise InputValidationError(
                    f"{source}: field '{name}[{index}]' is {entry!r}; expected {{'name', 'value', 'unit'}}"
                )
            triples.append((str(entry["name"]), entry.get("value"), entry.get("unit")))
        return triples
    raise InputValidationError(
        f"{source}: field '{name}' is {section!r}; expected a list of measurements or a mapping"
    )


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputValidationError(f"{where} is {value!r}; expected true/false")


def validate_record(raw: Mapping[str, Any], source: str = "record") -> PatientRecord:
    """Validate a parsed record (the JSON structure in the module docstring) into a `PatientRecord`.

    Args:
        raw: the parsed record.
        source: a name for messages (the file path).

    Returns:
        The record in canonical units, absent expected fields listed in ``missing``.

    Raises:
        InputValidationError: a missing patient_id, a wrong unit, a value out of range or of the wrong
            type, an unknown sex or smoking status (the message names the source and the field).

    Warns:
        UnknownFieldWarning: an unknown lab (kept in its stated unit) or top-level key (ignored).
    """
    if not isinstance(raw, Mapping):
        raise InputValidationError(
            f"{source}: the record is {type(raw).__name__}; expected an object of fields"
        )
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        warnings.warn(f"{source}: unknown fields {unknown} ignored", UnknownFieldWarning, stacklevel=2)
    patient_id = raw.get("patient_id")
    if _is_absent(patient_id):
        raise InputValidationError(
            f"{source}: field 'patient_id' is missing; expected a non-empty identifier"
        )
    present: set[str] = set()

    age = None
    if not _is_absent(raw.get("age")):
        entry = raw["age"]
        value, unit = (
            (entry.get("value"), entry.get("unit")) if isinstance(entry, Mapping) else (entry, "years")
        )
        age = _convert(value, unit, "years", (0.0, 130.0), f"{source}: field 'age'")
        present.add("age")
    sex = None
    if not _is_absent(raw.get("sex")):
        sex = SEX_CODES.get(str(raw["sex"]).strip().lower())
        if sex is None:
            raise InputValidationError(f"{source}: field 'sex' is {raw['sex']!r}; expected M, F or O")
        present.add("sex")

    vitals = []
    for name, value, unit in _items(raw.get("vitals"), source, "vitals"):
        if name not in VITAL_UNITS:
            raise InputValidationError(
                f"{source}: field 'vitals.{name}' is unknown; expected one of {', '.join(VITAL_UNITS)}"
            )
        if _is_absent(value):
            continue
        canonical, bounds = VITAL_UNITS[name]
        vitals.append(
            Measurement(
                name, _convert(value, unit, canonical, bounds, f"{source}: field 'vitals.{name}'"), canonical
            )
        )
        present.add(f"vitals.{name}")

    labs = []
    for given, value, unit in _items(raw.get("labs"), source, "labs"):
        if _is_absent(value):
            continue
        name = _LAB_ALIASES.get(given.strip().lower())
        if name is None:
            if _is_absent(unit):
                raise InputValidationError(f"{source}: field 'labs.{given}': the unit is missing")
            warnings.warn(
                f"{source}: lab {given!r} is not a known lab; kept unvalidated in {unit!r}",
                UnknownFieldWarning,
                stacklevel=2,
            )
            labs.append(
                Measurement(given, _number(value, f"{source}: field 'labs.{given}'"), str(unit).strip())
            )
            continue
        canonical, bounds = LAB_UNITS[name]
        labs.append(
            Measurement(
                name, _convert(value, unit, canonical, bounds, f"{source}: field 'labs.{given}'"), canonical
            )
        )
        present.add(f"labs.{name}")
    names = [m.name for m in (*vitals, *labs)]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputValidationError(
            f"{source}: fields {duplicated} are given more than once; expected one value each"
        )

    history = {}
    section = raw.get("history")
    if not _is_absent(section):
        if not isinstance(section, Mapping):
            raise InputValidationError(
                f"{source}: field 'history' is {section!r}; expected a mapping flag -> true/false"
            )
        for name, value in section.items():
            if _is_absent(value):
                continue
            history[str(name)] = _flag(value, f"{source}: field 'history.{name}'")
            present.add(f"history.{name}")

    smoking_status, pack_years = None, None
    section = raw.get("smoking")
    if not _is_absent(section):
        if not isinstance(section, Mapping):
            raise InputValidationError(
                f"{source}: field 'smoking' is {section!r}; expected {{'status', 'pack_years'}}"
            )
        if not _is_absent(section.get("status")):
            smoking_status = str(section["status"]).strip().lower()
            if smoking_status not in SMOKING_STATUSES:
                raise InputValidationError(
                    f"{source}: field 'smoking.status' is {section['status']!r}; expected one of {', '.join(SMOKING_STATUSES)}"
                )
            present.add("smoking.status")
        if not _is_absent(section.get("pack_years")):
            pack_years = _convert(
                section["pack_years"],
                "pack-years",
                "pack-years",
                (0.0, 300.0),
                f"{source}: field 'smoking.pack_years'",
            )
            present.add("smoking.pack_years")

    notes = raw.get("notes")
    return PatientRecord(
        patient_id=str(patient_id).strip(),
        age=age,
        sex=sex,
        vitals=tuple(vitals),
        labs=tuple(labs),
        history=history,
        smoking_status=smoking_status,
        pack_years=pack_years,
        notes="" if _is_absent(notes) else str(notes).strip(),
        missing=tuple(f for f in EXPECTED_FIELDS if f not in present),
    )


def _parse_csv(text: str, source: str) -> dict[str, Any]:
    """The long ``field,value,unit`` CSV -> the JSON structure."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"field", "value"} <= {f.strip() for f in reader.fieldnames}:
        raise InputValidationError(
            f"{source}: CSV header is {reader.fieldnames}; expected the columns field,value,unit (one field per row)"
        )
    raw: dict[str, Any] = {}
    seen: set[str] = set()
    for row_number, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        field, value, unit = row.get("field", ""), row.get("value", ""), row.get("unit", "")
        if not field:
            continue
        if field in seen:
            raise InputValidationError(
                f"{source}: row {row_number}: field {field!r} repeated; expected it once"
            )
        seen.add(field)
        section, _, name = field.partition(".")
        if not name:
            raw[field] = {"value": value, "unit": unit} if field == "age" and unit else value
        elif section in ("vitals", "labs"):
            raw.setdefault(section, {})[name] = {"value": value, "unit": unit}
        elif section in ("history", "smoking"):
            raw.setdefault(section, {})[name] = value
        else:
            raise InputValidationError(
                f"{source}: row {row_number}: field {field!r} is unknown; expected patient_id, age, sex, notes or "
                f"vitals.*, labs.*, history.*, smoking.*"
            )
    return raw


def read_record(path: str | Path) -> PatientRecord:
    """Read one patient record from a ``.json`` or ``.csv`` file (formats in the module docstring).

    Args:
        path: the record file.

    Returns:
        The validated `PatientRecord` in canonical units.

    Raises:
        AdapterError: the file is missing, unreadable, not valid JSON/CSV, or has another extension.
        InputValidationError: a field breaks a rule (see `validate_record`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise AdapterError(
            f"{path}: unsupported record format {suffix or '(no extension)'!r}; expected .json or .csv"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(
            f"{path}: cannot read the record ({e}); expected a UTF-8 .json or .csv file"
        ) from e
    if suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    else:
        try:
            raw = _parse_csv(text, str(path))
        except csv.Error as e:
            raise AdapterError(f"{path}: invalid CSV ({e})") from e
    return validate_record(raw, str(path))


def record_to_dict(record: PatientRecord) -> dict[str, Any]:
    """The JSON structure of `record` (canonical units), readable back by `read_record`."""
    return {
        "patient_id": record.patient_id,
        "age": record.age,
        "sex": record.sex,
        "vitals": [{"name": m.name, "value": m.value, "unit": m.unit} for m in record.vitals],
        "labs": [{"name": m.name, "value": m.value, "unit": m.unit} for m in record.labs],
        "history": dict(record.history),
        "smoking": {"status": record.smoking_status, "pack_years": record.pack_years},
        "notes": record.notes,
    }


def pseudonymise(patient_id: str, secret: str | bytes) -> str:
    """A stable pseudonym for `patient_id`: HMAC-SHA256 keyed by `secret`, as 64 hex characters.

    The same id and secret always give the same pseudonym; without the secret the id cannot be
    recovered or re-derived by hashing candidate ids. The caller owns the secret (an entry point reads
    it from its configuration); it is never stored next to the pseudonyms.

    Args:
        patient_id: the identifier to hide (surrounding whitespace ignored).
        secret: the key, at least 16 bytes (UTF-8 for a str).

    Returns:
        The lowercase hex digest.

    Raises:
        ConfigError: a secret shorter than 16 bytes.
        InputValidationError: an empty patient_id.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"pseudonymisation secret: expected at least {MIN_SECRET_BYTES} bytes, got {len(key)}; "
            f"pass a long random secret (e.g. secrets.token_hex(32))"
        )
    identifier = str(patient_id).strip()
    if not identifier:
        raise InputValidationError("pseudonymise: patient_id is empty; expected a non-empty identifier")
    return hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
