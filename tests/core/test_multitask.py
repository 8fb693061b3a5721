"""Shared-trunk multi-task models: tying, the round-robin data, exporting a task, and expert-group priors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import CoreConfig
from core.data import collate
from core.errors import ConfigError
from core.model import CoreModel
from core.multitask import MultiTaskModel, RoundCollator, RoundRobinDataset, export_task_model
from core.train import TaskCollator

DOMAINS = ("a", "b")


def _config(**changes) -> CoreConfig:
    values = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        n_routed_experts=6,
        moe_top_k=2,
        domains=DOMAINS,
        domain_expert_groups={"a": [0, 1], "b": [2, 3]},
        dense_below=64,
        categorical_fields={"x": 10},
        num_labels=2,
    )
    values.update(changes)
    return CoreConfig(**values)


def _examples(n: int, length: int, domain: int, rng: np.random.Generator) -> list[dict]:
    return [
        {
            "categorical": {"x": rng.integers(2, 10, length)},
            "domain_ids": np.int64(domain),
            "labels": int(rng.integers(0, 2)),
        }
        for _ in range(n)
    ]


def test_expert_groups_initialise_the_router_prior():
    model = CoreModel(_config(domain_group_prior=3.0))
    prior = model.layers[0].ffn.domain_prior.weight
    assert prior[0].tolist() == [0.0, 0.0, -3.0, -3.0, 0.0, 0.0]  # own group + general experts 4, 5
    assert prior[1].tolist() == [-3.0, -3.0, 0.0, 0.0, 0.0, 0.0]
    assert CoreModel(_config(domain_expert_groups=None)).layers[0].ffn.domain_prior.weight.abs().sum() == 0


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ({"c": [0]}, "keys among domains"),
        ({"a": [0, 1], "b": [1]}, "in no other group"),
        ({"a": [9]}, "distinct"),
    ],
)
def test_invalid_expert_groups_are_rejected(groups, match):
    with pytest.raises(ConfigError, match=match):
        _config(domain_expert_groups=groups)


def test_tied_trunk_is_one_set_of_parameters():
    first, second = CoreModel(_config()), CoreModel(_config(causal=True, categorical_fields={"x": 5, "y": 3}))
    model = MultiTaskModel({"one": first, "two": second})
    assert second.layers[1].ffn is first.layers[1].ffn
    assert second.layers[0].attention.q_proj is first.layers[0].attention.q_proj
    assert second.layers[0].attention.gating_factor is first.layers[0].attention.gating_factor
    assert second.layers[0].attention.causal and not first.layers[0].attention.causal
    trunk = sum(p.numel() for n, p in first.named_parameters() if n.startswith(("layers.", "final_norm")))
    own = sum(
        p.numel()
        for m in (first, second)
        for n, p in m.named_parameters()
        if not n.startswith(("layers.", "final_norm"))
    )
    assert sum(p.numel() for p in model.parameters()) == trunk + own


def test_trunk_fields_must_agree():
    with pytest.raises(ConfigError, match="n_routed_experts"):
        MultiTaskModel({"one": CoreModel(_config()), "two": CoreModel(_config(n_routed_experts=8))})


def test_rounds_hold_one_batch_per_task_and_train(rng):
    models = {"one": CoreModel(_config()), "two": CoreModel(_config(causal=True))}
    data = RoundRobinDataset(
        {"one": _examples(10, 6, 0, rng), "two": _examples(3, 9, 1, rng)}, {"one": 4, "two": 2}, seed=0
    )
    assert len(data) == 3  # ceil(10 / 4) rounds; task "two" (2 batches) starts over
    batch = RoundCollator({"one": TaskCollator(), "two": TaskCollator()})([data[2]])
    assert batch["task_batches"]["one"]["labels"].shape == (2,)
    model = MultiTaskModel(models)
    out = model(**batch)
    out.loss.backward()
    assert models["two"].layers[0].ffn.router.weight.grad is not None
    assert models["one"].field_embedder.categorical["x"].weight.grad is not None


def test_exported_task_model_equals_the_task_inside_the_trunk(rng):
    models = {"one": CoreModel(_config()), "two": CoreModel(_config())}
    MultiTaskModel(models).eval()
    with torch.no_grad():
        for moe in models["two"].moe_layers():
            moe.domain_prior.weight.normal_()  # a learned, domain-specific prior
    task_config = _config(domains=("x", "y", "z"), domain_expert_groups=None)
    exported = export_task_model(models["two"], task_config, domain_id=1)
    examples = _examples(4, 7, 1, rng)
    local = [{**e, "domain_ids": rng.integers(0, 3, 7)} for e in examples]  # the task's own domain ids
    with torch.no_grad():
        inside = models["two"](**collate(examples).to_dict()).logits
        alone = exported(**collate(local).to_dict()).logits
    torch.testing.assert_close(alone, inside)
    assert all(int(m.domain_expert_counts.sum()) > 0 for m in exported.moe_layers())
    with pytest.raises(ConfigError, match="domain_id 5"):
        export_task_model(models["two"], task_config, domain_id=5)


def test_a_task_transform_applies_to_that_task_only_and_leaves_the_stored_examples():
    examples = {"a": [{"x": np.float32(i)} for i in range(4)], "b": [{"x": np.float32(i)} for i in range(4)]}
    dataset = RoundRobinDataset(
        examples, {"a": 2, "b": 2}, seed=0, transforms={"a": lambda e: {**e, "x": e["x"] + 100}}
    )
    for index in range(len(dataset)):
        item = dataset[index]
        assert all(e["x"] >= 100 for e in item["a"])
        assert all(e["x"] < 100 for e in item["b"])
    assert [e["x"] for e in examples["a"]] == [0, 1, 2, 3]
