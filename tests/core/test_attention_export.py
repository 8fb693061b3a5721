"""Export-only layouts of the block-sparse attention and the CT patch embedding: the same outputs as eager.

`select_blocks` pools queries and keys by one MatMul when exported (`_export_pools`), the exported gather path
leaves out the straight-through factor (exactly 1 in a forward pass), and `VolumeEmbedder` exports its patch
convolution as patches times the flattened kernel (`_patchify_export`). Tolerance: 1e-5 (the order of float
additions changes, nothing else).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.attention import DynamicAttention, select_blocks
from core.config import CoreConfig
from core.embeddings import VolumeEmbedder
from core.onnx_model import _session
from tests.core.test_onnx_export import ct_examples


def block_sparse_config(causal: bool) -> CoreConfig:
    return CoreConfig(
        hidden_size=32,
        num_heads=4,
        num_layers=2,
        block_size=4,
        top_k_blocks=1,
        dense_below=0,
        dense_tail_layers=1,
        categorical_fields={"x": 4},
        num_labels=2,
        causal=causal,
    )


def padded_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, length - 6 :] = False  # a partly padded last block and a fully padded one
    mask[2, 3:] = False  # one real block
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_exported_block_pools_select_the_blocks_eager_selects(
    monkeypatch, causal: bool, padded: bool
) -> None:
    torch.manual_seed(0)
    batch, heads, n_blocks, bs, dim = 3, 2, 5, 4, 8
    q, k = (torch.randn(batch, heads, n_blocks * bs, dim) for _ in range(2))
    gating_factor = torch.randn(heads, dim, dim) * 0.5
    key_valid = padded_mask(batch, n_blocks * bs) if padded else None
    expected = select_blocks(q, k, key_valid, gating_factor, bs, 2, causal)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    got = select_blocks(q, k, key_valid, gating_factor, bs, 2, causal)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)  # gate scores
    assert torch.equal(got[1], expected[1])  # allowed
    assert torch.equal(got[3], expected[3])  # pick_valid
    assert torch.equal(got[2][got[3]], expected[2][expected[3]])  # the kept blocks
    # The selection is not trivial: the query blocks do not all keep the same blocks.
    assert len({tuple(row.tolist()) for row in expected[2].reshape(-1, 3)[:, 1:]}) > 1


class _Attend(torch.nn.Module):
    def __init__(self, attention: DynamicAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.attention(hidden_states, attention_mask=attention_mask)[0]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_exported_block_sparse_layer_matches_eager_without_gate_softmax_or_cumsum(tmp_path, causal) -> None:
    import onnx

    torch.manual_seed(0)
    attention = DynamicAttention(block_sparse_config(causal), layer_idx=0).eval()
    with torch.no_grad():
        attention.gating_factor.normal_(std=0.5)
    length = 18  # 5 blocks of 4 (the last one padded), each query block keeps 2
    hidden, mask = torch.randn(3, length, 32), padded_mask(3, length)
    assert not attention.use_dense(length, hidden.device)
    path = tmp_path / "attention.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(
            _Attend(attention).eval(),
            (hidden, mask),
            str(path),
            dynamo=True,
            opset_version=23,
            input_names=["hidden_states", "attention_mask"],
            dynamic_shapes=({0: batch}, {0: batch}),
        )
        expected = attention(hidden, attention_mask=mask)[0]
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # No straight-through factor (its softmax over the gate) and no cumulative sums of the causal query pool.
    assert "Softmax" not in ops and "CumSum" not in ops
    assert ops.count("Attention") == 1  # one fused call over the gathered blocks
    (got,) = _session(path, 1).run(None, {"hidden_states": hidden.numpy(), "attention_mask": mask.numpy()})
    real = mask.numpy()
    np.testing.assert_allclose(got[real], expected.numpy()[real], atol=1e-5, rtol=1e-5)


class _Embed(torch.nn.Module):
    def __init__(self, embedder: VolumeEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.embedder(volume)


def test_patch_embedding_exports_as_a_matmul_and_matches_the_eager_convolution(tmp_path) -> None:
    import onnx

    config = CoreConfig(
        hidden_size=16,
        num_heads=2,
        volume_channels=2,
        volume_patch_size=(2, 4, 4),
        categorical_fields={"x": 4},
        num_labels=2,
    )
    torch.manual_seed(0)
    embedder = VolumeEmbedder(config).eval()
    volume = torch.randn(3, 2, 4, 8, 12)  # a 2 x 2 x 3 patch grid
    path = tmp_path / "embedder.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _Embed(embedder),
            (volume,),
            str(path),
            dynamo=True,
            opset_version=23,
            input_names=["volume"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        )
        expected = embedder(volume)  # eager: the Conv3d
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Conv" not in ops and ops.count("MatMul") == 1
    session = _session(path, 1)
    for batch in (1, 3):
        (got,) = session.run(None, {"volume": volume[:batch].numpy()})
        np.testing.assert_allclose(got, expected[:batch].numpy(), atol=1e-5, rtol=1e-5)


def test_int8_quantises_the_patch_matmul_whose_flattened_kernel_is_folded(tmp_path) -> None:
    """The patch kernel (here 32 x 2 x 4 x 8 x 8 = 16384 values, above the exporter's folding limit) reaches its
    MatMul as one initializer (`_fold_weight_views`), so `quantize_int8` makes it int8 by default while the
    convolutional stem (`KEEP_FP32_DEFAULT`) would stay fp32; the kernel is stored once."""
    import onnx

    from core.data import collate
    from core.model import CoreModel
    from core.onnx_model import KEEP_FP32_DEFAULT, OnnxCoreModel, export_onnx, quantize_int8

    assert "volume_embedder.stem" in KEEP_FP32_DEFAULT and "volume_embedder" not in KEEP_FP32_DEFAULT
    config = CoreConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        ffn_size=16,
        dense_tail_layers=1,
        n_routed_experts=2,
        moe_top_k=1,
        num_modalities=2,
        volume_modality_id=1,
        volume_patch_size=(4, 8, 8),
        volume_channels=2,
        numeric_fields=["x"],
        num_labels=2,
    )
    torch.manual_seed(0)
    model = CoreModel(config).eval()
    examples = ct_examples(3, (2, 8, 16, 16))
    out = tmp_path / "int8"
    meta = export_onnx(model, examples, out, with_explain=False)
    (patch_matmul,) = [n for n, m in meta["node_modules"]["model.onnx"].items() if m == "volume_embedder"]
    graph = onnx.load(str(out / "model.onnx")).graph
    kernel_sized = [init for init in graph.initializer if int(np.prod(init.dims)) == 32 * 2 * 4 * 8 * 8]
    assert [list(init.dims) for init in kernel_sized] == [[2 * 4 * 8 * 8, 32]]  # folded, stored once
    batch = collate(examples)
    with torch.no_grad():
        expected = model(**batch.to_dict())
    torch.testing.assert_close(
        OnnxCoreModel(out)(**batch.to_dict()).logits, expected.logits, atol=1e-4, rtol=1e-4
    )

    kept = quantize_int8(out)
    assert patch_matmul not in kept["model.onnx"]
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    assert "MatMulInteger" in {n.op_type for n in nodes if n.name.startswith(patch_matmul)}
    got = OnnxCoreModel(out)(**batch.to_dict())
    torch.testing.assert_close(got.logits, expected.logits, atol=0.05, rtol=0.05)
