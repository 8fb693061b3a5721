"""Tiny DICOM datasets built in code for the adapter tests: CT slices and an Enhanced CT multi-frame object."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

SERIES_A = "1.2.826.0.1.3680043.8.498.1001"
SERIES_B = "1.2.826.0.1.3680043.8.498.1002"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _file_dataset(sop_class: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality, ds.PatientID = "CT", "TEST-1"
    return ds


def _pixel_module(ds: Dataset, stored: np.ndarray) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = stored.astype("<i2").tobytes()


def ct_slice(
    position: Sequence[float],
    stored: np.ndarray | None = None,
    *,
    orientation: Sequence[float] = AXIAL,
    series_uid: str = SERIES_A,
    instance: int = 1,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> FileDataset:
    """One CT slice; `stored` defaults to a 4 x 5 ramp of int16 stored values."""
    stored = np.arange(20, dtype=np.int16).reshape(4, 5) + 1000 if stored is None else stored
    ds = _file_dataset(CTImageStorage)
    ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [str(v) for v in pixel_spacing]
    ds.SliceThickness = "1.0"
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    _pixel_module(ds, stored)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def enhanced_ct(
    positions: Sequence[Sequence[float]], stored: np.ndarray, *, slopes: Sequence[float]
) -> FileDataset:
    """A multi-frame Enhanced CT: per-frame PlanePosition and PixelValueTransformation, shared orientation."""
    ds = _file_dataset(EnhancedCTImageStorage)
    ds.SeriesInstanceUID = SERIES_A
    ds.NumberOfFrames = len(positions)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2.0
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for position, slope in zip(positions, slopes, strict=True):
        group, plane, rescale = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = list(position)
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, -1024.0, "HU"
        group.PlanePositionSequence = DicomSequence([plane])
        group.PixelValueTransformationSequence = DicomSequence([rescale])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _pixel_module(ds, stored)
    return ds
