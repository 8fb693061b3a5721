"""core.onnx_model: the next-step head folded into the exported inference graphs (knowledge tracing).

Tolerances as in tests/core/test_compress.py: the fp32 graph matches eager PyTorch to 1e-4 on every real
(non-padded) token; int8 logits stay within 0.05 of fp32 on the tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.config import CoreConfig
from core.data import collate
from core.errors import InputValidationError
from core.model import CoreModel
from core.onnx_model import (
    EXPLAIN_ONNX_FILE,
    KEEP_FP32_DEFAULT,
    ONNX_FILE,
    OnnxCoreModel,
    export_onnx,
    quantize_int8,
)
from tests.core.test_compress import small_config

ITEMS = 9  # next_step_vocab: 0 padding, 1..8 items

# Two exports (folded with its explanation graph, then the old layout) and one quantisation: ~15 s.
pytestmark = pytest.mark.slow


def kt_config() -> CoreConfig:
    """A tiny knowledge-tracing model as the education app builds it: causal, next-step head, no classifier."""
    return small_config(
        num_layers=1,
        categorical_fields={"item": ITEMS, "response": 4},
        numeric_fields=[],
        num_labels=0,
        next_step_vocab=ITEMS,
    )


def kt_examples(rng: np.random.Generator, n: int, with_next: bool = True) -> list[dict]:
    """Answer sequences of 3..9 steps; `next_item_ids[t]` is the item answered after step t."""
    examples = []
    for length in rng.integers(3, 10, n):
        items = rng.integers(1, ITEMS, length + 1)
        example = {
            "categorical": {"item": items[:-1], "response": rng.integers(1, 4, length)},
            "time_delta": rng.random(length).astype(np.float32) * 100,
            "domain_ids": rng.integers(0, 2, length),
        }
        if with_next:
            example["next_item_ids"] = items[1:]
            example["next_labels"] = rng.integers(0, 2, length).astype(np.float32)
        examples.append(example)
    return examples


@pytest.fixture(scope="module")
def kt_export(tmp_path_factory) -> dict:
    """One model exported with the head folded in (fp32 and int8), and exported the old way (sample without
    next_item_ids: the head only in next_step.onnx)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    model = CoreModel(kt_config()).eval()
    root = tmp_path_factory.mktemp("onnx_next_step")
    export_onnx(model, kt_examples(rng, 6), root / "fp32", with_explain=True)
    shutil.copytree(root / "fp32", root / "int8")
    quantize_int8(root / "int8")
    export_onnx(model, kt_examples(rng, 6, with_next=False), root / "old", with_explain=False)
    return {"model": model, "fp32": root / "fp32", "int8": root / "int8", "old": root / "old"}


def eager(model: CoreModel, batch) -> object:
    with torch.no_grad():
        return model(**batch.to_dict())


def test_folded_graphs_take_next_item_ids_and_give_next_step_logits(kt_export):
    meta = json.loads((kt_export["fp32"] / "onnx.json").read_text())
    spec = meta["inputs"]["next_item_ids"]
    assert (spec["rank"], spec["dtype"]) == (2, "int64")
    assert meta["outputs"] == ["hidden_states", "next_step_logits"]
    assert meta["explain_outputs"][:2] == ["hidden_states", "next_step_logits"]
    for name in (ONNX_FILE, EXPLAIN_ONNX_FILE):
        graph = onnx.load(str(kt_export["fp32"] / name)).graph
        assert "next_item_ids" in {value.name for value in graph.input}
        assert "next_step_logits" in {value.name for value in graph.output}
    assert meta["heads"] == {"next_step": "next_step.onnx"}  # kept for scoring states against other items
    old = json.loads((kt_export["old"] / "onnx.json").read_text())
    assert "next_item_ids" not in old["inputs"] and old["outputs"] == ["hidden_states"]


def test_folded_next_step_logits_match_eager_in_one_session_run(kt_export, rng):
    model = kt_export["model"]
    onnx_model = OnnxCoreModel(kt_export["fp32"])
    assert onnx_model.folds_next_step
    onnx_model.next_step = None  # the head's own graph must not be needed for a forward
    for batch_size in (1, 5):
        batch = collate(kt_examples(rng, batch_size))
        expected = eager(model, batch)
        got = onnx_model(**batch.to_dict())
        real = batch.attention_mask.bool()  # (B, T)
        torch.testing.assert_close(
            got.next_step_logits[real], expected.next_step_logits[real], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            got.hidden_states[real], expected.hidden_states[real], atol=1e-4, rtol=1e-4
        )
    explained = onnx_model(**batch.to_dict(), output_attentions=True)  # the explanation graph folds it too
    torch.testing.assert_close(
        explained.next_step_logits[real], expected.next_step_logits[real], atol=1e-4, rtol=1e-4
    )
    assert len(explained.attentions) == 1 and explained.attentions[0].attention_weights.shape[0] == 5


