"""Lightweight deployment: expert pruning, structured FFN/head pruning, ONNX export, int8 and QAT.

Every step works on a model directory written by `core.train.save_checkpoint` (an app model, or one
domain's part of a suite model) and writes another model directory:

- `plan_expert_pruning` (+ `routing_usage`): drop the routed experts a domain does not use (routing
  statistics measured on calibration examples), slicing the router rows, the domain prior, the selection
  bias and the statistics; the kept experts take over every token (top-k over the kept ones).
- `plan_structured_pruning`: remove the least important FFN units of every expert / shared / dense FFN
  (|W_down| column norm x mean |activation| on calibration data) and attention heads (|W_o| block norm x
  mean head-output norm). `apply_plan` builds the physically smaller model; the per-layer sizes go to
  `CoreConfig.layer_*`.
- `plan_block_pruning`: drop whole encoder layers and/or feed-forward (MoE) blocks, those whose output
  differs least from their input on calibration tokens (block influence, 1 - cos(input, output), as in
  ShortGPT, Men et al. 2024); the kept layers keep their attention kind (block-sparse or dense tail) and are
  renumbered.
- `export_onnx` + `quantize_int8` (in `core.onnx_model`): `torch.onnx.export(..., dynamo=True)` of the
  inference forward, then ONNX Runtime dynamic int8 (MatMul, Gemm, Conv and Gather, i.e. embeddings
  included), with `CompressionOptions.keep_fp32` modules left fp32 and, with `keep_sensitive`, every module
  group whose int8 alone changes the outputs more than that (`int8_sensitivity` on calibration data).
  `core.onnx_model.OnnxCoreModel` loads the result.
- `qat_finetune`: a few task steps with fake-quantised weights (per-channel symmetric int8, as ONNX
  Runtime quantises them) and activations (per-tensor asymmetric uint8 with the range of each batch, as
  dynamic quantisation computes it), straight-through gradients; then the same export.

`compress` chains them and writes `compression.json` (sizes, latency against the fp32 eager parent, CPU
flags, what was pruned); the caller adds metric deltas with `update_report`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import CoreConfig
from core.data import Batch, collate
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel
from core.moe import DomainMoE, SwiGLU
from core.onnx_model import (
    EXPLAIN_ONNX_FILE,
    KEEP_FP32_DEFAULT,
    LOSS_TARGETS,
    ONNX_FILE,
    ONNX_META_FILE,
    WEIGHT_FILES,
    export_onnx,
    flat_inputs,
    inference_inputs,
    quantize_int8,
)

logger = logging.getLogger(__name__)

COMPRESSION_FILE = "compression.json"


# ---------------------------------------------------------------------- calibration helpers
def _batches(examples: Sequence[Mapping[str, Any]], batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size])


@torch.inference_mode()
def _run_calibration(model: CoreModel, examples: Sequence[Mapping[str, Any]], batch_size: int) -> int:
    if not examples:
        raise InputValidationError("compression: calibration needs at least one encoded example")
    model.eval()
    tokens = 0
    for batch in _batches(examples, batch_size):
        model(**inference_inputs(batch))
        tokens += int(batch.attention_mask.sum())
    return tokens


def routing_usage(
    model: CoreModel, examples: Sequence[Mapping[str, Any]], batch_size: int = 32
) -> list[np.ndarray]:
    """Per MoE layer, the (num_domains, n_experts) share of each domain's assignments per expert.

    The model's stored statistics are cleared and re-measured on `examples` (eval mode, real tokens only).
    """
    for moe in model.moe_layers():
        moe.track_routing = True
        moe.reset_routing_stats()
    _run_calibration(model, examples, batch_size)
    return [moe.routing_stats()["count_share"] for moe in model.moe_layers()]


# ---------------------------------------------------------------------- rebuilding a smaller model
@dataclass
class PrunePlan:
    """What to keep, per layer: head ids, routed expert ids, unit ids per expert / shared / dense FFN; which
    layers (`layers`, ascending ids of the original model; None keeps every layer); and the layers whose
    feed-forward block goes (`ffn_dropped`, original ids)."""

    heads: list[list[int] | None] = field(default_factory=list)
    experts: list[list[int] | None] = field(default_factory=list)
    expert_units: list[dict[int, list[int]] | None] = field(default_factory=list)
    shared_units: list[list[int] | None] = field(default_factory=list)
    layers: list[int] | None = None
    ffn_dropped: list[int] = field(default_factory=list)

    @classmethod
    def identity(cls, model: CoreModel) -> PrunePlan:
        n = len(model.layers)
        return cls([None] * n, [None] * n, [None] * n, [None] * n)

    def is_identity(self) -> bool:
        per_layer = (*self.heads, *self.experts, *self.expert_units, *self.shared_units)
        return self.layers is None and not self.ffn_dropped and all(x is None for x in per_layer)

    def kept_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers is None else list(self.layers)


def _ffn_width(module: SwiGLU) -> int:
    return module.w1.out_features


def _pruned_config(model: CoreModel, plan: PrunePlan) -> CoreConfig:
    config = model.config
    layer_heads, layer_experts, layer_ffn, layer_shared = [], [], [], []
    for i, layer in enumerate(model.layers):
        heads = plan.heads[i]
        layer_heads.append(layer.attention.num_heads if heads is None else len(heads))
        ffn = layer.ffn
        if ffn is None or i in plan.ffn_dropped:  # no feed-forward block: the sizes are the config's, unused
            layer_experts.append(config.experts_in_layer(i))
            layer_ffn.append(config.ffn_size_in_layer(i))
            layer_shared.append(config.shared_ffn_size_in_layer(i))
            continue
        if isinstance(ffn, DomainMoE):
            experts = plan.experts[i]
            layer_experts.append(ffn.num_experts if experts is None else len(experts))
            units = plan.expert_units[i]
            width = _ffn_width(ffn.experts[0])
            if units is not None:
                widths = {len(v) for v in units.values()}
                if len(widths) != 1:
                    raise ConfigError(f"layer {i}: pruned experts must keep one common width, got {widths}")
                width = widths.pop()
            layer_ffn.append(width)
            shared = ffn.shared_experts
            full_shared = 0 if shared is None else _ffn_width(shared)
        else:
            layer_experts.append(config.n_routed_experts)
            layer_ffn.append(config.ffn_size)
            full_shared = _ffn_width(ffn)
        layer_shared.append(full_shared if plan.shared_units[i] is None else len(plan.shared_units[i]))
    kept = plan.kept_layers(len(model.layers))
    has_ffn = [model.layers[i].ffn is not None and i not in plan.ffn_dropped for i in kept]
    layer_heads, layer_experts, layer_ffn, layer_shared = (
        [sizes[i] for i in kept] for sizes in (layer_heads, layer_experts, layer_ffn, layer_shared)
    )
    values = config.to_dict()
    for key in (
        "layer_num_heads",
        "layer_routed_experts",
        "layer_ffn_sizes",
        "layer_shared_ffn_sizes",
        "layer_has_ffn",
    ):
        values.pop(key, None)
    if not all(has_ffn):
        values["layer_has_ffn"] = has_ffn
    if plan.layers is not None:
        # The dense tail is a suffix of the layers, so the kept dense layers stay a suffix of the kept ones.
        values["num_layers"] = len(kept)
        values["dense_tail_layers"] = sum(model.layers[i].attention.always_dense for i in kept)
    for key in ("architectures", "transformers_version", "model_type"):
        values.pop(key, None)
    if config.use_moe:
        values["layer_routed_experts"] = layer_experts
        values["layer_ffn_sizes"] = layer_ffn
    values["layer_num_heads"] = layer_heads
    values["layer_shared_ffn_sizes"] = layer_shared
    return CoreConfig(**values)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _slice_swiglu(
    state: dict[str, torch.Tensor], old: str, new: str, units: list[int] | None, out: dict
) -> None:
    for name, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
        tensor = state[f"{old}.{name}.weight"]
        if units is not None:
            tensor = tensor.index_select(dim, torch.as_tensor(units))
        out[f"{new}.{name}.weight"] = tensor


def _moe_state(prefix: str, moe: DomainMoE, state: dict, experts: list[int] | None, units, shared_units, out):
    """Slice one DomainMoE: expert-indexed tensors along their expert dimension, experts renumbered."""
    keep = list(range(moe.num_experts)) if experts is None else experts
    index = torch.as_tensor(keep)
    for new_id, old_id in enumerate(keep):
        expert_units = None if units is None else units[old_id]
        _slice_swiglu(state, f"{prefix}.experts.{old_id}", f"{prefix}.experts.{new_id}", expert_units, out)
    if moe.shared_experts is not None:
        _slice_swiglu(state, f"{prefix}.shared_experts", f"{prefix}.shared_experts", shared_units, out)
    for name, tensor in state.items():
        if not name.startswith(prefix + ".") or name.startswith(
            (f"{prefix}.experts.", f"{prefix}.shared_experts.")
        ):
            continue
        # Router rows, domain-prior columns, selection bias, statistics, and any other per-expert tensor
        # (one dimension of size num_experts) follow the kept experts.
        dims = [d for d, size in enumerate(tensor.shape) if size == moe.num_experts]
        if experts is not None and dims:
            dim = 0 if name.endswith("router.weight") else dims[-1]
            tensor = tensor.index_select(dim, index)
        out[name] = tensor


def _pruned_state(model: CoreModel, plan: PrunePlan) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    head_dim = model.config.head_dim
    handled: set[str] = set()
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        heads = plan.heads[i]
        if heads is not None:
            rows = _head_rows(heads, head_dim)
            att = f"{prefix}.attention"
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{att}.{proj}.weight"] = state[f"{att}.{proj}.weight"].index_select(0, rows)
            out[f"{att}.o_proj.weight"] = state[f"{att}.o_proj.weight"].index_select(1, rows)
            out[f"{att}.gating_factor"] = state[f"{att}.gating_factor"].index_select(
                0, torch.as_tensor(heads)
            )
            for name in ("weight", "bias"):
                key = f"{att}.gate_proj.{name}"
                if key in state:
                    out[key] = state[key].index_select(0, torch.as_tensor(heads))
            if f"{att}.recency_slope" in state:  # `CoreConfig.recency_bias`: one slope per head
                out[f"{att}.recency_slope"] = state[f"{att}.recency_slope"].index_select(
                    0, torch.as_tensor(heads)
                )
        ffn_prefix = f"{prefix}.ffn"
        if layer.ffn is None or i in plan.ffn_dropped:  # the block and its norm are left out
            handled.update(k for k in state if k.startswith((ffn_prefix + ".", f"{prefix}.ffn_norm.")))
            continue
        if isinstance(layer.ffn, DomainMoE):
            _moe_state(
                ffn_prefix, layer.ffn, state, plan.experts[i], plan.expert_units[i], plan.shared_units[i], out
            )
        else:
            _slice_swiglu(state, ffn_prefix, ffn_prefix, plan.shared_units[i], out)
        handled.update(k for k in state if k.startswith(ffn_prefix + "."))
    for name, tensor in state.items():
        if name not in out and name not in handled:
            out[name] = tensor
    if plan.layers is None:
        return out
    renumber = {f"layers.{old}.": f"layers.{new}." for new, old in enumerate(plan.layers)}
    kept_state = {}
    for name, tensor in out.items():
        if not name.startswith("layers."):
            kept_state[name] = tensor
            continue
        prefix = ".".join(name.split(".")[:2]) + "."
        if prefix in renumber:  # a dropped layer's tensors are left out
            kept_state[renumber[prefix] + name[len(prefix) :]] = tensor
    return kept_state


def apply_plan(model: CoreModel, plan: PrunePlan) -> CoreModel:
    """A new, physically smaller `CoreModel` holding the kept heads, experts and FFN units of `model`."""
    config = _pruned_config(model, plan)
    smaller = CoreModel(config)
    state = _pruned_state(model, plan)
    missing, unexpected = smaller.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("expert_load")]:
        raise ConfigError(
            f"pruning produced a state that does not fit: missing {missing}, unexpected {unexpected}"
        )
    return smaller.to(model.dtype).eval()


# ---------------------------------------------------------------------- expert pruning
def plan_expert_pruning(
    model: CoreModel,
    usage: Sequence[np.ndarray],
    domain: str | None = None,
    threshold: float = 0.0,
) -> PrunePlan:
    """Keep, per MoE layer, the experts whose share of the domain's assignments exceeds `threshold`.

    Args:
        usage: per MoE layer, the (num_domains, E) assignment shares (`routing_usage`).
        domain: keep what this domain uses; None keeps what any domain uses.
        threshold: an expert used by at most this share is dropped (0: only never-used experts).

    Raises:
        ConfigError: an unknown domain, a model without MoE, or no routed token for the domain.
    """
    if not model.config.use_moe:
        raise ConfigError("prune_experts: the model has no DomainMoE layers (use_moe=False)")
    domains = list(range(model.config.num_domains)) if domain is None else [model.config.domain_id(domain)]
    plan = PrunePlan.identity(model)
    layer_ids = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, DomainMoE)]
    for layer_idx, shares in zip(layer_ids, usage, strict=True):
        share = shares[domains].max(axis=0)  # (E,) the most any chosen domain uses each expert
        if not share.any():
            raise ConfigError(
                f"prune_experts: no routed token of domain(s) {[model.config.domains[d] for d in domains]} "
                "in the routing statistics; give calibration data of that domain"
            )
        top_k = model.config.moe_top_k
        keep = [int(e) for e in np.flatnonzero(share > threshold)]
        if len(keep) < top_k:  # top-k routing needs k experts: keep the most used ones
            keep = sorted(int(e) for e in np.argsort(-share, kind="stable")[:top_k])
        if len(keep) < len(share):
            plan.experts[layer_idx] = keep
    return plan


# ---------------------------------------------------------------------- structured pruning
@contextmanager
def _capture(modules: Mapping[str, nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor]):
    """Sum `reduce(input)` of each module's input over calibration forwards: {name: (sum, count)}."""
    totals: dict[str, list] = {name: [None, 0] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, args, name=name):
            value = args[0].detach().float()
            rows = value.reshape(-1, value.shape[-1])  # (N, F)
            if rows.shape[0] == 0:
                return
            total = totals[name]
            reduced = reduce(rows)
            total[0] = reduced if total[0] is None else total[0] + reduced
            total[1] += rows.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def _keep_top(scores: torch.Tensor, ratio: float, minimum: int = 1) -> list[int]:
    keep = max(minimum, round(len(scores) * (1.0 - ratio)))
    return sorted(int(i) for i in torch.argsort(scores, descending=True, stable=True)[:keep])


