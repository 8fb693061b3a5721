"""Semi-synthetic CT-plus-record cases: a chest phantom with diagnosis-dependent lesions, written as DICOM.

Each case is a diagnosis label, a CT series (valid DICOM, real geometry tags, HU through RescaleIntercept,
an out-of-field circle marked by PixelPaddingValue) and a patient record JSON readable by
`apps.medical.records.read_record`. The phantom has a body ellipse with a fat layer, two lungs at about
-850 HU with vessels, a mediastinum with heart and aorta, a vertebral body and ribs.

Design: neither modality alone decides the label. Two latent findings produce the data: the image
*pattern* (drawn given the label) produces the CT, and the clinical *presentation* (drawn given the label)
produces the record. Each narrows the diagnosis to a pair that the other one separates:

================  =============================================  ============================================
label             image pattern (probability)                    presentation (probability)
================  =============================================  ============================================
normal            none                                           incidental .6, acute infection .32 (viral),
                                                                 constitutional .08 (non-pulmonary cause)
benign_nodule     solid_nodule (10 % calcified)                  incidental .88, acute .08, constitutional .04
malignancy        solid_nodule .75, spiculated_mass .15,         constitutional .85, incidental .15 (screen-
                  ground_glass .1 (early, sometimes part-solid)  detected)
pneumonia         ground_glass .55 (consolidation core, 1-3      acute infection .9, constitutional .1
                  patches), cavity .45 (abscess)                 (subacute, elderly)
tuberculosis      cavity .55, ground_glass .45 (the same look    constitutional .88, acute .12
                  as in pneumonia)
miliary (rare)    miliary: dozens of 2-4 mm nodules              disseminated .8 (high fever, hypoxaemia,
                                                                 normal white cells), constitutional .2
================  =============================================  ============================================

The record fields that carry most information (fever, temperature, CRP, white cells, weight loss, night
sweats, haemoptysis, cough, heart and breathing rate, SpO2) depend on the presentation only: an
*incidental* finding in a well patient, an *acute infection* (fever, high CRP and white cells), a
*constitutional* illness (weight loss, night sweats, low-grade fever, moderate CRP) or, for the rare
miliary disease, a *disseminated* one. Age, smoking, COPD and TB contact
depend weakly on the label (cancer patients are older heavier smokers, TB patients report more contacts).
So a solid nodule is benign in a well patient and malignant in a wasting one; ground glass or a cavity is
pneumonia with an acute infection and tuberculosis with a constitutional illness; a well or febrile
patient is normal, has a nodule or pneumonia depending on the CT. Lesions fill a sizeable fraction of the
20 x 50 x 50 mm CT tokens of the default grid (nodules 12-26 mm across, masses 3-5 cm).
Record fields go missing at random (8 % each) so a model must cope with a partial record. Everything is
deterministic under the seed, and case ``i`` depends only on ``(seed, i)``, so a larger set extends a
smaller one; the label, pattern, presentation and record of a case come from one random stream and the
image from another, so `sample_findings` draws the record-side truth without building a volume.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from apps.medical.records import record_to_dict, validate_record
from apps.medical.schema import PatientRecord
from core.errors import ConfigError

logger = logging.getLogger(__name__)

LABELS = ("normal", "benign_nodule", "malignancy", "pneumonia", "tuberculosis", "miliary")
RARE_LABELS = ("miliary",)
PATTERNS = ("none", "solid_nodule", "spiculated_mass", "ground_glass", "cavity", "miliary")
LABEL_WEIGHTS = MappingProxyType(
    {
        "normal": 0.24,
        "benign_nodule": 0.16,
        "malignancy": 0.2,
        "pneumonia": 0.2,
        "tuberculosis": 0.15,
        "miliary": 0.05,
    }
)
PATTERN_GIVEN_LABEL = MappingProxyType(
    {
        "normal": {"none": 1.0},
        "benign_nodule": {"solid_nodule": 1.0},
        "malignancy": {"solid_nodule": 0.75, "spiculated_mass": 0.15, "ground_glass": 0.1},
        "pneumonia": {"ground_glass": 0.55, "cavity": 0.45},
        "tuberculosis": {"cavity": 0.55, "ground_glass": 0.45},
        "miliary": {"miliary": 1.0},
    }
)
PRESENTATIONS = ("incidental", "acute_infection", "constitutional", "disseminated")
PRESENTATION_GIVEN_LABEL = MappingProxyType(
    {
        "normal": {"incidental": 0.6, "acute_infection": 0.32, "constitutional": 0.08},
        "benign_nodule": {"incidental": 0.88, "acute_infection": 0.08, "constitutional": 0.04},
        "malignancy": {"constitutional": 0.85, "incidental": 0.15},
        "pneumonia": {"acute_infection": 0.9, "constitutional": 0.1},
        "tuberculosis": {"constitutional": 0.88, "acute_infection": 0.12},
        "miliary": {"disseminated": 0.8, "constitutional": 0.2},
    }
)
DEFAULT_SHAPE = (32, 96, 96)
FIELD_OF_VIEW_MM = 400.0
SLICE_SPACING_MM = 5.0
RESCALE_INTERCEPT = -1024.0
PADDING_VALUE = -2000  # stored value outside the reconstruction circle
MISSING_FIELD_PROBABILITY = 0.08
_STUDY_DATE = dt.date(2024, 1, 1)


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One generated case before it is written.

    Attributes:
        case_id: ``"case_0000"`` ...
        label: the diagnosis, one of `LABELS`.
        pattern: the image pattern, one of `PATTERNS`.
        presentation: the clinical presentation behind the record, one of `PRESENTATIONS`.
        hu: ``(S, R, C)`` float32 Hounsfield units (what a reader should get back, to rounding).
        lesion_mask: ``(S, R, C)`` bool, where the lesion dominates the voxel; empty for ``"none"``.
        inside_field: ``(R, C)`` bool, the reconstruction circle (outside it the files hold padding).
        record: the patient record (canonical units).
        spacing: ``(slice, row, col)`` mm.
        origin: ImagePositionPatient of slice 0, LPS mm.
    """

    case_id: str
    label: str
    pattern: str
    presentation: str
    hu: np.ndarray
    lesion_mask: np.ndarray
    inside_field: np.ndarray
    record: PatientRecord
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


