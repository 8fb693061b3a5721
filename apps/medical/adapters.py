"""Read CT series from DICOM (pydicom) into `CTVolume` records, validating every tag the geometry relies on.

Sources: a series folder (searched recursively; non-DICOM files such as READMEs and DICOMDIR indexes are
skipped), an explicit list of files, or one file (a single slice or a multi-frame Enhanced CT object).
Rules, each enforced with a typed error that names the file and the tag:

- one ``SeriesInstanceUID`` per volume (several in a folder -> `InputValidationError` listing them, unless
  ``series_uid=`` picks one); Modality must be ``CT``;
- slices ordered by ImagePositionPatient projected on the normal of ImageOrientationPatient, never by file
  name or InstanceNumber; spacing measured from those positions; duplicate positions and mixed
  orientations rejected; non-uniform spacing warned about (and resampled on request); gantry tilt measured
  as the angle between the normal and the stacking direction;
- HU = stored value x RescaleSlope + RescaleIntercept (1/0 only with a warning); PixelPaddingValue /
  PixelPaddingRangeLimit and out-of-field values (-2000/-3024 circles) masked;
- compressed transfer syntaxes decoded by the pylibjpeg plugins; JPEG and JPEG-LS need the GPL-licensed
  ``pylibjpeg-libjpeg`` (``pip install 'verticals[dicom-gpl]'``) and are refused up front without it.

Patient records (JSON/CSV) are read by `apps.medical.records`; `read_record` and `pseudonymise` are
re-exported here so that every source of the app is read through this module.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MediaStorageDirectoryStorage

from apps.medical.dicom import (
    GPL_EXTRA,
    Frame,
    NotDicomError,
    decode_pixels,
    frames_of,
    padding_range,
    read_dataset,
    tag_name,
    validate_frame,
)
from apps.medical.imaging import (
    DUPLICATE_TOLERANCE_MM,
    WINDOW_PRESETS,
    apply_window,
    gantry_tilt_deg,
    is_uniform_spacing,
    order_by_position,
    resample_slices,
    slice_normal,
)
from apps.medical.records import pseudonymise, read_record
from apps.medical.schema import PADDING_FILL_HU, CTVolume, MedicalCase
from core.errors import AdapterError, InputValidationError

__all__ = [
    "GPL_EXTRA",
    "WINDOW_PRESETS",
    "DicomWarning",
    "GantryTiltWarning",
    "NonUniformSpacingWarning",
    "NotDicomError",
    "RescaleWarning",
    "SliceSpacingWarning",
    "apply_window",
    "inspect_series",
    "pseudonymise",
    "read_case",
    "read_cases",
    "read_record",
    "read_series",
]

logger = logging.getLogger(__name__)

# Below this a CT value is no tissue or air (air is -1000 HU, noise stays well above -1200): it is the
# scanner's out-of-field fill (-2000, -2048, -3024 ...), masked like padding.
OUT_OF_FIELD_BELOW_HU = -1200.0
# ImageOrientationPatient of two slices differing by more than this are different orientations.
ORIENTATION_TOLERANCE = 1e-4
# A gantry tilt below this (degrees) is rounding noise in ImagePositionPatient, not a tilt to report.
TILT_REPORT_DEG = 0.1


class DicomWarning(UserWarning):
    """Base of the warnings raised while reading DICOM: the volume is valid but degraded or unusual."""


class RescaleWarning(DicomWarning):
    """RescaleSlope/RescaleIntercept absent (1/0 assumed) or RescaleType other than HU."""


class NonUniformSpacingWarning(DicomWarning):
    """The slices are not equally spaced along the normal."""


class GantryTiltWarning(DicomWarning):
    """The slices are stacked obliquely to their normal (gantry tilt): the volume is sheared."""


class SliceSpacingWarning(DicomWarning):
    """A single slice: the slice spacing comes from SpacingBetweenSlices/SliceThickness, not positions."""


# ---------------------------------------------------------------------------------------------------------
# reading files


@dataclass(frozen=True)
class _SeriesFiles:
    """The files of one SeriesInstanceUID, with the Modality and SeriesDescription of its first file."""

    series_uid: str
    paths: tuple[Path, ...]
    modality: str
    description: str


@dataclass(frozen=True)
class _Scan:
    series: dict[str, _SeriesFiles]
    skipped: tuple[Path, ...]


def _collect_files(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[list[Path], bool]:
    """The candidate files and whether they were named explicitly (then every one must be DICOM)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            if not files:
                raise AdapterError(f"{path}: the folder holds no files; expected a CT series (DICOM files)")
            return files, False
        if not path.exists():
            raise AdapterError(f"{path}: no such file or folder; expected a CT series folder or DICOM file")
        return [path], True
    files = [Path(p) for p in source]
    if not files:
        raise AdapterError("read_series: the list of files is empty; expected the DICOM files of one series")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise AdapterError(
            f"{missing[0]}: no such file ({len(missing)} of {len(files)} listed files missing)"
        )
    return files, True


