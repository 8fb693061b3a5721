"""core.compress: expert/structured pruning on tiny models, ONNX export round trip, int8, QAT, reports.

Tolerances: pruning that removes only unused experts / zero-importance units changes outputs by < 1e-5;
the fp32 ONNX graph matches eager PyTorch to 1e-4; int8 logits stay within 0.05 of fp32 on the tiny model
(weights ~N(0, 0.02), so this is ~10x the observed error).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.compress import (
    COMPRESSION_FILE,
    CompressionOptions,
    apply_plan,
    compress,
    export_onnx,
    fake_quantized,
    latency_report,
    plan_block_pruning,
    plan_expert_pruning,
    plan_structured_pruning,
    qat_finetune,
    quantize_int8,
    routing_usage,
)
from core.config import CoreConfig
from core.data import collate
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel
from core.onnx_model import OnnxCoreModel
from core.train import load_checkpoint, save_checkpoint


def small_config(**overrides) -> CoreConfig:
    values = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        dense_below=64,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_top_k=2,
        domains=("a", "b"),
        categorical_fields={"item": 12},
        numeric_fields=["amount"],
        use_time_delta=True,
        num_labels=2,
        causal=True,
    )
    values.update(overrides)
    return CoreConfig(**values)


def make_examples(rng: np.random.Generator, n: int, domain: int | None = None) -> list[dict]:
    examples = []
    for length in rng.integers(3, 10, n):
        examples.append(
            {
                "categorical": {"item": rng.integers(1, 12, length)},
                "numeric": rng.normal(size=(length, 1)).astype(np.float32),
                "numeric_mask": rng.random((length, 1)) > 0.2,
                "time_delta": rng.random(length).astype(np.float32) * 100,
                "domain_ids": np.full(length, domain) if domain is not None else rng.integers(0, 2, length),
                "token_labels": rng.integers(0, 2, length),
            }
        )
    return examples


def domain_biased_model(config: CoreConfig) -> CoreModel:
    """A model whose domain prior sends domain "a" to experts 0/1 only and domain "b" to 2/3 only."""
    model = CoreModel(config).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.domain_prior.weight.copy_(
                torch.tensor([[20.0, 20.0, -20.0, -20.0], [-20.0, -20.0, 20.0, 20.0]])
            )
    return model


def test_expert_pruning_keeps_the_domains_experts_and_its_outputs(rng):
    model = domain_biased_model(small_config())
    examples = make_examples(rng, 12, domain=0)
    usage = routing_usage(model, examples)
    plan = plan_expert_pruning(model, usage, domain="a")
    assert plan.experts == [[0, 1], [0, 1]]
    pruned = apply_plan(model, plan)
    for moe in pruned.moe_layers():
        assert moe.num_experts == 2
        assert moe.router.weight.shape == (2, 32)
        assert moe.domain_prior.weight.shape == (2, 2)
        assert moe.expert_bias.shape == (2,) and len(moe.experts) == 2
    assert pruned.config.layer_routed_experts == [2, 2]
    batch = collate(examples)
    with torch.no_grad():
        before = model(**batch.to_dict()).token_logits
        after = pruned(**batch.to_dict()).token_logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_pruned_routing_never_picks_a_removed_expert(rng):
    model = domain_biased_model(small_config())
    plan = plan_expert_pruning(model, routing_usage(model, make_examples(rng, 8, domain=0)), domain="a")
    pruned = apply_plan(model, plan)
    # Tokens of domain "b" used only the removed experts: they are re-routed to the kept ones.
    batch = collate(make_examples(rng, 8, domain=1))
    with torch.no_grad():
        out = pruned(**batch.to_dict())
    for moe, logits in zip(pruned.moe_layers(), out.router_logits, strict=True):
        assert logits.shape[-1] == moe.num_experts == 2
        topk_idx, topk_weight, _, _ = moe.route(torch.randn(20, 32), torch.ones(20, dtype=torch.long))
        assert int(topk_idx.max()) < moe.num_experts
        torch.testing.assert_close(topk_weight.sum(-1), torch.ones(20))
    assert torch.isfinite(out.token_logits).all()


def test_expert_pruning_keeps_top_k_experts_even_when_fewer_are_used(rng):
    config = small_config()
    model = domain_biased_model(config)
    usage = [np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])] * 2
    plan = plan_expert_pruning(model, usage, domain="a")
    assert all(len(kept) == config.moe_top_k for kept in plan.experts)
    with pytest.raises(ConfigError, match="no routed token"):
        plan_expert_pruning(model, usage, domain="b")
    with pytest.raises(ConfigError, match="unknown domain"):
        plan_expert_pruning(model, usage, domain="zzz")


def test_ffn_pruning_removes_dead_units_without_changing_outputs(rng):
    model = CoreModel(small_config()).eval()
    with torch.no_grad():
        for module in model.modules():
            if module.__class__.__name__ == "SwiGLU":
                module.w2.weight[:, ::2] = 0.0  # half the units contribute nothing
    examples = make_examples(rng, 8)
    plan = plan_structured_pruning(model, examples, ffn_ratio=0.5)
    pruned = apply_plan(model, plan)
    moe = pruned.moe_layers()[0]
    assert moe.experts[0].w1.weight.shape == (8, 32) and moe.experts[0].w2.weight.shape == (32, 8)
    assert moe.shared_experts.w1.weight.shape == (8, 32)
    assert pruned.config.layer_ffn_sizes == [8, 8] and pruned.config.layer_shared_ffn_sizes == [8, 8]
    batch = collate(examples)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(**batch.to_dict()).logits, model(**batch.to_dict()).logits, atol=1e-5, rtol=1e-5
        )


def test_head_pruning_shrinks_projections_and_round_trips(tmp_path, rng):
    model = CoreModel(small_config(use_moe=False)).eval()
    with torch.no_grad():
        model.layers[0].attention.o_proj.weight[:, 8:16] = 0.0  # head 1 of layer 0 is dead
    plan = plan_structured_pruning(model, make_examples(rng, 6), ffn_ratio=0.25, head_ratio=0.25)
    assert plan.heads[0] == [0, 2, 3]
    pruned = apply_plan(model, plan)
    attention = pruned.layers[0].attention
    assert attention.q_proj.weight.shape == (24, 32) and attention.o_proj.weight.shape == (32, 24)
    assert attention.gating_factor.shape == (3, 8, 8) and attention.gate_proj.weight.shape == (3, 32)
    assert pruned.layers[0].ffn.w1.weight.shape == (96, 32)  # dense FFN 128 -> 96 units
    save_checkpoint(pruned, tmp_path / "pruned", {"app": "test"})
    loaded, _ = load_checkpoint(tmp_path / "pruned")
    batch = collate(make_examples(rng, 4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch.to_dict()).logits, pruned(**batch.to_dict()).logits)


def test_pruned_layer_sizes_are_validated():
    with pytest.raises(ConfigError, match="layer_routed_experts"):
        small_config(layer_routed_experts=[1, 4])  # below moe_top_k
    with pytest.raises(ConfigError, match="layer_num_heads"):
        small_config(layer_num_heads=[4])  # one entry per layer


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[CoreModel, Path, Path, list[dict]]:
    """A tiny MoE model exported once to fp32 ONNX, and a copy quantised to int8."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = CoreModel(small_config(num_layers=1, dense_tail_layers=1)).eval()
    examples = make_examples(rng, 10)
    fp32_dir = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(model, examples, fp32_dir, with_explain=True)
    int8_dir = fp32_dir.parent / "int8"
    shutil.copytree(fp32_dir, int8_dir)
    quantize_int8(int8_dir)
    return model, fp32_dir, int8_dir, examples


