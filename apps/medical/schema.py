"""Typed records of the medical app: a CT volume in Hounsfield units with its geometry, and a patient record.

Coordinates follow DICOM: the patient coordinate system is LPS (x towards the patient's left, y towards
the posterior, z towards the head), in millimetres. Array axes are always ``(slice, row, col)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Value written into `CTVolume.hu` where `padding_mask` is True: air, so that padding (-2000, -3024 ...)
# never reaches a window, a resampler or a model as a fake ultra-low density.
PADDING_FILL_HU = -1024.0


@dataclass(frozen=True, eq=False)
class CTVolume:
    """One CT series as a volume in Hounsfield units with its patient-space geometry.

    Slices are ordered by their position along the slice normal (ascending), never by file name or
    InstanceNumber. For a gantry-tilted series the slice stack is sheared: each slice's exact origin is in
    `image_positions`, and `spacing[0]` is measured along the normal, not along the table.

    Attributes:
        hu: ``(S, R, C)`` float32 Hounsfield units (stored value x RescaleSlope + RescaleIntercept);
            voxels under `padding_mask` hold `PADDING_FILL_HU`.
        padding_mask: ``(S, R, C)`` bool, True where the pixel is padding (PixelPaddingValue /
            PixelPaddingRangeLimit) or outside the scanner's field of view (the -2000/-3024 circles).
        spacing: ``(slice, row, col)`` in mm. ``slice`` is the median distance between neighbouring slices
            along the slice normal (see `slice_positions` for the exact values when `is_uniform` is False);
            ``row`` and ``col`` are PixelSpacing[0] (between rows) and PixelSpacing[1] (between columns).
        origin: ImagePositionPatient of slice 0 (the centre of its first pixel), LPS mm.
        direction: ``(3, 3)`` float64; row k is the unit LPS vector along array axis k: the slice normal
            (row x column cosines of ImageOrientationPatient), the column cosines (down the rows), the
            row cosines (along a row).
        slice_positions: ``(S,)`` float64 mm, each slice's ImagePositionPatient projected on the normal.
        image_positions: ``(S, 3)`` float64 mm, each slice's ImagePositionPatient (LPS).
        series_uid: SeriesInstanceUID (0020,000E).
        tilt_deg: angle in degrees between the slice normal and the direction in which the slices are
            stacked (gantry tilt); 0 for an ordinary axial series.
        is_uniform: whether all neighbouring slices are `spacing[0]` apart (within 1 % or 0.01 mm).
        warnings: messages of every warning raised while the volume was read (also emitted via
            `warnings.warn`), so they can be shown with the volume later.
        source_files: the files the volume was read from, in slice order (a multi-frame file once).
        patient_id: PatientID (0010,0020), empty when absent; pseudonymise before storing it.
    """

    hu: np.ndarray
    padding_mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    slice_positions: np.ndarray
    image_positions: np.ndarray
    series_uid: str
    tilt_deg: float = 0.0
    is_uniform: bool = True
    warnings: tuple[str, ...] = ()
    source_files: tuple[Path, ...] = ()
    patient_id: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)``."""
        s, r, c = self.hu.shape
        return int(s), int(r), int(c)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel index ``(slice, row, col, 1)`` -> LPS mm.

        The slice column is the mean step between the first and last ImagePositionPatient, so the matrix
        is sheared for a tilted series and exact for every slice when the spacing is uniform.
        """
        affine = np.eye(4)
        if self.hu.shape[0] > 1:
            affine[:3, 0] = (self.image_positions[-1] - self.image_positions[0]) / (self.hu.shape[0] - 1)
        else:
            affine[:3, 0] = self.direction[0] * self.spacing[0]
        affine[:3, 1] = self.direction[1] * self.spacing[1]
        affine[:3, 2] = self.direction[2] * self.spacing[2]
        affine[:3, 3] = self.origin
        return affine


class Measurement(NamedTuple):
    """One vital sign or lab value in its canonical unit (see `apps.medical.records.VITAL_UNITS`).

    Attributes:
        name: canonical field name, e.g. ``"temperature"``, ``"CRP"``.
        value: the value in `unit`.
        unit: canonical unit string, e.g. ``"°C"``, ``"mg/L"``, ``"10^9/L"``, ``"/min"``.
    """

    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class PatientRecord:
    """The clinical record of one patient, validated and converted to canonical units.

    Every field except `patient_id` may be absent: an absent scalar is None, an absent measurement is
    not in its tuple, and the name of every expected field that was absent is listed in `missing`, so a
    model can tell "not measured" from "normal".

    Attributes:
        patient_id: the source identifier (pseudonymise with `apps.medical.records.pseudonymise` before
            storing it anywhere).
        age: years (0-120), or None.
        sex: ``"M"``, ``"F"`` or ``"O"`` (DICOM PatientSex codes), or None.
        vitals: measurements among temperature (°C), heart_rate (/min), respiratory_rate (/min),
            systolic_bp and diastolic_bp (mmHg), spo2 (%), weight (kg), height (cm).
        labs: measurements such as CRP (mg/L), WBC, neutrophils, lymphocytes (10^9/L), hemoglobin
            (g/dL), procalcitonin (ng/mL), LDH (U/L); unknown labs are kept in their stated unit.
        history: flag name -> present (e.g. ``"fever"``, ``"weight_loss"``, ``"copd"``, ``"tb_contact"``).
        smoking_status: ``"never"``, ``"former"`` or ``"current"``, or None.
        pack_years: cumulative smoking in pack-years (packs per day x years), or None.
        notes: free text (may be empty).
        missing: names of the expected fields that the source did not provide.
    """

    patient_id: str
    age: float | None = None
    sex: str | None = None
    vitals: tuple[Measurement, ...] = ()
    labs: tuple[Measurement, ...] = ()
    history: dict[str, bool] = field(default_factory=dict)
    smoking_status: str | None = None
    pack_years: float | None = None
    notes: str = ""
    missing: tuple[str, ...] = ()

    def vital(self, name: str) -> Measurement | None:
        """The vital sign called `name`, or None when it was not recorded."""
        return next((m for m in self.vitals if m.name == name), None)

    def lab(self, name: str) -> Measurement | None:
        """The lab value called `name`, or None when it was not measured."""
        return next((m for m in self.labs if m.name == name), None)


@dataclass(frozen=True, eq=False)
class MedicalCase:
    """One case for the diagnoser: a patient record, optionally a CT volume, optionally a confirmed label.

    Attributes:
        case_id: an identifier for messages and evidence (e.g. ``"case_0007"``); never the patient id.
        record: the patient record.
        volume: the CT volume, or None when the case has no CT (the model then uses the record alone).
        label: the confirmed diagnosis (training, evaluation, few-shot support), or None.
        series_dir: where the CT series was read from (the input reference stored with a diagnosis).
        record_file: where the record was read from.
    """

    case_id: str
    record: PatientRecord
    volume: CTVolume | None = None
    label: str | None = None
    series_dir: Path | None = None
    record_file: Path | None = None
