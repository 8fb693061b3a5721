"""The Batch the core model consumes, and collation of per-example field sequences into padded batches.

An *example* is a mapping produced by an app's encoder (`apps/<app>/encode.py`) with any of these keys
(T is the example's own length; every per-token array has T rows):

- `categorical`: field name -> int array (T,) of vocabulary ids (0 pad, 1 unknown)
- `numeric`: float array (T, F); `numeric_mask`: bool array (T, F), True where the value is present
- `time_delta`: float array (T,) seconds since the previous token
- `modality_ids`: int array (T,); `domain_ids`: int scalar (the whole example) or int array (T,)
- `volume`: float array (C, D, H, W); `volume_present`: bool
- targets: `labels` int scalar, `token_labels` int array (T,) (-100 ignored), `next_item_ids` int array (T,),
  `next_labels` float array (T,) (-1 ignored), `next_features` int array (T, F) of bucket ids of the next
  item's extra features (`CoreConfig.next_step_feature_buckets`; 0 on padding)

`collate` right-pads them into a `Batch` whose `attention_mask` marks real tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from core.errors import InputValidationError

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A padded batch of field sequences (and optional CT volumes) with its targets.

    Attributes:
        attention_mask: (B, T) bool, True for real tokens.
        categorical: field -> (B, T) long ids.
        numeric: (B, T, F) float; numeric_mask: (B, T, F) bool.
        time_delta: (B, T) float seconds.
        modality_ids: (B, T) long. domain_ids: (B,) or (B, T) long.
        volume: (B, C, D, H, W) float; volume_present: (B,) bool.
        labels: (B,) long. token_labels: (B, T) long. next_item_ids: (B, T) long. next_labels: (B, T) float.
        next_features: (B, T, F) long bucket ids of the next item's extra features.
        mfm_mask: (B, T) bool tokens masked for masked-field modelling.
    """

    attention_mask: torch.Tensor
    categorical: dict[str, torch.Tensor] = field(default_factory=dict)
    numeric: torch.Tensor | None = None
    numeric_mask: torch.Tensor | None = None
    time_delta: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None
    volume: torch.Tensor | None = None
    volume_present: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    token_labels: torch.Tensor | None = None
    next_item_ids: torch.Tensor | None = None
    next_labels: torch.Tensor | None = None
    next_features: torch.Tensor | None = None
    mfm_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    def to_dict(self) -> dict[str, Any]:
        """Keyword arguments for `CoreModel.forward` (None entries and empty dicts left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (isinstance(value, dict) and not value):
                continue
            out[f.name] = value
        return out

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif isinstance(value, dict):
                value = {k: v.to(device) for k, v in value.items()}
            moved[f.name] = value
        return Batch(**moved)


def _pad(arrays: Sequence[np.ndarray], length: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    """Right-pad arrays of shape (T_i, ...) into one (B, length, ...) tensor."""
    first = np.asarray(arrays[0])
    out = torch.full((len(arrays), length, *first.shape[1:]), value, dtype=dtype)
    for row, array in enumerate(arrays):
        array = np.asarray(array)
        out[row, : array.shape[0]] = torch.as_tensor(array, dtype=dtype)
    return out


def example_length(example: Mapping[str, Any]) -> int:
    """Number of field tokens of one example."""
    for key in ("time_delta", "numeric", "token_labels", "next_item_ids"):
        if example.get(key) is not None:
            return len(example[key])
    categorical = example.get("categorical") or {}
    for ids in categorical.values():
        return len(ids)
    return 0


def collate(examples: Sequence[Mapping[str, Any]], pad_to_multiple_of: int | None = None) -> Batch:
    """Right-pad a list of examples (see the module docstring) into a `Batch`.

    Args:
        examples: per-example mappings from an app encoder.
        pad_to_multiple_of: round the padded length up (e.g. to the attention block size).

    Raises:
        InputValidationError: when examples disagree on which fields they carry, or one is empty.
    """
    if not examples:
        raise InputValidationError("collate: no examples to batch")
    lengths = [example_length(e) for e in examples]
    if any(n == 0 for n in lengths) and any("volume" not in e for e in examples):
        raise InputValidationError(f"collate: example {lengths.index(0)} has no tokens and no volume")
    length = max(lengths)
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    keys = set(examples[0])
    for index, example in enumerate(examples):
        if set(example) != keys:
            raise InputValidationError(
                f"collate: example {index} has fields {sorted(example)}, example 0 has {sorted(keys)}"
            )
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    batch = Batch(attention_mask=mask)
    if "categorical" in keys:
        names = list(examples[0]["categorical"])
        batch.categorical = {
            name: _pad([e["categorical"][name] for e in examples], length, 0, torch.long) for name in names
        }
    if "numeric" in keys:
        batch.numeric = _pad([e["numeric"] for e in examples], length, 0.0, torch.float32)
    if "numeric_mask" in keys:
        batch.numeric_mask = _pad([e["numeric_mask"] for e in examples], length, False, torch.bool)
    if "time_delta" in keys:
        batch.time_delta = _pad([e["time_delta"] for e in examples], length, 0.0, torch.float32)
    if "modality_ids" in keys:
        batch.modality_ids = _pad([e["modality_ids"] for e in examples], length, 0, torch.long)
    if "domain_ids" in keys:
        first = np.asarray(examples[0]["domain_ids"])
        if first.ndim == 0:
            batch.domain_ids = torch.tensor([int(e["domain_ids"]) for e in examples], dtype=torch.long)
        else:
            batch.domain_ids = _pad([e["domain_ids"] for e in examples], length, 0, torch.long)
    if "volume" in keys:
        batch.volume = torch.stack(
            [torch.as_tensor(np.asarray(e["volume"]), dtype=torch.float32) for e in examples]
        )
    if "volume_present" in keys:
        batch.volume_present = torch.tensor([bool(e["volume_present"]) for e in examples])
    if "labels" in keys:
        batch.labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    if "token_labels" in keys:
        batch.token_labels = _pad([e["token_labels"] for e in examples], length, IGNORE_INDEX, torch.long)
    if "next_item_ids" in keys:
        batch.next_item_ids = _pad([e["next_item_ids"] for e in examples], length, 0, torch.long)
    if "next_labels" in keys:
        batch.next_labels = _pad([e["next_labels"] for e in examples], length, -1.0, torch.float32)
    if "next_features" in keys:
        batch.next_features = _pad([e["next_features"] for e in examples], length, 0, torch.long)
    return batch
