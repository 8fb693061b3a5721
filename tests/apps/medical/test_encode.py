"""Encoding: one token per record field with missing masks, the CT volume on the fixed windowed grid."""

from __future__ import annotations

import numpy as np
import pytest

from apps.medical.config import GRIDS, VolumeGrid
from apps.medical.encode import (
    CATEGORICAL_VOCAB,
    FIELD_IDS,
    RECORD_FIELDS,
    VALUE_IDS,
    encode_case,
    encode_cases,
    encode_record,
    encode_volume,
    fit_record_stats,
    patch_map_to_volume,
)
from apps.medical.imaging import apply_window
from apps.medical.records import validate_record
from apps.medical.schema import CTVolume, MedicalCase
from core.data import collate
from core.errors import ConfigError

RECORD = validate_record(
    {
        "patient_id": "P1",
        "age": 70,
        "sex": "F",
        "labs": [{"name": "CRP", "value": 120, "unit": "mg/L"}],
        "history": {"fever": True},
        "smoking": {"status": "current"},
    }
)


def _volume(hu: np.ndarray, spacing=(5.0, 4.0, 4.0)) -> CTVolume:
    s = hu.shape[0]
    positions = np.arange(s) * spacing[0]
    return CTVolume(
        hu=hu.astype(np.float32),
        padding_mask=np.zeros(hu.shape, dtype=bool),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        slice_positions=positions,
        image_positions=np.stack([np.zeros(s), np.zeros(s), positions], axis=1),
        series_uid="1.2.3",
    )


def test_every_record_field_is_one_token_and_missing_fields_are_masked():
    stats = fit_record_stats([RECORD])
    example = encode_record(RECORD, stats)
    assert example["categorical"]["field"].tolist() == [FIELD_IDS[name] for name in RECORD_FIELDS]
    index = {name: i for i, name in enumerate(RECORD_FIELDS)}
    value = example["categorical"]["value"]
    assert value[index["sex"]] == VALUE_IDS["F"] and value[index["smoking_status"]] == VALUE_IDS["current"]
    assert value[index["fever"]] == VALUE_IDS["true"] and value[index["weight_loss"]] == VALUE_IDS["missing"]
    assert example["numeric_mask"][index["age"], 0] and example["numeric_mask"][index["CRP"], 0]
    assert not example["numeric_mask"][index["WBC"], 0] and example["numeric"][index["WBC"], 0] == 0.0
    assert not example["numeric_mask"][index["sex"], 0]  # a category has no numeric value
    assert value.max() < CATEGORICAL_VOCAB["value"]


def test_volume_is_resampled_to_the_grid_with_window_channels_and_air_outside():
    grid = VolumeGrid(shape=(8, 16, 16), spacing_mm=(10.0, 10.0, 10.0), patch_size=(4, 8, 8))
    hu = np.full((10, 20, 20), 40.0)  # soft tissue, 50 x 80 x 80 mm
    out = encode_volume(_volume(hu), grid)
    assert out.shape == (3, 8, 16, 16) and out.dtype == np.float32
    centre, corner = out[:, 4, 8, 8], out[:, 0, 0, 0]
    assert centre[1] == pytest.approx(0.5, abs=1e-3)  # 40 HU is the middle of the mediastinum window
    air = [float(apply_window(np.float32(-1024.0), w)) for w in grid.windows]
    assert corner.tolist() == pytest.approx(air)  # outside the scanned region: air


def test_patch_map_projects_back_onto_the_series_slices():
    grid = GRIDS["tiny"]
    volume = _volume(np.zeros((12, 32, 32)), spacing=(5.0, 12.5, 12.5))
    patch_map = np.zeros(grid.patch_grid, dtype=np.float32)
    patch_map[2, 1, 2] = 1.0
    per_voxel = patch_map_to_volume(patch_map, volume.shape, volume, grid)
    hit = np.argwhere(per_voxel > 0)
    assert per_voxel.shape == volume.shape and len(hit)
    # the patch is just above the centre of the slice stack, in the row band 1 and column band 2
    assert hit[:, 0].min() >= 6 and hit[:, 1].max() < 16 and hit[:, 2].min() >= 16


def test_a_case_without_ct_collates_with_cases_with_ct():
    stats = fit_record_stats([RECORD])
    grid = GRIDS["tiny"]
    with_ct = MedicalCase("a", RECORD, volume=_volume(np.zeros((8, 32, 32))), label="normal")
    without = MedicalCase("b", RECORD, volume=None, label="pneumonia")
    ids = {"normal": 0, "pneumonia": 1}
    batch = collate(
        [encode_case(with_ct, grid, stats, label_ids=ids), encode_case(without, grid, stats, label_ids=ids)]
    )
    assert batch.volume.shape == (2, 3, *grid.shape) and batch.volume_present.tolist() == [True, False]
    assert batch.labels.tolist() == [0, 1]


def test_grid_shape_must_be_a_multiple_of_the_patch():
    with pytest.raises(ConfigError, match="multiples of patch_size"):
        VolumeGrid(shape=(10, 32, 32), spacing_mm=(5.0, 5.0, 5.0), patch_size=(4, 8, 8))


def test_encoding_many_cases_on_threads_keeps_the_order_and_the_values():
    stats = fit_record_stats([RECORD])
    grid = GRIDS["tiny"]
    rng = np.random.default_rng(0)
    cases = [
        MedicalCase(f"c{i}", RECORD, volume=_volume(rng.uniform(-1000, 400, (8, 32, 32))), label="normal")
        for i in range(5)
    ] + [MedicalCase("none", RECORD, volume=None, label="pneumonia")]
    ids = {"normal": 0, "pneumonia": 1}
    many = encode_cases(cases, grid, stats, label_ids=ids)
    for case, example in zip(cases, many, strict=True):
        one = encode_case(case, grid, stats, label_ids=ids)
        np.testing.assert_array_equal(example["volume"], one["volume"])
        assert example["labels"] == one["labels"] and example["volume_present"] == one["volume_present"]
