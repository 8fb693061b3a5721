"""The lung-field segmentation behind the `lung_field` CT channel."""

from __future__ import annotations

import numpy as np
import pytest

from apps.medical.imaging import apply_window, lung_field_mask, stack_windows
from core.errors import ConfigError


def _chest(nodule: bool = True) -> np.ndarray:
    """(6, 40, 40) HU: air around a body at 40 HU holding two lungs at -850 HU, a solid nodule in one."""
    _, y, x = np.mgrid[0:6, 0:40, 0:40]
    hu = np.full((6, 40, 40), -1000.0, dtype=np.float32)
    hu[((y - 20) / 17.0) ** 2 + ((x - 20) / 18.0) ** 2 <= 1.0] = 40.0
    for cx in (12, 28):
        hu[((y - 20) / 9.0) ** 2 + ((x - cx) / 5.0) ** 2 <= 1.0] = -850.0
    if nodule:
        hu[:, 19:22, 11:14] = 35.0  # inside the right lung
    return hu


def test_the_lung_field_holds_the_lungs_and_a_nodule_inside_them_but_not_the_body_or_the_air() -> None:
    hu = _chest()
    mask = lung_field_mask(hu)
    assert mask[:, 20, 12].all() and mask[:, 20, 28].all()  # the nodule and the other lung
    assert not mask[:, 0, 0].any()  # the air around the patient
    assert not mask[:, 20, 20].any()  # the mediastinum between the lungs
    assert not mask[:, 20, 2].any() and not mask[:, 4, 20].any()  # outside air, chest wall


def test_no_enclosed_air_gives_an_empty_lung_field() -> None:
    assert not lung_field_mask(np.full((4, 16, 16), 40.0, dtype=np.float32)).any()
    assert not lung_field_mask(np.full((4, 16, 16), -1000.0, dtype=np.float32)).any()  # all outside air


def test_the_lung_field_channel_is_the_lung_window_inside_the_lungs_and_zero_elsewhere() -> None:
    hu = _chest()
    channels = stack_windows(hu, ("lung", "lung_field"))
    mask = lung_field_mask(hu)
    np.testing.assert_array_equal(channels[1][mask], apply_window(hu, "lung")[mask])
    assert (channels[1][~mask] == 0).all()
    assert channels[1][:, 20, 12].min() > 0.9  # the nodule is bright in the lung window


def test_a_lung_field_of_a_2d_array_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="slices, rows, cols"):
        lung_field_mask(np.zeros((16, 16)))
