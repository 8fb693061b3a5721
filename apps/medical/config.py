"""Presets of the medical app: the CoreConfig of the diagnoser, the CT resampling grid and window channels.

Token layout of one case (see `apps.medical.encode`): the CT volume, resampled to a fixed grid at a fixed
spacing with window presets as channels, becomes ``prod(grid / patch)`` patch tokens (modality 1, domain
``"ct"``); the patient record becomes one token per record field (modality 0, domain ``"record"``). Both
share one sequence, so attention mixes the modalities and the MoE router's per-domain prior lets experts
specialise per modality.

Domain order: ``("ct", "record")``. `core.data.Batch` carries no per-example domain of the CT tokens, so
`CoreModel` gives them domain 0 whenever the field tokens carry per-token domain ids; putting ``"ct"`` first
makes that default the right one (a ``volume_domain_ids`` field in `Batch`/`collate` would remove the need).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from core.config import CoreConfig
from core.errors import ConfigError

APP_NAME = "medical"
SCHEMA_VERSION = 1
RECORD_MODALITY = 0
CT_MODALITY = 1
DOMAINS = ("ct", "record")
CT_DOMAIN = DOMAINS.index("ct")
RECORD_DOMAIN = DOMAINS.index("record")


@dataclass(frozen=True)
class VolumeGrid:
    """The fixed grid every CT volume is resampled to before it reaches the model.

    Attributes:
        shape: ``(slices, rows, cols)`` of the resampled volume; each a multiple of `patch_size`.
        spacing_mm: ``(slice, row, col)`` spacing of the grid in mm; the grid is centred on the volume.
        patch_size: ``(depth, height, width)`` voxels per CT patch token.
        windows: window presets (see `apps.medical.imaging.WINDOW_PRESETS`) stacked as channels.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    windows: tuple[str, ...] = ("lung", "mediastinum", "bone")

    def __post_init__(self) -> None:
        for size, patch in zip(self.shape, self.patch_size, strict=True):
            if size <= 0 or patch <= 0 or size % patch:
                raise ConfigError(
                    f"VolumeGrid.shape: expected positive multiples of patch_size {self.patch_size}, got {self.shape}"
                )
        if any(s <= 0 for s in self.spacing_mm):
            raise ConfigError(f"VolumeGrid.spacing_mm: expected positive mm, got {self.spacing_mm}")
        if not self.windows:
            raise ConfigError("VolumeGrid.windows: expected at least one window preset")

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """``(D', H', W')`` patch tokens along each axis."""
        return tuple(s // p for s, p in zip(self.shape, self.patch_size, strict=True))

    @property
    def num_patches(self) -> int:
        d, h, w = self.patch_grid
        return d * h * w

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VolumeGrid:
        return cls(
            shape=tuple(data["shape"]),
            spacing_mm=tuple(float(v) for v in data["spacing_mm"]),
            patch_size=tuple(data["patch_size"]),
            windows=tuple(data["windows"]),
        )


# 32 x 64 x 64 at 5 x 6.25 x 6.25 mm covers 160 mm of chest and a 400 mm field of view; 4 x 8 x 8 patches
# (20 x 50 x 50 mm) give 512 CT tokens.
# The lung-field channel (the lung window inside the segmented lungs) sets what is solid inside the lungs
# apart from the chest wall and the mediastinum, which the plain windows show alike.
_CHEST_GRID = VolumeGrid(
    shape=(32, 64, 64),
    spacing_mm=(5.0, 6.25, 6.25),
    patch_size=(4, 8, 8),
    windows=("lung", "mediastinum", "bone", "lung_field"),
)
GRIDS = MappingProxyType(
    {
        "small": _CHEST_GRID,
        "cnn": _CHEST_GRID,
        # Tests: 64 CT tokens over the same field of view.
        "tiny": VolumeGrid(shape=(16, 32, 32), spacing_mm=(10.0, 12.5, 12.5), patch_size=(4, 8, 8)),
    }
)

# Architecture per preset (everything but the data-dependent sizes filled in by `core_config`).
_ARCHITECTURES = MappingProxyType(
    {
        "small": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "ffn_size": 64,
            "block_size": 64,
            "top_k_blocks": 2,
            "dense_below": 256,
            "dense_tail_layers": 1,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "moe_top_k": 2,
            "dropout": 0.1,
            # The linear patch embedding: cheap enough to train on a CPU; the CT side learns little from
            # it (image-only AUROC near chance on the benchmark data). `cnn` is the model for real sizes.
            "volume_stem_channels": 0,
            # 512 CT tokens against ~20 record tokens: a plain mean gives the record 1/26 of the pooled
            # state (and of its gradient), and a small training set never learns it.
            "classifier_pooling": "modality_mean",
        },
        # `small` with the convolutional CT stem (`core.embeddings.ConvStem`, trained alone first: the
        # Diagnoser's stage 0, then frozen) and each modality max/mean pooled. Needs about a thousand
        # training cases and a GPU: on 1,200 semi-synthetic cases, image-only macro AUROC 0.890 against
        # 0.494 for `small` (README, medical benchmark).
        "tiny": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "ffn_size": 32,
            "block_size": 16,
            "top_k_blocks": 1,
            "dense_below": 0,
            "dense_tail_layers": 1,
            "n_routed_experts": 3,
            "n_shared_experts": 1,
            "moe_top_k": 2,
            "dropout": 0.0,
            "volume_stem_channels": 0,
            # 64 CT tokens: a plain mean still gives the record tokens about a quarter of the pooled state.
            "classifier_pooling": "mean",
        },
    }
)
# `small` with the convolutional CT stem (`core.embeddings.ConvStem`: the Diagnoser trains it alone first,
# its stage 0, then freezes it) and each modality max/mean pooled. Needs about a thousand training cases and
# a GPU: on 1,200 semi-synthetic cases, image-only macro AUROC 0.890 against 0.494 for `small` (README,
# medical benchmark).
_ARCHITECTURES = MappingProxyType(
    {
        **_ARCHITECTURES,
        "cnn": {**_ARCHITECTURES["small"], "volume_stem_channels": 16, "classifier_pooling": "modality_max"},
    }
)
PRESETS = tuple(_ARCHITECTURES)


