"""Medical cases -> core examples: the CT volume on a fixed windowed grid, the record as one token per field.

Record tokens: every field in `RECORD_FIELDS` gives one token, present or not, so the model sees "not
measured" as such: a categorical ``field`` id (which field), a categorical ``value`` id (``missing``,
``numeric`` or the category such as ``M`` / ``former`` / ``true``) and one numeric value (standardised
with statistics learned at fit time; its mask is False when the field is missing or categorical). Record
history flags outside `HISTORY_FLAGS` are not model inputs. The CT volume becomes ``(C, D, H, W)``
window channels in [0, 1]; a case without CT gets a zero volume with ``volume_present=False``, which masks
its CT tokens out of attention and pooling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apps.medical.config import RECORD_DOMAIN, RECORD_MODALITY, VolumeGrid
from apps.medical.imaging import stack_windows
from apps.medical.records import LAB_UNITS, VITAL_UNITS
from apps.medical.schema import PADDING_FILL_HU, CTVolume, MedicalCase, PatientRecord
from core.errors import InputValidationError

HISTORY_FLAGS = ("fever", "weight_loss", "night_sweats", "tb_contact", "haemoptysis", "cough", "copd")
# Numeric fields whose distribution is skewed: standardised on log1p(value).
LOG_FIELDS = frozenset(("CRP", "WBC", "neutrophils", "lymphocytes", "procalcitonin", "LDH", "pack_years"))
NUMERIC_RECORD_FIELDS = ("age", *VITAL_UNITS, *LAB_UNITS, "pack_years")
CATEGORY_VALUES = MappingProxyType(
    {
        "sex": ("M", "F", "O"),
        "smoking_status": ("never", "former", "current"),
        **{flag: ("false", "true") for flag in HISTORY_FLAGS},
    }
)
RECORD_FIELDS = (*NUMERIC_RECORD_FIELDS, *CATEGORY_VALUES)

# `value` vocabulary: 0 pad, 1 unknown, then missing, numeric, and every category value.
_VALUE_TOKENS = ("missing", "numeric", *sorted({v for values in CATEGORY_VALUES.values() for v in values}))
VALUE_IDS = MappingProxyType({name: 2 + i for i, name in enumerate(_VALUE_TOKENS)})
FIELD_IDS = MappingProxyType({name: 2 + i for i, name in enumerate(RECORD_FIELDS)})
CATEGORICAL_VOCAB = MappingProxyType({"field": 2 + len(RECORD_FIELDS), "value": 2 + len(_VALUE_TOKENS)})
NUMERIC_FEATURES = ("value",)


# ---------------------------------------------------------------------------------------------------------
# record


def record_values(record: PatientRecord) -> dict[str, float | str | None]:
    """Field name -> raw value (number in canonical unit, category string, or None when missing)."""
    values: dict[str, float | str | None] = {"age": record.age, "pack_years": record.pack_years}
    for name in VITAL_UNITS:
        measurement = record.vital(name)
        values[name] = None if measurement is None else measurement.value
    for name in LAB_UNITS:
        measurement = record.lab(name)
        values[name] = None if measurement is None else measurement.value
    values["sex"] = record.sex
    values["smoking_status"] = record.smoking_status
    for flag in HISTORY_FLAGS:
        present = record.history.get(flag)
        values[flag] = None if present is None else ("true" if present else "false")
    return values


def _transform(name: str, value: float) -> float:
    return math.log1p(max(value, 0.0)) if name in LOG_FIELDS else float(value)


def fit_record_stats(records: Sequence[PatientRecord]) -> dict[str, list[float]]:
    """Mean and standard deviation of each numeric field (after log1p for `LOG_FIELDS`) over `records`.

    Fields never observed get ``[0, 1]``; a constant field gets a standard deviation of 1.
    """
    stats: dict[str, list[float]] = {}
    columns: dict[str, list[float]] = {name: [] for name in NUMERIC_RECORD_FIELDS}
    for record in records:
        for name, value in record_values(record).items():
            if name in columns and value is not None:
                columns[name].append(_transform(name, float(value)))
    for name, column in columns.items():
        if not column:
            stats[name] = [0.0, 1.0]
            continue
        mean, std = float(np.mean(column)), float(np.std(column))
        stats[name] = [mean, std if std > 1e-6 else 1.0]
    return stats


def encode_record(record: PatientRecord, stats: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """One token per record field.

    Args:
        record: the patient record.
        stats: field -> (mean, std) from `fit_record_stats`.

    Returns:
        ``{"categorical": {"field": (T,), "value": (T,)}, "numeric": (T, 1), "numeric_mask": (T, 1),
        "modality_ids": (T,), "domain_ids": (T,)}`` with ``T = len(RECORD_FIELDS)``.
    """
    values = record_values(record)
    length = len(RECORD_FIELDS)
    field_ids = np.array([FIELD_IDS[name] for name in RECORD_FIELDS], dtype=np.int64)
    value_ids = np.empty(length, dtype=np.int64)
    numeric = np.zeros((length, 1), dtype=np.float32)
    numeric_mask = np.zeros((length, 1), dtype=bool)
    for index, name in enumerate(RECORD_FIELDS):
        value = values[name]
        if value is None:
            value_ids[index] = VALUE_IDS["missing"]
        elif name in CATEGORY_VALUES:
            value_ids[index] = VALUE_IDS.get(str(value), 1)
        else:
            mean, std = stats[name]
            value_ids[index] = VALUE_IDS["numeric"]
            # Clipped so that a wild value cannot push the periodic encoding into an unseen range.
            numeric[index, 0] = float(np.clip((_transform(name, float(value)) - mean) / std, -6.0, 6.0))
            numeric_mask[index, 0] = True
    return {
        "categorical": {"field": field_ids, "value": value_ids},
        "numeric": numeric,
        "numeric_mask": numeric_mask,
        "modality_ids": np.full(length, RECORD_MODALITY, dtype=np.int64),
        "domain_ids": np.full(length, RECORD_DOMAIN, dtype=np.int64),
    }


def without_field(example: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A copy of an encoded example whose record token `index` is marked missing (occlusion)."""
    categorical = {k: v.copy() for k, v in example["categorical"].items()}
    categorical["value"][index] = VALUE_IDS["missing"]
    numeric_mask = example["numeric_mask"].copy()
    numeric_mask[index] = False
    numeric = example["numeric"].copy()
    numeric[index] = 0.0
    return {**example, "categorical": categorical, "numeric": numeric, "numeric_mask": numeric_mask}