@pytest.mark.slow  # ONNX export (shared fixture) or a full compress run
def test_onnx_round_trip_matches_eager_with_dynamic_batch_and_length(exported, rng):
    model, fp32_dir, _, _ = exported
    onnx_model = OnnxCoreModel(fp32_dir)
    for batch_size in (1, 7):
        batch = collate(make_examples(rng, batch_size))
        with torch.no_grad():
            expected = model(**batch.to_dict(), output_attentions=True)
        got = onnx_model(**batch.to_dict(), output_attentions=True)
        torch.testing.assert_close(got.hidden_states, expected.hidden_states, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            got.attentions[0].attention_weights,
            expected.attentions[0].attention_weights,
            atol=1e-4,
            rtol=1e-4,
        )
        hidden = got.hidden_states
        torch.testing.assert_close(
            onnx_model.classifier(hidden), model.classifier(hidden), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            onnx_model.classifier(hidden[:, 0]), model.classifier(hidden[:, 0]), atol=1e-4, rtol=1e-4
        )


@pytest.mark.slow  # ONNX export (shared fixture) or a full compress run
def test_int8_graph_is_quantised_and_close_to_fp32(exported, rng):
    import onnx

    model, fp32_dir, int8_dir, _ = exported
    ops = {node.op_type for node in onnx.load(str(int8_dir / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert (int8_dir / "model.onnx").stat().st_size < (fp32_dir / "model.onnx").stat().st_size
    batch = collate(make_examples(rng, 16))
    with torch.no_grad():
        expected = model(**batch.to_dict()).logits
    got = OnnxCoreModel(int8_dir)(**batch.to_dict()).logits
    assert (got - expected).abs().max() < 0.05


@pytest.mark.slow  # ONNX export (shared fixture) or a full compress run
def test_onnx_model_checks_inputs_like_the_eager_model(exported, rng):
    _, fp32_dir, _, _ = exported
    onnx_model = OnnxCoreModel(fp32_dir)
    batch = collate(make_examples(rng, 2))
    batch.categorical["item"][0, 0] = 99
    with pytest.raises(InputValidationError, match="outside"):
        onnx_model(**batch.to_dict())
    batch = collate(make_examples(rng, 2))
    with pytest.raises(InputValidationError, match="not inputs of the exported graph"):
        onnx_model(**batch.to_dict(), volume=torch.zeros(2, 1, 4, 16, 16))
    with pytest.raises(ConfigError, match="CPU only"):
        onnx_model.to("cuda")


def test_fake_quantized_trains_and_leaves_plain_modules(rng):
    from torch.nn.utils import parametrize

    model = CoreModel(small_config(num_layers=1)).train()
    batch = collate(make_examples(rng, 8))
    before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with fake_quantized(model) as n_modules:
        assert n_modules > 0 and parametrize.is_parametrized(model.classifier)
        loss = model(**batch.to_dict()).loss
        loss.backward()
        optimizer.step()
    assert not parametrize.is_parametrized(model.classifier)
    assert not torch.equal(model.classifier.weight, before)
    assert torch.isfinite(model.classifier.weight).all()


def _relative_error(student: CoreModel, teacher: CoreModel, batch) -> float:
    with torch.no_grad():
        mine, theirs = student(**batch).hidden_states, teacher(**batch).hidden_states
    return float((mine - theirs).pow(2).mean() / theirs.pow(2).mean())


def test_distilled_qat_pulls_a_pruned_model_to_its_parent_and_keeps_the_routing_bias(tmp_path, rng):
    torch.manual_seed(0)
    parent = CoreModel(small_config()).eval()
    examples = make_examples(rng, 64)
    student = apply_plan(copy.deepcopy(parent), plan_structured_pruning(parent, examples, head_ratio=0.5))
    with torch.no_grad():
        for moe in student.moe_layers():
            moe.expert_bias.uniform_(-0.1, 0.1)
    biases = [moe.expert_bias.clone() for moe in student.moe_layers()]
    parent_biases = [moe.expert_bias.clone() for moe in parent.moe_layers()]
    inputs = [{k: v for k, v in e.items() if k != "token_labels"} for e in examples]  # no targets needed
    batch = {k: v for k, v in collate(inputs).to_dict().items() if v is not None}
    before = _relative_error(student.eval(), parent, batch)
    qat_finetune(student, inputs, 40, tmp_path, learning_rate=3e-4, batch_size=16, teacher=parent)
    assert _relative_error(student, parent, batch) < 0.7 * before
    assert all(torch.equal(moe.expert_bias, b) for moe, b in zip(student.moe_layers(), biases, strict=True))
    # The teacher is held too: the Trainer's balancing callback reaches every MoE layer of the trained module.
    assert all(
        torch.equal(moe.expert_bias, b) for moe, b in zip(parent.moe_layers(), parent_biases, strict=True)
    )
    with pytest.raises(InputValidationError, match="task targets"):  # task steps still need targets
        qat_finetune(student, inputs, 1, tmp_path)
    with pytest.raises(ConfigError, match="qat_objective"):
        CompressionOptions(int8=True, qat_objective="mimic").validate()


@pytest.mark.slow  # ONNX export (shared fixture) or a full compress run
def test_compress_writes_a_consistent_report_and_a_loadable_artifact(tmp_path, rng):
    model = domain_biased_model(small_config(num_layers=1))
    parent = save_checkpoint(model, tmp_path / "parent", {"app": "test", "vocab": [1, 2]})
    (parent / "labels.txt").write_text("kept")
    examples = make_examples(rng, 16, domain=0)
    options = CompressionOptions(
        domain="a", prune_experts=True, ffn_ratio=0.25, int8=True, explanations=False, latency_repeats=2
    )
    report = compress(parent, tmp_path / "out", options, examples)
    out = tmp_path / "out"
    assert json.loads((out / COMPRESSION_FILE).read_text()) == json.loads(json.dumps(report))
    assert (out / "labels.txt").read_text() == "kept" and not (out / "model.safetensors").exists()
    sizes = report["sizes"]
    assert sizes["parent_safetensors_bytes"] == (parent / "model.safetensors").stat().st_size
    on_disk = {name: (out / name).stat().st_size for name in sizes["artifact_files_bytes"]}
    assert on_disk == sizes["artifact_files_bytes"] and "model.onnx" in on_disk
    assert sizes["size_ratio"] == pytest.approx(
        sizes["artifact_bytes"] / sizes["parent_safetensors_bytes"], 1e-3
    )
    assert report["pruned"]["layers"][0]["experts_kept"] == [0, 1]
    assert report["parameters"]["artifact"] < report["parameters"]["parent"]
    assert set(report["latency"]) == {"batch_1", "batch_64"}
    assert isinstance(report["cpu"]["avx512_vnni"], bool) and report["cpu"]["onnxruntime"]
    loaded, meta = load_checkpoint(out)
    assert isinstance(loaded, OnnxCoreModel) and meta["vocab"] == [1, 2]
    with pytest.raises(ConfigError, match="without its explanation graph"):
        loaded(**collate(examples[:2]).to_dict(), output_attentions=True)
    with pytest.raises(ConfigError, match="nothing to do"):
        compress(parent, tmp_path / "again", CompressionOptions(), examples)


@pytest.mark.slow  # ONNX export (shared fixture)
def test_int8_keeps_routers_fp32_and_einsum_runs_as_matmul(exported):
    import onnx

    _, fp32_dir, int8_dir, _ = exported
    fp32_graph = onnx.load(str(fp32_dir / "model.onnx")).graph
    assert "Einsum" not in {node.op_type for node in fp32_graph.node}  # per-field maps as batched MatMul
    meta = json.loads((int8_dir / "onnx.json").read_text())
    modules = meta["node_modules"]["model.onnx"]
    routers = sorted(n for n, m in modules.items() if m.endswith(".router") or m.endswith(".domain_prior"))
    assert routers and set(routers) <= set(meta["int8_kept_fp32"]["model.onnx"])
    int8_nodes = {node.name: node for node in onnx.load(str(int8_dir / "model.onnx")).graph.node}
    for name in routers:  # left unquantised (a Gemm is rewritten as `<name>_MatMul` + Add by the quantiser)
        node = int8_nodes.get(name) or int8_nodes[f"{name}_MatMul"]
        assert node.op_type in ("Gemm", "MatMul", "Gather")
    quantised = [n for n in int8_nodes.values() if n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger")]
    assert quantised


def test_keep_fp32_patterns_select_nodes_by_module_path():
    from core.onnx_model import _excluded_nodes

    meta = {
        "node_modules": {
            "model.onnx": {
                "n1": "layers.0.ffn.router",
                "n2": "layers.0.ffn.experts.0.w1",
                "n3": "volume_embedder.proj",
                "n4": "volume_embedder.stem.0",
                "n5": "classifier",
            }
        }
    }
    assert _excluded_nodes(meta, "model.onnx", ("*.router",)) == ["n1"]
    assert _excluded_nodes(meta, "model.onnx", ("volume_embedder.*", "classifier")) == ["n3", "n4", "n5"]
    assert _excluded_nodes(meta, "model.onnx", ("volume_embedder",)) == ["n3", "n4"]  # and its sub-modules
    assert _excluded_nodes(meta, "model.onnx", ("layers.1.*",)) == []
    assert _excluded_nodes(meta, "other.onnx", ("*",)) == []


@pytest.mark.slow  # ONNX export (shared fixture) and one quantisation per module group
def test_int8_sensitivity_scans_every_module_group(exported, rng):
    from core.onnx_model import int8_sensitivity, module_groups

    _, fp32_dir, _, _ = exported
    groups = module_groups(fp32_dir)
    assert {"field_embedder", "layers.0.attention", "layers.0.ffn", "classifier"} <= set(groups)
    inputs = collate(make_examples(rng, 8)).to_dict()
    feed = OnnxCoreModel(fp32_dir).graph_feed(inputs)  # targets (token_labels) left out
    errors = int8_sensitivity(fp32_dir, feed)
    assert set(errors) == {*groups, "all"}
    assert all(np.isfinite(e) and e >= 0 for e in errors.values())
    assert errors["all"] > 0 and max(errors.values()) < 0.5  # int8 noise, not a broken graph
    assert int8_sensitivity(fp32_dir, feed, groups={"none": []})["none"] == 0.0
    # One group alone: the same error as in the full scan (deterministic), and a part of "all"'s.
    alone = int8_sensitivity(fp32_dir, feed, groups={"classifier": groups["classifier"]})
    assert alone["classifier"] == errors["classifier"] and alone["all"] == errors["classifier"]


def test_latency_report_times_the_models_in_alternating_blocks_after_an_untimed_forward() -> None:
    calls: list[str] = []

    def recorder(name: str):
        def forward(**inputs):
            calls.append(name)

        return forward

    examples = make_examples(np.random.default_rng(0), 3)
    report = latency_report(recorder("p"), recorder("a"), examples, batch_sizes=(2,), repeats=7, block=3)
    # Blocks of 1 untimed + 3, 3, then 1 timed forward of each model in turn.
    assert "".join(calls) == "ppppaaaappppaaaappaa"
    assert set(report) == {"batch_2"} and report["batch_2"]["speedup"] > 0
    with pytest.raises(ConfigError, match="repeats and block"):
        latency_report(recorder("p"), recorder("a"), examples, repeats=0)


@pytest.mark.parametrize("fields", [1, 3])
def test_per_field_einsum_rewrite_matches_einsum_and_moves_no_axis_for_one_field(fields):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from core.onnx_model import _einsum_as_matmul

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((fields, 4, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "w"], ["y"], equation="btfi,fio->btfo", name="einsum")],
        "per_field",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", fields, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    assert _einsum_as_matmul(graph) == 1
    ops = [node.op_type for node in graph.node]
    assert "Einsum" not in ops and ("Transpose" in ops) == (fields > 1)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, fields, 4)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, np.einsum("btfi,fio->btfo", x, weight), rtol=1e-5, atol=1e-5)


def _make_identity(layer) -> None:
    """Zero what a layer adds to the residual stream: its output is its input."""
    with torch.no_grad():
        layer.attention.o_proj.weight.zero_()
        for module in layer.ffn.modules():
            if module.__class__.__name__ == "SwiGLU":
                module.w2.weight.zero_()


def test_layer_pruning_drops_the_layer_that_changes_nothing_and_renumbers_the_rest(rng):
    model = CoreModel(small_config(num_layers=3, dense_tail_layers=1)).eval()
    _make_identity(model.layers[1])
    examples = make_examples(rng, 8)
    plan = plan_structured_pruning(model, examples, head_ratio=0.25)  # heads: layer ids of the original
    plan, influence = plan_block_pruning(model, examples, layers=1, plan=plan)
    layers = influence["layers"]
    assert layers[1] == pytest.approx(0.0, abs=1e-6) and min(layers[0], layers[2]) > 1e-8
    assert plan.layers == [0, 2]
    pruned = apply_plan(model, plan)
    assert pruned.config.num_layers == 2 and len(pruned.layers) == 2
    assert pruned.config.layer_num_heads == [3, 3]
    # The kept layers keep their attention kind: layer 2 was the dense tail, layer 0 was not.
    assert [layer.attention.always_dense for layer in pruned.layers] == [False, True]
    torch.testing.assert_close(
        pruned.layers[1].attention.q_proj.weight,
        model.layers[2].attention.q_proj.weight.index_select(
            0, torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in plan.heads[2]])
        ),
    )
    heads_only = apply_plan(model, plan_structured_pruning(model, examples, head_ratio=0.25))
    batch = collate(examples)
    with torch.no_grad():  # dropping a layer that adds nothing leaves the outputs as they were
        torch.testing.assert_close(
            pruned(**batch.to_dict()).token_logits, heads_only(**batch.to_dict()).token_logits
        )


