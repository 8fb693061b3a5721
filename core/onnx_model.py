"""The ONNX form of `CoreModel`: dynamo export, ONNX Runtime int8 quantisation, and `OnnxCoreModel`.

`export_onnx` exports the inference forward (the MoE runs its export dispatch, `DomainMoE._dispatch_export`;
the numeric embedder and the block-sparse mask run their export layouts, `PeriodicEncoding.masked_sum` and
`DynamicAttention._gathered_mask_export`; dense attention runs in the token layout,
`DynamicAttention._dense_export`: ONNX `RotaryEmbedding` and `Attention` on (B, T, H*D), no head transposes)
and the heads, then rewrites the graph for ONNX Runtime's CPU kernels: per-field Einsums as batched MatMuls
(its Einsum is slow), each MoE layer's chain of per-expert scatter-adds as one ScatterND (every ScatterND
copies the whole output), floor divisions of `nonzero()` positions as plain divisions, skips no-op flattens
of index vectors, folds reshaped or transposed views of weights into the weights (the CT patch kernel,
so int8 reaches its MatMul), and drops dead nodes. It records each weight node's torch module path in `onnx.json`; `quantize_int8` applies ONNX Runtime dynamic int8 (MatMul,
Gemm, Conv and Gather, i.e. embeddings included), keeping chosen modules fp32 by path (`KEEP_FP32_DEFAULT`:
MoE routers, domain priors, the convolutional CT stem). `int8_sensitivity` measures how much quantising each
module group alone changes the outputs; `profile_ops` reports ONNX Runtime kernel time per op type.
`OnnxCoreModel` runs such a directory behind the `CoreModel` call signature (sessions: one intra-op thread
pool, inter-op 1, sequential, ORT_ENABLE_ALL, denormals flushed to zero).

`core.train.load_checkpoint` returns it for a directory holding `model.onnx`, so the app predictors run
compressed models unchanged: calling it with a batch's keyword arguments returns a `CoreOutput` with
`hidden_states`, `logits`, `embeddings` and `next_step_logits` (when `next_item_ids` is given), and
`model.classifier(hidden)` / `model.next_step(hidden, ids)` run the exported heads. When the export sample
carries `next_item_ids`, the next-step head is folded into the inference graphs (`next_item_ids` an input,
`next_step_logits` an output, as `CoreModel.forward` computes them), so a knowledge-tracing forward is one
session run; a call without `next_item_ids` feeds zeros and leaves `next_step_logits` out. Artifacts
exported without the fold (no `next_item_ids` input) run the head's own graph as before. With
`output_attentions=True` the explanation graph (`model_explain.onnx`) runs and each layer's
`AttentionTrace` carries its attention weights; an artifact exported without it raises `ConfigError`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.attention import AttentionTrace
from core.config import CoreConfig
from core.data import Batch, collate
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel, CoreOutput

__all__ = [
    "KEEP_FP32_DEFAULT",
    "OnnxCoreModel",
    "OnnxSequenceWarning",
    "denormals_flushed",
    "export_onnx",
    "flat_inputs",
    "int8_sensitivity",
    "module_groups",
    "profile_ops",
    "quantize_int8",
]

ONNX_FILE = "model.onnx"
EXPLAIN_ONNX_FILE = "model_explain.onnx"
ONNX_META_FILE = "onnx.json"
HEAD_FILES = {"classifier": "classifier.onnx", "next_step": "next_step.onnx"}
WEIGHT_FILES = ("model.safetensors", ONNX_FILE, EXPLAIN_ONNX_FILE, *HEAD_FILES.values())
TARGET_KEYS = ("labels", "token_labels", "next_labels", "mfm_mask")
# Inputs the ONNX model can fill in when a batch leaves them out (the defaults `CoreModel` uses).
DEFAULTABLE_INPUTS = ("attention_mask", "numeric_mask", "modality_ids", "domain_ids", "volume_present")
MAX_DYNAMIC_BATCH = 65536
QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Gather", "Conv")
KEEP_FP32_DEFAULT = ("*.router", "*.domain_prior", "volume_embedder.stem")
"""Modules `quantize_int8` keeps in fp32 by default. The MoE routers and domain priors pick the experts by a
top-k over their logits, where int8 rounding flips choices between near-tied experts (a few KB of weights).
Convolutions run as ONNX Runtime `ConvInteger` in int8, slower than its fp32 `Conv` on the CPU (the medical
suite part's patch convolution, (64, 3, 16, 32, 32) volumes through a (4, 8, 8) kernel into 64 channels,
1 thread: 2.5x the fp32 `Conv` time at batch 1, 3.0x at batch 64), so the convolutional CT stem stays fp32.
The linear patch embedding exports as patches times the flattened kernel (`VolumeEmbedder._patchify_export`),
a MatMul that int8 runs on integer kernels: 0.64x of the fp32 `Conv` time at batch 1, 0.95x at batch 64; in
that medical part (pruned_int8, one run, load average ~3.8) 1.43 ms against 1.58 ms with it fp32 at batch 1,
38.8 ms against 39.9 ms at batch 64, AUROC delta against the fp32 parent +0.04 points (+0.17 with it fp32)."""
ONNX_OPSET = 23


def inference_inputs(batch: Batch) -> dict[str, Any]:
    """The keyword arguments of an inference forward: the batch without its targets."""
    return {k: v for k, v in batch.to_dict().items() if k not in TARGET_KEYS}


#: The batch keys that only a loss reads (the targets of the task heads).
LOSS_TARGETS = ("labels", "token_labels", "next_labels")
_NUMPY_DTYPES = {"bool": np.bool_, "int64": np.int64, "float32": np.float32}


# ---------------------------------------------------------------------- ONNX export
class _ExportForward(nn.Module):
    """The inference forward with flat tensor inputs: (hidden_states, [logits], [embeddings],
    [next_step_logits], [attentions]); `next_step_logits` when `next_item_ids` is one of the inputs."""

    def __init__(self, model: CoreModel, input_names: Sequence[str], with_attentions: bool) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.with_attentions = with_attentions

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {}
        categorical = {}
        for name, value in inputs.items():
            if name.startswith("categorical."):
                categorical[name.split(".", 1)[1]] = value
            else:
                kwargs[name] = value
        out = self.model(categorical=categorical or None, output_attentions=self.with_attentions, **kwargs)
        outputs = [out.hidden_states]
        if out.logits is not None:
            outputs.append(out.logits)
        if out.embeddings is not None:
            outputs.append(out.embeddings)
        if out.next_step_logits is not None:
            outputs.append(out.next_step_logits)  # (B, T)
        if self.with_attentions:
            outputs.extend(trace.attention_weights for trace in out.attentions)
        return tuple(outputs)


class _ClassifierHead(nn.Module):
    def __init__(self, model: CoreModel) -> None:
        super().__init__()
        self.classifier = model.classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden_states)  # (N, hidden) -> (N, num_labels)


class _NextStepHead(nn.Module):
    def __init__(self, model: CoreModel) -> None:
        super().__init__()
        self.next_step = model.next_step

    def forward(self, hidden_states: torch.Tensor, next_item_ids: torch.Tensor) -> torch.Tensor:
        return self.next_step(hidden_states[None], next_item_ids[None])[0]  # (N, hidden), (N,) -> (N,)


def flat_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The graph inputs of a batch: categorical fields as `categorical.<name>`, targets left out."""
    flat: dict[str, torch.Tensor] = {}
    for name, value in inference_inputs(batch).items():
        if name == "next_item_ids":
            continue
        if name == "categorical":
            flat.update({f"categorical.{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def _folds_next_step(model: CoreModel, batch: Batch) -> bool:
    """Whether the inference graph computes the next-step head: the model has one the graph can express (no
    retrieval, no next-item features) and the export sample carries `next_item_ids`."""
    return (
        model.next_step is not None
        and batch.next_item_ids is not None
        and not getattr(model.config, "next_step_retrieval", False)
        and not getattr(model.config, "next_step_feature_buckets", [])
    )


def _sequence_limit(model: CoreModel, n_volume: int) -> int | None:
    """Longest field sequence every attention layer runs on the dense path for (None: no limit)."""
    config = model.config
    if all(layer.attention.always_dense for layer in model.layers):
        return None
    return config.dense_below - 1 - n_volume


def _module_of(node: Any) -> str | None:
    """The torch module path a node was exported from (`layers.0.ffn.router`), from the exporter's metadata."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # ['', 'model', 'model.layers.0', ..., 'model.layers.0.ffn.router', 'linear_5']: the deepest module
            # before the fx node name, without the export wrapper's attribute (`model.`).
            if len(scopes) < 2 or not scopes[-2]:
                return None
            return scopes[-2].removeprefix("model.")
    return None


def _strip_metadata(path: Path) -> dict[str, str]:
    """Drop the exporter's per-node stack traces and doc strings (often larger than a small model's weights).

    Returns:
        For every node int8 quantisation may touch (`QUANTIZED_OP_TYPES`), its torch module path, so that
        `quantize_int8` can keep chosen modules in fp32 by name.
    """
    import onnx

    proto = onnx.load(str(path))
    modules: dict[str, str] = {}
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type in QUANTIZED_OP_TYPES and node.name:
                module = _module_of(node)
                if module is not None:
                    modules[node.name] = module
            del node.metadata_props[:]
            node.doc_string = ""
            graphs.extend(attr.g for attr in node.attribute if attr.HasField("g"))
        graph.doc_string = ""
        for value in (*graph.input, *graph.output, *graph.value_info):
            del value.metadata_props[:]
    proto.doc_string = ""
    _einsum_as_matmul(proto.graph)
    _merge_scatter_adds(proto.graph)
    _nonnegative_floor_divides(proto.graph)
    _flatten_noops(proto.graph)
    _fold_weight_views(proto.graph)
    _prune_dead_nodes(proto.graph)
    onnx.save(proto, str(path))
    return modules


_PER_FIELD_EINSUM = re.compile(r"^([a-z]*)([a-z])([a-z]),\2\3([a-z])->\1\2\4$")


def _einsum_as_matmul(graph: Any) -> int:
    """Rewrite per-field linear maps `...fi,fio->...fo` (weights an initializer) as Transpose/MatMul/Transpose.

    ONNX Runtime's CPU Einsum runs this contraction (the numeric and time-delta embedders: one small matrix
    per field) several times slower than one batched MatMul over the fields; the result is the same. Returns
    the number of rewritten nodes.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        match = _PER_FIELD_EINSUM.match(equation.replace(" ", "")) if node.op_type == "Einsum" else None
        weight = initializers.get(node.input[1]) if match and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 3:
            nodes.append(node)
            continue
        lead = len(match.group(1))  # the batch-like leading axes of x: (*lead, F, I)
        fields, width_in, width_out = (int(d) for d in weight.dims)
        name, x, out = node.name or f"einsum_{rewritten}", node.input[0], node.output[0]
        if fields == 1:  # one field: no axis to move, (*lead, 1, I) -> (N, I) @ (1, I, O) -> (*lead, 1, O)
            nodes += _single_field_matmul(graph, name, x, node.input[1], out, lead, width_in, width_out)
            rewritten += 1
            continue
        constants = {
            f"{name}_shape_in": np.array([fields, -1, width_in], dtype=np.int64),
            f"{name}_fo": np.array([fields, width_out], dtype=np.int64),
        }
        for key, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(value, key))
        nodes += [
            helper.make_node(
                "Transpose", [x], [f"{name}_fx"], perm=[lead, *range(lead), lead + 1], name=f"{name}_t_in"
            ),  # (F, *lead, I)
            helper.make_node(
                "Reshape", [f"{name}_fx", f"{name}_shape_in"], [f"{name}_rows"], name=f"{name}_r_in"
            ),
            helper.make_node(
                "MatMul", [f"{name}_rows", node.input[1]], [f"{name}_mm"], name=f"{name}_matmul"
            ),
            helper.make_node("Shape", [x], [f"{name}_lead"], start=0, end=lead, name=f"{name}_shape"),
            helper.make_node(
                "Concat",
                [f"{name}_fo", f"{name}_lead"],
                [f"{name}_shape_out_raw"],
                axis=0,
                name=f"{name}_concat",
            ),  # (F, O, *lead): reordered below
            helper.make_node(
                "Gather",
                [f"{name}_shape_out_raw", f"{name}_order"],
                [f"{name}_shape_out"],
                axis=0,
                name=f"{name}_order_shape",
            ),
            helper.make_node(
                "Reshape", [f"{name}_mm", f"{name}_shape_out"], [f"{name}_fy"], name=f"{name}_r_out"
            ),
            helper.make_node(
                "Transpose",
                [f"{name}_fy"],
                [out],
                perm=[*range(1, lead + 1), 0, lead + 1],
                name=f"{name}_t_out",
            ),  # (*lead, F, O)
        ]
        # (F, O, *lead) -> (F, *lead, O)
        order = np.array([0, *range(2, lead + 2), 1], dtype=np.int64)
        graph.initializer.append(numpy_helper.from_array(order, f"{name}_order"))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _single_field_matmul(
    graph: Any, name: str, x: str, weight: str, out: str, lead: int, width_in: int, width_out: int
) -> list[Any]:
    """`_einsum_as_matmul` for one field: reshapes around one MatMul, no transposes (a Transpose that moves
    a length-1 axis still copies the tensor: 0.18 ms of the education part's 12.5 ms at batch 64)."""
    from onnx import helper, numpy_helper

    graph.initializer.append(
        numpy_helper.from_array(np.array([-1, width_in], dtype=np.int64), f"{name}_rows_shape")
    )
    graph.initializer.append(numpy_helper.from_array(np.array([width_out], dtype=np.int64), f"{name}_o"))
    return [
        helper.make_node("Reshape", [x, f"{name}_rows_shape"], [f"{name}_rows"], name=f"{name}_r_in"),
        helper.make_node("MatMul", [f"{name}_rows", weight], [f"{name}_mm"], name=f"{name}_matmul"),
        helper.make_node("Shape", [x], [f"{name}_lead"], start=0, end=lead + 1, name=f"{name}_shape"),
        helper.make_node(
            "Concat", [f"{name}_lead", f"{name}_o"], [f"{name}_shape_out"], axis=0, name=f"{name}_concat"
        ),  # (*lead, 1, O)
        helper.make_node("Reshape", [f"{name}_mm", f"{name}_shape_out"], [out], name=f"{name}_r_out"),
    ]


