"""Low-level DICOM access for CT (pydicom): parse a file, take each frame's geometry and rescale, decode pixels.

Classic single-frame CT and multi-frame Enhanced CT are handled alike: every attribute of a frame is taken
from its PerFrameFunctionalGroupsSequence item, else from the SharedFunctionalGroupsSequence, else from the
top level of the dataset. Every pydicom error is re-raised once here as an `AdapterError` naming the file;
every missing or malformed tag is an `InputValidationError` naming the file, the frame and the tag.
`apps.medical.adapters` builds volumes from these pieces.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import UID, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from core.errors import AdapterError, InputValidationError

GPL_EXTRA = "verticals[dicom-gpl]"
# JPEG (ISO 10918) and JPEG-LS syntaxes: only pylibjpeg-libjpeg (GPLv3, opt-in) or GDCM decode the
# 12/16-bit lossless variants that CT uses; Pillow handles 8-bit baseline only, so it does not count.
GPL_SYNTAXES = frozenset((*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes))
_PIXEL_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    NotImplementedError,
    RuntimeError,
    AttributeError,
)
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, struct.error, *_PIXEL_ERRORS)


class NotDicomError(AdapterError):
    """A file that is not DICOM at all (no Part 10 header); skipped inside folders, an error when named."""


def tag_name(keyword: str) -> str:
    """``"Keyword (gggg,eeee)"``, the way every message names a tag."""
    return f"{keyword} {Tag(tag_for_keyword(keyword))}"


def read_dataset(path: Path, *, header_only: bool) -> Dataset:
    """Parse one DICOM file with pydicom.

    Args:
        path: the file.
        header_only: stop before the pixel data (fast; for grouping files into series).

    Returns:
        The pydicom `Dataset`.

    Raises:
        NotDicomError: the file has no DICOM Part 10 header (a README, a JSON file, raw data).
        AdapterError: pydicom cannot parse it (truncated or corrupt), wrapping pydicom's error.
    """
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as e:
        raise NotDicomError(
            f"{path}: not a DICOM file (no 'DICM' preamble or file meta information); expected a DICOM "
            f"Part 10 CT image"
        ) from e
    except _READ_ERRORS as e:
        raise AdapterError(
            f"{path}: unreadable DICOM file ({type(e).__name__}: {e}); the file may be truncated"
        ) from e
    _check_not_truncated(dataset, path)
    return dataset


def _check_not_truncated(dataset: Dataset, path: Path) -> None:
    """pydicom keeps a value cut short by the end of the file; a short last element means truncation."""
    tags = list(dataset.keys())
    if not tags:
        return
    raw = dataset.get_item(tags[-1])
    if (
        isinstance(raw, RawDataElement)
        and isinstance(raw.value, bytes)
        and raw.length != 0xFFFFFFFF  # undefined length: no declared size to compare
        and len(raw.value) < raw.length
    ):
        keyword = keyword_for_tag(raw.tag) or "element"
        raise AdapterError(
            f"{path}: the file is truncated: {keyword} {Tag(raw.tag)} declares {raw.length} bytes but only "
            f"{len(raw.value)} are present; expected a complete file (copy or export it again)"
        )


# ---------------------------------------------------------------------------------------------------------
# per-frame attributes (classic single-frame files and Enhanced CT functional groups alike)


@dataclass(frozen=True)
class Frame:
    """Geometry and rescale of one slice (a single-frame file, or one frame of a multi-frame file).

    Attributes:
        label: how messages name it: the path, plus ``(frame N)`` for a multi-frame file.
        path: the file.
        position: ``(3,)`` ImagePositionPatient, LPS mm.
        orientation: ``(6,)`` ImageOrientationPatient (row cosines, column cosines).
        pixel_spacing: PixelSpacing (between rows, between columns), mm.
        slope: RescaleSlope, None when absent.
        intercept: RescaleIntercept, None when absent.
        rescale_type: RescaleType ("" when absent; "HU" expected).
        thickness: SliceThickness in mm, None when absent.
        spacing_between: SpacingBetweenSlices in mm, None when absent.
    """

    label: str
    path: Path
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float | None
    intercept: float | None
    rescale_type: str
    thickness: float | None
    spacing_between: float | None


# keyword -> (functional group sequence that holds it in a multi-frame file, count, what is expected)
_GEOMETRY_TAGS = MappingProxyType(
    {
        "ImagePositionPatient": ("PlanePositionSequence", 3, "3 finite numbers (mm)"),
        "ImageOrientationPatient": ("PlaneOrientationSequence", 6, "6 direction cosines"),
        "PixelSpacing": ("PixelMeasuresSequence", 2, "2 positive numbers (mm)"),
    }
)


def _lookup(dataset: Dataset, frame_group: Dataset | None, sequence: str, keyword: str) -> Any:
    """`keyword` from the per-frame functional group, else the shared group, else the top level."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    for group in (frame_group, shared[0] if shared else None):
        if group is not None and sequence in group and len(group[sequence].value) > 0:
            item = group[sequence].value[0]
            if keyword in item and item[keyword].value not in (None, ""):
                return item[keyword].value
    if keyword in dataset and dataset[keyword].value not in (None, ""):
        return dataset[keyword].value
    return None