def grid_for(preset: str) -> VolumeGrid:
    """The CT grid of a preset.

    Raises:
        ConfigError: an unknown preset (lists the known ones).
    """
    if preset not in GRIDS:
        raise ConfigError(f"medical preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return GRIDS[preset]


def core_config(
    preset: str,
    *,
    num_labels: int,
    categorical_fields: Mapping[str, int],
    numeric_fields: tuple[str, ...],
) -> CoreConfig:
    """The CoreConfig of the diagnoser for a preset.

    Bidirectional attention, two modalities (record 0, CT 1), domains ``("ct", "record")``, CT channels =
    the grid's window presets, the preset's CT stem and pooling, and a prototype head as wide as the
    hidden state (the few-shot embedding is the normalised pooled state, see `apps.medical.predictor`).

    Args:
        preset: ``"small"`` (default model, CPU-trainable), ``"cnn"`` (with the CT stem; GPU, >= ~1,000
            cases) or ``"tiny"`` (tests).
        num_labels: classes of the classification head.
        categorical_fields: the record token vocabularies (`apps.medical.encode.CATEGORICAL_VOCAB`).
        numeric_fields: the record token numeric features.

    Raises:
        ConfigError: an unknown preset or an invalid resulting config.
    """
    grid = grid_for(preset)
    architecture = dict(_ARCHITECTURES[preset])
    return CoreConfig(
        **architecture,
        causal=False,
        domains=DOMAINS,
        categorical_fields=dict(categorical_fields),
        numeric_fields=numeric_fields,
        num_modalities=2,
        volume_modality_id=CT_MODALITY,
        volume_patch_size=grid.patch_size,
        volume_channels=len(grid.windows),
        num_labels=num_labels,
        prototype_dim=architecture["hidden_size"],
    )