def _scatter_add_chains(graph: Any) -> list[list[Any]]:
    """Chains of ScatterND(reduction="add") nodes, each one's output the next one's data and used nowhere
    else."""
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {value.name for value in graph.output}

    def is_add(node: Any) -> bool:
        reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        return node.op_type == "ScatterND" and reduction == "add"

    by_data = {node.input[0]: node for node in graph.node if is_add(node)}
    heads = [
        node
        for node in graph.node
        if is_add(node) and not any(node.input[0] == n.output[0] for n in by_data.values())
    ]
    chains = []
    for node in heads:
        chain = [node]
        while True:
            out = chain[-1].output[0]
            nxt = by_data.get(out)
            if nxt is None or consumers.get(out, 0) != 1 or out in graph_outputs:
                break
            chain.append(nxt)
        if len(chain) > 1:
            chains.append(chain)
    return chains


def _merge_scatter_adds(graph: Any) -> int:
    """Rewrite each chain of ScatterND(add) (the MoE export dispatch: one `index_add` per expert) as one
    ScatterND over the concatenated indices and updates.

    ONNX Runtime copies the whole (tokens, hidden) output for every ScatterND of the chain; one scatter of all
    assignments gives the same sums (a token's experts add in a different order: float rounding only).
    Returns the number of ScatterND nodes removed.
    """
    from onnx import helper

    removed, replacements, dropped = 0, {}, set()
    for chain in _scatter_add_chains(graph):
        last = chain[-1]
        name = last.name or f"scatter_add_{removed}"
        replacements[last.output[0]] = [
            helper.make_node(
                "Concat", [n.input[1] for n in chain], [f"{name}_indices"], axis=0, name=f"{name}_cat_idx"
            ),
            helper.make_node(
                "Concat", [n.input[2] for n in chain], [f"{name}_updates"], axis=0, name=f"{name}_cat_upd"
            ),
            helper.make_node(
                "ScatterND",
                [chain[0].input[0], f"{name}_indices", f"{name}_updates"],
                [last.output[0]],
                reduction="add",
                name=f"{name}_merged",
            ),
        ]
        dropped.update(n.output[0] for n in chain[:-1])  # (an output name identifies a node)
        removed += len(chain) - 1
    if removed:
        nodes = []
        for node in graph.node:
            if node.output[0] in dropped:
                continue
            nodes.extend(replacements.get(node.output[0], [node]))
        del graph.node[:]
        graph.node.extend(nodes)
    return removed