# ---------------------------------------------------------------------------------------------------------
# phantom


@dataclass(frozen=True)
class _Grid:
    z: np.ndarray  # (S,) mm from the volume centre
    y: np.ndarray  # (R,) mm, posterior positive (LPS)
    x: np.ndarray  # (C,) mm, patient-left positive (LPS)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.z), len(self.y), len(self.x)


def _grid(shape: tuple[int, int, int]) -> _Grid:
    slices, rows, cols = shape
    pixel = FIELD_OF_VIEW_MM / cols
    return _Grid(
        z=(np.arange(slices) - (slices - 1) / 2) * SLICE_SPACING_MM,
        y=(np.arange(rows) - (rows - 1) / 2) * pixel,
        x=(np.arange(cols) - (cols - 1) / 2) * pixel,
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], passes: int = 2) -> np.ndarray:
    """Zero-mean, unit-ish noise with a few voxels of correlation (box blur along each axis)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    for _ in range(passes):
        for axis in range(3):
            noise = (noise + np.roll(noise, 1, axis) + np.roll(noise, -1, axis)) / 3.0
    return noise / max(float(noise.std()), 1e-6)


def _sigmoid_inside(distance: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft membership of a ball: ~1 well inside `radius`, ~0 outside, `edge` mm wide (partial volume)."""
    return (1.0 / (1.0 + np.exp(np.clip((distance - radius) / edge, -30.0, 30.0)))).astype(np.float32)


def _box(grid: _Grid, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice]:
    """Index slices of the voxels whose (z, y, x) mm lie within [low, high]."""
    return tuple(
        slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))
        for axis, lo, hi in zip((grid.z, grid.y, grid.x), low, high, strict=True)
    )