def test_a_call_without_next_item_ids_returns_the_states_only(kt_export, rng):
    onnx_model = OnnxCoreModel(kt_export["fp32"])
    batch = collate(kt_examples(rng, 3)).to_dict()
    with_ids = onnx_model(**batch)
    batch.pop("next_item_ids")
    for output_attentions in (False, True):
        got = onnx_model(**batch, output_attentions=output_attentions)
        assert got.next_step_logits is None
        torch.testing.assert_close(got.hidden_states, with_ids.hidden_states)
    # The separately exported head still scores states against any items (the predictor's candidate items).
    hidden = with_ids.hidden_states[:, -1]  # (B, hidden)
    items = torch.arange(1, ITEMS)[None].expand(3, -1)  # (B, 8)
    torch.testing.assert_close(
        onnx_model.next_step(hidden[:, None].expand(-1, ITEMS - 1, -1), items),
        kt_export["model"].next_step(hidden[:, None].expand(-1, ITEMS - 1, -1), items).detach(),
        atol=1e-4,
        rtol=1e-4,
    )


def quantised_head_nodes(model_dir: Path, name: str) -> tuple[set[str], set[str]]:
    """The next-step head's weight nodes of one int8 file, and those of them that int8 quantised."""
    meta = json.loads((model_dir / "onnx.json").read_text())
    head_nodes = {n for n, m in meta["node_modules"][name].items() if m.startswith("next_step.")}
    graph = onnx.load(str(model_dir / name)).graph
    by_name = {node.name: node for node in graph.node}
    int8_weights = {init.name for init in graph.initializer if init.data_type in (2, 3)}  # (u)int8
    quantised = {
        node
        for node in head_nodes
        if f"{node}_quant" in by_name  # a MatMul now MatMulInteger / DynamicQuantizeMatMul
        or (node in by_name and by_name[node].input[0] in int8_weights)  # an int8 embedding table
    }
    return head_nodes, quantised


def test_int8_quantises_the_folded_head_like_its_own_graph(kt_export, rng, tmp_path):
    for name in (ONNX_FILE, EXPLAIN_ONNX_FILE, "next_step.onnx"):
        head_nodes, quantised = quantised_head_nodes(kt_export["int8"], name)
        assert len(head_nodes) == 3 and quantised == head_nodes, name  # item table and both MLP layers
    # Keeping the head fp32 by its module path keeps it fp32 in every file.
    shutil.copytree(kt_export["fp32"], tmp_path / "kept")
    kept = quantize_int8(tmp_path / "kept", keep_fp32=(*KEEP_FP32_DEFAULT, "next_step"))
    for name in (ONNX_FILE, EXPLAIN_ONNX_FILE, "next_step.onnx"):
        head_nodes, quantised = quantised_head_nodes(tmp_path / "kept", name)
        assert not quantised and head_nodes <= set(kept[name]), name
    model = kt_export["model"]
    batch = collate(kt_examples(rng, 16))
    expected = eager(model, batch).next_step_logits
    got = OnnxCoreModel(kt_export["int8"])(**batch.to_dict()).next_step_logits
    real = batch.attention_mask.bool()
    assert (got - expected)[real].abs().max() < 0.05


def test_an_artifact_exported_without_the_fold_still_runs_the_head_graph(kt_export, rng):
    model = kt_export["model"]
    onnx_model = OnnxCoreModel(kt_export["old"])
    assert not onnx_model.folds_next_step
    batch = collate(kt_examples(rng, 4))
    expected = eager(model, batch)
    got = onnx_model(**batch.to_dict())
    real = batch.attention_mask.bool()
    torch.testing.assert_close(
        got.next_step_logits[real], expected.next_step_logits[real], atol=1e-4, rtol=1e-4
    )
    without = batch.to_dict()
    without.pop("next_item_ids")
    assert onnx_model(**without).next_step_logits is None


def test_bad_next_item_ids_are_rejected_by_name(kt_export, rng):
    onnx_model = OnnxCoreModel(kt_export["fp32"])
    batch = collate(kt_examples(rng, 2)).to_dict()
    batch["next_item_ids"] = batch["next_item_ids"].clone()
    batch["next_item_ids"][0, 0] = ITEMS
    with pytest.raises(InputValidationError, match=r"next_item_ids: ids outside \[0, 9\)"):
        onnx_model(**batch)
    batch["next_item_ids"] = batch["next_item_ids"][:, :-1].clamp(max=ITEMS - 1)
    with pytest.raises(InputValidationError, match="next_item_ids has shape"):
        onnx_model(**batch)
