"""CT series reading: geometry from positions, tilt, rescale, padding, multi-frame, codecs, and each rejection."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from apps.medical.adapters import (
    GPL_EXTRA,
    GantryTiltWarning,
    NonUniformSpacingWarning,
    NotDicomError,
    RescaleWarning,
    SliceSpacingWarning,
    apply_window,
    inspect_series,
    read_series,
)
from apps.medical.schema import PADDING_FILL_HU
from core.errors import AdapterError, ConfigError, InputValidationError

from .factories import SERIES_A, SERIES_B, ct_slice, enhanced_ct, write


def _marked(value: int) -> np.ndarray:
    """4 x 5 stored values whose first pixel identifies the slice."""
    stored = np.full((4, 5), 1000, dtype=np.int16)
    stored[0, 0] = value
    return stored


@pytest.fixture
def shuffled_series(tmp_path):
    """3 axial slices at z = 10, 12.5, 15 mm written as c, a, b with InstanceNumbers 2, 3, 1."""
    folder = tmp_path / "series"
    for name, z, instance in (("c.dcm", 10.0, 2), ("a.dcm", 12.5, 3), ("b.dcm", 15.0, 1)):
        write(ct_slice((-5.0, -7.0, z), _marked(int(z * 10)), instance=instance), folder / name)
    return folder


def test_series_loads_in_position_order_not_file_or_instance_order(shuffled_series):
    volume = read_series(shuffled_series)
    assert volume.shape == (3, 4, 5)
    # stored 100/125/150 with intercept -1024
    np.testing.assert_array_equal(volume.hu[:, 0, 0], [100 - 1024, 125 - 1024, 150 - 1024])
    assert [p.name for p in volume.source_files] == ["c.dcm", "a.dcm", "b.dcm"]
    np.testing.assert_allclose(volume.slice_positions, [10.0, 12.5, 15.0])
    assert volume.origin == (-5.0, -7.0, 10.0)
    assert volume.series_uid == SERIES_A and volume.patient_id == "TEST-1"
    assert volume.hu.dtype == np.float32 and not volume.padding_mask.any()


def test_spacing_is_measured_from_positions_not_slice_thickness(shuffled_series):
    volume = read_series(shuffled_series)  # SliceThickness says 1.0 mm
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert volume.is_uniform and volume.tilt_deg == 0.0 and volume.warnings == ()
    np.testing.assert_allclose(volume.direction, np.eye(3)[[2, 1, 0]])
    np.testing.assert_allclose(volume.affine @ [2, 3, 4, 1], [-5.0 + 4 * 0.8, -7.0 + 3 * 0.7, 15.0, 1.0])


def test_a_list_of_files_reads_like_the_folder(shuffled_series):
    files = sorted(shuffled_series.iterdir())
    np.testing.assert_array_equal(read_series(files).hu, read_series(shuffled_series).hu)


def test_non_dicom_files_in_a_folder_are_skipped(shuffled_series):
    (shuffled_series / "README.txt").write_text("not dicom")
    assert read_series(shuffled_series).shape == (3, 4, 5)
    assert inspect_series(shuffled_series)["skipped_files"] == [str(shuffled_series / "README.txt")]


def test_non_uniform_spacing_is_reported_and_resampled_on_request(tmp_path):
    for z in (0.0, 2.0, 6.0):
        write(ct_slice((0.0, 0.0, z), _marked(int(z * 100) + 1000)), tmp_path / f"{z}.dcm")
    with pytest.warns(NonUniformSpacingWarning, match="non-uniform"):
        volume = read_series(tmp_path)
    assert not volume.is_uniform and volume.spacing[0] == pytest.approx(3.0)
    np.testing.assert_allclose(volume.slice_positions, [0.0, 2.0, 6.0])
    assert any("non-uniform" in w for w in volume.warnings)

    with pytest.warns(NonUniformSpacingWarning):
        resampled = read_series(tmp_path, resample=True)
    assert resampled.is_uniform and resampled.shape[0] == 3
    np.testing.assert_allclose(resampled.slice_positions, [0.0, 3.0, 6.0])
    # z = 3 lies a quarter of the way from z = 2 (stored 1200) to z = 6 (stored 1600)
    assert resampled.hu[1, 0, 0] == pytest.approx(1300 - 1024)
    np.testing.assert_allclose(resampled.image_positions[:, 2], [0.0, 3.0, 6.0])


def _tilted(angle_deg: float) -> tuple[float, ...]:
    a = math.radians(angle_deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a))


def test_gantry_tilt_is_detected_and_spacing_is_along_the_normal(tmp_path):
    # A tilted gantry keeps oblique slices but moves the table along z: 5 mm of table per slice.
    for k in range(3):
        write(ct_slice((0.0, 0.0, 5.0 * k), orientation=_tilted(20.0)), tmp_path / f"{k}.dcm")
    with pytest.warns(GantryTiltWarning, match="20.00 deg"):
        volume = read_series(tmp_path)
    assert volume.tilt_deg == pytest.approx(20.0, abs=1e-4)
    assert volume.spacing[0] == pytest.approx(5.0 * math.cos(math.radians(20.0)), abs=1e-4)
    np.testing.assert_allclose(volume.image_positions[:, 2], [0.0, 5.0, 10.0])
    np.testing.assert_allclose(volume.affine[:3, 0], [0.0, 0.0, 5.0], atol=1e-6)  # sheared stack axis


def test_oblique_series_stacked_along_its_normal_has_no_tilt(tmp_path):
    orientation = _tilted(20.0)
    normal = np.cross(orientation[:3], orientation[3:])
    for k in range(3):
        write(ct_slice(tuple(2.0 * k * normal), orientation=orientation), tmp_path / f"{k}.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        volume = read_series(tmp_path)
    assert volume.tilt_deg == 0.0 and volume.spacing[0] == pytest.approx(2.0)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    stored = np.full((4, 5), 600, dtype=np.int16)
    path = write(ct_slice((0, 0, 0), stored, slope=2.0, intercept=-1000.0), tmp_path / "s.dcm")
    with pytest.warns(SliceSpacingWarning):
        volume = read_series(path)
    np.testing.assert_array_equal(volume.hu, 200.0)


def test_missing_rescale_defaults_to_identity_with_a_warning(tmp_path):
    for k in range(2):
        ds = ct_slice((0, 0, k), np.full((4, 5), 40, dtype=np.int16))
        del ds.RescaleSlope, ds.RescaleIntercept
        write(ds, tmp_path / f"{k}.dcm")
    with pytest.warns(RescaleWarning, match="RescaleSlope"):
        volume = read_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, 40.0)


def test_pixel_padding_value_is_masked_even_when_written_unsigned(tmp_path):
    stored = np.full((4, 5), 1040, dtype=np.int16)
    stored[0, :] = -2000
    for k in range(2):
        ds = ct_slice((0, 0, k), stored)
        ds.add_new("PixelPaddingValue", "US", 63536)  # -2000 as unsigned, as LIDC-IDRI writes it
        write(ds, tmp_path / f"{k}.dcm")
    volume = read_series(tmp_path)
    assert volume.padding_mask[:, 0, :].all() and not volume.padding_mask[:, 1:, :].any()
    assert (volume.hu[volume.padding_mask] == PADDING_FILL_HU).all()
    assert (volume.hu[~volume.padding_mask] == 16.0).all()


def test_out_of_field_values_are_masked(tmp_path):
    stored = np.full((4, 5), 1040, dtype=np.int16)
    stored[:, 0] = -2000  # -3024 HU: the reconstruction circle's fill, no PixelPaddingValue given
    for k in range(2):
        write(ct_slice((0, 0, k), stored), tmp_path / f"{k}.dcm")
    volume = read_series(tmp_path)
    assert volume.padding_mask[:, :, 0].all() and volume.padding_mask.sum() == 8
    kept = read_series(tmp_path, out_of_field_below_hu=None)
    assert not kept.padding_mask.any() and kept.hu.min() == -3024.0


def test_folder_with_two_series_is_rejected_listing_both(tmp_path):
    for k in range(2):
        write(ct_slice((0, 0, k), series_uid=SERIES_A), tmp_path / f"a{k}.dcm")
        write(ct_slice((0, 0, k), series_uid=SERIES_B), tmp_path / f"b{k}.dcm")
    with pytest.raises(InputValidationError, match="2 series found") as info:
        read_series(tmp_path)
    assert SERIES_A in str(info.value) and SERIES_B in str(info.value)
    assert read_series(tmp_path, series_uid=SERIES_B).series_uid == SERIES_B
    with pytest.raises(InputValidationError, match="no series with SeriesInstanceUID"):
        read_series(tmp_path, series_uid="1.2.3")


def test_enhanced_ct_multiframe_uses_per_frame_and_shared_groups(tmp_path):
    stored = np.stack([_marked(v) for v in (300, 100, 200)])  # frames at z = 4, 0, 2
    ds = enhanced_ct([(0, 0, 4.0), (0, 0, 0.0), (0, 0, 2.0)], stored, slopes=[1.0, 1.0, 2.0])
    volume = read_series(write(ds, tmp_path / "enhanced.dcm"))
    assert volume.shape == (3, 4, 5) and volume.spacing == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_allclose(volume.slice_positions, [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(volume.hu[:, 0, 0], [100 - 1024, 2 * 200 - 1024, 300 - 1024])
    assert volume.source_files == (tmp_path / "enhanced.dcm",)


def test_enhanced_ct_frame_without_position_is_rejected(tmp_path):
    ds = enhanced_ct([(0, 0, 0.0), (0, 0, 2.0)], np.stack([_marked(1), _marked(2)]), slopes=[1.0, 1.0])
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(InputValidationError, match=r"frame 2.*PlanePositionSequence > ImagePositionPatient"):
        read_series(write(ds, tmp_path / "enhanced.dcm"))


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["jpeg2000", "rle"])
def test_compressed_series_decode_to_the_same_hu(tmp_path, syntax):
    stored = (np.arange(64 * 64, dtype=np.int16).reshape(64, 64) % 2000) - 500
    plain = write(ct_slice((0, 0, 0), stored), tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    compressed = write(ds, tmp_path / "compressed.dcm")
    with pytest.warns(SliceSpacingWarning):
        np.testing.assert_array_equal(read_series(compressed).hu, read_series(plain).hu)


@pytest.mark.skipif(
    importlib.util.find_spec("libjpeg") is not None, reason="the GPL JPEG plugin is installed"
)
def test_jpeg_without_the_gpl_extra_is_refused_naming_the_extra(tmp_path):
    ds = ct_slice((0, 0, 0))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8 not decoded \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = write(ds, tmp_path / "jpeg.dcm")
    with pytest.raises(AdapterError, match=r"TransferSyntaxUID \(0002,0010\).*JPEG Lossless") as info:
        read_series(path)
    assert GPL_EXTRA in str(info.value) and str(path) in str(info.value)


# --- rejection rules: each names the file and the tag ------------------------------------------------------


def _without(keyword):
    def edit(ds):
        delattr(ds, keyword)

    return edit


def _set(keyword, value):
    def edit(ds):
        setattr(ds, keyword, value)

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [
        (_without("PixelData"), InputValidationError, r"PixelData \(7FE0,0010\) is missing"),
        (
            _without("ImagePositionPatient"),
            InputValidationError,
            r"ImagePositionPatient \(0020,0032\) is missing",
        ),
        (_without("ImageOrientationPatient"), InputValidationError, r"ImageOrientationPatient \(0020,0037\)"),
        (_without("PixelSpacing"), InputValidationError, r"PixelSpacing \(0028,0030\) is missing"),
        (_without("SeriesInstanceUID"), InputValidationError, r"SeriesInstanceUID \(0020,000E\)"),
        (_set("Modality", "MR"), InputValidationError, r"Modality \(0008,0060\) is 'MR'; expected 'CT'"),
        (
            _set("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
            InputValidationError,
            r"ImageType \(0008,0008\)",
        ),
        (
            _set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
            InputValidationError,
            "orthogonal unit vectors",
        ),
        (_set("ImagePositionPatient", [0, 0]), InputValidationError, r"ImagePositionPatient .* expected 3"),
    ],
    ids=[
        "pixel-data",
        "position",
        "orientation",
        "pixel-spacing",
        "series-uid",
        "modality",
        "localizer",
        "degenerate-orientation",
        "short-position",
    ],
)
def test_bad_slice_is_rejected_naming_file_and_tag(tmp_path, edit, error, pattern):
    write(ct_slice((0, 0, 0)), tmp_path / "good.dcm")
    ds = ct_slice((0, 0, 1))
    edit(ds)
    bad = write(ds, tmp_path / "bad.dcm")
    with pytest.raises(error, match=pattern) as info:
        read_series(tmp_path)
    assert str(bad) in str(info.value)


def test_non_dicom_file_is_rejected(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not DICOM")
    with pytest.raises(NotDicomError, match="not a DICOM file") as info:
        read_series(path)
    assert isinstance(info.value, AdapterError) and str(path) in str(info.value)


def test_folder_without_dicom_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(AdapterError, match="no DICOM image files"):
        read_series(tmp_path)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(AdapterError, match="no such file"):
        read_series(tmp_path / "absent")


@pytest.mark.parametrize("keep", [200, 900], ids=["header", "pixel-data"])
def test_truncated_file_is_rejected(tmp_path, keep):
    data = write(ct_slice((0, 0, 0), np.zeros((16, 16), np.int16)), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:keep])
    with pytest.raises((AdapterError, InputValidationError)) as info:
        read_series(path)
    assert str(path) in str(info.value)


def test_duplicate_positions_are_rejected(tmp_path):
    write(ct_slice((0, 0, 0), instance=1), tmp_path / "one.dcm")
    write(ct_slice((0, 0, 0), instance=2), tmp_path / "two.dcm")
    with pytest.raises(
        InputValidationError, match=r"duplicate slice positions.*ImagePositionPatient"
    ) as info:
        read_series(tmp_path)
    assert "one.dcm" in str(info.value) and "two.dcm" in str(info.value)


def test_mixed_orientations_are_rejected(tmp_path):
    write(ct_slice((0, 0, 0)), tmp_path / "axial.dcm")
    write(ct_slice((0, 0, 2), orientation=(1, 0, 0, 0, 0, -1)), tmp_path / "coronal.dcm")
    with pytest.raises(
        InputValidationError, match=r"mixed orientations.*ImageOrientationPatient \(0020,0037\)"
    ):
        read_series(tmp_path)


def test_mismatched_image_sizes_are_rejected(tmp_path):
    write(ct_slice((0, 0, 0)), tmp_path / "a.dcm")
    write(ct_slice((0, 0, 1), np.zeros((6, 6), np.int16)), tmp_path / "b.dcm")
    with pytest.raises(InputValidationError, match=r"Rows \(0028,0010\) x Columns"):
        read_series(tmp_path)


def test_pydicom_example_ct_loads():
    with pytest.warns(SliceSpacingWarning):
        volume = read_series(pydicom.examples.get_path("ct"))
    assert volume.shape == (1, 128, 128)
    assert volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert np.isfinite(volume.hu).all() and -1100 < volume.hu.min() < volume.hu.max() < 3000


def test_inspect_reports_every_series_and_is_json_serialisable(tmp_path):
    for k in range(2):
        write(ct_slice((0, 0, 2.0 * k), series_uid=SERIES_A), tmp_path / f"a{k}.dcm")
        ds = ct_slice((0, 0, k), series_uid=SERIES_B)
        ds.Modality = "MR"
        write(ds, tmp_path / f"b{k}.dcm")
    report = json.loads(json.dumps(inspect_series(tmp_path)))
    by_uid = {s["series_uid"]: s for s in report["series"]}
    assert by_uid[SERIES_A]["error"] is None and by_uid[SERIES_A]["shape"] == [2, 4, 5]
    assert by_uid[SERIES_A]["spacing_mm"] == {"row": 0.7, "col": 0.8, "slice": 2.0}
    assert by_uid[SERIES_A]["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert by_uid[SERIES_A]["hu_range"] == [1000 - 1024, 1019 - 1024]
    assert "Modality (0008,0060) is 'MR'" in by_uid[SERIES_B]["error"]
    assert inspect_series(tmp_path, series_uid=SERIES_A)["series"][0]["slices"] == 2


def test_windows_map_hu_to_unit_interval():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    np.testing.assert_allclose(apply_window(hu, "lung"), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(apply_window(np.array([0.0, 40.0, 80.0]), "brain"), [0.0, 0.5, 1.0])
    assert apply_window(hu, (0.0, 100.0)).dtype == np.float32
    with pytest.raises(ConfigError, match="lung, mediastinum, bone, brain"):
        apply_window(hu, "abdomen")
    with pytest.raises(ConfigError, match="positive"):
        apply_window(hu, (0.0, 0.0))