_INDEX_VIEWS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _nonnegative_floor_divides(graph: Any) -> int:
    """Drop the sign correction of integer floor divisions whose dividend comes from `NonZero`.

    The exporter writes `a // b` as `Div(a, b) - ((a < 0) != (a % b == 0 ...))` (seven nodes); the MoE export
    dispatch divides `nonzero()` positions (never negative) by `top_k` once per expert, where the plain
    (truncating) `Div` by a positive constant is already the floor. The uses of the `Sub` output are pointed
    at the `Div`. Returns the number of divisions simplified (the dead nodes go in `_prune_dead_nodes`).
    """
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {value.name for value in graph.output}
    positive = {init.name for init in graph.initializer if (numpy_helper.to_array(init) > 0).all()}

    def from_nonzero(name: str) -> bool:
        node = producers.get(name)
        while node is not None and node.op_type in _INDEX_VIEWS:
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "NonZero"

    def correction_of(name: str, dividend: str) -> bool:
        """The correction term's sub-graph reads `dividend` through a `Mod` (it is the floor fix-up)."""
        stack, seen = [name], set()
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.output[0] in seen:
                continue
            seen.add(node.output[0])
            if node.op_type == "Mod":
                return node.input[0] == dividend
            if node.op_type in ("Cast", "And", "Or", "Xor", "Not", "Equal", "Less", "Where"):
                stack.extend(node.input)
        return False

    renames: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Sub" or node.output[0] in graph_outputs:
            continue
        div = producers.get(node.input[0])
        if (
            div is None
            or div.op_type != "Div"
            or div.input[1] not in positive
            or not from_nonzero(div.input[0])
        ):
            continue
        if correction_of(node.input[1], div.input[0]):
            renames[node.output[0]] = div.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return len(renames)