def test_dropping_the_dense_tail_keeps_the_other_layers_sparse(rng):
    model = CoreModel(small_config(dense_below=0, dense_tail_layers=1)).eval()
    _make_identity(model.layers[1])
    examples = make_examples(rng, 6)
    plan, _ = plan_block_pruning(model, examples, layers=1)
    pruned = apply_plan(model, plan)
    assert plan.layers == [0] and pruned.config.dense_tail_layers == 0
    assert not pruned.layers[0].attention.always_dense
    batch = collate(examples)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch.to_dict()).logits, model(**batch.to_dict()).logits)
    with pytest.raises(ConfigError, match="layers to drop"):
        plan_block_pruning(model, examples, layers=2)  # at least one layer stays
    with pytest.raises(ConfigError, match="feed-forward blocks to drop"):
        plan_block_pruning(model, examples, layers=1, ffn_blocks=2)  # one layer left, one block


def test_ffn_block_pruning_drops_the_block_that_adds_nothing(tmp_path, rng):
    model = CoreModel(small_config()).eval()
    with torch.no_grad():
        for module in model.layers[0].ffn.modules():
            if module.__class__.__name__ == "SwiGLU":
                module.w2.weight.zero_()  # layer 0's MoE block adds nothing to the residual stream
    examples = make_examples(rng, 8)
    plan, influence = plan_block_pruning(model, examples, ffn_blocks=1)
    assert influence["ffn"][0] == pytest.approx(0.0, abs=1e-6) and influence["ffn"][1] > 1e-8
    assert plan.ffn_dropped == [0] and plan.layers is None
    pruned = apply_plan(model, plan)
    assert pruned.config.layer_has_ffn == [False, True]
    assert pruned.layers[0].ffn is None and pruned.layers[0].ffn_norm is None
    assert len(pruned.moe_layers()) == 1
    assert not [k for k in pruned.state_dict() if k.startswith(("layers.0.ffn.", "layers.0.ffn_norm."))]
    save_checkpoint(pruned, tmp_path / "pruned", {"app": "test"})
    loaded, _ = load_checkpoint(tmp_path / "pruned")
    batch = collate(examples)
    with torch.no_grad():
        out = loaded(**batch.to_dict())
        torch.testing.assert_close(out.token_logits, model(**batch.to_dict()).token_logits)
    assert len(out.router_logits) == 1
    with pytest.raises(ConfigError, match="layer_has_ffn"):
        small_config(layer_has_ffn=[True])  # one entry per layer


def test_compress_drops_a_layer_and_reports_its_influence(tmp_path, rng):
    model = CoreModel(small_config(num_layers=2)).eval()
    _make_identity(model.layers[0])
    parent = save_checkpoint(model, tmp_path / "parent", {"app": "test"})
    options = CompressionOptions(layer_drop=1, measure_latency=False)
    report = compress(parent, tmp_path / "out", options, make_examples(rng, 8))
    step = next(s for s in report["steps"] if s["step"] == "prune_blocks")
    assert step["layers_kept"] == [1] and step["ffn_dropped"] == []
    assert step["block_influence"]["layers"][0] == pytest.approx(0.0, abs=1e-6)
    assert report["pruned"]["layers"] == [{"layer": 0, "dropped": True}, {"layer": 1, "new_index": 0}]
    loaded, _ = load_checkpoint(tmp_path / "out")
    assert loaded.config.num_layers == 1 and loaded.config.dense_tail_layers == 1
    with pytest.raises(ConfigError, match="layer_drop"):
        CompressionOptions(layer_drop=-1).validate()
    with pytest.raises(ConfigError, match="ffn_block_drop"):
        CompressionOptions(ffn_block_drop=-1).validate()