def plan_structured_pruning(
    model: CoreModel,
    examples: Sequence[Mapping[str, Any]] | None,
    ffn_ratio: float = 0.0,
    head_ratio: float = 0.0,
    batch_size: int = 32,
    plan: PrunePlan | None = None,
) -> PrunePlan:
    """Choose the FFN units and attention heads to keep by importance.

    FFN unit j of a SwiGLU: ||W_down[:, j]|| x mean |a_j| (a = silu(W_gate x) * W_up x on calibration
    tokens; without examples, ||W_gate[j]|| x ||W_up[j]|| replaces the activation term). Head h:
    ||W_o[:, block h]|| x mean ||head output h||. Each expert keeps the same number of units (so the experts
    of a layer keep one width). `ffn_ratio` / `head_ratio` are the shares removed.

    Raises:
        ConfigError: a ratio outside [0, 1).
    """
    for name, ratio in (("ffn_ratio", ffn_ratio), ("head_ratio", head_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"{name}: expected a share in [0, 1), got {ratio!r}")
    plan = plan or PrunePlan.identity(model)
    swiglus = {name: m.w2 for name, m in model.named_modules() if isinstance(m, SwiGLU)}
    o_projs = {f"layers.{i}": layer.attention.o_proj for i, layer in enumerate(model.layers)}
    act_sums, head_sums = {}, {}
    if examples:
        head_dim = model.config.head_dim
        with (
            _capture(swiglus, lambda rows: rows.abs().sum(0)) as act_sums,
            _capture(
                o_projs, lambda rows: rows.view(rows.shape[0], -1, head_dim).norm(dim=-1).sum(0)
            ) as head_sums,
        ):
            _run_calibration(model, examples, batch_size)

    def unit_scores(name: str, module: SwiGLU) -> torch.Tensor:
        down = module.w2.weight.detach().float().norm(dim=0)  # (F,)
        total, count = act_sums.get(name, (None, 0))
        if total is not None and count:
            return down * (total / count)
        return (
            down
            * module.w1.weight.detach().float().norm(dim=1)
            * module.w3.weight.detach().float().norm(dim=1)
        )

    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}.ffn"
        if ffn_ratio > 0 and layer.ffn is not None:
            if isinstance(layer.ffn, DomainMoE):
                kept_experts = plan.experts[i] or list(range(layer.ffn.num_experts))
                width = _ffn_width(layer.ffn.experts[0])
                keep_n = max(1, round(width * (1.0 - ffn_ratio)))
                plan.expert_units[i] = {
                    e: _keep_top(
                        unit_scores(f"{prefix}.experts.{e}", layer.ffn.experts[e]), 1 - keep_n / width
                    )
                    for e in kept_experts
                }
                if layer.ffn.shared_experts is not None:
                    plan.shared_units[i] = _keep_top(
                        unit_scores(f"{prefix}.shared_experts", layer.ffn.shared_experts), ffn_ratio
                    )
            else:
                plan.shared_units[i] = _keep_top(unit_scores(prefix, layer.ffn), ffn_ratio)
        if head_ratio > 0:
            attention = layer.attention
            dim = model.config.head_dim
            o_weight = attention.o_proj.weight.detach().float()  # (hidden, H*D)
            block_norm = o_weight.view(o_weight.shape[0], attention.num_heads, dim).norm(dim=(0, 2))  # (H,)
            total, count = head_sums.get(f"layers.{i}", (None, 0))
            scores = block_norm * (total / count) if total is not None and count else block_norm
            plan.heads[i] = _keep_top(scores, head_ratio)
    return plan


