"""The question-aware retrieval of the next-step head (`CoreConfig.next_step_retrieval`, `ItemRetrieval`)."""

from __future__ import annotations

import pytest
import torch

from core.config import CoreConfig
from core.errors import ConfigError
from core.model import CoreModel


def make_model(retrieval: bool = True, **overrides) -> CoreModel:
    config = CoreConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        dense_below=0,
        dense_tail_layers=0,
        n_routed_experts=3,
        moe_top_k=2,
        causal=True,
        categorical_fields={"item": 10},
        next_step_vocab=10,
        next_step_retrieval=retrieval,
        **overrides,
    )
    return CoreModel(config).eval()


def batch(length: int = 13) -> dict[str, torch.Tensor]:
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, length - 4 :] = False
    return {
        "attention_mask": mask,
        "categorical": {"item": torch.randint(2, 10, (2, length))},
        "next_item_ids": torch.randint(2, 10, (2, length)),
    }


def test_retrieval_needs_a_causal_model() -> None:
    with pytest.raises(ConfigError, match="next_step_retrieval"):
        CoreConfig(hidden_size=32, num_heads=4, next_step_vocab=10, next_step_retrieval=True)


def test_retrieval_off_keeps_the_head_unchanged() -> None:
    plain, retrieving = make_model(retrieval=False), make_model(retrieval=True)
    assert plain.next_step.retrieval is None
    assert plain.next_step.mlp[0].in_features == 2 * 32
    assert retrieving.next_step.mlp[0].in_features == 3 * 32
    extra = set(retrieving.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("next_step.retrieval.") for key in extra)


@pytest.mark.parametrize("recency_bias", [False, True])
def test_a_prediction_never_depends_on_later_steps(recency_bias: bool) -> None:
    model = make_model(recency_bias=recency_bias)
    inputs = batch()
    changed = {
        "attention_mask": inputs["attention_mask"],
        "categorical": {"item": inputs["categorical"]["item"].clone()},
        "next_item_ids": inputs["next_item_ids"].clone(),
    }
    changed["categorical"]["item"][:, 7:] = torch.randint(2, 10, (2, 6))
    changed["next_item_ids"][:, 7:] = torch.randint(2, 10, (2, 6))
    before = model(**inputs).next_step_logits
    after = model(**changed).next_step_logits
    torch.testing.assert_close(after[:, :7], before[:, :7])


def test_reading_out_every_item_after_a_step_matches_the_in_sequence_logit() -> None:
    model = make_model()
    inputs = batch()
    output = model(**inputs)
    states, step = output.hidden_states, 8
    items = torch.arange(10)[None]  # (1, n_items)
    logits = model.next_step(
        states[1:2, step, None].expand(-1, 10, -1),
        items,
        memory=states[1:2],
        memory_mask=inputs["attention_mask"][1:2],
        query_positions=torch.full((1, 10), step),
    )  # (1, n_items)
    target = inputs["next_item_ids"][1, step]
    torch.testing.assert_close(logits[0, target], output.next_step_logits[1, step])


def test_gradients_flow_through_the_retrieval() -> None:
    model = make_model().train()
    inputs = batch()
    labels = torch.randint(0, 2, (2, 13)).float()
    model(**inputs, next_labels=labels).loss.backward()
    retrieval = model.next_step.retrieval
    for name, parameter in retrieval.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert retrieval.recency_slope.grad.abs().sum() > 0
    assert retrieval.query.weight.grad.abs().sum() > 0


def test_padded_steps_give_finite_logits() -> None:
    model = make_model()
    logits = model(**batch()).next_step_logits
    assert torch.isfinite(logits).all()


def test_onnx_export_refuses_a_retrieval_head(tmp_path) -> None:
    from core.onnx_model import export_onnx

    with pytest.raises(ConfigError, match="next_step_retrieval"):
        export_onnx(make_model(), [], tmp_path)
