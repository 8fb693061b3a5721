"""Knowledge-tracing presets (CoreConfig builders), the token fields, and the recommendation thresholds.

A token of the interaction sequence carries four categorical fields (index 0 is padding, 1 the unknown
bucket / the start token):

| field | vocabulary | meaning |
|---|---|---|
| `item` | item vocabulary | the question answered |
| `skill` | skill vocabulary | its (first) skill |
| `interaction` | 2 x skill vocabulary | skill x response, `2 * skill_index + correct` (DKT's input token) |
| `response` | 4 | 2 = wrong, 3 = correct (1 on the start token) |

plus the time since the student's previous answer (`time_delta`). The next-step head scores the item of
the next answer (`next_step_vocab` = item vocabulary).

The `practice` preset adds DKT-forget-style practice features of the item to predict (`PRACTICE_FIELDS`:
earlier attempts on its skills, past success rate, steps since the latest attempt, whether that attempt
was correct; `encode.practice_features`) to the next-step head (`next_step_feature_buckets`), and with
`practice_tokens` (on in that preset) gives each history token its own answer's features as extra
categorical fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.config import CoreConfig
from core.errors import ConfigError

FIELDS: tuple[str, ...] = ("item", "skill", "interaction", "response")
RESPONSE_VOCAB = 4
START_INDEX = 1
"""Every categorical field of the start token (before a student's first answer) uses this index."""

PRACTICE_FIELDS: tuple[str, ...] = ("practice_attempts", "practice_success", "practice_gap", "practice_last")
PRACTICE_BUCKETS: tuple[int, ...] = (10, 12, 10, 4)
"""Bucket counts of the practice features (index 0 padding, 1 "never practised"): attempts 1 + log2
buckets, success 2 + tenths of the smoothed rate, gap 2 + log2 buckets of the steps, last 2 + response."""

MASTERY_THRESHOLD = 0.7
"""Predicted mastery at which a skill counts as mastered (prerequisite checks, gaps)."""

PREREQUISITE_THRESHOLD = 0.8
"""Predicted mastery every prerequisite of a recommended skill needs (unless the student demonstrated it,
see MASTERY_EVIDENCE): a margin above MASTERY_THRESHOLD, because predicted mastery is an estimate
(bench/education_recommend_bench.py measures how often the true state of a prerequisite was still
unmastered). Chosen with MASTERY_EVIDENCE and TARGET_BAND on simulated learners of seeds outside the
benchmark's."""

MASTERY_EVIDENCE: tuple[int, int] = (3, 5)
"""(N, M): a skill counts as demonstrated when N of the student's last M answers on it are correct; a
demonstrated skill counts as a mastered prerequisite and ranks after the other target skills."""

RECENT_PRACTICE = 2
"""Recommendations prefer skills practised less often among this many last answers (interleaving)."""

TARGET_BAND: tuple[float, float] = (0.4, 0.85)
"""Predicted success of a recommended item: hard enough to learn from, easy enough to succeed. On the
simulated learners' tuning seeds a floor of 0.4 rather than 0.6 raised the gain over a random recommender
by about 0.1x: students with weak gap skills get items on them."""


@dataclass(frozen=True)
class TrainingPreset:
    """Training knobs of a preset (passed to `core.train.default_training_args`)."""

    pretrain_epochs: float
    task_epochs: float
    learning_rate: float
    batch_size: int
    maxlen: int


_WIDE = dict(
    hidden_size=128,
    num_layers=2,
    num_heads=8,
    ffn_size=128,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_top_k=2,
)

PRESETS: dict[str, dict[str, Any]] = {
    # A model that trains in about a minute on 2 CPU cores (demo, tests).
    "small": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        ffn_size=64,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_top_k=2,
        dropout=0.1,
    ),
    # Twice small's width, with AKT's two ingredients from the core: a learned per-head recency decay in
    # every attention layer (`recency_bias`) and a next-step head in which the item to predict attends over
    # the history (`next_step_retrieval`). Chosen on the validation folds of ASSISTments 2015 and 2009
    # (bench/education_bench.py; bench/results/education_kt_ablation.md).
    "retrieval": dict(_WIDE, dropout=0.1, recency_bias=True, next_step_retrieval=True),
    # `retrieval` plus DKT-forget-style practice features (Nagatani et al. 2019; see PRACTICE_FIELDS): those
    # of the item to predict in the next-step head, and each history token's own as extra fields. Chosen
    # on validation folds of ASSISTments 2015 and 2009 (bench/results/education_kt_ablation.md).
    "practice": dict(
        _WIDE,
        dropout=0.1,
        recency_bias=True,
        next_step_retrieval=True,
        next_step_feature_buckets=PRACTICE_BUCKETS,
        practice_tokens=True,
    ),
    # The benchmark model (ASSISTments).
    "bench": dict(_WIDE, dropout=0.2),
}

TRAINING: dict[str, TrainingPreset] = {
    "small": TrainingPreset(
        pretrain_epochs=1.0, task_epochs=15.0, learning_rate=3e-3, batch_size=16, maxlen=200
    ),
    "retrieval": TrainingPreset(
        pretrain_epochs=1.0, task_epochs=8.0, learning_rate=2e-3, batch_size=16, maxlen=200
    ),
    "practice": TrainingPreset(
        pretrain_epochs=1.0, task_epochs=8.0, learning_rate=2e-3, batch_size=16, maxlen=200
    ),
    "bench": TrainingPreset(
        pretrain_epochs=1.0, task_epochs=6.0, learning_rate=1e-3, batch_size=64, maxlen=200
    ),
}


def knowledge_tracing_config(
    n_items: int, n_skills: int, *, preset: str = "small", **overrides: Any
) -> CoreConfig:
    """A causal `CoreConfig` for knowledge tracing over the given vocabularies.

    Args:
        n_items: Item vocabulary size (incl. padding and unknown), `len(item_vocab)`.
        n_skills: Skill vocabulary size (incl. padding and unknown), `len(skill_vocab)`.
        preset: `"small"` (demo, tests), `"retrieval"`, `"practice"` (ASSISTments benchmark choices) or
            `"bench"`.
        **overrides: Any `CoreConfig` field (e.g. `hidden_size=32` in tests), or `practice_tokens=True`:
            the tokens also carry their answer's practice features (`PRACTICE_FIELDS`).

    Returns:
        The config: causal attention, the four categorical fields, time gaps, a next-step head over items.

    Raises:
        ConfigError: Unknown preset or vocabularies too small.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}.")
    if n_items < 3 or n_skills < 3:
        raise ConfigError(
            f"vocabularies must hold at least one id besides padding and unknown; got {n_items} items, "
            f"{n_skills} skills."
        )
    values = dict(
        PRESETS[preset],
        causal=True,
        use_moe=True,
        categorical_fields={
            "item": n_items,
            "skill": n_skills,
            "interaction": 2 * n_skills,
            "response": RESPONSE_VOCAB,
        },
        use_time_delta=True,
        next_step_vocab=n_items,
        block_size=64,
        dense_below=512,
    )
    values.update(overrides)
    if values.pop("practice_tokens", False):
        values["categorical_fields"] = {
            **values["categorical_fields"],
            **dict(zip(PRACTICE_FIELDS, PRACTICE_BUCKETS, strict=True)),
        }
    return CoreConfig(**values)