def block_influence(
    model: CoreModel, examples: Sequence[Mapping[str, Any]], batch_size: int = 32
) -> dict[str, list[float | None]]:
    """Block influence on calibration examples: 1 - the mean cosine similarity of each real token's hidden
    state before and after a block (ShortGPT, Men et al. 2024); a block that barely turns its input scores
    near 0.

    Returns:
        {"layers": per encoder layer, its influence as a whole; "ffn": per layer, that of its feed-forward
        block alone (None where the layer has none)}.
    """
    n = len(model.layers)
    sums = {"layers": [0.0] * n, "ffn": [0.0] * n}
    counts = {"layers": [0] * n, "ffn": [0] * n}
    inputs: dict[str, torch.Tensor | None] = {}

    def add(kind: str, i: int, before: torch.Tensor, after: torch.Tensor) -> None:
        similarity = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)  # (B, T)
        if inputs["mask"] is not None:
            similarity = similarity[inputs["mask"].to(torch.bool)]
        sums[kind][i] += float(similarity.sum())
        counts[kind][i] += similarity.numel()

    def layer_input(_module, args, kwargs):
        inputs["layer"] = args[0].detach()
        inputs["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    def ffn_input(_module, args):
        inputs["ffn"] = args[0].detach()  # the residual stream after attention, into the FFN's norm

    handles = []
    for i, layer in enumerate(model.layers):

        def layer_output(_module, args, kwargs, output, i=i, has_ffn=layer.ffn is not None):
            add("layers", i, inputs["layer"], output[0])
            if has_ffn:
                add("ffn", i, inputs["ffn"], output[0])

        handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_output, with_kwargs=True))
        if layer.ffn_norm is not None:
            handles.append(layer.ffn_norm.register_forward_pre_hook(ffn_input))
    try:
        _run_calibration(model, examples, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {
        kind: [
            1.0 - total / count if count else None
            for total, count in zip(sums[kind], counts[kind], strict=True)
        ]
        for kind in sums
    }


def _least(scores: Sequence[float | None], n: int, among: Sequence[int]) -> set[int]:
    """The `n` ids in `among` of lowest score (ties: the lower id)."""
    return set(sorted(among, key=lambda i: (scores[i], i))[:n])


def plan_block_pruning(
    model: CoreModel,
    examples: Sequence[Mapping[str, Any]],
    layers: int = 0,
    ffn_blocks: int = 0,
    batch_size: int = 32,
    plan: PrunePlan | None = None,
) -> tuple[PrunePlan, dict[str, list[float | None]]]:
    """Drop the `layers` encoder layers of least influence, then the `ffn_blocks` feed-forward (MoE) blocks
    of least influence among the kept layers (`block_influence` on `examples`, measured once on the whole
    model).

    Returns:
        (plan with `layers` / `ffn_dropped` set, the influence of every layer and feed-forward block).

    Raises:
        ConfigError: `layers` not in [0, num_layers) (at least one layer stays), or `ffn_blocks` more than
            the feed-forward blocks the kept layers have.
    """
    n_layers = len(model.layers)
    if not 0 <= layers < n_layers:
        raise ConfigError(f"prune_layers: expected 0 to {n_layers - 1} layers to drop, got {layers!r}")
    plan = plan or PrunePlan.identity(model)
    influence = block_influence(model, examples, batch_size)
    if layers:
        dropped = _least(influence["layers"], layers, range(n_layers))
        plan.layers = [i for i in range(n_layers) if i not in dropped]
    with_ffn = [i for i in plan.kept_layers(n_layers) if model.layers[i].ffn is not None]
    if not 0 <= ffn_blocks <= len(with_ffn):
        raise ConfigError(
            f"prune_ffn_blocks: expected 0 to {len(with_ffn)} feed-forward blocks to drop "
            f"(the kept layers have {len(with_ffn)}), got {ffn_blocks!r}"
        )
    plan.ffn_dropped = sorted(_least(influence["ffn"], ffn_blocks, with_ffn))
    return plan, influence


# ---------------------------------------------------------------------- QAT
def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantisation (what ONNX Runtime stores)."""
    scale = (weight.detach().abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()  # (out,)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


def _fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor asymmetric uint8 fake quantisation with the batch's own range (dynamic quantisation)."""
    low = x.detach().min().clamp_max(0.0)
    high = x.detach().max().clamp_min(0.0)
    scale = ((high - low) / 255.0).clamp_min(1e-12).float().reshape(1)
    zero = torch.round(-low / scale).clamp(0, 255).to(torch.int32).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class _FakeQuantWeight(nn.Module):
    """A `torch.nn.utils.parametrize` parametrization: the weight as int8 would store it (straight-through)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _fake_quant_weight(weight)


@contextmanager
def fake_quantized(model: nn.Module) -> Iterator[int]:
    """Fake-quantise the weights of every Linear/Embedding and the inputs of every Linear of `model`.

    Yields the number of quantised modules; on exit the parametrizations and hooks are removed and the
    trained fp32 weights stay (the int8 export quantises them the same way).
    """
    from torch.nn.utils import parametrize

    modules = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)]
    handles = []
    for module in modules:
        parametrize.register_parametrization(module, "weight", _FakeQuantWeight())
        if isinstance(module, nn.Linear):
            handles.append(
                module.register_forward_pre_hook(lambda _m, args: (_fake_quant_activation(args[0]),))
            )
    try:
        yield len(modules)
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


#: What QAT fine-tunes towards (`qat_finetune`).
QAT_OBJECTIVES = ("task", "distill", "task+distill")

# Outputs the distillation matches, when the parent gives them.
_DISTILLED_OUTPUTS = ("hidden_states", "logits", "next_step_logits", "embeddings")


class _Distillation(nn.Module):
    """QAT towards the fp32 parent: the student's outputs (final hidden states and every head's output) are
    pulled to the parent's on the same batch, relative mean squared error per output, real tokens only."""

    def __init__(self, student: CoreModel, teacher: CoreModel, with_task: bool = False) -> None:
        super().__init__()
        self.student = student
        self.with_task = with_task
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> _Distillation:
        super().train(mode)
        self.teacher.eval()  # the parent as it serves: no dropout
        return self

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in LOSS_TARGETS}
        with torch.no_grad():
            target = self.teacher(**inputs)
        out = self.student(**(batch if self.with_task else inputs))
        real = inputs.get("attention_mask")
        loss = out.loss if self.with_task and out.loss is not None else out.hidden_states.new_zeros(())
        for name in _DISTILLED_OUTPUTS:
            mine, theirs = getattr(out, name, None), getattr(target, name, None)
            if mine is None or theirs is None:
                continue
            error, scale = (mine - theirs).pow(2), theirs.pow(2)
            if real is not None and tuple(error.shape[:2]) == tuple(real.shape):  # per-token output
                keep = real.bool()
                error, scale = error[keep], scale[keep]
            loss = loss + error.mean() / scale.mean().clamp_min(1e-8)
        return {"loss": loss}


