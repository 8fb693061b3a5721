"""Input embedders per modality: field sequences (records, transactions, interactions) and CT volumes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import CoreConfig
from core.errors import InputValidationError

PAD_INDEX = 0
UNKNOWN_INDEX = 1


class PeriodicEncoding(nn.Module):
    """Learned periodic encoding of scalars (PLR, Gorishniy et al. 2022): x -> ReLU(W [sin, cos](2 pi f x)).

    One set of `n_frequencies` learned frequencies per feature, then a linear map to `out_size`.
    """

    def __init__(self, n_features: int, n_frequencies: int, out_size: int, sigma: float = 1.0) -> None:
        super().__init__()
        # Frequencies start spread over scales around `sigma` so standardised inputs are resolved.
        self.frequencies = nn.Parameter(torch.randn(n_features, n_frequencies) * sigma)
        self.linear = nn.Parameter(torch.empty(n_features, 2 * n_frequencies + 1, out_size))
        self.bias = nn.Parameter(torch.zeros(n_features, out_size))
        nn.init.normal_(self.linear, std=1.0 / math.sqrt(2 * n_frequencies + 1))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Encode values of shape (B, T, F) into (B, T, F, out_size)."""
        angles = 2 * math.pi * values[..., None] * self.frequencies  # (B, T, F, n_freq)
        features = torch.cat([angles.sin(), angles.cos(), values[..., None]], dim=-1)  # (B, T, F, 2n+1)
        out = torch.einsum("btfi,fio->btfo", features, self.linear) + self.bias  # (B, T, F, out)
        return torch.relu(out)

    def masked_sum(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(forward(values) * mask[..., None]).sum(2)` for values (B, T, F) and a 0/1 mask (B, T, F).

        The same sum laid out for an exported graph (ONNX Runtime): fields first and tokens last, so every
        element-wise op runs over contiguous rows of B*T tokens, one batched MatMul covers the fields and the
        sum over fields adds whole slabs; the bias is a weight column fed by the mask, so the MatMul already
        masks (`relu(z * m) = relu(z) * m` for m in {0, 1}). A token without any present value sums to exactly
        0, so only the tokens with one are encoded (padding is most of a padded batch) and scattered back.
        """
        batch, length, fields = values.shape
        m = mask.to(values.dtype).reshape(batch * length, fields)  # (N, F)
        rows = (m.sum(dim=1) > 0).nonzero().reshape(-1)  # (n,) tokens with a present value
        x = values.reshape(batch * length, fields).index_select(0, rows).t()[:, None, :]  # (F, 1, n)
        m = m.index_select(0, rows).t()[:, None, :]  # (F, 1, n)
        angles = (2 * math.pi * self.frequencies)[:, :, None] * x  # (F, n_freq, n)
        features = torch.cat([angles.sin(), angles.cos(), x, torch.ones_like(x)], dim=1) * m  # (F, 2n+2, n)
        weight = torch.cat([self.linear, self.bias[:, None, :]], dim=1).transpose(1, 2)  # (F, out, 2n+2)
        out = torch.relu(torch.bmm(weight, features)).sum(dim=0)  # (F, out, n) -> (out, n)
        encoded = values.new_zeros(batch * length, out.shape[0]).index_copy(0, rows, out.t())  # (N, out)
        return encoded.reshape(batch, length, -1)  # (B, T, out)


class FieldEmbedder(nn.Module):
    """Embeds tokens made of fields: categorical ids, numeric values and the time since the last token.

    Categorical fields use index 0 for padding and 1 for the unknown bucket (a value not in the
    vocabulary). Numeric fields are expected roughly standardised by the app (e.g. log-amount, z-scores);
    a missing numeric value (mask False) gets its own learned embedding instead of a fake number. The
    token embedding is the sum of its field embeddings, plus modality and domain embeddings.
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.field_names = list(config.categorical_fields)
        self.categorical = nn.ModuleDict(
            {
                name: nn.Embedding(size, hidden, padding_idx=PAD_INDEX)
                for name, size in config.categorical_fields.items()
            }
        )
        self.n_numeric = len(config.numeric_fields)
        if self.n_numeric:
            self.numeric = PeriodicEncoding(self.n_numeric, config.numeric_frequencies, hidden)
            self.numeric_missing = nn.Parameter(torch.zeros(self.n_numeric, hidden))
        self.time_delta = (
            PeriodicEncoding(1, config.numeric_frequencies, hidden) if config.use_time_delta else None
        )
        self.modality = nn.Embedding(config.num_modalities, hidden)
        self.domain = nn.Embedding(config.num_domains, hidden)
        # Replaces a whole token for masked-field modelling (stage-1 domain adaptation).
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.norm = nn.RMSNorm(hidden, eps=config.layer_norm_eps)

    def forward(
        self,
        categorical: dict[str, torch.Tensor] | None = None,
        numeric: torch.Tensor | None = None,
        numeric_mask: torch.Tensor | None = None,
        time_delta: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        domain_ids: torch.Tensor | None = None,
        mfm_mask: torch.Tensor | None = None,
        shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Embed a batch of field tokens.

        Args:
            categorical: field name -> (B, T) long ids (0 pad, 1 unknown).
            numeric: (B, T, F) float values in `config.numeric_fields` order.
            numeric_mask: (B, T, F) bool, True where the value is present (default: all present).
            time_delta: (B, T) seconds since the previous token (>= 0).
            modality_ids: (B, T) long, default 0.
            domain_ids: (B, T) or (B,) long, default 0.
            mfm_mask: (B, T) bool, tokens replaced by the mask embedding (masked-field modelling).
            shape: (B, T) when no field tensor gives it.

        Returns:
            (B, T, hidden) token embeddings.
        """
        categorical = categorical or {}
        batch, length = self._shape(categorical, numeric, time_delta, shape)
        device = self.modality.weight.device
        exporting = torch.compiler.is_exporting()
        out = torch.zeros(batch, length, self.modality.embedding_dim, device=device)
        missing = [name for name in self.field_names if name not in categorical]
        if missing:
            raise InputValidationError(f"FieldEmbedder: categorical fields {missing} missing from the batch")
        for name, ids in categorical.items():
            if name not in self.categorical:
                raise InputValidationError(
                    f"FieldEmbedder: unknown categorical field {name!r}; configured fields: {self.field_names}"
                )
            table = self.categorical[name]
            # Range and finiteness checks need a host sync; an exported graph (core.compress) checks
            # them in `core.onnx_model` before the session runs.
            if (
                not exporting
                and ids.numel()
                and (int(ids.max()) >= table.num_embeddings or int(ids.min()) < 0)
            ):
                raise InputValidationError(
                    f"FieldEmbedder: field {name!r} has ids outside [0, {table.num_embeddings}); "
                    "map unseen values to the unknown bucket (1) with the saved vocabulary"
                )
            out = out + table(ids)
        if self.n_numeric:
            if numeric is None:
                raise InputValidationError(f"FieldEmbedder: numeric values ({self.n_numeric} fields) missing")
            if (
                not exporting
                and not torch.isfinite(numeric[numeric_mask] if numeric_mask is not None else numeric).all()
            ):
                raise InputValidationError(
                    "FieldEmbedder: numeric values contain NaN or inf; mark them missing"
                )
            numeric = torch.nan_to_num(numeric)  # masked-out slots may hold NaN; they are replaced below
            if exporting:  # the same sum, laid out for ONNX Runtime (`PeriodicEncoding.masked_sum`)
                present = torch.ones_like(numeric) if numeric_mask is None else numeric_mask.to(numeric.dtype)
                out = out + self.numeric.masked_sum(numeric, present)  # (B, T, hidden)
                out = out + (1 - present) @ self.numeric_missing  # (B, T, F) @ (F, hidden)
            else:
                encoded = self.numeric(numeric)  # (B, T, F, hidden)
                if numeric_mask is not None:
                    encoded = torch.where(numeric_mask[..., None], encoded, self.numeric_missing)
                out = out + encoded.sum(dim=2)
        if self.time_delta is not None and time_delta is not None:
            out = out + self.time_delta(torch.log1p(time_delta.clamp_min(0))[..., None]).squeeze(2)
        if mfm_mask is not None:
            out = torch.where(mfm_mask[..., None], self.mask_token.to(out.dtype), out)
        out = out + self.modality(self._ids(modality_ids, batch, length, device))
        out = out + self.domain(self._ids(domain_ids, batch, length, device))
        return self.norm(out)

    @staticmethod
    def _ids(ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        if ids is None:
            return torch.zeros(batch, length, dtype=torch.long, device=device)
        return ids[:, None].expand(batch, length) if ids.dim() == 1 else ids

    @staticmethod
    def _shape(categorical, numeric, time_delta, shape) -> tuple[int, int]:
        for tensor in (*categorical.values(), numeric, time_delta):
            if tensor is not None:
                return tensor.shape[0], tensor.shape[1]
        if shape is None:
            raise InputValidationError("FieldEmbedder: the batch has no field tensors and no shape")
        return shape


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 3-D sine-cosine position embeddings of shape (D*H*W, dim) (MAE/ViT-3D style)."""
    per_axis = (dim // 6) * 2  # even share per axis; leftover channels are zero
    out = torch.zeros(*grid, dim, device=device)
    coords = torch.meshgrid(
        *(torch.arange(n, device=device, dtype=torch.float32) for n in grid), indexing="ij"
    )
    inv_freq = 1.0 / (10000 ** (torch.arange(0, per_axis, 2, device=device, dtype=torch.float32) / per_axis))
    for axis, coord in enumerate(coords):
        angles = coord[..., None] * inv_freq  # (D, H, W, per_axis/2)
        start = axis * per_axis
        out[..., start : start + per_axis] = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return out.view(-1, dim)


def _pool_schedule(patch_size: tuple[int, ...], stages: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Max-pool kernels per stage that bring a volume down to its patch grid, and the factor left after them.

    Each axis halves in the last ``log2`` stages its patch size allows (so thin axes keep their resolution
    longest); whatever the halvings do not cover (a non-power-of-two patch) is pooled once at the end.
    """
    halvings = [(p & -p).bit_length() - 1 for p in patch_size]  # log2 of the largest power-of-2 divisor
    kernels = []
    for stage in range(stages):
        kernels.append(tuple(2 if h > stages - 1 - stage else 1 for h in halvings))
    done = [math.prod(k[axis] for k in kernels) for axis in range(len(patch_size))]
    return kernels, tuple(p // d for p, d in zip(patch_size, done, strict=True))


class VolumeConv3d(nn.Conv3d):
    """`nn.Conv3d` that always takes oneDNN's kernel for float32 on the CPU.

    For a batch of one PyTorch picks its native im2col kernel whenever ``N*C*D*H <= 20480``, a rule written
    for 2-D images; on CT volumes that kernel is about 3x slower (measured on this project's 2-core CPU: a
    4 x 32 x 64 x 64 volume through 16 filters, 104 ms against 34 ms). Same weights, outputs and gradients;
    export and other devices use the parent's path.
    """

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        fast = volume.device.type == "cpu" and volume.dtype == torch.float32 and torch.backends.mkldnn.enabled
        if not fast or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return super().forward(volume)
        return torch.ops.aten.mkldnn_convolution(
            volume, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


class ConvStem(nn.Module):
    """A small 3-D CNN from the voxels to the patch grid: three stages of two 3x3x3 convolutions with
    GroupNorm and GELU, each stage max-pooled, widths ``(w, 2w, 4w)``.

    Output: ``(B, 4w, D', H', W')``, one feature vector per patch token, each summarising a receptive field
    wider than its patch (a lesion on a patch border still shows).
    """

    STAGES = 3

    def __init__(self, in_channels: int, width: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        kernels, self.rest = _pool_schedule(patch_size, self.STAGES)
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, kernel in enumerate(kernels):
            out = width * 2**stage
            for _ in range(2):
                conv = VolumeConv3d(channels, out, kernel_size=3, padding=1)
                conv.fan_in_init = True  # see CoreModel._init_weights
                layers += [conv, nn.GroupNorm(math.gcd(4, out), out), nn.GELU()]
                channels = out
            if any(k > 1 for k in kernel):
                layers.append(nn.MaxPool3d(kernel, kernel))
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        features = self.layers(volume)
        if any(r > 1 for r in self.rest):
            features = F.max_pool3d(features, self.rest, self.rest)
        return features


class VolumeEmbedder(nn.Module):
    """3-D patch embedding of CT volumes: non-overlapping patches -> tokens with 3-D positions.

    Input volumes are (B, C, D, H, W) (channels are window presets or HU scaled by the app), with each
    spatial size a multiple of `config.volume_patch_size`.

    With `config.volume_stem_channels` 0 a patch is one linear projection (ViT) and the positions are added
    before the norm. A linear projection of a whole patch barely separates a small lesion from the
    anatomy around it (it depends on where in the patch the lesion lies), so with a stem width > 0 a small
    CNN (`ConvStem`; a hybrid ViT, cf. Xiao et al. 2021, "Early convolutions help transformers see better")
    turns the voxels into one feature vector per patch, which is projected, normalised, and given its
    position after the norm so the position cannot drown the content.
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.patch_size = tuple(config.volume_patch_size)
        if config.volume_stem_channels:
            self.stem = ConvStem(config.volume_channels, config.volume_stem_channels, self.patch_size)
            self.proj = nn.Linear(self.stem.out_channels, config.hidden_size)
        else:
            self.stem = None
            self.proj = nn.Conv3d(
                config.volume_channels,
                config.hidden_size,
                kernel_size=self.patch_size,
                stride=self.patch_size,
            )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)

    def grid(self, volume_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Patch grid (D', H', W') of a (B, C, D, H, W) volume, validating divisibility."""
        spatial = volume_shape[-3:]
        if any(size % patch for size, patch in zip(spatial, self.patch_size, strict=True)):
            raise InputValidationError(
                f"VolumeEmbedder: volume of spatial shape {tuple(spatial)} is not a multiple of the patch "
                f"size {self.patch_size}; resample or pad the volume to a multiple first"
            )
        return tuple(size // patch for size, patch in zip(spatial, self.patch_size, strict=True))

    def _patchify_export(self, volume: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The patch projection (a Conv3d with kernel = stride) as exported: the patches as rows, then one
        MatMul with the flattened kernel (one initializer after `core.onnx_model._fold_weight_views`), which
        ONNX Runtime's dynamic int8 runs on its integer kernels (its `ConvInteger` is slower than the fp32
        `Conv`; `core.onnx_model.KEEP_FP32_DEFAULT` has the numbers)."""
        channels = volume.shape[1]
        (gd, gh, gw), (pd, ph, pw) = grid, self.patch_size
        patches = volume.reshape(-1, channels, gd, pd, gh, ph, gw, pw)  # (B, C, D', pd, H', ph, W', pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, D', H', W', C, pd, ph, pw): Conv3d's order
        patches = patches.reshape(-1, gd * gh * gw, channels * pd * ph * pw)  # (B, N, C*pd*ph*pw)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, hidden)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Embed (B, C, D, H, W) volumes into (B, D'*H'*W', hidden) patch tokens."""
        grid = self.grid(tuple(volume.shape))
        if self.stem is None:
            if torch.compiler.is_exporting():
                tokens = self._patchify_export(volume, grid)  # (B, N, hidden)
            else:
                tokens = self.proj(volume).flatten(2).transpose(1, 2)  # (B, N, hidden)
            tokens = tokens + sincos_3d(grid, tokens.shape[-1], tokens.device).to(tokens.dtype)
            return self.norm(tokens)
        features = self.stem(volume)  # (B, 4w, D', H', W')
        tokens = self.norm(self.proj(features.flatten(2).transpose(1, 2)))  # (B, N, hidden)
        return tokens + sincos_3d(grid, tokens.shape[-1], tokens.device).to(tokens.dtype)
