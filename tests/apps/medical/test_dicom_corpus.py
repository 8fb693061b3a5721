"""Every real DICOM file we can reach either loads to a valid HU volume or is rejected with one of our errors.

Corpora: the pydicom wheel's test files, the ``pydicom-data`` package (a dev dependency) and the real CT in
``<repo>/../shared/data/medical`` (LIDC-IDRI stacks and a gantry-tilted GE head CT with a manifest).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from apps.medical.adapters import GantryTiltWarning, NonUniformSpacingWarning, read_series
from apps.medical.schema import CTVolume
from core.errors import AdapterError, InputValidationError

SHARED_MEDICAL = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "medical"
GE_TILT = SHARED_MEDICAL / "dcm-qa-ct-ge-tilt"
LIDC = SHARED_MEDICAL / "lidc-idri-mini"
needs_shared_data = pytest.mark.skipif(not SHARED_MEDICAL.is_dir(), reason=f"{SHARED_MEDICAL} is absent")


def _pydicom_wheel_files() -> list[Path]:
    wheel = Path(pydicom.data.__file__).parent
    return sorted(
        p for p in map(Path, pydicom.data.get_testdata_files()) if p.is_file() and wheel in p.parents
    )


def _pydicom_data_files() -> list[Path]:
    spec = importlib.util.find_spec("data_store")  # the import name of the pydicom-data distribution
    if spec is None or spec.origin is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[dev]')")
    return sorted(p for p in (Path(spec.origin).parent / "data").rglob("*") if p.is_file())


def _shared_files() -> list[Path]:
    if not SHARED_MEDICAL.is_dir():
        pytest.skip(f"{SHARED_MEDICAL} is absent")
    return sorted(SHARED_MEDICAL.rglob("*.dcm"))


def _assert_valid(volume: CTVolume, path: Path) -> None:
    assert volume.hu.ndim == 3 and volume.hu.shape[0] >= 1, path
    assert volume.hu.dtype == np.float32 and np.isfinite(volume.hu).all(), path
    assert volume.padding_mask.shape == volume.hu.shape, path
    assert all(s > 0 and math.isfinite(s) for s in volume.spacing), path


def _walk(files: list[Path]) -> tuple[int, dict[str, int], list[str]]:
    """``(loaded, rejections by error type, unexpected)``; unexpected lists anything but our typed errors."""
    loaded, rejected, unexpected = 0, {}, []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom and our degraded-input warnings are fine here
                volume = read_series(path)
        except (AdapterError, InputValidationError) as e:
            assert str(path) in str(e), f"the error does not name the file: {e}"
            rejected[type(e).__name__] = rejected.get(type(e).__name__, 0) + 1
            continue
        except Exception as e:  # the point of the test: anything else is a bug
            unexpected.append(f"{path}: {type(e).__name__}: {e}")
            continue
        _assert_valid(volume, path)
        loaded += 1
    return loaded, rejected, unexpected


@pytest.mark.parametrize(
    ("corpus", "min_loaded"),
    [(_pydicom_wheel_files, 10), (_pydicom_data_files, 3), (_shared_files, 67)],
    ids=["pydicom-wheel", "pydicom-data", "shared-data"],
)
def test_every_corpus_file_loads_or_is_rejected_with_a_typed_error(corpus, min_loaded):
    files = corpus()
    assert files, "empty corpus"
    loaded, rejected, unexpected = _walk(files)
    assert not unexpected, "\n".join(unexpected)
    assert loaded >= min_loaded, (loaded, rejected)
    assert loaded + sum(rejected.values()) == len(files)


@needs_shared_data
@pytest.mark.shared_data
@pytest.mark.parametrize("patient", ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"])
def test_lidc_stacks_load_with_positions_from_their_labels(patient):
    with open(LIDC / "slice_labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient_id"] == patient]
    volume = read_series(LIDC / patient)  # the folder also holds the annotation XML (skipped)
    assert volume.shape == (len(rows), 512, 512)
    np.testing.assert_allclose(
        volume.image_positions[:, 2], sorted(float(r["z_mm"]) for r in rows), atol=1e-4
    )
    assert volume.spacing[0] == pytest.approx(float(rows[0]["slice_thickness_mm"]))
    assert volume.spacing[1] == pytest.approx(float(rows[0]["pixel_spacing_mm"]))
    inside = volume.hu[~volume.padding_mask]
    assert volume.padding_mask.any() and inside.min() >= -1200 and inside.max() <= 3072


@needs_shared_data
@pytest.mark.shared_data
def test_ge_tilted_series_reproduces_the_manifest_geometry():
    with open(GE_TILT / "manifest.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: float(r["ipp_z_mm"]))
    tilt = float(rows[0]["gantry_tilt_deg"])
    iop = np.array([float(v) for v in rows[0]["iop"].split("\\")])
    normal = np.cross(iop[:3], iop[3:])
    # The table moves along z only, so the true gap between slice planes is the z step projected on the normal.
    expected_steps = np.array([float(r["delta_z_to_next_mm"]) for r in rows[:-1]]) * abs(normal[2])

    with pytest.warns((GantryTiltWarning, NonUniformSpacingWarning)) as caught:
        volume = read_series(GE_TILT)
    assert {w.category for w in caught} >= {GantryTiltWarning, NonUniformSpacingWarning}
    assert volume.tilt_deg == pytest.approx(tilt, abs=0.01)
    steps = np.diff(volume.slice_positions)
    np.testing.assert_allclose(steps, expected_steps, atol=0.01)
    np.testing.assert_allclose(
        sorted(set(np.round(steps, 3))), [1.081, 4.002, 6.999], atol=0.001
    )  # SOURCE.md
    assert [p.name for p in volume.source_files] == [r["file"] for r in rows]
    np.testing.assert_allclose(volume.image_positions[:, 2], [float(r["ipp_z_mm"]) for r in rows], atol=1e-4)
    assert not volume.is_uniform
    # Uniform-spacing or z-step loaders are off by 1/cos(tilt); ours is not.
    assert np.max(np.abs(steps - [float(r["delta_z_to_next_mm"]) for r in rows[:-1]])) > 0.2
    # PixelPaddingValue -1500 (RescaleIntercept 0) is masked.
    assert volume.padding_mask.any() and volume.hu[~volume.padding_mask].min() > -1100

    with pytest.warns((GantryTiltWarning, NonUniformSpacingWarning)):
        resampled = read_series(GE_TILT, resample=True)
    assert resampled.is_uniform and resampled.spacing[0] == pytest.approx(4.002, abs=0.01)
    span = volume.slice_positions[-1] - volume.slice_positions[0]
    assert resampled.shape[0] == round(span / resampled.spacing[0]) + 1