# ---------------------------------------------------------------------------------------------------------
# CT volume


def _source_slice_index(volume: CTVolume, target_mm: np.ndarray) -> np.ndarray:
    """Continuous slice index of each target position along the normal (-2 outside the stack)."""
    positions = np.asarray(volume.slice_positions, dtype=np.float64)
    count = len(positions)
    index = np.interp(target_mm, positions, np.arange(count, dtype=np.float64), left=np.nan, right=np.nan)
    half = volume.spacing[0] / 2.0
    # Half a slice beyond each end still lies in the end slice (its slab).
    index = np.where(np.isnan(index) & (np.abs(target_mm - positions[0]) <= half), 0.0, index)
    index = np.where(np.isnan(index) & (np.abs(target_mm - positions[-1]) <= half), count - 1.0, index)
    return np.where(np.isnan(index), -2.0, index)


def _grid_positions(volume: CTVolume, grid: VolumeGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous source indices (slice, row, col) of the grid's sample points; the grid is centred."""
    axes = []
    for size, spacing in zip(grid.shape, grid.spacing_mm, strict=True):
        axes.append((np.arange(size) - (size - 1) / 2.0) * spacing)  # mm from the grid centre
    positions = np.asarray(volume.slice_positions, dtype=np.float64)
    centre_mm = (positions[0] + positions[-1]) / 2.0
    slices = _source_slice_index(volume, centre_mm + axes[0])
    _, rows_n, cols_n = volume.shape
    rows = (rows_n - 1) / 2.0 + axes[1] / volume.spacing[1]
    cols = (cols_n - 1) / 2.0 + axes[2] / volume.spacing[2]
    return slices, rows, cols


def encode_volume(volume: CTVolume, grid: VolumeGrid) -> np.ndarray:
    """Resample a CT volume onto the fixed grid (trilinear, centred) and stack its window channels.

    The grid is centred on the middle of the slice stack and of the image; slice positions come from
    `CTVolume.slice_positions`, so non-uniform stacks are resampled exactly. Gantry tilt shear is not
    undone (each slice is taken as acquired). Outside the scanned region the grid holds air (-1024 HU).

    Args:
        volume: the CT volume.
        grid: the target grid.

    Returns:
        ``(C, D, H, W)`` float32 in [0, 1], one channel per window of `grid.windows`.
    """
    slices, rows, cols = _grid_positions(volume, grid)
    sizes = volume.shape

    def normalised(index: np.ndarray, size: int) -> torch.Tensor:
        # align_corners=True: -1 and 1 are the centres of the first and last voxels.
        scaled = 2.0 * index / max(size - 1, 1) - 1.0 if size > 1 else np.where(index == 0, 0.0, 2.0)
        return torch.as_tensor(scaled, dtype=torch.float32)

    z, y, x = torch.meshgrid(
        normalised(slices, sizes[0]), normalised(rows, sizes[1]), normalised(cols, sizes[2]), indexing="ij"
    )
    sample_grid = torch.stack([x, y, z], dim=-1)[None]  # (1, D, H, W, 3), grid_sample wants (x, y, z)
    # Shifted so that zero padding outside the volume means air.
    shifted = torch.as_tensor(volume.hu - PADDING_FILL_HU, dtype=torch.float32)[None, None]  # (1, 1, S, R, C)
    resampled = F.grid_sample(shifted, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    hu = resampled[0, 0].numpy() + PADDING_FILL_HU  # (D, H, W)
    return stack_windows(hu, grid.windows).astype(np.float32)  # (C, D, H, W)


def patch_indices(
    volume_shape: Sequence[int], volume: CTVolume, grid: VolumeGrid
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per array axis of the original series, each voxel's patch index on the grid and whether it is on it.

    Returns:
        Three ``(patch_index, inside)`` pairs for the slice, row and column axes (lengths S, R, C).
    """
    positions = np.asarray(volume.slice_positions, dtype=np.float64)
    centre_mm = (positions[0] + positions[-1]) / 2.0
    _, r_n, c_n = volume_shape
    continuous = [
        (positions - centre_mm) / grid.spacing_mm[0] + (grid.shape[0] - 1) / 2.0,
        ((np.arange(r_n) - (r_n - 1) / 2.0) * volume.spacing[1]) / grid.spacing_mm[1]
        + (grid.shape[1] - 1) / 2.0,
        ((np.arange(c_n) - (c_n - 1) / 2.0) * volume.spacing[2]) / grid.spacing_mm[2]
        + (grid.shape[2] - 1) / 2.0,
    ]
    out = []
    for index, size, patch in zip(continuous, grid.shape, grid.patch_size, strict=True):
        voxel = np.round(index).astype(np.int64)
        out.append((np.clip(voxel // patch, 0, size // patch - 1), (voxel >= 0) & (voxel < size)))
    return out


def patch_map_to_volume(
    patch_map: np.ndarray, volume_shape: Sequence[int], volume: CTVolume, grid: VolumeGrid
) -> np.ndarray:
    """Project a per-patch map ``(D', H', W')`` back onto the voxels ``(S, R, C)`` of the original series.

    Used for the evidence overlay: each original voxel takes the value of the patch its position falls in
    (0 outside the grid).

    Args:
        patch_map: ``grid.patch_grid``-shaped scores.
        volume_shape: ``(S, R, C)`` of `volume`.
        volume: the original CT volume (its slice positions and spacing).
        grid: the grid the model saw.

    Returns:
        ``(S, R, C)`` float32.
    """
    (zi, zv), (yi, yv), (xi, xv) = patch_indices(volume_shape, volume, grid)
    out = np.asarray(patch_map, dtype=np.float32)[np.ix_(zi, yi, xi)]  # (S, R, C)
    mask = zv[:, None, None] & yv[None, :, None] & xv[None, None, :]
    return np.where(mask, out, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# cases


def encode_case(
    case: MedicalCase,
    grid: VolumeGrid,
    stats: Mapping[str, Sequence[float]],
    *,
    label_ids: Mapping[str, int] | None = None,
    volume_tensor: np.ndarray | None = None,
) -> dict[str, Any]:
    """One example for `core.data.collate`: record tokens, the CT volume (or zeros) and optionally the label.

    Args:
        case: the case.
        grid: the CT grid.
        stats: record statistics from `fit_record_stats`.
        label_ids: label -> class id; when given, the case's label is encoded as ``labels``.
        volume_tensor: an already encoded ``(C, D, H, W)`` volume (saves resampling twice).

    Raises:
        InputValidationError: `label_ids` given and the case has no label or an unknown one.
    """
    example: dict[str, Any] = encode_record(case.record, stats)
    if case.volume is None:
        example["volume"] = np.zeros((len(grid.windows), *grid.shape), dtype=np.float32)
        example["volume_present"] = False
    else:
        example["volume"] = volume_tensor if volume_tensor is not None else encode_volume(case.volume, grid)
        example["volume_present"] = True
    if label_ids is not None:
        if case.label not in label_ids:
            raise InputValidationError(
                f"case {case.case_id}: label {case.label!r} is not one of the model's labels {sorted(label_ids)}"
            )
        example["labels"] = label_ids[case.label]
    return example


def encode_cases(
    cases: Sequence[MedicalCase],
    grid: VolumeGrid,
    stats: Mapping[str, Sequence[float]],
    *,
    label_ids: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """`encode_case` for every case, in order, on a few threads (resampling releases the GIL).

    Raises:
        InputValidationError: as `encode_case`.
    """
    workers = min(8, os.cpu_count() or 1, len(cases))
    if workers <= 1:
        return [encode_case(c, grid, stats, label_ids=label_ids) for c in cases]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: encode_case(c, grid, stats, label_ids=label_ids), cases))