def _numbers(value: Any, count: int, label: str, where: str, expected: str) -> np.ndarray:
    try:
        numbers = np.asarray([float(v) for v in (value if isinstance(value, (list, tuple)) else list(value))])
    except (TypeError, ValueError) as e:
        raise InputValidationError(f"{label}: {where} is {value!r}; expected {expected}") from e
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise InputValidationError(f"{label}: {where} is {value!r}; expected {expected}")
    return numbers


def _optional_float(value: Any, label: str, where: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise InputValidationError(f"{label}: {where} is {value!r}; expected a number") from e
    if not np.isfinite(number):
        raise InputValidationError(f"{label}: {where} is {value!r}; expected a finite number")
    return number


def frames_of(dataset: Dataset, path: Path) -> list[Frame]:
    """One `Frame` per frame of `dataset`, each attribute taken per-frame, else shared, else top level.

    Args:
        dataset: a parsed CT image (single-frame, or multi-frame with functional groups).
        path: its file, for messages.

    Returns:
        The frames in the order of the pixel data.

    Raises:
        InputValidationError: ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing or not
            numeric for a frame; a multi-frame file without per-frame functional groups; a
            PerFrameFunctionalGroupsSequence whose length differs from NumberOfFrames.
    """
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        raise InputValidationError(
            f"{path}: {tag_name('PerFrameFunctionalGroupsSequence')} has {len(per_frame)} items; expected one per "
            f"frame ({tag_name('NumberOfFrames')} = {n_frames})"
        )
    if n_frames > 1 and per_frame is None:
        raise InputValidationError(
            f"{path}: {n_frames} frames but no {tag_name('PerFrameFunctionalGroupsSequence')}; expected a "
            f"PlanePositionSequence per frame (a legacy multi-frame file has no per-frame geometry)"
        )
    multi = per_frame is not None

    def where(sequence: str, keyword: str) -> str:
        # In a multi-frame file the tag sits in a functional group (per-frame, else shared).
        return f"Per-frame/Shared {sequence} > {tag_name(keyword)}" if multi else tag_name(keyword)

    rescale, measures = "PixelValueTransformationSequence", "PixelMeasuresSequence"
    frames = []
    for index in range(n_frames):
        label = f"{path} (frame {index + 1})" if multi else str(path)
        group = per_frame[index] if per_frame is not None else None
        geometry = {}
        for keyword, (sequence, count, expected) in _GEOMETRY_TAGS.items():
            value = _lookup(dataset, group, sequence, keyword)
            if value is None:
                raise InputValidationError(
                    f"{label}: {where(sequence, keyword)} is missing; a CT slice needs its position, "
                    f"orientation and pixel spacing (geometry is never guessed from file order)"
                )
            geometry[keyword] = _numbers(value, count, label, where(sequence, keyword), expected)
        optional = {
            keyword: _optional_float(
                _lookup(dataset, group, sequence, keyword), label, where(sequence, keyword)
            )
            for sequence, keyword in (
                (rescale, "RescaleSlope"),
                (rescale, "RescaleIntercept"),
                (measures, "SliceThickness"),
                (measures, "SpacingBetweenSlices"),
            )
        }
        frames.append(
            Frame(
                label=label,
                path=path,
                position=geometry["ImagePositionPatient"],
                orientation=geometry["ImageOrientationPatient"],
                pixel_spacing=(float(geometry["PixelSpacing"][0]), float(geometry["PixelSpacing"][1])),
                slope=optional["RescaleSlope"],
                intercept=optional["RescaleIntercept"],
                rescale_type=str(_lookup(dataset, group, rescale, "RescaleType") or "").strip(),
                thickness=optional["SliceThickness"],
                spacing_between=optional["SpacingBetweenSlices"],
            )
        )
    return frames


def validate_frame(frame: Frame) -> None:
    """Raise `InputValidationError` unless the orientation is two orthogonal unit vectors and spacing > 0."""
    row, col = frame.orientation[:3], frame.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1.0) > 1e-2
        or abs(np.linalg.norm(col) - 1.0) > 1e-2
        or abs(float(row @ col)) > 1e-2
    ):
        raise InputValidationError(
            f"{frame.label}: {tag_name('ImageOrientationPatient')} is {frame.orientation.tolist()}; expected two "
            f"orthogonal unit vectors (row cosines, then column cosines)"
        )
    if min(frame.pixel_spacing) <= 0:
        raise InputValidationError(
            f"{frame.label}: {tag_name('PixelSpacing')} is {list(frame.pixel_spacing)}; expected 2 positive numbers (mm)"
        )