def _ball(
    grid: _Grid, center: np.ndarray, radii: np.ndarray, edge: float
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Soft membership of an axis-aligned ellipsoid (centre (z, y, x) and radii in mm) within its box.

    Returns:
        ``(box, weight)``: the index box and the membership of the voxels in it.
    """
    reach = radii + 4.0 * edge * radii / float(np.min(radii))
    box = _box(grid, center - reach, center + reach)
    dz = (grid.z[box[0], None, None] - center[0]) / radii[0]
    dy = (grid.y[None, box[1], None] - center[1]) / radii[1]
    dx = (grid.x[None, None, box[2]] - center[2]) / radii[2]
    radius = float(np.min(radii))
    return box, _sigmoid_inside(np.sqrt(dz**2 + dy**2 + dx**2) * radius, radius, edge)


def _paint(hu: np.ndarray, box: tuple[slice, slice, slice], weight: np.ndarray, value: float) -> None:
    """Blend `value` into `hu` inside `box` with `weight` (partial-volume mixing)."""
    hu[box] = hu[box] * (1.0 - weight) + value * weight


def _anatomy(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion-free phantom: ``(hu, lung_mask, inside_field)``."""
    slices = grid.shape[0]
    z, y, x = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    half_width, half_depth = rng.uniform(150, 175), rng.uniform(100, 125)
    fat = rng.uniform(8, 20)
    body = (x / half_width) ** 2 + (y / half_depth) ** 2 <= 1.0  # (1, R, C)
    muscle = (x / (half_width - fat)) ** 2 + (y / (half_depth - fat)) ** 2 <= 1.0
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    hu[:, body[0]] = -100.0  # subcutaneous fat
    hu[:, muscle[0]] = 45.0  # chest wall, mediastinum

    # Lungs shrink towards the apex and the base: an ellipsoidal profile along z.
    extent = (slices - 1) / 2 * SLICE_SPACING_MM * rng.uniform(1.05, 1.3)
    profile = np.sqrt(np.clip(1.0 - (z / extent) ** 2, 0.0, 1.0))
    lung_mask = np.zeros(grid.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * half_width * rng.uniform(0.42, 0.5)
        ax = np.maximum(half_width * rng.uniform(0.3, 0.36) * profile, 1e-3)
        ay = np.maximum(half_depth * rng.uniform(0.6, 0.7) * profile, 1e-3)
        lung_mask |= ((x - cx) / ax) ** 2 + ((y - 0.1 * half_depth) / ay) ** 2 <= 1.0
    lung_mask &= muscle
    hu = np.where(lung_mask, -850.0 + 25.0 * _smooth_noise(rng, grid.shape), hu).astype(np.float32)

    # Vessels: short bright dots inside the lungs (miliary nodules must compete with them).
    lung_points = np.argwhere(lung_mask)
    for index in rng.choice(len(lung_points), size=min(len(lung_points), 60), replace=False):
        k, i, j = lung_points[index]
        center = np.array([grid.z[k], grid.y[i], grid.x[j]])
        box, weight = _ball(grid, center, np.array([4.0, 2.0, 2.0]) * rng.uniform(0.8, 1.4), edge=1.0)
        _paint(hu, box, weight * lung_mask[box], 30.0)

    long_axis = 10.0 * grid.shape[0] * SLICE_SPACING_MM  # cylinders through the whole volume
    organs = (
        (np.array([0.0, -0.15 * half_depth, 0.15 * half_width]), (55.0, 60.0), 2.0, 40.0),  # heart
        (np.array([0.0, 0.25 * half_depth, -0.1 * half_width]), (14.0, 14.0), 1.5, 50.0),  # aorta
        (np.array([0.0, 0.78 * half_depth, 0.0]), (18.0, 18.0), 1.5, 450.0),  # vertebral body
        (np.array([0.0, 0.78 * half_depth + 22.0, 0.0]), (7.0, 7.0), 1.0, 15.0),  # spinal canal
    )
    solid = np.zeros(grid.shape, dtype=np.float32)  # where the organs and ribs take the place of lung
    for center, (ry, rx), edge, value in organs:
        box, weight = _ball(grid, center, np.array([long_axis, ry, rx]), edge)
        _paint(hu, box, weight, value)
        solid[box] = np.maximum(solid[box], weight)
    # Ribs: bone dots on a ring under the chest wall, on the slices a rib crosses (~25 mm period).
    crossing = (((grid.z + rng.uniform(0, 25)) % 25.0) < 11.0).astype(np.float32)[:, None, None]
    for angle in np.linspace(0.15 * np.pi, 0.85 * np.pi, 6):
        for sy in (-1.0, 1.0):
            for sx in (-1.0, 1.0):
                center = np.array(
                    [
                        0.0,
                        sy * np.sin(angle) * (half_depth - fat - 6),
                        sx * np.cos(angle) * (half_width - fat - 6),
                    ]
                )
                box, weight = _ball(grid, center, np.array([long_axis, 5.0, 5.0]), 1.0)
                _paint(hu, box, weight * crossing[box[0]], 700.0)
                solid[box] = np.maximum(solid[box], weight * crossing[box[0]])
    # The heart and the aorta overlap the lung ellipses: lesions go only where lung is left to see them in.
    lung_mask &= solid < 0.5

    hu += rng.normal(0.0, 12.0, grid.shape).astype(np.float32)  # quantum noise
    radius = FIELD_OF_VIEW_MM / 2
    inside_field = (grid.x[None, :] ** 2 + grid.y[:, None] ** 2) <= radius**2
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32), lung_mask, inside_field


def _lung_point(
    grid: _Grid, lung_mask: np.ndarray, rng: np.random.Generator, central: float = 0.6
) -> np.ndarray:
    """A random (z, y, x) mm point inside the lungs, in the central `central` fraction of the slices."""
    slices = grid.shape[0]
    low, high = int(slices * (1 - central) / 2), int(np.ceil(slices * (1 + central) / 2))
    candidates = np.argwhere(lung_mask[low:high]) + np.array([low, 0, 0])
    k, i, j = candidates[rng.integers(len(candidates))]
    return np.array([grid.z[k], grid.y[i], grid.x[j]])


def _spicule(
    grid: _Grid, start: np.ndarray, end: np.ndarray, radius: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Soft membership of a thin cylinder from `start` to `end` (mm) within its box."""
    box = _box(grid, np.minimum(start, end) - radius - 4.0, np.maximum(start, end) + radius + 4.0)
    points = np.stack(np.meshgrid(grid.z[box[0]], grid.y[box[1]], grid.x[box[2]], indexing="ij"), axis=-1)
    direction = end - start
    t = np.clip(((points - start) @ direction) / float(direction @ direction), 0.0, 1.0)  # (s, r, c)
    distance = np.linalg.norm(points - (start + t[..., None] * direction), axis=-1)
    return box, _sigmoid_inside(distance, radius, 0.8)


def _lesion(
    grid: _Grid, lung_mask: np.ndarray, pattern: str, label: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, lesion_hu)``: soft lesion membership (S, R, C) in [0, 1] and the HU the lesion takes."""
    weight = np.zeros(grid.shape, dtype=np.float32)
    value = np.zeros(grid.shape, dtype=np.float32)

    def add(box: tuple[slice, ...], part: np.ndarray, scale: float = 1.0) -> None:
        weight[box] = np.maximum(weight[box], scale * part)

    if pattern == "none":
        return weight, value
    if pattern == "solid_nodule":
        # 12-26 mm across: a nodule (< 3 cm) that still fills a good part of a 20 x 50 x 50 mm CT token.
        center, radius = _lung_point(grid, lung_mask, rng), rng.uniform(6.0, 13.0)
        add(*_ball(grid, center, np.full(3, radius), edge=1.5))
        calcified = label == "benign_nodule" and rng.random() < 0.1
        value[:] = rng.uniform(200, 400) if calcified else rng.normal(35, 10)
    elif pattern == "spiculated_mass":
        center, radius = _lung_point(grid, lung_mask, rng), rng.uniform(15.0, 25.0)  # a 3-5 cm mass
        add(*_ball(grid, center, np.full(3, radius), edge=1.5))
        for _ in range(2):  # lobulation
            add(*_ball(grid, center + rng.normal(0, 0.4 * radius, 3), np.full(3, 0.6 * radius), edge=1.5))
        for _ in range(int(rng.integers(8, 15))):  # spicules
            direction = rng.normal(size=3) * np.array([0.4, 1.0, 1.0])
            direction /= np.linalg.norm(direction)
            add(*_spicule(grid, center, center + direction * radius * rng.uniform(1.5, 2.3), 1.2), 0.8)
        value[:] = rng.normal(40, 8)
    elif pattern == "ground_glass":
        # Infective ground glass (pneumonia, tuberculosis: the same look) is patchy and often consolidates
        # in the centre; an early adenocarcinoma is one lesion, sometimes part-solid.
        infective = label != "malignancy"
        patches = int(rng.integers(1, 4)) if infective else 1
        low, high = (12.0, 30.0) if infective else (10.0, 22.0)
        value[:] = rng.uniform(-620, -480)
        core_fraction, core_probability = (0.55, 0.5) if infective else (0.3, 0.3)
        for _ in range(patches):
            center = _lung_point(grid, lung_mask, rng)
            radii = rng.uniform(low, high) * rng.uniform(0.7, 1.3, 3)
            add(*_ball(grid, center, radii, edge=3.0))
            if rng.random() < core_probability:
                box, core = _ball(grid, center, radii * core_fraction, edge=1.5)
                value[box] = value[box] * (1.0 - core) + 20.0 * core
                add(box, core)
    elif pattern == "cavity":
        center, radius = _lung_point(grid, lung_mask, rng), rng.uniform(12.0, 22.0)
        add(*_ball(grid, center, np.full(3, radius), edge=1.5))
        value[:] = 30.0
        box, hollow = _ball(
            grid, center + rng.normal(0, 0.1 * radius, 3), np.full(3, radius * rng.uniform(0.45, 0.7)), 1.0
        )
        value[box] = value[box] * (1.0 - hollow) - 1000.0 * hollow
    elif pattern == "miliary":
        for _ in range(int(rng.integers(40, 90))):
            center = _lung_point(grid, lung_mask, rng, central=0.9)
            add(*_ball(grid, center, np.full(3, rng.uniform(2.5, 4.0)), edge=1.0))
        value[:] = 10.0
    else:
        raise ConfigError(f"lesion pattern: expected one of {', '.join(PATTERNS)}, got {pattern!r}")
    return weight * lung_mask, value


# ---------------------------------------------------------------------------------------------------------
# record


def _choose(rng: np.random.Generator, probabilities: dict[str, float]) -> str:
    names = list(probabilities)
    weights = np.array([probabilities[n] for n in names])
    return str(names[rng.choice(len(names), p=weights / weights.sum())])


@dataclass(frozen=True)
class _Presentation:
    """How a clinical presentation shows in the record (probabilities per case, medians, means)."""

    p_fever: float
    temperature: tuple[float, float]  # mean, sd in °C when febrile
    crp_median: float  # mg/L
    wbc_mean: float  # 10^9/L
    p_weight_loss: float
    p_night_sweats: float
    p_haemoptysis: float
    p_cough: float
    spo2: tuple[float, float]  # mean, sd in %


PRESENTATION_SIGNS = MappingProxyType(
    {
        "incidental": _Presentation(0.04, (38.2, 0.3), 3.0, 7.0, 0.05, 0.05, 0.02, 0.35, (97.5, 1.2)),
        "acute_infection": _Presentation(0.9, (38.6, 0.45), 80.0, 13.5, 0.06, 0.2, 0.06, 0.85, (94.0, 2.5)),
        "constitutional": _Presentation(0.4, (37.9, 0.3), 25.0, 8.0, 0.7, 0.5, 0.2, 0.7, (96.0, 1.8)),
        # Haematogenous spread: high fever, night sweats, hypoxaemia out of proportion, normal white cells.
        "disseminated": _Presentation(0.85, (38.7, 0.4), 45.0, 6.0, 0.7, 0.7, 0.03, 0.7, (89.0, 3.0)),
    }
)


@dataclass(frozen=True)
class _Background:
    """Weak label-specific demographics and risk factors (age, sex, smoking, COPD, TB contact)."""

    age: tuple[float, float]  # mean, sd in years
    p_male: float
    smoking: dict[str, float]
    pack_years_mean: float
    p_copd: float
    p_tb_contact: float


_USUAL_SMOKING = {"never": 0.45, "former": 0.3, "current": 0.25}
LABEL_BACKGROUND = MappingProxyType(
    {
        "normal": _Background((54, 15), 0.5, _USUAL_SMOKING, 18, 0.1, 0.04),
        "benign_nodule": _Background((56, 14), 0.5, _USUAL_SMOKING, 18, 0.1, 0.04),
        "malignancy": _Background(
            (60, 12), 0.55, {"never": 0.35, "former": 0.35, "current": 0.3}, 25, 0.15, 0.04
        ),
        "pneumonia": _Background((57, 17), 0.5, _USUAL_SMOKING, 18, 0.14, 0.04),
        "tuberculosis": _Background((52, 16), 0.55, _USUAL_SMOKING, 18, 0.1, 0.15),
        "miliary": _Background((46, 18), 0.55, _USUAL_SMOKING, 15, 0.08, 0.25),
    }
)


def _record(
    case_index: int, seed: int, label: str, presentation: str, rng: np.random.Generator
) -> PatientRecord:
    signs, background = PRESENTATION_SIGNS[presentation], LABEL_BACKGROUND[label]
    fever = bool(rng.random() < signs.p_fever)
    crp = signs.crp_median * float(np.exp(rng.normal(0, 0.6)))
    status = _choose(rng, background.smoking)
    pack_mean = background.pack_years_mean
    pack_years = 0.0 if status == "never" else max(1.0, rng.normal(pack_mean, 0.4 * pack_mean))
    temperature = rng.normal(*signs.temperature) if fever else rng.normal(36.9, 0.3)
    history = {
        "fever": fever,
        "weight_loss": bool(rng.random() < signs.p_weight_loss),
        "night_sweats": bool(rng.random() < signs.p_night_sweats),
        "tb_contact": bool(rng.random() < background.p_tb_contact),
        "haemoptysis": bool(rng.random() < signs.p_haemoptysis),
        "cough": bool(rng.random() < signs.p_cough),
        "copd": bool(rng.random() < background.p_copd),
    }
    raw = {
        "patient_id": f"SYN-{seed}-{case_index:04d}",
        "age": float(np.clip(round(rng.normal(*background.age)), 18, 95)),
        "sex": "M" if rng.random() < background.p_male else "F",
        "vitals": {
            "temperature": {"value": round(float(np.clip(temperature, 35.5, 41.5)), 1), "unit": "°C"},
            "heart_rate": {"value": round(float(rng.normal(96 if fever else 76, 10))), "unit": "/min"},
            "respiratory_rate": {"value": round(float(rng.normal(21 if fever else 15, 3))), "unit": "/min"},
            "spo2": {"value": round(float(np.clip(rng.normal(*signs.spo2), 70.0, 100.0))), "unit": "%"},
        },
        "labs": [
            {"name": "CRP", "value": round(float(np.clip(crp, 0.3, 480)), 1), "unit": "mg/L"},
            {
                "name": "WBC",
                "value": round(float(np.clip(rng.normal(signs.wbc_mean, 0.2 * signs.wbc_mean), 1.5, 60)), 1),
                "unit": "10^9/L",
            },
        ],
        "history": history,
        "smoking": {"status": status, "pack_years": round(float(pack_years), 1)},
        "notes": _notes(history, rng),
    }
    # Missing fields at random: the model must cope with a partial record.
    for section, name in (("vitals", "temperature"), ("vitals", "heart_rate"), ("smoking", "pack_years")):
        if rng.random() < MISSING_FIELD_PROBABILITY:
            del raw[section][name]
    raw["labs"] = [lab for lab in raw["labs"] if rng.random() >= MISSING_FIELD_PROBABILITY]
    if rng.random() < MISSING_FIELD_PROBABILITY:
        del raw["history"]["weight_loss"]
    return validate_record(raw, source=f"synthetic case {case_index}")


def _notes(history: dict[str, bool], rng: np.random.Generator) -> str:
    """Free text built from the symptoms only (never from the label)."""
    parts = []
    if history["cough"]:
        parts.append(f"Cough for {int(rng.integers(2, 60))} days.")
    if history["fever"]:
        parts.append("Reports fever.")
    if history["weight_loss"]:
        parts.append(f"Lost {int(rng.integers(3, 12))} kg over recent months.")
    if history["night_sweats"]:
        parts.append("Night sweats.")
    if history["haemoptysis"]:
        parts.append("Occasional blood-streaked sputum.")
    return " ".join(parts) or "No complaints; routine review."


# ---------------------------------------------------------------------------------------------------------
# cases and files


@dataclass(frozen=True)
class Findings:
    """The record-side truth of a case: what `make_case` draws before it builds the image.

    Attributes:
        label: the diagnosis, one of `LABELS`.
        pattern: the image pattern, one of `PATTERNS`.
        presentation: the clinical presentation behind the record, one of `PRESENTATIONS`.
        record: the patient record (canonical units).
    """

    label: str
    pattern: str
    presentation: str
    record: PatientRecord


def sample_findings(case_index: int, seed: int, *, label: str | None = None) -> Findings:
    """Draw the label, image pattern, presentation and record of case `case_index` (no volume; cheap).

    `make_case` draws exactly these, so a record-only analysis of a generated set needs no CT.

    Raises:
        ConfigError: an unknown label.
    """
    if label is not None and label not in LABELS:
        raise ConfigError(f"synthetic label: expected one of {', '.join(LABELS)}, got {label!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, case_index, 0]))
    label = label or _choose(rng, dict(LABEL_WEIGHTS))
    pattern = _choose(rng, PATTERN_GIVEN_LABEL[label])
    presentation = _choose(rng, PRESENTATION_GIVEN_LABEL[label])
    return Findings(label, pattern, presentation, _record(case_index, seed, label, presentation, rng))


def make_case(
    case_index: int, seed: int, *, label: str | None = None, shape: tuple[int, int, int] = DEFAULT_SHAPE
) -> SyntheticCase:
    """Build one case in memory (no files).

    Args:
        case_index: the case number; with `seed` it fixes everything about the case.
        seed: the generator seed.
        label: force this diagnosis (one of `LABELS`); default: drawn with `LABEL_WEIGHTS`.
        shape: ``(slices, rows, cols)``; rows and cols span a 400 mm field of view, slices are 5 mm apart.

    Returns:
        The `SyntheticCase`.

    Raises:
        ConfigError: an unknown label or a shape smaller than 8 x 32 x 32.
    """
    if len(shape) != 3 or shape[0] < 8 or shape[1] < 32 or shape[2] < 32:
        raise ConfigError(f"synthetic shape: expected (slices >= 8, rows >= 32, cols >= 32), got {shape!r}")
    findings = sample_findings(case_index, seed, label=label)
    rng = np.random.default_rng(np.random.SeedSequence([seed, case_index, 1]))  # the image's own stream
    grid = _grid(shape)
    hu, lung_mask, inside_field = _anatomy(grid, rng)
    weight, lesion_hu = _lesion(grid, lung_mask, findings.pattern, findings.label, rng)
    hu = (hu * (1 - weight) + (lesion_hu + rng.normal(0.0, 12.0, grid.shape)) * weight).astype(np.float32)
    hu = np.clip(np.round(hu), -1024.0, 3071.0).astype(np.float32)  # what 16-bit storage keeps
    pixel = FIELD_OF_VIEW_MM / shape[2]
    table = float(rng.uniform(-250.0, -100.0))
    origin = (float(grid.x[0]), float(grid.y[0]), table + float(grid.z[0]))
    return SyntheticCase(
        case_id=f"case_{case_index:04d}",
        label=findings.label,
        pattern=findings.pattern,
        presentation=findings.presentation,
        hu=hu,
        lesion_mask=weight > 0.5,
        inside_field=inside_field,
        record=findings.record,
        spacing=(SLICE_SPACING_MM, pixel, pixel),
        origin=origin,
    )


def write_series(case: SyntheticCase, series_dir: Path, seed: int, case_index: int) -> list[Path]:
    """Write `case` as one DICOM file per slice (CT Image Storage, Explicit VR Little Endian).

    UIDs come from `pydicom.uid.generate_uid` with entropy from ``(seed, case_index, ...)``, and dates are
    fixed, so the same inputs write byte-identical files.

    Args:
        case: the case.
        series_dir: the folder to write into (created).
        seed: the generator seed (UID entropy).
        case_index: the case number (UID entropy, dates).

    Returns:
        The files written, in slice order.
    """
    series_dir.mkdir(parents=True, exist_ok=True)

    def uid(*parts: object) -> str:
        return generate_uid(
            entropy_srcs=["verticals-synthetic", str(seed), str(case_index), *map(str, parts)]
        )

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame-of-reference")
    date = (_STUDY_DATE + dt.timedelta(days=case_index)).strftime("%Y%m%d")
    stored = np.round(case.hu - RESCALE_INTERCEPT).astype(np.int16)  # (S, R, C)
    stored[:, ~case.inside_field] = PADDING_VALUE
    record = case.record
    paths = []
    for k in range(case.hu.shape[0]):
        sop_uid = uid("image", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = series_dir / f"IM{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.PatientID, ds.PatientName = record.patient_id, f"Synthetic^{case.case_id}"
        ds.PatientSex = record.sex or ""
        ds.PatientAge = f"{int(record.age):03d}Y" if record.age is not None else ""
        ds.Manufacturer, ds.SeriesDescription = "verticals synthetic phantom", "CHEST"
        ds.BodyPartExamined, ds.PatientPosition = "CHEST", "HFS"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.ImagePositionPatient = [
            f"{case.origin[0]:.4f}",
            f"{case.origin[1]:.4f}",
            f"{case.origin[2] + k * case.spacing[0]:.4f}",
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{case.origin[2] + k * case.spacing[0]:.4f}"
        ds.PixelSpacing = [f"{case.spacing[1]:.6f}", f"{case.spacing[2]:.6f}"]
        ds.SliceThickness = f"{case.spacing[0]:.2f}"
        ds.KVP = "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = case.hu.shape[1], case.hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelPaddingValue = PADDING_VALUE
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{RESCALE_INTERCEPT:g}", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.PixelData = stored[k].astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_case(task: tuple[Path, int, int, str | None, tuple[int, int, int]]) -> dict[str, object]:
    """Build and write case ``index`` (its series and record) under `out_dir`; its ``cases.csv`` row."""
    out_dir, index, seed, label, shape = task
    case = make_case(index, seed, label=label, shape=shape)
    case_dir = out_dir / case.case_id
    write_series(case, case_dir / "ct", seed, index)
    record_file = case_dir / "record.json"
    record_file.write_text(
        json.dumps(record_to_dict(case.record), indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    logger.debug("wrote %s (%s, %s)", case.case_id, case.label, case.pattern)
    return {
        "case_id": case.case_id,
        "series_dir": f"{case.case_id}/ct",
        "record_file": f"{case.case_id}/record.json",
        "label": case.label,
        "pattern": case.pattern,
        "presentation": case.presentation,
        "lesion_voxels": int(case.lesion_mask.sum()),
    }


def generate(
    out_dir: str | Path,
    cases: int,
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    labels: Sequence[str] | None = None,
    jobs: int = 1,
) -> Path:
    """Write a semi-synthetic data set: per case a DICOM series and a record JSON, plus ``cases.csv``.

    Layout: ``out_dir/case_0000/ct/IM0001.dcm ...``, ``out_dir/case_0000/record.json``, and
    ``out_dir/cases.csv`` with columns ``case_id, series_dir, record_file, label, pattern, presentation, lesion_voxels``
    (paths relative to `out_dir`).

    Args:
        out_dir: a new or empty folder.
        cases: number of cases (>= 1).
        seed: the seed; the same seed writes byte-identical files.
        shape: ``(slices, rows, cols)`` per series.
        labels: the label of each case in order (length `cases`); default drawn with `LABEL_WEIGHTS`.
        jobs: worker processes (cases are independent, so the files are the same for any `jobs`).

    Returns:
        The path of ``cases.csv``.

    Raises:
        ConfigError: ``cases < 1``, a non-empty `out_dir`, `labels` of the wrong length or with an unknown
            label, or an invalid shape.
    """
    out_dir = Path(out_dir)
    if cases < 1:
        raise ConfigError(f"cases: expected at least 1, got {cases!r}")
    if labels is not None and len(labels) != cases:
        raise ConfigError(f"labels: expected one label per case ({cases}), got {len(labels)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: expected a new or empty folder for the generated data, it holds files")
    out_dir.mkdir(parents=True, exist_ok=True)
    case_labels = [None] * cases if labels is None else list(labels)
    tasks = [(out_dir, index, seed, case_labels[index], shape) for index in range(cases)]
    if jobs > 1 and cases > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, cases)) as pool:
            rows = list(pool.map(_write_case, tasks, chunksize=max(1, cases // (4 * jobs))))
    else:
        rows = [_write_case(task) for task in tasks]
    manifest = out_dir / "cases.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    logger.info("generated %d cases in %s", cases, out_dir)
    return manifest
