"""core.onnx_model export rewrites: padded batches match eager PyTorch, the graph rewrites keep the sums.

Tolerance: the fp32 ONNX graph matches eager PyTorch to 1e-4 on every real (non-padded) token, as in
tests/core/test_compress.py; the export-only layouts (numeric embedder, block-sparse mask, merged
scatter-adds) change the order of float additions only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import CoreConfig
from core.data import collate
from core.embeddings import PeriodicEncoding
from core.model import CoreModel
from core.onnx_model import (
    ONNX_FILE,
    OnnxCoreModel,
    _flushing_denormals,
    _merge_scatter_adds,
    _session,
    _session_options,
    denormals_flushed,
    export_onnx,
)

LENGTH = 12  # 3 blocks of 4 tokens: layer 0 keeps 1 + 1 of them (block-sparse), layer 1 is dense


def padded_config(causal: bool) -> CoreConfig:
    return CoreConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        top_k_blocks=1,
        dense_below=0,
        dense_tail_layers=1,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_top_k=2,
        domains=("a", "b"),
        categorical_fields={"item": 12},
        numeric_fields=["amount", "balance"],
        use_time_delta=True,
        num_labels=2,
        causal=causal,
    )


def padded_examples(rng: np.random.Generator, n: int) -> list[dict]:
    """Examples of 3..LENGTH tokens (the first one full length), with missing numeric values."""
    lengths = [LENGTH, *rng.integers(3, LENGTH + 1, n - 1)]
    return [
        {
            "categorical": {"item": rng.integers(1, 12, length)},
            "numeric": rng.normal(size=(length, 2)).astype(np.float32),
            "numeric_mask": rng.random((length, 2)) > 0.3,
            "time_delta": rng.random(length).astype(np.float32) * 100,
            "domain_ids": rng.integers(0, 2, length),
        }
        for length in lengths
    ]


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidirectional"])
def padded_export(request, tmp_path_factory):
    torch.manual_seed(0)
    model = CoreModel(padded_config(request.param)).eval()
    rng = np.random.default_rng(2)
    out = tmp_path_factory.mktemp("onnx_padded") / "fp32"
    meta = export_onnx(model, padded_examples(rng, 4), out, with_explain=False)
    return model, out, meta


@pytest.mark.slow  # one ONNX export per attention direction
def test_padded_batches_of_different_lengths_match_eager(padded_export):
    model, out, meta = padded_export
    assert not meta["dynamic_sequence"]  # layer 0 runs the block-sparse path at this length
    onnx_model = OnnxCoreModel(out)
    rng = np.random.default_rng(3)
    for batch_size in (1, 5, 16):
        batch = collate(padded_examples(rng, batch_size))
        assert batch.attention_mask.shape[1] == LENGTH
        with torch.no_grad():
            expected = model(**batch.to_dict())
        got = onnx_model(**batch.to_dict())
        real = batch.attention_mask.bool()  # (B, T)
        if batch_size > 1:
            assert not real.all()  # the batch really is padded
        torch.testing.assert_close(
            got.hidden_states[real], expected.hidden_states[real], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    # Every numeric value missing: the numeric encoder has no token to encode (empty tensors in the graph).
    examples = padded_examples(rng, 3)
    for example in examples:
        example["numeric_mask"][:] = False
    batch = collate(examples)
    with torch.no_grad():
        expected = model(**batch.to_dict())
    got = onnx_model(**batch.to_dict())
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # shares the export above
def test_export_rewrites_leave_one_scatter_per_moe_layer_and_no_floor_fixups(padded_export):
    import onnx

    model, out, _ = padded_export
    nodes = onnx.load(str(out / ONNX_FILE)).graph.node
    ops = [node.op_type for node in nodes]
    # One `index_add` per expert became one ScatterND(add) per MoE layer (the numeric encoder's scatter of
    # its encoded tokens, `PeriodicEncoding.masked_sum`, is a plain one).
    adds = [
        n
        for n in nodes
        if n.op_type == "ScatterND" and any(a.name == "reduction" and a.s == b"add" for a in n.attribute)
    ]
    assert len(adds) == len(model.moe_layers())
    # `nonzero() // top_k` needs no sign correction (the exporter's floor division goes through Mod).
    assert "Mod" not in ops
    # The (1, M) positions of `nonzero()` are flattened directly, not transposed first.
    producers = {out: node.op_type for node in nodes for out in node.output}
    assert ops.count("NonZero") >= 4
    assert not [n for n in nodes if n.op_type == "Transpose" and producers.get(n.input[0]) == "NonZero"]


def test_masked_sum_equals_the_eager_masked_encoding():
    torch.manual_seed(0)
    encoding = PeriodicEncoding(n_features=3, n_frequencies=4, out_size=8)
    values = torch.randn(2, 5, 3)
    mask = (torch.rand(2, 5, 3) > 0.4).float()
    mask[0, 3:] = 0  # tokens without any present value (padding): encoded as exactly 0, not computed
    expected = (encoding(values) * mask[..., None]).sum(dim=2)  # (B, T, out)
    got = encoding.masked_sum(values, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[0, 3:] == 0).all()
    assert (encoding.masked_sum(values, torch.zeros_like(mask)) == 0).all()  # no token to encode at all


def test_merged_scatter_adds_sum_duplicate_indices_like_the_chain():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    # out = base; out[idx_e] += upd_e for three "experts"; token 1 is in all three.
    indices = [np.array([[0], [1]]), np.array([[1], [3]]), np.array([[1]])]
    updates = [np.ones((2, 2)), 2 * np.ones((2, 2)), 4 * np.ones((1, 2))]
    inputs = [helper.make_tensor_value_info("base", TensorProto.FLOAT, [4, 2])]
    nodes, data = [], "base"
    for e, (idx, upd) in enumerate(zip(indices, updates, strict=True)):
        inputs += [
            helper.make_tensor_value_info(f"idx{e}", TensorProto.INT64, list(idx.shape)),
            helper.make_tensor_value_info(f"upd{e}", TensorProto.FLOAT, list(upd.shape)),
        ]
        nodes.append(
            helper.make_node(
                "ScatterND", [data, f"idx{e}", f"upd{e}"], [f"out{e}"], reduction="add", name=f"s{e}"
            )
        )
        data = f"out{e}"
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("out2", TensorProto.FLOAT, None)]
    )
    assert _merge_scatter_adds(graph) == 2
    assert [n.op_type for n in graph.node] == ["Concat", "Concat", "ScatterND"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"base": np.zeros((4, 2), np.float32)}
    for e, (idx, upd) in enumerate(zip(indices, updates, strict=True)):
        feed[f"idx{e}"], feed[f"upd{e}"] = idx.astype(np.int64), upd.astype(np.float32)
    (got,) = session.run(None, feed)
    np.testing.assert_array_equal(got[:, 0], [1.0, 7.0, 0.0, 2.0])


def test_sessions_run_with_denormals_flushed_and_leave_the_thread_mode_alone(tmp_path):
    from onnx import TensorProto, helper, save

    # Masked attention underflows in exp(); denormal arithmetic made a masked Attention ~3x slower.
    assert _session_options(1).get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert not _flushing_denormals()
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    save(model, str(tmp_path / "mul.onnx"))
    session = _session(tmp_path / "mul.onnx", 1)  # (ONNX Runtime alone would leave the mode set)
    assert not _flushing_denormals()
    tiny = np.array([1e-20], np.float32)  # its square is a denormal
    with denormals_flushed():
        assert _flushing_denormals()
        (flushed,) = session.run(None, {"x": tiny})
    assert not _flushing_denormals()
    assert flushed[0] == 0.0 and session.run(None, {"x": tiny})[0][0] > 0.0


def ct_examples(n: int, volume_shape: tuple[int, ...], seed: int = 0) -> list[dict]:
    """`n` encoded examples of one numeric field and a CT volume of `volume_shape` (C, D, H, W)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "numeric": rng.normal(size=(3, 1)).astype(np.float32),
            "volume": rng.random(volume_shape).astype(np.float32),
            "volume_present": True,
        }
        for _ in range(n)
    ]