def _flatten_noops(graph: Any) -> int:
    """Skip no-op flattens of index vectors (the MoE export dispatch has three per expert).

    `Reshape(x, [-1])` of an x of rank 1 is x; `Reshape(Transpose(NonZero(v)), [-1])` of a rank-1 v is
    `Reshape(NonZero(v), [-1])` (NonZero gives (1, M) there). Ranks come from the exporter's `value_info`;
    a value without one is left alone. Returns the number of nodes bypassed (dropped as dead afterwards).
    """
    from onnx import numpy_helper

    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in (*graph.value_info, *graph.input)
        if value.type.tensor_type.HasField("shape")
    }
    flat = {
        init.name
        for init in graph.initializer
        if len(init.dims) == 1 and numpy_helper.to_array(init).tolist() == [-1]
    }
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {value.name for value in graph.output}
    renames: dict[str, str] = {}
    bypassed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in flat:
            continue
        source = producers.get(node.input[0])
        if ranks.get(node.input[0]) == 1 and node.output[0] not in graph_outputs:
            renames[node.output[0]] = node.input[0]
            bypassed += 1
        elif (
            source is not None
            and source.op_type == "Transpose"
            and producers.get(source.input[0]) is not None
            and producers[source.input[0]].op_type == "NonZero"
            and ranks.get(producers[source.input[0]].input[0]) == 1
        ):
            node.input[0] = source.input[0]  # (1, M) flattens to the same (M,) as its transpose
            bypassed += 1

    def resolve(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
    return bypassed


def _fold_weight_views(graph: Any) -> int:
    """Fold Reshape/Transpose of a weight initializer read by nothing else into a new initializer.

    The exporter's constant folding skips a Reshape of a tensor over 8192 elements, so a weight used in a
    flattened view (the CT patch kernel, `VolumeEmbedder._patchify_export`) would reach its MatMul through
    Reshape and Transpose nodes, which ONNX Runtime's dynamic quantiser does not follow (the MatMul stays
    fp32). Returns the number of nodes folded (removed).
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    interface = {value.name for value in (*graph.input, *graph.output)}  # (an initializer may be an input)
    folded = []
    for node in graph.node:  # in topological order: a chain of views folds in one pass
        source = node.input[0] if node.input else None
        if (
            node.op_type not in ("Reshape", "Transpose")
            or node.output[0] in interface
            or source in interface
            or source not in initializers
            or readers.get(source) != 1
            or (node.op_type == "Reshape" and node.input[1] not in initializers)
        ):
            continue
        value = numpy_helper.to_array(initializers[source])
        if node.op_type == "Reshape":
            shape = numpy_helper.to_array(initializers[node.input[1]])
            allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
            value = value.reshape(
                [value.shape[i] if d == 0 and not allow_zero else int(d) for i, d in enumerate(shape)]
            )
        else:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            value = np.transpose(value, perm)
        graph.initializer.remove(initializers.pop(source))
        initializers[node.output[0]] = numpy_helper.from_array(np.ascontiguousarray(value), node.output[0])
        graph.initializer.append(initializers[node.output[0]])
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def _prune_dead_nodes(graph: Any) -> int:
    """Remove nodes no graph output depends on (left over by the rewrites above). Returns how many."""
    if any(attr.HasField("g") or len(attr.graphs) for node in graph.node for attr in node.attribute):
        return 0  # sub-graphs read outer names implicitly: leave such a graph alone
    needed = {value.name for value in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    removed = len(graph.node) - len(keep)
    if removed:
        del graph.node[:]
        graph.node.extend(reversed(keep))
    return removed


def _export(
    module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes
) -> dict[str, str]:
    try:
        # A dict argument goes in `kwargs`: as the last positional argument torch.onnx.export would
        # take it for keyword arguments.
        kwargs = args[0] if len(args) == 1 and isinstance(args[0], dict) else None
        torch.onnx.export(
            module,
            () if kwargs is not None else args,
            str(path),
            kwargs={"inputs": kwargs} if kwargs is not None else None,
            dynamo=True,
            # Opset 23 has fused Attention and RMSNormalization, which ONNX Runtime runs as single kernels
            # (about 1.4x faster than the decomposed opset-18 graph on a small model).
            opset_version=ONNX_OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes={"inputs": dynamic_shapes[0]} if kwargs is not None else dynamic_shapes,
            optimize=True,
            verbose=False,
            external_data=False,
        )
    except Exception as e:  # torch.export / onnxscript raise many types; wrap once at this boundary
        raise ConfigError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e
    return _strip_metadata(path)


def _extract(source: Path, target: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Write the sub-graph of `source` that computes `outputs` from `inputs` (unused nodes dropped)."""
    import onnx
    from onnx.utils import Extractor

    proto = onnx.load(str(source))
    extracted = Extractor(proto).extract_model(list(inputs), list(outputs))
    extracted.ir_version = proto.ir_version
    onnx.save(extracted, str(target))


def export_onnx(
    model: CoreModel, sample: Sequence[Mapping[str, Any]], out_dir: str | Path, with_explain: bool = True
) -> dict[str, Any]:
    """Export the inference forward of `model` (and its heads) to ONNX files in `out_dir`.

    The batch axis is always dynamic. The field-sequence axis is dynamic up to the longest length every
    layer attends densely over (`dense_below`); a model whose sequences reach its block-sparse path (e.g. CT
    plus record) is exported at the sample's sequence length, which every input then has to match.

    When the model has a next-step head and the sample carries `next_item_ids`, both inference graphs take
    `next_item_ids` (B, T) as an input and give `next_step_logits` (B, T) as an output (the head folded in:
    one session run per knowledge-tracing forward, the head quantised with the rest); `next_step.onnx`
    is written all the same, for scoring states against other items (`OnnxCoreModel.next_step`).

    Args:
        model: the fp32 model (eval mode is set).
        sample: encoded examples (see `core.data`) with the inputs the app sends.
        out_dir: folder for `model.onnx`, `model_explain.onnx` (attention weights as extra outputs, used
            for explanations), `classifier.onnx` / `next_step.onnx`.
        with_explain: also export the explanation graph.

    Returns:
        The metadata written to `onnx.json` (input names, ranks, dtypes, axes, graph outputs in order,
        head files).

    Raises:
        ConfigError: the next-step head reads the history (`next_step_retrieval`), which the per-token
            `next_step.onnx` graph cannot express.
    """
    if getattr(model.config, "next_step_retrieval", False):
        raise ConfigError(
            "export_onnx: a model with next_step_retrieval=True cannot be exported (its next-step head reads "
            "the whole history); compress it without ONNX export or train it without retrieval."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    for moe in model.moe_layers():
        moe.track_routing = False
    batch = collate(list(sample[: min(len(sample), 4)]))
    inputs = flat_inputs(batch)
    fold_next_step = _folds_next_step(model, batch)
    if fold_next_step:
        inputs["next_item_ids"] = batch.next_item_ids  # (B, T)
    n_volume = 0
    if batch.volume is not None:
        grid = model.volume_embedder.grid(tuple(batch.volume.shape))
        n_volume = int(np.prod(grid))
    length = batch.attention_mask.shape[1]
    limit = _sequence_limit(model, n_volume)
    dynamic_seq = limit is None or length <= limit
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    seq_dim = torch.export.Dim("seq", min=1, max=limit or 1 << 20) if dynamic_seq else None
    shapes = {}
    for name, value in inputs.items():
        axes: dict[int, Any] = {0: batch_dim}
        if seq_dim is not None and value.dim() >= 2 and name != "volume":
            axes[1] = seq_dim
        shapes[name] = axes
    names = list(inputs)
    outputs = ["hidden_states"]
    if model.classifier is not None:
        outputs.append("logits")
    if model.prototype is not None:
        outputs.append("embeddings")
    if fold_next_step:
        outputs.append("next_step_logits")
    model.config.save_pretrained(out_dir)
    node_modules: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        explain_outputs = []
        if with_explain:
            # One export: the inference graph is the explanation graph without the attention outputs
            # (the nodes only they need are dropped), which halves the export time.
            explain_outputs = [*outputs, *(f"attentions.{i}" for i in range(len(model.layers)))]
            explain_path = out_dir / EXPLAIN_ONNX_FILE
            node_modules[EXPLAIN_ONNX_FILE] = _export(
                _ExportForward(model, names, True).eval(),
                (inputs,),
                explain_path,
                names,
                explain_outputs,
                (shapes,),
            )
            _extract(explain_path, out_dir / ONNX_FILE, names, outputs)
            node_modules[ONNX_FILE] = node_modules[EXPLAIN_ONNX_FILE]  # the extraction keeps node names
        else:
            node_modules[ONNX_FILE] = _export(
                _ExportForward(model, names, False).eval(),
                (inputs,),
                out_dir / ONNX_FILE,
                names,
                outputs,
                (shapes,),
            )
        heads = {}
        rows = torch.export.Dim("rows", min=1, max=1 << 24)
        hidden = torch.randn(3, model.config.hidden_size)
        if model.classifier is not None:
            node_modules[HEAD_FILES["classifier"]] = _export(
                _ClassifierHead(model).eval(),
                (hidden,),
                out_dir / HEAD_FILES["classifier"],
                ["hidden_states"],
                ["logits"],
                ({0: rows},),
            )
            heads["classifier"] = HEAD_FILES["classifier"]
        if model.next_step is not None:
            ids = torch.tensor([1, 2, 1])
            node_modules[HEAD_FILES["next_step"]] = _export(
                _NextStepHead(model).eval(),
                (hidden, ids),
                out_dir / HEAD_FILES["next_step"],
                ["hidden_states", "next_item_ids"],
                ["next_step_logits"],
                ({0: rows}, {0: rows}),
            )
            heads["next_step"] = HEAD_FILES["next_step"]
    meta = {
        "inputs": {
            name: {
                "rank": value.dim(),
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
            }
            for name, value in inputs.items()
        },
        "dynamic_sequence": dynamic_seq,
        "max_sequence": limit if dynamic_seq else length,
        "volume_tokens": n_volume,
        "outputs": outputs,
        "explain_file": EXPLAIN_ONNX_FILE if with_explain else None,
        "explain_outputs": explain_outputs,
        "heads": heads,
        "categorical_sizes": {k: int(v) for k, v in model.config.categorical_fields.items()},
        "attention": "dense" if dynamic_seq else "as trained (block-sparse where the model uses it)",
        "int8": False,
        "node_modules": node_modules,
    }
    (out_dir / ONNX_META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _excluded_nodes(meta: Mapping[str, Any], name: str, keep_fp32: Sequence[str]) -> list[str]:
    """Nodes of one exported file whose torch module path matches a `keep_fp32` pattern (fnmatch), or lies
    inside a module that does (`volume_embedder` keeps `volume_embedder.stem.0` too)."""
    from fnmatch import fnmatchcase

    modules = meta.get("node_modules", {}).get(name, {})
    return sorted(
        node
        for node, module in modules.items()
        if any(fnmatchcase(module, p) or fnmatchcase(module, f"{p}.*") for p in keep_fp32)
    )


def _batched_weight_matmuls(path: Path) -> list[str]:
    """MatMul nodes with a weight initializer of rank > 2 (`_einsum_as_matmul`'s per-field maps), which ONNX
    Runtime's dynamic quantiser does not handle: they stay fp32."""
    import onnx

    graph = onnx.load(str(path)).graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and any(ranks.get(x, 0) > 2 for x in node.input)
    ]


def quantize_int8(
    model_dir: str | Path, keep_fp32: Sequence[str] = KEEP_FP32_DEFAULT
) -> dict[str, list[str]]:
    """Quantise every ONNX file of an exported directory in place with ONNX Runtime dynamic int8.

    Weights of MatMul/Gemm/Conv (per output channel) and embedding tables (Gather) become int8; activations
    are quantised per batch at run time (uint8), which uses VNNI/AMX integer kernels where the CPU has them.

    Args:
        model_dir: a directory written by `export_onnx`.
        keep_fp32: fnmatch patterns of torch module paths (`"volume_embedder.*"`, `"classifier"`,
            `"layers.0.*"`) whose nodes stay fp32; default `KEEP_FP32_DEFAULT`.

    Returns:
        Per file, the node names kept in fp32 (also written to `onnx.json` as `int8_kept_fp32`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_dir = Path(model_dir)
    meta_path = model_dir / ONNX_META_FILE
    meta = json.loads(meta_path.read_text())
    files = [ONNX_FILE, *meta["heads"].values()] + ([meta["explain_file"]] if meta["explain_file"] else [])
    kept: dict[str, list[str]] = {}
    for name in files:
        path = model_dir / name
        kept[name] = sorted({*_excluded_nodes(meta, name, keep_fp32), *_batched_weight_matmuls(path)})
        # The quantiser first rewrites Gemm as MatMul + Add, naming the MatMul `<name>_MatMul`.
        excluded = [*kept[name], *(f"{node}_MatMul" for node in kept[name])]
        with tempfile.TemporaryDirectory(prefix="verticals-int8-") as work:
            target = Path(work) / name
            try:
                quantize_dynamic(
                    str(path),
                    str(target),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                    nodes_to_exclude=excluded,
                )
            except Exception as e:  # onnxruntime raises plain exceptions; wrap once here
                raise ConfigError(f"int8 quantisation of {path} failed: {type(e).__name__}: {e}") from e
            shutil.move(str(target), path)
    meta["int8"] = True
    meta["int8_keep_fp32_patterns"] = list(keep_fp32)
    meta["int8_kept_fp32"] = kept
    meta_path.write_text(json.dumps(meta, indent=2))
    return kept


def module_groups(model_dir: str | Path) -> dict[str, list[str]]:
    """The quantisable nodes of `model.onnx` grouped by module: each embedder, each layer's attention and
    feed-forward block, each head (`{"volume_embedder": [...], "layers.0.ffn": [...], "classifier": [...]}`)."""
    meta = json.loads((Path(model_dir) / ONNX_META_FILE).read_text())
    groups: dict[str, list[str]] = {}
    for node, module in meta.get("node_modules", {}).get(ONNX_FILE, {}).items():
        parts = module.split(".")
        key = ".".join(parts[:3]) if parts[0] == "layers" else parts[0]
        groups.setdefault(key, []).append(node)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def _relative_error(reference: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> float:
    """The largest relative RMS error over the graph outputs (||y_q - y|| / ||y||)."""
    errors = []
    for name, ref in reference.items():
        scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) or 1.0
        errors.append(float(np.sqrt(np.mean((values[name] - ref).astype(np.float64) ** 2))) / scale)
    return max(errors)


def int8_sensitivity(
    model_dir: str | Path,
    feed: Mapping[str, np.ndarray],
    groups: Mapping[str, Sequence[str]] | None = None,
    keep_fp32: Sequence[str] = KEEP_FP32_DEFAULT,
) -> dict[str, float]:
    """Output error of the fp32 graph `model_dir/model.onnx` when only one module group is quantised to int8.

    Each group (default `module_groups`) is quantised alone (ONNX Runtime dynamic int8, as `quantize_int8`),
    run on `feed`, and compared with the fp32 outputs; `"all"` quantises every group. Nodes of `keep_fp32`
    modules (default: routers and domain priors) stay fp32 throughout, as in `quantize_int8`. The groups with the
    largest error are the ones to keep in fp32 (`quantize_int8(keep_fp32=...)`).

    Returns:
        {group: largest relative RMS error over the outputs}, `"all"` included.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_dir = Path(model_dir)
    source = model_dir / ONNX_FILE
    groups = dict(groups or module_groups(model_dir))
    groups["all"] = sorted({node for nodes in groups.values() for node in nodes})
    options = _session_options(1)
    meta = json.loads((model_dir / ONNX_META_FILE).read_text())
    kept = _excluded_nodes(meta, ONNX_FILE, keep_fp32)
    excluded = [*kept, *(f"{n}_MatMul" for n in kept), *_batched_weight_matmuls(source)]

    def run(path: Path) -> dict[str, np.ndarray]:
        session = _new_session(path, options)
        names = [o.name for o in session.get_outputs()]
        with denormals_flushed():
            return dict(zip(names, session.run(names, dict(feed)), strict=True))

    reference = run(source)
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="verticals-int8-scan-") as work:
        for group, nodes in groups.items():
            if not nodes:  # (ONNX Runtime reads an empty node list as "every node")
                errors[group] = 0.0
                continue
            target = Path(work) / f"{len(errors)}.onnx"
            quantize_dynamic(
                str(source),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_quantize=[*nodes, *(f"{n}_MatMul" for n in nodes)],
                nodes_to_exclude=excluded,
            )
            errors[group] = round(_relative_error(reference, run(target)), 6)
    return errors


def profile_ops(model_dir: str | Path, feed: Mapping[str, np.ndarray], runs: int = 5) -> dict[str, Any]:
    """Where the inference graph spends its time: ONNX Runtime's profiler, kernel time per op type.

    Args:
        model_dir: an exported (or int8) directory.
        feed: graph inputs (`OnnxCoreModel.graph_feed` builds them from a batch).
        runs: profiled runs after one warm-up (times are per run).

    Returns:
        `{"total_ms": ..., "ops": {op_type: {"ms": ..., "share": ..., "nodes": ...}}}`, op types by time.
    """
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="verticals-ortprof-") as work:
        options = _session_options(1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "profile")
        session = _new_session(model_dir / ONNX_FILE, options)
        with denormals_flushed():  # as `OnnxCoreModel` runs it
            session.run(None, dict(feed))
            for _ in range(runs):
                session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        per_op[op] = per_op.get(op, 0.0) + event["dur"]
        nodes.setdefault(op, set()).add(event["name"])
    total = sum(per_op.values()) or 1.0
    # The warm-up run is profiled too: divide by every run.
    ops = {
        op: {"ms": round(us / (runs + 1) / 1000, 3), "share": round(us / total, 4), "nodes": len(nodes[op])}
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])
    }
    return {"total_ms": round(total / (runs + 1) / 1000, 3), "ops": ops}


