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

# Channels computed from the volume rather than through a plain window (usable in `stack_windows`):
# "lung_field" is the lung window inside the segmented lung fields (`lung_field_mask`) and 0 elsewhere, so
# whatever is solid inside the lungs stands out from the chest wall and the mediastinum.
DERIVED_CHANNELS = ("lung_field",)
# Lung segmentation: air below this HU, in-plane closing radius (voxels) so that a lesion against the
# pleura still counts as inside the lung, and the smallest air pocket kept (fraction of the largest one).
LUNG_AIR_HU = -400.0
LUNG_CLOSING_VOXELS = 2
LUNG_MIN_COMPONENT_FRACTION = 0.02

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


def lung_field_mask(hu: np.ndarray) -> np.ndarray:
    """The lung fields of a ``(S, R, C)`` HU volume, with what lies inside them (nodules, masses, vessels).

    The usual threshold-and-components segmentation: air below `LUNG_AIR_HU` that is not connected to the
    edge of a slice (the air around the patient, out-of-field padding), air pockets of at least
    `LUNG_MIN_COMPONENT_FRACTION` of the largest one, then per slice an in-plane closing and hole filling so
    that solid lesions inside or against the lung count as lung.

    Returns:
        bool array of `hu`'s shape; all False when no enclosed air is found (e.g. a head CT).
    """
    from scipy import ndimage  # only CT encoding needs it; `inspect` and the DICOM reader start faster

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ConfigError(f"lung_field_mask: expected a (slices, rows, cols) volume, got shape {hu.shape}")
    air = hu < LUNG_AIR_HU
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    edge = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    sizes = ndimage.sum_labels(air, labels, index=np.arange(1, count + 1))
    sizes[edge[edge > 0] - 1] = 0.0
    if sizes.max() <= 0:
        return np.zeros(hu.shape, dtype=bool)
    keep = np.flatnonzero(sizes >= LUNG_MIN_COMPONENT_FRACTION * sizes.max()) + 1
    lungs = np.isin(labels, keep)
    radius = LUNG_CLOSING_VOXELS
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2 <= radius**2)[None]  # (1, k, k): in-plane only
    padded = np.pad(lungs, ((0, 0), (radius, radius), (radius, radius)))
    closed = ndimage.binary_closing(padded, structure=disk)[:, radius:-radius, radius:-radius]
    return np.stack([ndimage.binary_fill_holes(part) for part in closed]).astype(bool)


def stack_windows(hu: np.ndarray, presets: Sequence[str | tuple[float, float]]) -> np.ndarray:
    """Several windows of one volume as channels: ``(len(presets), *hu.shape)`` float32 in [0, 1].

    A preset may also be one of `DERIVED_CHANNELS` (``"lung_field"``: the lung window inside
    `lung_field_mask`, 0 outside).
    """
    channels, mask = [], None
    for preset in presets:
        if isinstance(preset, str) and preset in DERIVED_CHANNELS:  # "lung_field", the only one
            mask = lung_field_mask(hu) if mask is None else mask
            channels.append(apply_window(hu, "lung") * mask)
        else:
            channels.append(apply_window(hu, preset))
    return np.stack(channels, axis=0)
