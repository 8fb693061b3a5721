"""Suite presets: the shared trunk every app's part uses, the domain expert groups, per-app batch sizes."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from core.errors import ConfigError

SUITE_DOMAINS: tuple[str, ...] = ("finance", "medical", "education")
"""The suite's MoE domains: every token of an app carries its app's id. The order is fixed, whichever apps a
run trains, so that a single-app run has the same architecture as the suite."""

GENERAL_GROUP = "general"
"""Name of the expert group open to every domain (the routed experts in no domain's group)."""

TRUNK: MappingProxyType[str, Any] = MappingProxyType(
    {
        # Width study (bench/suite_bench.py, 15 seeds per run, suite minus own model; README "Suite model"):
        # at width 64 medical trailed its own model by 2.1 points over 30 seeds, a capacity gap shared with
        # two other domains. Width 96 with 240 task steps met every figure over 45 seeds (0-14, 100-114,
        # 200-214: finance +1.7, medical -0.5, education -0.0, no expert under 2%, every domain >= 90% on its
        # group); width 128 did as well on the metrics but missed a routing figure on 2 of its 45 seeds.
        "hidden_size": 96,
        "num_layers": 2,
        "num_heads": 4,
        "ffn_size": 96,
        "use_moe": True,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "moe_top_k": 2,
        "balance": "aux_free",
        # A suite run is a few hundred steps, not DeepSeek-V3's many thousands: a 1e-3 bias step would move
        # the selection bias by at most a few tenths, too little to revive a cold expert within its group.
        # At 1e-2 (balancing within groups, bench/suite_bench.py seeds 5, 6, 8, 9) one expert stayed below 2%
        # of its group on seeds 6 and 8, where the router's logits for it fell faster than the bias rose;
        # at 3e-2 none did on those seeds.
        "bias_update_rate": 3e-2,
        "router_domain_prior": True,
        "domain_group_prior": 4.0,
    }
)
"""CoreConfig fields of the shared trunk (each app keeps its own embedders, heads and attention settings)."""

BATCH_SIZES: MappingProxyType[str, int] = MappingProxyType({"finance": 32, "medical": 8, "education": 16})
"""Examples per batch of each app (one batch of every app per optimizer step)."""


def expert_groups(n_routed_experts: int, domains: tuple[str, ...] = SUITE_DOMAINS) -> dict[str, list[int]]:
    """Equal contiguous groups of routed experts: one per domain, then the general group.

    With 16 experts and three domains: finance 0-3, medical 4-7, education 8-11, general 12-15.

    Raises:
        ConfigError: fewer experts than groups.
    """
    size = n_routed_experts // (len(domains) + 1)
    if size < 1:
        raise ConfigError(
            f"suite: {n_routed_experts} routed experts cannot form {len(domains) + 1} groups "
            f"({', '.join(domains)}, {GENERAL_GROUP}); use at least {len(domains) + 1}"
        )
    return {name: list(range(i * size, (i + 1) * size)) for i, name in enumerate(domains)}


def trunk_overrides(**changes: Any) -> dict[str, Any]:
    """The trunk fields with `changes` applied (unknown names raise `ConfigError`)."""
    unknown = sorted(set(changes) - set(TRUNK))
    if unknown:
        raise ConfigError(f"suite trunk: unknown fields {unknown}; known: {sorted(TRUNK)}")
    return {**TRUNK, **changes}