class OnnxSequenceWarning(UserWarning):
    """A sequence longer than the dense range the ONNX graph was exported for (it still runs, densely)."""


def _session_options(threads: int | None):
    """One intra-op thread pool of `threads` (default: torch's count), no inter-op parallelism, all graph
    optimisations (constant folding, node fusions, layout transforms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Denormals flushed to zero in the pool's threads (the calling thread: `denormals_flushed`).
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def _flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ/DAZ): a denormal times ~1 comes out as 0."""
    with np.errstate(all="ignore"):
        return bool(np.float32(1e-39) * np.float32(1.0001) == 0)


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormal floats to zero on this thread for the duration (the previous mode is restored).

    Masked attention logits underflow in exp(), and x86 arithmetic on denormals is ~10x slower: a masked ONNX
    `Attention` at batch 64 x 64 tokens runs in 4.7 ms with denormals and 1.5 ms without. ONNX Runtime runs a
    one-thread session on the calling thread, so its sessions run inside this; the results differ from IEEE
    arithmetic only below 1.2e-38. (Creating a session with `session.set_denormal_as_zero` also sets the
    mode on the creating thread, for good: `_new_session` undoes that.)
    """
    if _flushing_denormals():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _new_session(path: Path, options):
    """An ONNX Runtime CPU session, leaving this thread's denormal mode as it was."""
    import onnxruntime as ort

    flushing = _flushing_denormals()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        if not flushing:
            torch.set_flush_denormal(False)