# ---------------------------------------------------------------------------------------------------------
# pixel data


def check_decodable(dataset: Dataset, path: Path) -> None:
    """Refuse, before decoding, missing pixel data or a transfer syntax that no installed plugin decodes.

    Raises:
        InputValidationError: no PixelData (7FE0,0010).
        AdapterError: a JPEG/JPEG-LS syntax without ``verticals[dicom-gpl]`` (the message names the extra),
            or another compressed syntax without a decoder.
    """
    if "PixelData" not in dataset:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in dataset]
        got = f"only {other[0]}" if other else "no pixel data (the file may be truncated)"
        raise InputValidationError(f"{path}: {tag_name('PixelData')} is missing ({got}); expected a CT image")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return
    syntax = UID(syntax)
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as e:
        raise AdapterError(
            f"{path}: {tag_name('TransferSyntaxUID')} is {syntax.name} ({syntax}); pydicom has no decoder for it"
        ) from e
    plugins = set(decoder.available_plugins)
    if syntax in GPL_SYNTAXES:
        plugins.discard("pillow")
        if not plugins:
            raise AdapterError(
                f"{path}: {tag_name('TransferSyntaxUID')} is {syntax.name} ({syntax}); decoding it needs the "
                f"GPL-licensed plugin pylibjpeg-libjpeg, an optional extra: pip install '{GPL_EXTRA}'"
            )
    elif not plugins:
        raise AdapterError(
            f"{path}: {tag_name('TransferSyntaxUID')} is {syntax.name} ({syntax}) and no installed plugin decodes "
            f"it; missing: {'; '.join(decoder.missing_dependencies) or 'a decoder'}"
        )


def decode_pixels(dataset: Dataset, path: Path, n_frames: int) -> np.ndarray:
    """Decode the stored pixel values (before rescale).

    Args:
        dataset: a fully read dataset (not ``header_only``).
        path: its file, for messages.
        n_frames: the number of frames expected (from `frames_of`).

    Returns:
        ``(n_frames, rows, cols)`` integer array as stored.

    Raises:
        InputValidationError: not greyscale, missing pixel data, or a frame count that does not match.
        AdapterError: the pixel data cannot be decoded (see `check_decodable`; truncated pixel data).
    """
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputValidationError(
            f"{path}: {tag_name('SamplesPerPixel')} is {samples}; expected 1 (a CT image is greyscale)"
        )
    check_decodable(dataset, path)
    try:
        array = dataset.pixel_array
    except _PIXEL_ERRORS as e:
        raise AdapterError(f"{path}: cannot decode {tag_name('PixelData')} ({type(e).__name__}: {e})") from e
    if n_frames == 1 and array.ndim == 2:
        array = array[None]  # (1, R, C)
    if array.ndim != 3 or array.shape[0] != n_frames:
        raise InputValidationError(
            f"{path}: decoded pixel data has shape {array.shape}; expected {n_frames} frame(s) of "
            f"{tag_name('Rows')} x {tag_name('Columns')}"
        )
    return array


def padding_range(dataset: Dataset, path: Path) -> tuple[int, int] | None:
    """``(low, high)`` stored values that are padding (PixelPaddingValue..PixelPaddingRangeLimit), or None.

    Values are read with the signedness of the pixel data (PixelRepresentation), so an unsigned 63536
    written for signed data means -2000.
    """
    if "PixelPaddingValue" not in dataset:
        return None
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    bits = int(dataset.get("BitsAllocated", 16) or 16)

    def as_stored(keyword: str) -> int:
        value = dataset[keyword].value
        if isinstance(value, bytes):
            value = int.from_bytes(value[:2] if bits == 16 else value, "little", signed=signed)
        if not isinstance(value, int):
            raise InputValidationError(
                f"{path}: {tag_name(keyword)} is {value!r}; expected one integer stored value"
            )
        # Some exporters write the padding of signed data as unsigned (e.g. 63536 for -2000, seen in LIDC).
        if signed and value >= 2 ** (bits - 1):
            value -= 2**bits
        return value

    first = as_stored("PixelPaddingValue")
    last = as_stored("PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in dataset else first
    return min(first, last), max(first, last)
