"""CoreConfig validation and serialisation."""

from __future__ import annotations

import pytest

from core.config import CoreConfig
from core.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
        ({"moe_top_k": 17}, "moe_top_k"),
        ({"n_routed_experts": 0}, "n_routed_experts"),
        ({"balance": "magic"}, "balance"),
        ({"domains": ()}, "domains"),
        ({"domains": ("a", "a")}, "domains"),
        ({"attention_backend": "triton"}, "attention_backend"),
        ({"block_size": 0}, "block_size"),
        ({"top_k_blocks": -1}, "top_k_blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"categorical_fields": {"merchant": 1}}, "categorical_fields"),
        ({"volume_patch_size": (4, 16)}, "volume_patch_size"),
        ({"num_labels": 2, "class_weights": [1.0]}, "class_weights"),
        ({"classification_loss": "hinge"}, "classification_loss"),
    ],
)
def test_invalid_configs_raise_config_error_naming_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=rf"CoreConfig\.{field}.*expected .* got"):
        CoreConfig(**overrides)


def test_unknown_domain_lists_the_known_ones() -> None:
    config = CoreConfig(domains=("finance", "medical"))
    assert config.domain_id("medical") == 1
    with pytest.raises(ConfigError, match=r"known domains: \['finance', 'medical'\]"):
        config.domain_id("retail")


@pytest.mark.parametrize("num_labels", [0, 2, 5])
def test_round_trip_keeps_every_field(tmp_path, num_labels) -> None:
    config = CoreConfig(
        num_labels=num_labels,
        domains=("x", "y"),
        categorical_fields={"merchant": 50},
        numeric_fields=["amount"],
        causal=True,
    )
    config.save_pretrained(tmp_path)
    loaded = CoreConfig.from_pretrained(tmp_path)
    assert loaded.num_labels == num_labels
    assert loaded.domains == ["x", "y"] and loaded.categorical_fields == {"merchant": 50} and loaded.causal
    assert loaded.model_type == "verticals-core"
