"""Pure array functions on CT volumes: slice geometry (order, spacing, gantry tilt), resampling, windowing.

Nothing here reads files; `apps.medical.adapters` extracts the DICOM tags and calls these functions, so
the geometry rules are testable on plain arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import numpy as np

from core.errors import ConfigError

# (center, width) in HU, the usual radiology presets.
WINDOW_PRESETS = MappingProxyType(
    {
        "lung": (-600.0, 1500.0),
        "mediastinum": (40.0, 400.0),
        "bone": (400.0, 1800.0),
        "brain": (40.0, 80.0),
    }
)

# Neighbouring slices closer than this along the normal are the same position (mm).
DUPLICATE_TOLERANCE_MM = 1e-3
# A step counts as uniform when it is within max(abs, rel x median) of the median step.
UNIFORM_ABS_TOLERANCE_MM = 0.01
UNIFORM_REL_TOLERANCE = 0.01


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a slice plane from its ImageOrientationPatient.

    Args:
        orientation: the 6 direction cosines of ImageOrientationPatient: row cosines (x, y, z) then
            column cosines (x, y, z).

    Returns:
        ``(3,)`` float64, ``row x column``: the direction in which the slice index should increase.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def order_by_position(image_positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order slices by their ImagePositionPatient projected on the slice normal.

    Args:
        image_positions: ``(S, 3)`` ImagePositionPatient of each slice, LPS mm.
        normal: ``(3,)`` unit slice normal.

    Returns:
        ``(order, positions)``: ``(S,)`` int indices that sort the slices (stable, so equal positions
        keep their input order) and the ``(S,)`` sorted positions along the normal in mm.
    """
    distances = np.asarray(image_positions, dtype=np.float64) @ normal  # (S,)
    order = np.argsort(distances, kind="stable")
    return order, distances[order]


def gantry_tilt_deg(image_positions: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the slice normal and the direction in which the slices are stacked.

    An ordinary axial series is stacked along its normal (0°); a series acquired with a tilted gantry
    keeps its slices parallel but shifts each one along the table, so the stack direction leans away
    from the normal by the tilt angle.

    Args:
        image_positions: ``(S, 3)`` ImagePositionPatient in slice order, LPS mm.
        normal: ``(3,)`` unit slice normal.

    Returns:
        The tilt in degrees in [0, 90]; 0 for a single slice.
    """
    if len(image_positions) < 2:
        return 0.0
    step = np.asarray(image_positions[-1], dtype=np.float64) - np.asarray(
        image_positions[0], dtype=np.float64
    )
    length = float(np.linalg.norm(step))
    if length == 0.0:
        return 0.0
    cosine = abs(float(step @ normal)) / length
    return float(np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0))))


def is_uniform_spacing(slice_positions: np.ndarray) -> bool:
    """Whether every step between sorted slice positions equals the median step (1 % or 0.01 mm)."""
    steps = np.diff(slice_positions)
    if steps.size < 2:
        return True
    median = float(np.median(steps))
    tolerance = max(UNIFORM_ABS_TOLERANCE_MM, UNIFORM_REL_TOLERANCE * median)
    return bool(np.all(np.abs(steps - median) <= tolerance))


def resample_slices(
    hu: np.ndarray,
    padding_mask: np.ndarray,
    slice_positions: np.ndarray,
    image_positions: np.ndarray,
    spacing: float,
    fill_value: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resample a stack with irregular slice positions onto a uniform grid along the normal.

    The new grid starts at the first slice and steps by `spacing` up to the last one. HU values are
    interpolated linearly between the two neighbouring slices; a voxel is padding when either
    contributing slice is padding there (padding must never be averaged into tissue).

    Args:
        hu: ``(S, R, C)`` HU, slices sorted by position.
        padding_mask: ``(S, R, C)`` bool.
        slice_positions: ``(S,)`` ascending positions along the normal, mm.
        image_positions: ``(S, 3)`` ImagePositionPatient per slice (interpolated for the new slices).
        spacing: the new step along the normal, mm (> 0).
        fill_value: HU written where the new mask is True.

    Returns:
        ``(hu, padding_mask, slice_positions, image_positions)`` on the new grid of S' slices.
    """
    if spacing <= 0:
        raise ConfigError(f"resample spacing: expected a positive number of mm, got {spacing!r}")
    first, last = float(slice_positions[0]), float(slice_positions[-1])
    count = round((last - first) / spacing) + 1
    if first + (count - 1) * spacing > last + UNIFORM_ABS_TOLERANCE_MM:
        count -= 1
    new_positions = first + spacing * np.arange(count, dtype=np.float64)  # (S',)
    lower = np.clip(
        np.searchsorted(slice_positions, new_positions, side="right") - 1, 0, len(slice_positions) - 2
    )
    gaps = slice_positions[lower + 1] - slice_positions[lower]
    weight = np.clip((new_positions - slice_positions[lower]) / gaps, 0.0, 1.0)  # (S',)
    w = weight[:, None, None].astype(np.float32)
    new_hu = (1.0 - w) * hu[lower] + w * hu[lower + 1]  # (S', R, C)
    new_mask = (padding_mask[lower] & (w < 1.0)) | (padding_mask[lower + 1] & (w > 0.0))
    new_hu[new_mask] = fill_value
    new_image_positions = np.stack(
        [np.interp(new_positions, slice_positions, image_positions[:, axis]) for axis in range(3)], axis=1
    )  # (S', 3)
    return new_hu.astype(np.float32), new_mask, new_positions, new_image_positions


def window_bounds(preset: str | tuple[float, float]) -> tuple[float, float]:
    """``(center, width)`` of a named preset (see `WINDOW_PRESETS`) or of an explicit pair.

    Raises:
        ConfigError: an unknown preset name, or a width that is not positive.
    """
    if isinstance(preset, str):
        if preset not in WINDOW_PRESETS:
            raise ConfigError(
                f"window preset: expected one of {', '.join(WINDOW_PRESETS)} or a (center, width) pair "
                f"in HU, got {preset!r}"
            )
        return WINDOW_PRESETS[preset]
    center, width = (float(v) for v in preset)
    if not width > 0:
        raise ConfigError(f"window width: expected a positive number of HU, got {width!r}")
    return center, width


def apply_window(hu: np.ndarray, preset: str | tuple[float, float]) -> np.ndarray:
    """Map HU to display intensities in [0, 1] through a window.

    Args:
        hu: array of Hounsfield units, any shape.
        preset: ``"lung"`` (-600/1500), ``"mediastinum"`` (40/400), ``"bone"`` (400/1800),
            ``"brain"`` (40/80), or an explicit ``(center, width)`` in HU.

    Returns:
        float32 array of the same shape: 0 at or below ``center - width / 2``, 1 at or above
        ``center + width / 2``, linear in between.

    Raises:
        ConfigError: an unknown preset or a non-positive width.
    """
    center, width = window_bounds(preset)
    lower = center - width / 2.0
    windowed = (np.asarray(hu, dtype=np.float32) - np.float32(lower)) / np.float32(width)
    return np.clip(windowed, 0.0, 1.0).astype(np.float32)


def stack_windows(hu: np.ndarray, presets: Sequence[str | tuple[float, float]]) -> np.ndarray:
    """Several windows of one volume as channels: ``(len(presets), *hu.shape)`` float32 in [0, 1]."""
    return np.stack([apply_window(hu, preset) for preset in presets], axis=0)
