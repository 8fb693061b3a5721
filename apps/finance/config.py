"""Finance presets: the CoreConfig of the fraud model, history window, label delay and alerting defaults."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apps.finance.schema import CHANNELS
from core.config import CoreConfig

CATEGORICAL_FIELDS: tuple[str, ...] = ("merchant", "category", "channel", "country")
"""Token fields, in the order of the encoded id columns (canonical columns merchant_id, merchant_category,
channel, country)."""

NUMERIC_FIELDS: tuple[str, ...] = (
    "log_amount",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "amount_vs_account",
    "merchant_risk_1d",
    "merchant_risk_7d",
    "merchant_risk_30d",
    "merchant_risk_all",
    "merchant_log_count_1d",
    "merchant_log_count_7d",
    "merchant_log_count_30d",
    "account_log_count_1d",
    "account_log_count_7d",
    "account_log_count_30d",
    "amount_vs_account_1d",
    "amount_vs_account_7d",
    "amount_vs_account_30d",
)
"""Numeric fields of each transaction token (standardised with training statistics, see `encode`)."""

ACCOUNT_WINDOWS_DAYS: tuple[float, ...] = (1.0, 7.0, 30.0)
"""Windows of the account spending features (`account_log_count_*`, `amount_vs_account_*`)."""

DOMAINS: tuple[str, ...] = ("other", *CHANNELS)
"""MoE domains: the channel of each transaction (values outside `CHANNELS` route as "other")."""

HISTORY_WINDOW = 64
"""K: tokens per model window. Each transaction is scored with between K/2 and K-1 earlier transactions
of its account (fewer only at the start of the account)."""

LABEL_DELAY_DAYS = 7.0
"""A transaction's fraud label becomes known this many days after it (merchant risk uses only those)."""

TARGET_PRECISION = 0.5
"""Default threshold rule: the lowest score threshold whose validation precision reaches this."""

MAX_VOCABULARY = 50_000
"""Most frequent values kept per categorical field (the rest map to the unknown id 1)."""


def fraud_config(
    vocab_sizes: Mapping[str, int],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    history_window: int = HISTORY_WINDOW,
    class_weights: Sequence[float] | None = None,
    classification_loss: str = "ce",
    use_moe: bool = False,
    **overrides: Any,
) -> CoreConfig:
    """The fraud model preset: causal, one fraud logit pair per transaction token, small enough for a CPU.

    Args:
        vocab_sizes: categorical field -> vocabulary size (including 0 pad and 1 unknown).
        hidden_size: width of the model.
        num_layers: encoder layers.
        num_heads: attention heads.
        history_window: K, tokens per window (attention stays on the exact dense path below it).
        class_weights: loss weights (genuine, fraud), or None.
        classification_loss: "ce" or "focal".
        use_moe: DomainMoE routed by channel (True) or a dense FFN.
        **overrides: any other CoreConfig field.

    Returns:
        The CoreConfig.
    """
    settings: dict[str, Any] = dict(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        ffn_size=hidden_size,
        dense_ffn_size=2 * hidden_size,
        dropout=0.1,
        block_size=history_window,
        dense_below=history_window + 1,
        dense_below_gpu=history_window + 1,
        causal=True,
        use_moe=use_moe,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_top_k=2,
        domains=DOMAINS,
        categorical_fields={name: int(vocab_sizes[name]) for name in CATEGORICAL_FIELDS},
        numeric_fields=NUMERIC_FIELDS,
        numeric_frequencies=4,
        use_time_delta=True,
        num_labels=2,
        # The pooled logits are the last token's: the real-time path reads a window's score from them.
        classifier_pooling="last",
        classification_loss=classification_loss,
        class_weights=list(class_weights) if class_weights is not None else None,
    )
    settings.update(overrides)
    return CoreConfig(**settings)
