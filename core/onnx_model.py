"""The ONNX form of `CoreModel`: dynamo export, ONNX Runtime int8 quantisation, and `OnnxCoreModel`.

`export_onnx` exports the inference forward (the MoE runs its export dispatch, `DomainMoE._dispatch_export`)
and the heads; `quantize_int8` applies ONNX Runtime dynamic int8 (MatMul, Gemm and Gather, i.e. embeddings
included). `OnnxCoreModel` runs such a directory behind the `CoreModel` call signature.

`core.train.load_checkpoint` returns it for a directory holding `model.onnx`, so the app predictors run
compressed models unchanged: calling it with a batch's keyword arguments returns a `CoreOutput` with
`hidden_states`, `logits`, `embeddings` and `next_step_logits` (when `next_item_ids` is given), and
`model.classifier(hidden)` / `model.next_step(hidden, ids)` run the exported heads. With
`output_attentions=True` the explanation graph (`model_explain.onnx`) runs and each layer's
`AttentionTrace` carries its attention weights; an artifact exported without it raises `ConfigError`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
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

__all__ = ["OnnxCoreModel", "OnnxSequenceWarning", "export_onnx", "flat_inputs", "quantize_int8"]

ONNX_FILE = "model.onnx"
EXPLAIN_ONNX_FILE = "model_explain.onnx"
ONNX_META_FILE = "onnx.json"
HEAD_FILES = {"classifier": "classifier.onnx", "next_step": "next_step.onnx"}
WEIGHT_FILES = ("model.safetensors", ONNX_FILE, EXPLAIN_ONNX_FILE, *HEAD_FILES.values())
TARGET_KEYS = ("labels", "token_labels", "next_labels", "mfm_mask")
# Inputs the ONNX model can fill in when a batch leaves them out (the defaults `CoreModel` uses).
DEFAULTABLE_INPUTS = ("attention_mask", "numeric_mask", "modality_ids", "domain_ids", "volume_present")
MAX_DYNAMIC_BATCH = 65536
ONNX_OPSET = 23


def inference_inputs(batch: Batch) -> dict[str, Any]:
    """The keyword arguments of an inference forward: the batch without its targets."""
    return {k: v for k, v in batch.to_dict().items() if k not in TARGET_KEYS}


_TARGETS = ("labels", "token_labels", "next_labels")
_NUMPY_DTYPES = {"bool": np.bool_, "int64": np.int64, "float32": np.float32}


# ---------------------------------------------------------------------- ONNX export
class _ExportForward(nn.Module):
    """The inference forward with flat tensor inputs: (hidden_states, [logits], [embeddings], [attentions])."""

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


def _sequence_limit(model: CoreModel, n_volume: int) -> int | None:
    """Longest field sequence every attention layer runs on the dense path for (None: no limit)."""
    config = model.config
    if all(layer.attention.always_dense for layer in model.layers):
        return None
    return config.dense_below - 1 - n_volume


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node stack traces and doc strings (often larger than a small model's weights)."""
    import onnx

    proto = onnx.load(str(path))
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            graphs.extend(attr.g for attr in node.attribute if attr.HasField("g"))
        graph.doc_string = ""
        for value in (*graph.input, *graph.output, *graph.value_info):
            del value.metadata_props[:]
    proto.doc_string = ""
    onnx.save(proto, str(path))


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
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
    _strip_metadata(path)


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

    Args:
        model: the fp32 model (eval mode is set).
        sample: encoded examples (see `core.data`) with the inputs the app sends.
        out_dir: folder for `model.onnx`, `model_explain.onnx` (attention weights as extra outputs, used
            for explanations), `classifier.onnx` / `next_step.onnx`.
        with_explain: also export the explanation graph.

    Returns:
        The metadata written to `onnx.json` (input names, ranks, dtypes, axes, outputs, head files).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    for moe in model.moe_layers():
        moe.track_routing = False
    batch = collate(list(sample[: min(len(sample), 4)]))
    inputs = flat_inputs(batch)
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
    model.config.save_pretrained(out_dir)
    with torch.no_grad():
        explain_outputs = []
        if with_explain:
            # One export: the inference graph is the explanation graph without the attention outputs
            # (the nodes only they need are dropped), which halves the export time.
            explain_outputs = [*outputs, *(f"attentions.{i}" for i in range(len(model.layers)))]
            explain_path = out_dir / EXPLAIN_ONNX_FILE
            _export(
                _ExportForward(model, names, True).eval(),
                (inputs,),
                explain_path,
                names,
                explain_outputs,
                (shapes,),
            )
            _extract(explain_path, out_dir / ONNX_FILE, names, outputs)
        else:
            _export(
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
            _export(
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
            _export(
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
    }
    (out_dir / ONNX_META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def quantize_int8(model_dir: str | Path) -> None:
    """Quantise every ONNX file of an exported directory in place with ONNX Runtime dynamic int8.

    Weights of MatMul/Gemm/Conv (per output channel) and embedding tables (Gather) become int8; activations
    are quantised per batch at run time (uint8), which uses VNNI/AMX integer kernels where the CPU has them.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_dir = Path(model_dir)
    meta_path = model_dir / ONNX_META_FILE
    meta = json.loads(meta_path.read_text())
    files = [ONNX_FILE, *meta["heads"].values()] + ([meta["explain_file"]] if meta["explain_file"] else [])
    for name in files:
        path = model_dir / name
        with tempfile.TemporaryDirectory(prefix="verticals-int8-") as work:
            target = Path(work) / name
            try:
                quantize_dynamic(
                    str(path),
                    str(target),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Gather", "Conv"],
                )
            except Exception as e:  # onnxruntime raises plain exceptions; wrap once here
                raise ConfigError(f"int8 quantisation of {path} failed: {type(e).__name__}: {e}") from e
            shutil.move(str(target), path)
    meta["int8"] = True
    meta_path.write_text(json.dumps(meta, indent=2))


class OnnxSequenceWarning(UserWarning):
    """A sequence longer than the dense range the ONNX graph was exported for (it still runs, densely)."""


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types; wrap once at the boundary
        raise InputValidationError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e


class _OnnxHead:
    """One exported head: flattens the leading axes, runs the session, restores them."""

    def __init__(self, path: Path, threads: int | None) -> None:
        self.session = _session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(
        self, hidden_states: torch.Tensor, next_item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
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
        """Run the graph on the keyword arguments of `CoreModel.forward` (targets are ignored)."""
        next_item_ids = batch.pop("next_item_ids", None)
        for name in _TARGETS:
            batch.pop(name, None)
        feed = self._feed(batch)
        if output_attentions:
            session, names = self._explain(), self.meta["explain_outputs"]
        else:
            session, names = self.session, self.meta["outputs"]
        values = dict(zip(names, session.run(names, feed), strict=True))
        hidden = torch.from_numpy(values["hidden_states"])
        out: dict[str, Any] = {"hidden_states": hidden}
        for name in ("logits", "embeddings"):
            if name in values:
                out[name] = torch.from_numpy(values[name])
        if next_item_ids is not None and self.next_step is not None:
            field_states = hidden[:, self.meta["volume_tokens"] :]  # (B, T, hidden)
            out["next_step_logits"] = self.next_step(field_states, next_item_ids)
        if output_attentions:
            out["attentions"] = tuple(
                AttentionTrace(
                    is_dense=bool(self.meta["dynamic_sequence"]),
                    attention_weights=torch.from_numpy(values[f"attentions.{i}"]),
                )
                for i in range(len(names) - len(self.meta["outputs"]))
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
