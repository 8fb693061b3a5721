"""The suite's routing report: where each domain's routed probability mass goes, balance, unused experts.

Read from `suite.json` (statistics of the validation data of every app, measured on the exported parts):

- mass share: each domain's share of its routed probability mass per expert (rows sum to 1), per layer and
  over all layers (masses summed over layers first);
- on group: the share on the domain's own expert group plus the general experts (the shared experts take
  no routed mass: they see every token);
- load balance: per layer, the max violation `max_e load_e / mean_e load_e - 1` over the assignments of all
  domains' tokens;
- low use: experts with less than `LOW_USE` of their group's assignments (the groups of the trained domains
  and the general group), per layer. Assignments are counted over every domain's validation tokens, so a
  general expert's use is its share of the general group's work on the mix the suite serves (each app's
  data in proportion); the aux-free balancing evens the load for that same mix
  (`SuiteSettings.balance_mix`). The validation data is routed as served (eval mode, no dropout), which
  for finance and education (dropout 0.1) concentrates tokens more than the training passes the balancing
  saw; the suite settles the bias on the served routing of the training data after training
  (`SuiteSettings.settle_steps`, `settle_floor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apps.suite.config import GENERAL_GROUP
from apps.suite.train import read_suite
from core.errors import InputValidationError

LOW_USE = 0.02
"""An expert below this share of its group's assignments counts as unused."""

ON_GROUP_TARGET = 0.80
"""Target share of each domain's routed mass on its own group plus the general experts."""


def _matrix(table: Mapping[str, list[float]], domains: list[str], n_experts: int, what: str) -> np.ndarray:
    rows = []
    for name in domains:
        row = table.get(name)
        if row is None or len(row) != n_experts:
            raise InputValidationError(
                f"suite.json: routing {what} of domain {name!r} missing or not {n_experts} values; "
                "retrain with `verticals suite train`"
            )
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)  # (D, E)


def _shares(values: np.ndarray) -> np.ndarray:
    totals = values.sum(axis=1, keepdims=True)
    return np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)


def _group_of(groups: Mapping[str, list[int]], n_experts: int) -> list[str]:
    owner = [GENERAL_GROUP] * n_experts
    for name, experts in groups.items():
        for e in experts:
            owner[e] = name
    return owner


def _layer_report(
    mass: np.ndarray, counts: np.ndarray, domains: list[str], groups: Mapping[str, list[int]]
) -> dict[str, Any]:
    n_experts = mass.shape[1]
    shares = _shares(mass)  # (D, E)
    general = list(groups.get(GENERAL_GROUP, []))
    on_group = {}
    for d, name in enumerate(domains):
        allowed = sorted(set(groups.get(name, [])) | set(general))
        on_group[name] = float(shares[d, allowed].sum())
    load = counts.sum(axis=0)  # (E,) assignments of every domain's tokens
    violation = float(load.max() / load.mean() - 1.0) if load.sum() > 0 else 0.0
    low_use = []
    for group, experts in groups.items():
        if group != GENERAL_GROUP and group not in domains:
            continue  # the group of an app this run did not train has no traffic to share out
        total = load[experts].sum()
        for e in experts:
            share = float(load[e] / total) if total > 0 else 0.0
            if share < LOW_USE:
                low_use.append({"expert": int(e), "group": group, "share_in_group": share})
    return {
        "mass_share": {name: shares[d].tolist() for d, name in enumerate(domains)},
        "on_group_share": on_group,
        "load": load.tolist(),
        "max_violation": violation,
        "low_use_experts": low_use,
        "expert_group": _group_of({k: v for k, v in groups.items() if k != GENERAL_GROUP}, n_experts),
    }


def routing_report(model_dir: str | Path) -> dict[str, Any]:
    """The routing report of a suite directory (see the module docstring).

    Returns:
        {"domains", "expert_groups", "n_experts", "layers": [per-layer report], "all_layers": report over
        the layers' summed statistics, "checks": {"on_group_min", "on_group_target", "low_use_count",
        "max_violation"}}. A per-layer report holds "mass_share" (domain -> E shares summing to 1),
        "on_group_share" (domain -> share), "load" (E assignments), "max_violation", "low_use_experts"
        ([{"expert", "group", "share_in_group"}]) and "expert_group" (E group names).

    Raises:
        InputValidationError: not a suite directory, or routing statistics missing or malformed.
    """
    suite = read_suite(model_dir)
    domains = list(suite.get("domains", []))
    groups = {name: [int(e) for e in experts] for name, experts in suite.get("expert_groups", {}).items()}
    layers = suite.get("routing", {}).get("layers", [])
    n_experts = int(suite.get("trunk", {}).get("n_routed_experts", 0))
    if not domains or not layers or n_experts < 1:
        raise InputValidationError(
            f"{model_dir}: suite.json holds no routing statistics; retrain with `verticals suite train`"
        )
    reports, total_mass, total_counts = [], 0.0, 0.0
    for layer in layers:
        mass = _matrix(layer.get("mass", {}), domains, n_experts, "mass")
        counts = _matrix(layer.get("counts", {}), domains, n_experts, "counts")
        reports.append(_layer_report(mass, counts, domains, groups))
        total_mass, total_counts = total_mass + mass, total_counts + counts
    overall = _layer_report(total_mass, total_counts, domains, groups)
    return {
        "model_dir": str(model_dir),
        "domains": domains,
        "expert_groups": groups,
        "n_experts": n_experts,
        "layers": reports,
        "all_layers": overall,
        "checks": {
            "on_group_min": min(min(r["on_group_share"].values()) for r in reports),
            "on_group_target": ON_GROUP_TARGET,
            "low_use_threshold": LOW_USE,
            "low_use_count": sum(len(r["low_use_experts"]) for r in reports),
            "max_violation": max(r["max_violation"] for r in reports),
        },
    }


def heatmap_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows (domain, expert, group, share) of the all-layers mass shares, for a heat map."""
    overall = report["all_layers"]
    rows = []
    for domain, shares in overall["mass_share"].items():
        for expert, share in enumerate(shares):
            rows.append(
                {
                    "domain": domain,
                    "expert": expert,
                    "group": overall["expert_group"][expert],
                    "share": float(share),
                }
            )
    return rows