def test_ct_stem_exports_and_matches_eager(tmp_path):
    """The CT stem's convolutions (`VolumeConv3d`, oneDNN-only in eager) export as plain ONNX Conv."""
    from tests.core.test_train import stem_config

    config = stem_config(volume_channels=2)
    torch.manual_seed(0)
    model = CoreModel(config).eval()
    examples = ct_examples(2, (2, 4, 8, 8))
    export_onnx(model, examples, tmp_path / "fp32", with_explain=False)
    batch = collate(examples[:1])
    with torch.no_grad():
        expected = model(**batch.to_dict())
    got = OnnxCoreModel(tmp_path / "fp32")(**batch.to_dict())
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # one ONNX export (inference and explanation graphs)
def test_dense_attention_exports_in_token_layout_and_matches_eager(tmp_path):
    """Dense layers export as `DynamicAttention._dense_export`: `RotaryEmbedding` and `Attention` on
    (B, T, H*D) with head-count attributes, no head transposes in the inference graph; padded batches and the
    explanation graph's attention weights match eager PyTorch. With the recency bias, so the float-mask branch
    is covered too (the bool mask of the other configs: `test_padded_batches_of_different_lengths_match_eager`,
    whose layer 1 is dense)."""
    import onnx

    config = padded_config(causal=True)
    config.dense_below = 1 << 10  # every layer dense: a dynamic sequence axis
    config.recency_bias = True
    torch.manual_seed(0)
    model = CoreModel(config).eval()
    rng = np.random.default_rng(4)
    meta = export_onnx(model, padded_examples(rng, 4), tmp_path / "fp32", with_explain=True)
    assert meta["dynamic_sequence"]
    nodes = onnx.load(str(tmp_path / "fp32" / ONNX_FILE)).graph.node
    attention = [n for n in nodes if n.op_type == "Attention"]
    assert len(attention) == config.num_layers
    for node in attention:
        heads = {a.name: a.i for a in node.attribute}
        assert heads["q_num_heads"] == heads["kv_num_heads"] == config.num_heads
    assert [n.op_type for n in nodes].count("RotaryEmbedding") == 2 * config.num_layers
    # No head transposes: nothing between a Transpose and an attention op but views and the output gate.
    producers = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    passing = ("Reshape", "Unsqueeze", "Squeeze", "Mul")
    for node in nodes:
        if node.op_type not in ("Attention", "RotaryEmbedding"):
            continue
        stack = [*node.input[:3], *node.output[:1]]
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for other in [producers.get(name), *consumers.get(name, [])]:
                if other is None or other is node:
                    continue
                assert other.op_type != "Transpose", f"{other.name} transposes {node.op_type} {node.name}"
                if other.op_type in passing:
                    stack += [*other.input[:1], *other.output]

    onnx_model = OnnxCoreModel(tmp_path / "fp32")
    batch = collate(padded_examples(rng, 6))
    real = batch.attention_mask.bool()
    assert not real.all()
    with torch.no_grad():
        expected = model(**batch.to_dict(), output_attentions=True)
    got = onnx_model(**batch.to_dict(), output_attentions=True)
    torch.testing.assert_close(got.hidden_states[real], expected.hidden_states[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    for got_trace, trace in zip(got.attentions, expected.attentions, strict=True):
        query_real = real[:, None, :, None].expand_as(trace.attention_weights)
        torch.testing.assert_close(
            got_trace.attention_weights[query_real], trace.attention_weights[query_real], atol=1e-5, rtol=1e-4
        )