def _session(path: Path, threads: int | None):
    options = _session_options(threads)
    try:
        return _new_session(path, options)
    except Exception as e:  # onnxruntime raises its own exception types; wrap once at the boundary
        raise InputValidationError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e


class _OnnxHead:
    """One exported head: flattens the leading axes, runs the session, restores them."""

    def __init__(self, path: Path, threads: int | None) -> None:
        self.session = _session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(
        self,
        hidden_states: torch.Tensor,
        next_item_ids: torch.Tensor | None = None,
        next_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if next_features is not None:  # `NextStepHead`'s extra item features are not exported
            raise InputValidationError(
                "ONNX next_step head: this graph takes no next-item features (next_step_feature_buckets); "
                "run the model in PyTorch"
            )
        lead = hidden_states.shape[:-1]
        feed = {
            "hidden_states": hidden_states.detach().reshape(-1, hidden_states.shape[-1]).float().cpu().numpy()
        }
        if "next_item_ids" in self.input_names:
            if next_item_ids is None:
                raise InputValidationError("next_step head: next_item_ids missing")
            feed["next_item_ids"] = next_item_ids.detach().reshape(-1).long().cpu().numpy()
        if feed["hidden_states"].shape[0] == 0:
            raise InputValidationError("ONNX head: no rows to score")
        with denormals_flushed():
            (out,) = self.session.run(None, feed)
        out = torch.from_numpy(out)
        return out.reshape(*lead, *out.shape[1:])


class OnnxCoreModel:
    """A compressed model directory run by ONNX Runtime with the `CoreModel` inference interface.

    Args:
        model_dir: folder with `config.json`, `model.onnx`, `onnx.json` (and head / explanation graphs).
        threads: ONNX Runtime intra-op threads (default: torch's thread count).

    Attributes:
        config: the (pruned) `CoreConfig`.
        classifier, next_step: the exported heads as callables (None when the model has none).
        prototype: None (the prototype projection is part of the exported graph).
        folds_next_step: the inference graphs compute `next_step_logits` from a `next_item_ids` input (an
            artifact exported before the fold runs `next_step` on the hidden states instead).
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config = CoreConfig.from_pretrained(self.model_dir)
        self.meta = json.loads((self.model_dir / ONNX_META_FILE).read_text())
        self.threads = threads
        self.session = _session(self.model_dir / ONNX_FILE, threads)
        self._explain_session = None
        heads = self.meta.get("heads", {})
        self.classifier = (
            _OnnxHead(self.model_dir / heads["classifier"], threads) if "classifier" in heads else None
        )
        self.next_step = (
            _OnnxHead(self.model_dir / heads["next_step"], threads) if "next_step" in heads else None
        )
        self.prototype = None
        self.folds_next_step = "next_step_logits" in self.meta["outputs"]
        self.training = False

    # ------------------------------------------------------------------ nn.Module look-alikes
    def to(self, device: str | torch.device) -> OnnxCoreModel:
        """ONNX artifacts run on the CPU; any other device raises `ConfigError`."""
        if torch.device(device).type != "cpu":
            raise ConfigError(
                f"{self.model_dir}: an ONNX int8 artifact runs on the CPU only, not on {device}"
            )
        return self

    def eval(self) -> OnnxCoreModel:
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def moe_layers(self) -> list:
        """No torch MoE layers: routing telemetry is not available from an ONNX artifact."""
        return []

    # ------------------------------------------------------------------ forward
    def __call__(self, output_attentions: bool = False, **batch: Any) -> CoreOutput:
        """Run the graph on the keyword arguments of `CoreModel.forward` (targets are ignored).

        With a folded next-step head, `next_item_ids` goes into the graph (zeros when the batch has none)
        and `next_step_logits` comes from the same run, returned only when `next_item_ids` was given.
        """
        next_item_ids = batch.get("next_item_ids")
        feed = self.graph_feed(batch)
        names = self.meta["explain_outputs"] if output_attentions else self.meta["outputs"]
        if next_item_ids is None:
            names = [name for name in names if name != "next_step_logits"]
        session = self._explain() if output_attentions else self.session
        with denormals_flushed():
            values = dict(zip(names, session.run(names, feed), strict=True))
        hidden = torch.from_numpy(values["hidden_states"])
        out: dict[str, Any] = {"hidden_states": hidden}
        for name in ("logits", "embeddings", "next_step_logits"):
            if name in values:
                out[name] = torch.from_numpy(values[name])
        if next_item_ids is not None and "next_step_logits" not in out and self.next_step is not None:
            field_states = hidden[:, self.meta["volume_tokens"] :]  # (B, T, hidden)
            out["next_step_logits"] = self.next_step(field_states, next_item_ids)
        if output_attentions:
            layers = sum(name.startswith("attentions.") for name in names)
            out["attentions"] = tuple(
                AttentionTrace(
                    is_dense=bool(self.meta["dynamic_sequence"]),
                    attention_weights=torch.from_numpy(values[f"attentions.{i}"]),
                )
                for i in range(layers)
            )
        return CoreOutput(**out)

    forward = __call__

    def _explain(self):
        if self._explain_session is None:
            name = self.meta.get("explain_file")
            if not name or not (self.model_dir / name).is_file():
                raise ConfigError(
                    f"{self.model_dir}: this compressed model was exported without its explanation graph; "
                    "explanations (attention evidence) need `verticals compress ... --explanations`"
                )
            self._explain_session = _session(self.model_dir / name, self.threads)
        return self._explain_session

    def graph_feed(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inference graph's inputs (numpy) from `CoreModel.forward`'s keyword arguments: targets left
        out, and `next_item_ids` too unless the graph folds the next-step head; inputs the batch leaves out
        get their defaults.

        Raises:
            InputValidationError: an input the graph does not take, or one of the wrong shape or range.
        """
        skipped = {*LOSS_TARGETS, *(() if self.folds_next_step else ("next_item_ids",))}
        return self._feed({name: value for name, value in batch.items() if name not in skipped})

    def _feed(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        flat: dict[str, torch.Tensor] = {}
        for name, value in batch.items():
            if value is None:
                continue
            if name == "categorical":
                flat.update({f"categorical.{k}": v for k, v in value.items()})
            elif name == "mfm_mask":
                raise InputValidationError("an ONNX artifact is inference-only: mfm_mask is not an input")
            else:
                flat[name] = value
        specs = self.meta["inputs"]
        extra = sorted(set(flat) - set(specs))
        if extra:
            raise InputValidationError(
                f"{self.model_dir}: inputs {extra} are not inputs of the exported graph (inputs: {sorted(specs)}); "
                "re-export with calibration data that has them"
            )
        shape = self._batch_shape(flat)
        feed = {}
        for name, spec in specs.items():
            value = flat.get(name)
            if value is None:
                value = self._default(name, spec, shape)
            value = self._conform(name, value, spec, shape)
            feed[name] = value.detach().cpu().numpy().astype(_NUMPY_DTYPES[spec["dtype"]], copy=False)
        self._validate(feed, shape)
        return feed

    def _batch_shape(self, flat: dict[str, torch.Tensor]) -> tuple[int, int]:
        for name, value in flat.items():
            if name != "volume" and name != "volume_present" and value.dim() >= 2:
                return int(value.shape[0]), int(value.shape[1])
        raise InputValidationError("ONNX model: the batch has no per-token inputs")

    def _default(self, name: str, spec: dict, shape: tuple[int, int]) -> torch.Tensor:
        batch, length = shape
        if name == "attention_mask":
            return torch.ones(batch, length, dtype=torch.bool)
        if name == "numeric_mask":
            return torch.ones(batch, length, spec["shape"][-1], dtype=torch.bool)
        if name in ("modality_ids", "domain_ids"):
            return (
                torch.zeros(batch, length, dtype=torch.long)
                if spec["rank"] == 2
                else torch.zeros(batch, dtype=torch.long)
            )
        if name == "volume_present":
            return torch.ones(batch, dtype=torch.bool)
        if name == "next_item_ids":  # the padding item: the folded head's logits are not returned
            return torch.zeros(batch, length, dtype=torch.long)
        raise InputValidationError(
            f"{self.model_dir}: input {name!r} missing from the batch; the exported graph needs {sorted(self.meta['inputs'])}"
        )

    def _conform(self, name: str, value: torch.Tensor, spec: dict, shape: tuple[int, int]) -> torch.Tensor:
        if value.dim() == 1 and spec["rank"] == 2 and name in ("domain_ids", "modality_ids"):
            value = value[:, None].expand(shape)  # (B,) -> (B, T): one id per sequence
        if value.dim() != spec["rank"]:
            raise InputValidationError(
                f"{self.model_dir}: input {name!r} has shape {tuple(value.shape)}; the graph expects rank {spec['rank']}"
            )
        if name == "next_item_ids" and tuple(value.shape) != shape:
            raise InputValidationError(
                f"{self.model_dir}: next_item_ids has shape {tuple(value.shape)}; expected one id per field "
                f"token, {shape}"
            )
        static = not self.meta["dynamic_sequence"] and value.dim() >= 2 and name != "volume"
        if static and value.shape[1] != spec["shape"][1]:
            raise InputValidationError(
                f"{self.model_dir}: input {name!r} has {value.shape[1]} tokens; this artifact was exported for "
                f"exactly {spec['shape'][1]} (block-sparse attention, static length)"
            )
        if name == "volume" and list(value.shape[1:]) != spec["shape"][1:]:
            raise InputValidationError(
                f"{self.model_dir}: volume of shape {tuple(value.shape[1:])}, the graph expects {tuple(spec['shape'][1:])}"
            )
        return value

    def _validate(self, feed: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
        """The checks `FieldEmbedder` makes in eager mode (the graph has none)."""
        for name, size in self.meta["categorical_sizes"].items():
            ids = feed.get(f"categorical.{name}")
            if ids is not None and ids.size and (ids.max() >= size or ids.min() < 0):
                raise InputValidationError(
                    f"FieldEmbedder: field {name!r} has ids outside [0, {size}); map unseen values to the "
                    "unknown bucket (1) with the saved vocabulary"
                )
        items = feed.get("next_item_ids")
        vocab = self.config.next_step_vocab
        if items is not None and items.size and (items.max() >= vocab or items.min() < 0):
            raise InputValidationError(
                f"next_item_ids: ids outside [0, {vocab}) (next_step_vocab); map unseen items to the "
                "unknown bucket with the saved vocabulary"
            )
        numeric = feed.get("numeric")
        if numeric is not None:
            mask = feed.get("numeric_mask")
            values = numeric[mask] if mask is not None else numeric
            if not np.isfinite(values).all():
                raise InputValidationError(
                    "FieldEmbedder: numeric values contain NaN or inf; mark them missing"
                )
            feed["numeric"] = np.nan_to_num(numeric)
        limit = self.meta["max_sequence"]
        if self.meta["dynamic_sequence"] and limit is not None and shape[1] > limit:
            warnings.warn(
                f"{shape[1]} tokens exceed the dense range ({limit}) the ONNX graph was exported for; "
                "it attends densely where the fp32 model would use block-sparse attention",
                OnnxSequenceWarning,
                stacklevel=4,
            )