def _scan(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> _Scan:
    """Read every header and group the files by SeriesInstanceUID."""
    files, explicit = _collect_files(source)
    groups: dict[str, list[Path]] = {}
    first: dict[str, Dataset] = {}
    skipped: list[Path] = []
    for path in files:
        try:
            header = read_dataset(path, header_only=True)
        except NotDicomError:
            if explicit:
                raise
            skipped.append(path)
            continue
        media_class = getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", None)
        if media_class == MediaStorageDirectoryStorage:
            if explicit:
                raise AdapterError(
                    f"{path}: a DICOMDIR index, not an image; pass the folder that holds the series"
                )
            skipped.append(path)
            continue
        series_uid = str(header.get("SeriesInstanceUID", "") or "").strip()
        if not series_uid:
            raise InputValidationError(
                f"{path}: {tag_name('SeriesInstanceUID')} is missing or empty (Modality "
                f"{str(header.get('Modality', '') or '')!r}); expected the UID that groups the slices of one "
                f"CT series"
            )
        groups.setdefault(series_uid, []).append(path)
        first.setdefault(series_uid, header)
    if skipped:
        logger.info("skipped %d non-DICOM/DICOMDIR files, e.g. %s", len(skipped), skipped[0])
    if not groups:
        raise AdapterError(f"{source}: no DICOM image files found (skipped {len(skipped)} non-DICOM files)")
    series = {
        uid: _SeriesFiles(
            series_uid=uid,
            paths=tuple(paths),
            modality=str(first[uid].get("Modality", "") or ""),
            description=str(first[uid].get("SeriesDescription", "") or ""),
        )
        for uid, paths in groups.items()
    }
    return _Scan(series=series, skipped=tuple(skipped))


def _describe(series: _SeriesFiles) -> str:
    text = f"{series.series_uid} ({series.modality or 'no modality'}, {len(series.paths)} files"
    return text + (f", '{series.description}')" if series.description else ")")


def _choose_series(scan: _Scan, series_uid: str | None, source: object) -> _SeriesFiles:
    if series_uid is not None:
        if series_uid not in scan.series:
            found = "; ".join(_describe(s) for s in scan.series.values())
            raise InputValidationError(
                f"{source}: no series with {tag_name('SeriesInstanceUID')} {series_uid!r}; found: {found}"
            )
        return scan.series[series_uid]
    if len(scan.series) > 1:
        found = "; ".join(_describe(s) for s in scan.series.values())
        raise InputValidationError(
            f"{source}: {len(scan.series)} series found, expected one {tag_name('SeriesInstanceUID')} per volume: "
            f"{found}. Choose one with series_uid=..."
        )
    return next(iter(scan.series.values()))


# ---------------------------------------------------------------------------------------------------------
# the volume


class _Notes:
    """Warnings found while building one volume; `read_series` emits them, `CTVolume.warnings` keeps them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, type[DicomWarning]]] = []

    def add(self, message: str, category: type[DicomWarning]) -> None:
        self.items.append((message, category))

    @property
    def messages(self) -> tuple[str, ...]:
        return tuple(message for message, _ in self.items)


def _read_frames(
    series: _SeriesFiles,
) -> tuple[list[Frame], list[np.ndarray], list[tuple[int, int] | None], str]:
    """Every frame of every file: geometry, stored pixels ``(R, C)``, padding range; and the PatientID."""
    frames: list[Frame] = []
    pixels: list[np.ndarray] = []
    paddings: list[tuple[int, int] | None] = []
    patient_id = ""
    for path in series.paths:
        dataset = read_dataset(path, header_only=False)
        modality = str(dataset.get("Modality", "") or "")
        if modality != "CT":
            raise InputValidationError(
                f"{path}: {tag_name('Modality')} is {modality!r}; expected 'CT' (this reader builds HU volumes)"
            )
        image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            raise InputValidationError(
                f"{path}: {tag_name('ImageType')} is {image_type}; a LOCALIZER (scout) is a projection, not a "
                f"slice - expected the axial/reformatted slices of the series only"
            )
        patient_id = patient_id or str(dataset.get("PatientID", "") or "")
        file_frames = frames_of(dataset, path)
        pixels.extend(decode_pixels(dataset, path, len(file_frames)))  # (F, R, C) -> F x (R, C)
        frames.extend(file_frames)
        paddings.extend([padding_range(dataset, path)] * len(file_frames))
    return frames, pixels, paddings, patient_id


def _check_consistent(series_uid: str, frames: list[Frame], pixels: list[np.ndarray]) -> None:
    """One image size, one orientation and one pixel spacing for the whole series."""
    reference = frames[0]
    for frame, image in zip(frames, pixels, strict=True):
        validate_frame(frame)
        if image.shape != pixels[0].shape:
            raise InputValidationError(
                f"{frame.label}: {tag_name('Rows')} x {tag_name('Columns')} is {image.shape}; expected "
                f"{pixels[0].shape} like {reference.label}"
            )
        if np.max(np.abs(frame.orientation - reference.orientation)) > ORIENTATION_TOLERANCE:
            raise InputValidationError(
                f"mixed orientations in series {series_uid}: {frame.label} has "
                f"{tag_name('ImageOrientationPatient')} {frame.orientation.tolist()} but {reference.label} has "
                f"{reference.orientation.tolist()}; expected one orientation per volume (a localizer or "
                f"reformat mixed in?) - pass only the slices of one orientation"
            )
        if np.max(np.abs(np.subtract(frame.pixel_spacing, reference.pixel_spacing))) > 1e-3:
            raise InputValidationError(
                f"{frame.label}: {tag_name('PixelSpacing')} is {list(frame.pixel_spacing)}; expected "
                f"{list(reference.pixel_spacing)} like {reference.label}"
            )


def _check_no_duplicates(series_uid: str, frames: list[Frame], slice_positions: np.ndarray) -> None:
    steps = np.diff(slice_positions)
    if steps.size and steps.min() < DUPLICATE_TOLERANCE_MM:
        i = int(np.argmin(steps))
        raise InputValidationError(
            f"duplicate slice positions in series {series_uid}: {frames[i].label} and {frames[i + 1].label} "
            f"have {tag_name('ImagePositionPatient')} {frames[i].position.tolist()} and "
            f"{frames[i + 1].position.tolist()}, both {slice_positions[i]:.3f} mm along the slice normal; "
            f"expected one slice per position (a duplicate export or several acquisitions in one series)"
        )


def _to_hu(
    frames: list[Frame],
    pixels: list[np.ndarray],
    paddings: list[tuple[int, int] | None],
    out_of_field_below_hu: float | None,
    notes: _Notes,
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale stored values to HU and mask padding/out-of-field voxels (inputs in slice order)."""
    hu = np.empty((len(frames), *pixels[0].shape), dtype=np.float32)  # (S, R, C)
    padding_mask = np.zeros(hu.shape, dtype=bool)
    defaulted, odd_types = [], set()
    for k, (frame, stored, padding) in enumerate(zip(frames, pixels, paddings, strict=True)):
        if frame.slope is None or frame.intercept is None:
            defaulted.append(frame.label)
        if frame.rescale_type and frame.rescale_type.upper() != "HU":
            odd_types.add(frame.rescale_type)
        slope = np.float32(1.0 if frame.slope is None else frame.slope)
        intercept = np.float32(0.0 if frame.intercept is None else frame.intercept)
        hu[k] = stored.astype(np.float32) * slope + intercept
        if padding is not None:
            # Padding is defined on stored values, before rescale (PS3.3 C.7.5.1.1.2).
            padding_mask[k] = (stored >= padding[0]) & (stored <= padding[1])
    if defaulted:
        notes.add(
            f"{defaulted[0]}: {tag_name('RescaleSlope')}/{tag_name('RescaleIntercept')} missing on "
            f"{len(defaulted)} of {len(frames)} slices; assumed 1/0, so HU equal the stored values - check "
            f"the HU range",
            RescaleWarning,
        )
    if odd_types:
        notes.add(
            f"{frames[0].label}: {tag_name('RescaleType')} is {sorted(odd_types)}; expected 'HU' - values are "
            f"rescaled as given but may not be Hounsfield units",
            RescaleWarning,
        )
    if out_of_field_below_hu is not None:
        padding_mask |= hu < out_of_field_below_hu
    hu[padding_mask] = PADDING_FILL_HU
    return hu, padding_mask


def _slice_spacing(
    series_uid: str, frames: list[Frame], slice_positions: np.ndarray, notes: _Notes
) -> tuple[float, bool]:
    """``(spacing along the normal in mm, is_uniform)``, measured from positions when there are two slices."""
    if len(frames) == 1:
        spacing = frames[0].spacing_between or frames[0].thickness
        if spacing is None or spacing <= 0:
            raise InputValidationError(
                f"{frames[0].label}: a single slice has no neighbour to measure spacing from and "
                f"{tag_name('SpacingBetweenSlices')}/{tag_name('SliceThickness')} are missing; expected one of "
                f"them (mm)"
            )
        notes.add(
            f"{frames[0].label}: single slice; slice spacing {spacing} mm taken from "
            f"SpacingBetweenSlices/SliceThickness",
            SliceSpacingWarning,
        )
        return float(spacing), True
    steps = np.diff(slice_positions)
    spacing = float(np.median(steps))
    uniform = is_uniform_spacing(slice_positions)
    if not uniform:
        notes.add(
            f"series {series_uid}: non-uniform slice spacing along the normal, steps {steps.min():.3f}.."
            f"{steps.max():.3f} mm (median {spacing:.3f} mm); exact positions are in slice_positions, "
            f"read with resample=True for a uniform grid",
            NonUniformSpacingWarning,
        )
    return spacing, uniform


def _load_series(
    series: _SeriesFiles, *, resample: bool, out_of_field_below_hu: float | None
) -> tuple[CTVolume, _Notes]:
    notes = _Notes()
    frames, pixels, paddings, patient_id = _read_frames(series)
    _check_consistent(series.series_uid, frames, pixels)
    normal = slice_normal(frames[0].orientation)
    order, slice_positions = order_by_position(np.stack([f.position for f in frames]), normal)
    frames = [frames[i] for i in order]
    pixels = [pixels[i] for i in order]
    paddings = [paddings[i] for i in order]
    _check_no_duplicates(series.series_uid, frames, slice_positions)

    hu, padding_mask = _to_hu(frames, pixels, paddings, out_of_field_below_hu, notes)
    image_positions = np.stack([f.position for f in frames])  # (S, 3)
    tilt = gantry_tilt_deg(image_positions, normal)
    if tilt > TILT_REPORT_DEG:
        notes.add(
            f"series {series.series_uid}: gantry tilt {tilt:.2f} deg (slices stacked obliquely to their "
            f"normal); the volume is sheared: slice spacing is measured along the normal and each slice's "
            f"origin is in image_positions",
            GantryTiltWarning,
        )
    spacing, uniform = _slice_spacing(series.series_uid, frames, slice_positions, notes)
    if resample and not uniform:
        hu, padding_mask, slice_positions, image_positions = resample_slices(
            hu, padding_mask, slice_positions, image_positions, spacing, PADDING_FILL_HU
        )
        uniform = True
        logger.info("resampled series %s to %d slices %.3f mm apart", series.series_uid, len(hu), spacing)

    orientation = frames[0].orientation
    return CTVolume(
        hu=hu,
        padding_mask=padding_mask,
        spacing=(spacing, float(frames[0].pixel_spacing[0]), float(frames[0].pixel_spacing[1])),
        origin=tuple(float(v) for v in image_positions[0]),
        direction=np.stack([normal, orientation[3:], orientation[:3]]),  # (3, 3) slice, row, col axes
        slice_positions=slice_positions,
        image_positions=image_positions,
        series_uid=series.series_uid,
        tilt_deg=tilt if tilt > TILT_REPORT_DEG else 0.0,
        is_uniform=uniform,
        warnings=notes.messages,
        source_files=tuple(dict.fromkeys(f.path for f in frames)),
        patient_id=patient_id,
    ), notes


def read_series(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    series_uid: str | None = None,
    resample: bool = False,
    out_of_field_below_hu: float | None = OUT_OF_FIELD_BELOW_HU,
) -> CTVolume:
    """Read one CT series into a volume in Hounsfield units with its geometry.

    Args:
        source: a series folder (searched recursively; non-DICOM files and DICOMDIR are skipped), a list
            of DICOM files, or one DICOM file (a single slice or a multi-frame Enhanced CT object).
        series_uid: the SeriesInstanceUID to read when the source holds several series.
        resample: resample a non-uniformly spaced stack to its median spacing along the normal (linear in
            HU, padding never blended in). Without it the stack keeps its slices and `is_uniform` is False.
        out_of_field_below_hu: HU below which a voxel is out of the field of view and masked (None: only
            PixelPaddingValue is masked).

    Returns:
        The `CTVolume`, slices sorted along the slice normal.

    Raises:
        AdapterError: a missing path, a file that is not DICOM or is truncated, pixel data that cannot be
            decoded (JPEG/JPEG-LS without ``verticals[dicom-gpl]``).
        InputValidationError: several series without `series_uid`, a non-CT Modality, missing pixel data,
            missing or invalid ImagePositionPatient/ImageOrientationPatient/PixelSpacing, duplicate
            positions, mixed orientations, inconsistent image sizes.

    Warns:
        RescaleWarning, NonUniformSpacingWarning, GantryTiltWarning, SliceSpacingWarning.
    """
    scan = _scan(source)
    series = _choose_series(scan, series_uid, source)
    volume, notes = _load_series(series, resample=resample, out_of_field_below_hu=out_of_field_below_hu)
    for message, category in notes.items:
        warnings.warn(message, category, stacklevel=2)
    return volume


def inspect_series(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, series_uid: str | None = None
) -> dict[str, Any]:
    """Describe the CT series under `path` (for ``verticals medical inspect``); JSON-serialisable.

    Every series found is listed; each CT series is loaded and described. A series that cannot be loaded
    is listed with the message of its typed error under ``"error"`` (inspection reports problems rather
    than stopping at the first one).

    Args:
        path: as `read_series` ``source``.
        series_uid: describe only this series.

    Returns:
        ``{"source": str, "skipped_files": [str], "series": [{"series_uid", "modality", "description",
        "files", "error", and when loaded: "slices", "shape" (slices, rows, cols), "spacing_mm" {"row",
        "col", "slice"}, "slice_steps_mm" {"min", "max"}, "uniform_spacing", "orientation" (6 cosines),
        "tilt_deg", "hu_range" [min, max] over non-padding voxels, "padding_fraction", "patient_id_present",
        "warnings"}]}``.

    Raises:
        AdapterError: nothing readable as DICOM under `path`.
        InputValidationError: `series_uid` not found, a file without SeriesInstanceUID.
    """
    scan = _scan(path)
    chosen = (
        [_choose_series(scan, series_uid, path)] if series_uid is not None else list(scan.series.values())
    )
    described = []
    for series in chosen:
        entry: dict[str, Any] = {
            "series_uid": series.series_uid,
            "modality": series.modality,
            "description": series.description,
            "files": len(series.paths),
            "error": None,
        }
        try:
            volume, _ = _load_series(series, resample=False, out_of_field_below_hu=OUT_OF_FIELD_BELOW_HU)
        except (AdapterError, InputValidationError) as e:
            entry["error"] = str(e)
            described.append(entry)
            continue
        inside = volume.hu[~volume.padding_mask]
        steps = np.diff(volume.slice_positions)
        entry.update(
            {
                "slices": volume.shape[0],
                "shape": list(volume.shape),
                "spacing_mm": {
                    "row": volume.spacing[1],
                    "col": volume.spacing[2],
                    "slice": volume.spacing[0],
                },
                "slice_steps_mm": {
                    "min": float(steps.min()) if steps.size else volume.spacing[0],
                    "max": float(steps.max()) if steps.size else volume.spacing[0],
                },
                "uniform_spacing": volume.is_uniform,
                "orientation": [float(v) for v in (*volume.direction[2], *volume.direction[1])],
                "tilt_deg": round(volume.tilt_deg, 3),
                "hu_range": [float(inside.min()), float(inside.max())] if inside.size else None,
                "padding_fraction": float(volume.padding_mask.mean()),
                "patient_id_present": bool(volume.patient_id),
                "warnings": list(volume.warnings),
            }
        )
        described.append(entry)
    return {"source": str(path), "skipped_files": [str(p) for p in scan.skipped], "series": described}


# ---------------------------------------------------------------------------------------------------------
# cases: a series + a record (+ a confirmed label)

CASES_MANIFEST = "cases.csv"
_CASE_COLUMNS = ("case_id", "series_dir", "record_file")


def read_case(
    series_dir: str | os.PathLike[str] | None,
    record_file: str | os.PathLike[str],
    *,
    case_id: str = "case",
    label: str | None = None,
) -> MedicalCase:
    """Read one case: the CT series (None: a case without CT) and the patient record.

    Raises:
        AdapterError, InputValidationError: as `read_series` and `read_record`.
    """
    volume = read_series(series_dir) if series_dir is not None else None
    return MedicalCase(
        case_id=case_id,
        record=read_record(record_file),
        volume=volume,
        label=label or None,
        series_dir=Path(series_dir) if series_dir is not None else None,
        record_file=Path(record_file),
    )


def read_cases(data_dir: str | os.PathLike[str], *, with_ct: bool = True) -> list[MedicalCase]:
    """Read every case listed in ``data_dir/cases.csv`` (the layout `apps.medical.synthetic.generate` writes).

    Columns: ``case_id``, ``series_dir`` (relative to `data_dir`; empty for a case without CT),
    ``record_file`` (relative), and optionally ``label`` (empty when unconfirmed).

    Args:
        data_dir: the folder holding ``cases.csv``.
        with_ct: read the CT series (False: record-only cases, e.g. for a record-only baseline).

    Returns:
        The cases in manifest order.

    Raises:
        AdapterError: no ``cases.csv``; a series or record that cannot be read.
        InputValidationError: a missing column or an empty required cell (names the row and column).
    """
    data_dir = Path(data_dir)
    manifest = data_dir / CASES_MANIFEST
    if not manifest.is_file():
        raise AdapterError(
            f"{manifest}: no such file; expected a case list with columns {', '.join(_CASE_COLUMNS)}, label "
            f"(write one with `verticals medical generate --out DIR`)"
        )
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _CASE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputValidationError(
                f"{manifest}: columns {missing} missing; expected {', '.join(_CASE_COLUMNS)} (and label)"
            )
        rows = list(reader)
    if not rows:
        raise InputValidationError(f"{manifest}: no cases listed; expected one row per case")
    cases = []
    for row_number, row in enumerate(rows, start=2):
        for column in ("case_id", "record_file"):
            if not (row.get(column) or "").strip():
                raise InputValidationError(f"{manifest}: row {row_number}: column {column!r} is empty")
        series = (row.get("series_dir") or "").strip()
        cases.append(
            read_case(
                data_dir / series if series and with_ct else None,
                data_dir / row["record_file"].strip(),
                case_id=row["case_id"].strip(),
                label=(row.get("label") or "").strip() or None,
            )
        )
    return cases