def qat_finetune(
    model: CoreModel,
    examples: Sequence[Mapping[str, Any]],
    steps: int,
    work_dir: str | Path,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    teacher: CoreModel | None = None,
    with_task: bool = False,
) -> dict[str, float]:
    """Quantisation-aware fine-tuning: `steps` steps (transformers.Trainer) under `fake_quantized`.

    With a `teacher` (the fp32 parent: objective "distill") the steps pull the model's outputs to the
    teacher's on the examples (`_Distillation`), so QAT recovers what quantisation and pruning changed rather
    than fitting the task again; without one ("task") they are task steps on the examples' targets. The MoE
    selection biases stay as they are either way (the parent's served balance).

    Args:
        examples: encoded examples (with task targets for "task"; inputs suffice for "distill").
        teacher: the fp32 parent to distil from, or None for task steps.

    Returns:
        The Trainer's metrics.

    Raises:
        InputValidationError: no examples, or (task steps) examples without any task target.
    """
    from core.train import ExampleDataset, TaskCollator, default_training_args, run_stage

    if steps < 1:
        raise ConfigError(f"qat_steps: expected an integer >= 1, got {steps!r}")
    if not examples:
        raise InputValidationError("QAT needs encoded examples")
    if (teacher is None or with_task) and not any(k in examples[0] for k in LOSS_TARGETS):
        raise InputValidationError("QAT needs encoded examples with task targets (labels / next_labels)")
    args = default_training_args(
        work_dir,
        max_steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        warmup_steps=0,
        lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        logging_steps=max(1, steps // 4),
        bf16=False,
    )
    # The Trainer's MoEBalanceCallback updates every DomainMoE it finds in the trained module, the teacher's
    # included: hold them all (the teacher is the parent as served; its biases once moved at the first step,
    # from the uninitialised loads of a loaded model, and QAT distilled towards another target each run).
    held = [*model.moe_layers(), *(teacher.moe_layers() if teacher is not None else [])]
    rates = [(moe, moe.bias_update_rate) for moe in held]
    model.train()
    try:
        for moe, _ in rates:
            moe.bias_update_rate = 0.0
        with fake_quantized(model):
            trained = model if teacher is None else _Distillation(model, teacher, with_task)
            metrics = run_stage(trained, ExampleDataset(examples), args, TaskCollator())
    finally:
        for moe, rate in rates:
            moe.bias_update_rate = rate
    model.eval()
    return metrics


# ---------------------------------------------------------------------- measurement and reports
def cpu_flags() -> dict[str, Any]:
    """The CPU model and its int8 features (VNNI, AMX) from /proc/cpuinfo, and the runtime versions."""
    import onnxruntime

    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    return {
        "model": name,
        "logical_cpus": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "amx_tile": "amx_tile" in flags,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def dir_bytes(model_dir: str | Path) -> dict[str, int]:
    """Bytes of the weight files of a model directory (safetensors and ONNX files present)."""
    model_dir = Path(model_dir)
    return {name: (model_dir / name).stat().st_size for name in WEIGHT_FILES if (model_dir / name).is_file()}


def _repeat_to(examples: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    return [examples[i % len(examples)] for i in range(n)]


def time_forward(
    model: Any, examples: Sequence[Mapping[str, Any]], batch_size: int, repeats: int = 5
) -> float:
    """Median milliseconds of one inference forward over a batch of `batch_size` examples."""
    batch = collate(_repeat_to(examples, batch_size))
    inputs = inference_inputs(batch)
    times = []
    with torch.inference_mode():
        model(**inputs)  # warm-up (ONNX Runtime allocations, torch kernels)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def latency_report(
    parent: CoreModel,
    artifact: Any,
    examples: Sequence[Mapping[str, Any]],
    batch_sizes=(1, 64),
    repeats: int = 5,
    block: int = 5,
) -> dict[str, Any]:
    """Median latency (ms) of the fp32 eager parent and the artifact per batch size, and the speed-up.

    The two models take turns in blocks (one untimed forward, then up to `block` timed ones of the parent,
    the same of the artifact, and again until each has `repeats` timed forwards), so a change in the machine's
    load during the measurement hits both alike, while each is timed as it runs when served: after its own
    previous forward. Turns of single forwards cost each model the other's cache and allocator traffic
    (measured, education's pruned int8 part at batch 64, 1 thread: ONNX Runtime 18.0 ms taking turns against
    14.3 ms on its own, eager PyTorch 39.0 against 36.7 ms). `speedup` is the ratio of the medians and
    `speedup_best` the ratio of the fastest runs (the least disturbed by other processes on a busy machine).
    `speedup_cpu` is the ratio of the median CPU times of the calling thread (`time.thread_time`): with one
    intra-op thread both torch and ONNX Runtime compute on that thread, so time spent descheduled while other
    processes run is left out (shared caches and memory bandwidth still count).

    Raises:
        ConfigError: `repeats` or `block` below 1.
    """
    if repeats < 1 or block < 1:
        raise ConfigError(f"latency_report: repeats and block must be >= 1, got {repeats} and {block}")
    report = {}
    for size in batch_sizes:
        inputs = inference_inputs(collate(_repeat_to(examples, size)))
        times: dict[str, list[float]] = {"parent": [], "artifact": []}
        cpu: dict[str, list[float]] = {"parent": [], "artifact": []}
        with torch.inference_mode():
            while len(times["artifact"]) < repeats:
                timed = min(block, repeats - len(times["artifact"]))
                for name, model in (("parent", parent), ("artifact", artifact)):
                    model(**inputs)  # untimed: the first forward after the other model's turn
                    for _ in range(timed):
                        start, start_cpu = time.perf_counter(), time.thread_time()
                        model(**inputs)
                        times[name].append(1000 * (time.perf_counter() - start))
                        cpu[name].append(1000 * (time.thread_time() - start_cpu))
        base, mine = float(np.median(times["parent"])), float(np.median(times["artifact"]))
        best_base, best_mine = min(times["parent"]), min(times["artifact"])
        cpu_base, cpu_mine = float(np.median(cpu["parent"])), float(np.median(cpu["artifact"]))
        report[f"batch_{size}"] = {
            "parent_fp32_ms": round(base, 3),
            "artifact_ms": round(mine, 3),
            "speedup": round(base / mine, 3),
            "parent_fp32_best_ms": round(best_base, 3),
            "artifact_best_ms": round(best_mine, 3),
            "speedup_best": round(best_base / best_mine, 3),
            "parent_fp32_cpu_ms": round(cpu_base, 3),
            "artifact_cpu_ms": round(cpu_mine, 3),
            "speedup_cpu": round(cpu_base / max(cpu_mine, 1e-6), 3),
        }
    return report


def update_report(model_dir: str | Path, **entries: Any) -> dict[str, Any]:
    """Merge entries into a directory's compression.json (e.g. `metrics=...` from the app's evaluation)."""
    path = Path(model_dir) / COMPRESSION_FILE
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(entries)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def metric_deltas(parent: Mapping[str, Any], artifact: Mapping[str, Any]) -> dict[str, float]:
    """artifact - parent for every numeric metric both report."""
    return {
        k: float(artifact[k]) - float(parent[k])
        for k in parent
        if k in artifact and isinstance(parent[k], int | float) and isinstance(artifact[k], int | float)
    }


# ---------------------------------------------------------------------- one call
@dataclass
class CompressionOptions:
    """What `compress` does. Ratios are shares removed; `qat_steps > 0` implies `int8`."""

    domain: str | None = None
    prune_experts: bool = False
    expert_threshold: float = 0.0
    ffn_ratio: float = 0.0
    head_ratio: float = 0.0
    layer_drop: int = 0
    ffn_block_drop: int = 0
    int8: bool = False
    qat_steps: int = 0
    qat_learning_rate: float = 1e-4
    qat_objective: str = "task"
    explanations: bool = True
    keep_fp32: tuple[str, ...] = KEEP_FP32_DEFAULT
    keep_sensitive: float = 0.0
    measure_latency: bool = True
    latency_repeats: int = 5
    batch_size: int = 32

    def validate(self) -> None:
        if not (
            self.prune_experts
            or self.ffn_ratio
            or self.head_ratio
            or self.layer_drop
            or self.ffn_block_drop
            or self.int8
            or self.qat_steps
        ):
            raise ConfigError(
                "compress: nothing to do; give --prune-experts, --prune-ffn R, --prune-heads R, "
                "--prune-layers N, --prune-ffn-blocks N, --int8 or --qat-steps N"
            )
        for name in ("layer_drop", "ffn_block_drop"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if self.qat_steps < 0:
            raise ConfigError(f"qat_steps: expected an integer >= 0, got {self.qat_steps!r}")
        if self.qat_objective not in QAT_OBJECTIVES:
            raise ConfigError(
                f"qat_objective: expected one of {', '.join(QAT_OBJECTIVES)}, got {self.qat_objective!r}"
            )
        if self.keep_sensitive < 0:
            raise ConfigError(f"keep_sensitive: expected a relative error >= 0, got {self.keep_sensitive!r}")
        if not 0.0 <= self.expert_threshold < 1.0:
            raise ConfigError(f"expert_threshold: expected a share in [0, 1), got {self.expert_threshold!r}")


def _copy_app_files(parent: Path, out_dir: Path) -> None:
    """Everything of the parent directory but its weights and config (vocabularies, labels, prototypes)."""
    skip = {*WEIGHT_FILES, "config.json", COMPRESSION_FILE, ONNX_META_FILE, "generation_config.json"}
    for item in parent.iterdir():
        if item.name in skip:
            continue
        target = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)


def _describe_plan(model: CoreModel, plan: PrunePlan) -> dict[str, Any]:
    layers = []
    kept = plan.kept_layers(len(model.layers))
    for i, layer in enumerate(model.layers):
        entry: dict[str, Any] = {"layer": i}
        if i not in kept:
            entry["dropped"] = True
            layers.append(entry)
            continue
        if plan.layers is not None:
            entry["new_index"] = kept.index(i)
        if i in plan.ffn_dropped:
            entry["ffn_dropped"] = True
        if plan.heads[i] is not None:
            entry["heads_kept"] = plan.heads[i]
            entry["heads_before"] = layer.attention.num_heads
        if isinstance(layer.ffn, DomainMoE):
            if plan.experts[i] is not None:
                entry["experts_kept"] = plan.experts[i]
                entry["experts_before"] = layer.ffn.num_experts
            if plan.expert_units[i] is not None:
                entry["expert_ffn_width"] = [
                    _ffn_width(layer.ffn.experts[0]),
                    len(next(iter(plan.expert_units[i].values()))),
                ]
        if plan.shared_units[i] is not None:
            width = _ffn_width(layer.ffn.shared_experts if isinstance(layer.ffn, DomainMoE) else layer.ffn)
            entry["shared_or_dense_ffn_width"] = [width, len(plan.shared_units[i])]
        layers.append(entry)
    return {"layers": layers}


def compress(
    parent_dir: str | Path,
    out_dir: str | Path,
    options: CompressionOptions,
    calibration: Sequence[Mapping[str, Any]],
    task_examples: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Prune, fine-tune with fake quantisation, export and quantise a model directory into `out_dir`.

    Args:
        parent_dir: a model directory written by `core.train.save_checkpoint`.
        out_dir: the new model directory (app files copied; weights pruned, or ONNX when int8).
        options: the steps to run.
        calibration: encoded examples (inputs only needed) for routing statistics, importance, the export
            sample and latency.
        task_examples: encoded examples with targets, for QAT.

    Returns:
        The compression report (also written to `out_dir/compression.json`).
    """
    from core.train import load_checkpoint

    options.validate()
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    if parent_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"compress: --out must differ from --model ({parent_dir})")
    parent, _meta = load_checkpoint(parent_dir)
    if not isinstance(parent, CoreModel):
        raise ConfigError(f"{parent_dir}: already an ONNX artifact; compress its fp32 parent instead")
    if options.domain is not None:
        parent.config.domain_id(options.domain)  # raises on an unknown domain
    if not calibration:
        raise InputValidationError("compress: no calibration examples (give data the app can encode)")
    parent = parent.float().eval()
    work = _clone(parent)
    steps: list[dict[str, Any]] = []
    plan = PrunePlan.identity(work)
    if options.prune_experts:
        usage = routing_usage(work, calibration, options.batch_size)
        plan = plan_expert_pruning(work, usage, options.domain, options.expert_threshold)
        steps.append(
            {
                "step": "prune_experts",
                "domain": options.domain,
                "threshold": options.expert_threshold,
                "usage_share": [u.round(4).tolist() for u in usage],
            }
        )
    if options.ffn_ratio or options.head_ratio:
        plan = plan_structured_pruning(
            work, calibration, options.ffn_ratio, options.head_ratio, options.batch_size, plan
        )
        steps.append(
            {"step": "prune_structured", "ffn_ratio": options.ffn_ratio, "head_ratio": options.head_ratio}
        )
    if options.layer_drop or options.ffn_block_drop:
        plan, influence = plan_block_pruning(
            work, calibration, options.layer_drop, options.ffn_block_drop, options.batch_size, plan
        )
        steps.append(
            {
                "step": "prune_blocks",
                "layers_kept": plan.kept_layers(len(work.layers)),
                "ffn_dropped": plan.ffn_dropped,
                "block_influence": influence,
            }
        )
    pruned_description = _describe_plan(work, plan)
    if not plan.is_identity():
        work = apply_plan(work, plan)
    if options.qat_steps:
        if not task_examples:
            raise InputValidationError("compress: QAT needs task data with labels (--data)")
        with tempfile.TemporaryDirectory(prefix="verticals-qat-") as qat_work:
            qat_metrics = qat_finetune(
                work,
                task_examples,
                options.qat_steps,
                qat_work,
                options.qat_learning_rate,
                options.batch_size,
                teacher=parent if "distill" in options.qat_objective else None,
                with_task=options.qat_objective == "task+distill",
            )
        steps.append(
            {
                "step": "qat",
                "steps": options.qat_steps,
                "objective": options.qat_objective,
                "train_loss": qat_metrics.get("train_loss"),
            }
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    _copy_app_files(parent_dir, out_dir)
    int8 = options.int8 or options.qat_steps > 0
    if int8:
        for moe in work.moe_layers():
            moe.reset_routing_stats()
        work.config.save_pretrained(out_dir)
        export_onnx(work, calibration, out_dir, with_explain=options.explanations)
        keep_fp32, sensitivity = tuple(options.keep_fp32), None
        if options.keep_sensitive > 0:
            sensitivity = _sensitivity(out_dir, calibration, options.batch_size)
            keep_fp32 += tuple(
                group
                for group, error in sensitivity.items()
                if group != "all" and error > options.keep_sensitive
            )
        kept = quantize_int8(out_dir, keep_fp32)
        steps.append(
            {
                "step": "onnx_int8",
                "explanations": options.explanations,
                "keep_fp32": list(keep_fp32),
                "keep_sensitive": options.keep_sensitive,
                "sensitivity": sensitivity,
                "nodes_kept_fp32": {name: len(nodes) for name, nodes in kept.items()},
            }
        )
    else:
        work.save_pretrained(out_dir, safe_serialization=True)
    parent_bytes = dir_bytes(parent_dir).get("model.safetensors", 0)
    files = dir_bytes(out_dir)
    inference_bytes = sum(v for k, v in files.items() if k != EXPLAIN_ONNX_FILE)
    report: dict[str, Any] = {
        "parent": str(parent_dir.resolve()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": "onnx-int8" if int8 else "safetensors-fp32",
        "steps": steps,
        "pruned": pruned_description,
        "sizes": {
            "parent_safetensors_bytes": parent_bytes,
            "artifact_files_bytes": files,
            "artifact_bytes": inference_bytes,
            "artifact_bytes_with_explanations": sum(files.values()),
            "size_ratio": round(inference_bytes / parent_bytes, 4) if parent_bytes else None,
        },
        "parameters": {"parent": _count(parent), "artifact": _count(work)},
        "cpu": cpu_flags(),
    }
    if options.measure_latency:
        artifact, _ = load_checkpoint(out_dir)
        report["latency"] = latency_report(parent, artifact, calibration, repeats=options.latency_repeats)
    (out_dir / COMPRESSION_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def _sensitivity(
    out_dir: Path, calibration: Sequence[Mapping[str, Any]], batch_size: int
) -> dict[str, float]:
    """`int8_sensitivity` of the fp32 export in `out_dir` on one calibration batch."""
    from core.onnx_model import OnnxCoreModel, int8_sensitivity

    inputs = inference_inputs(collate(list(calibration[:batch_size])))
    return int8_sensitivity(out_dir, OnnxCoreModel(out_dir, threads=1).graph_feed(inputs))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _clone(model: CoreModel) -> CoreModel:
    clone = CoreModel(
        CoreConfig(
            **{
                k: v
                for k, v in model.config.to_dict().items()
                if k not in ("architectures", "transformers_version", "model_type")
            }
        )
    )
    clone.load_state_dict(model.state_dict())
    return clone.float().eval()


__all__ = [
    "COMPRESSION_FILE",
    "ONNX_FILE",
    "CompressionOptions",
    "PrunePlan",
    "apply_plan",
    "compress",
    "cpu_flags",
    "export_onnx",
    "fake_quantized",
    "flat_inputs",
    "metric_deltas",
    "plan_expert_pruning",
    "plan_structured_pruning",
    "qat_finetune",
    "quantize_int8",
    "routing_usage",
    "update_report",
]
