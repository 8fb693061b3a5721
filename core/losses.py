"""Loss functions of the core model as pure functions: task losses and the MoE router balancing loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from core.errors import InputValidationError

__all__ = ["classification_loss", "load_balancing_loss", "masked_field_loss", "next_step_loss"]


def load_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    top_k: int,
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer / Mixtral auxiliary load-balancing loss over the routed experts.

    `loss = num_experts * sum_e f_e * P_e`, where `f_e` is the fraction of the top-k token-expert assignments
    that go to expert `e` (the `f_e` sum to 1) and `P_e` is the mean router probability of expert `e`
    (Fedus et al. 2021, eq. 4). Only `P_e` carries a gradient. Perfectly balanced routing gives exactly 1.0,
    routing that concentrates on few experts gives up to `num_experts`; the value is always >= 0. This is
    HF `load_balancing_loss_func` divided by `top_k` (there `f_e` sums to `top_k`), so a coefficient means
    the same for any `top_k`.

    The selection here is the plain top-k of the router probabilities (no aux-free selection bias), as in
    HF Mixtral. The caller adds the result once, scaled by `config.router_aux_loss_coef`.

    Args:
        router_logits: unbiased router logits, (N, num_experts) with N = B * T, or a sequence of such tensors
            (one per MoE layer, each (B * T, num_experts)), pooled over layers.
        top_k: experts selected per token.
        num_experts: number of routed experts.
        attention_mask: optional (B, T) bool/0-1 mask, True/1 = real token; padding tokens are left out of
            both `f_e` and `P_e`. Applied to every layer's logits.

    Returns:
        Scalar float32 tensor >= 0 (zero when there are no logits or no real tokens).

    Raises:
        InputValidationError: logits whose last dimension is not `num_experts`, a `top_k` outside
            [1, num_experts], or an attention mask whose size does not match the logits.
    """
    if isinstance(router_logits, torch.Tensor):
        layers = [router_logits]
    else:
        layers = [logits for logits in router_logits if logits is not None]
    if not layers:
        return torch.zeros(())
    if not 1 <= top_k <= num_experts:
        raise InputValidationError(f"load_balancing_loss: top_k must be in [1, {num_experts}], got {top_k}")
    for logits in layers:
        if logits.dim() != 2 or logits.shape[-1] != num_experts:
            raise InputValidationError(
                f"load_balancing_loss: router_logits must be (N, num_experts={num_experts}), "
                f"got shape {tuple(logits.shape)}"
            )
    device = layers[0].device
    token_weight: torch.Tensor | None = None
    if attention_mask is not None:
        token_weight = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # (N,)
        bad_sizes = sorted({logits.shape[0] for logits in layers if logits.shape[0] != token_weight.numel()})
        if bad_sizes:
            raise InputValidationError(
                f"load_balancing_loss: attention_mask has {token_weight.numel()} tokens but router logits "
                f"have {bad_sizes} rows; pass the (B, T) mask of the batch that produced them"
            )

    # Accumulate layer by layer so memory stays O(N * E) whatever the number of layers.
    assignment_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)  # (E,)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)  # (E,)
    num_tokens = torch.zeros((), dtype=torch.float32, device=device)
    for logits in layers:
        # float32: bf16/fp16 probabilities lose the small differences between experts that this loss averages.
        probs = F.softmax(logits.to(device), dim=-1, dtype=torch.float32)  # (N, E)
        selected = probs.topk(top_k, dim=-1).indices.reshape(-1)  # (N * k,)
        if token_weight is None:
            assignment_weight = torch.ones_like(selected, dtype=torch.float32)  # (N * k,)
            num_tokens = num_tokens + probs.shape[0]
        else:
            assignment_weight = token_weight.repeat_interleave(top_k)  # (N * k,)
            probs = probs * token_weight.unsqueeze(-1)  # (N, E), padding rows zeroed
            num_tokens = num_tokens + token_weight.sum()
        assignment_sum = assignment_sum.scatter_add(0, selected, assignment_weight)
        prob_sum = prob_sum + probs.sum(dim=0)

    num_tokens = num_tokens.clamp_min(1.0)  # no real token: f = P = 0 and the loss is 0
    fraction_routed = assignment_sum / (num_tokens * top_k)  # (E,) f_e, sums to 1
    mean_prob = prob_sum / num_tokens  # (E,) P_e
    return num_experts * torch.sum(fraction_routed * mean_prob)


IGNORE_INDEX = -100


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Cross-entropy or focal loss for sequence (B, C) or per-token (B, T, C) logits.

    Labels equal to -100 are ignored. `config.class_weights` weights classes (imbalanced labels such as
    fraud); `config.classification_loss == "focal"` down-weights easy examples by (1 - p_true)^gamma
    (Lin et al. 2017), with the class weights acting as its alpha.

    Args:
        logits: (B, C) or (B, T, C).
        labels: (B,) or (B, T) class ids.
        config: a `CoreConfig` (reads classification_loss, focal_gamma, class_weights).

    Returns:
        Scalar mean loss over the labelled positions (0 when none is labelled).
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C); float32 for a stable log-softmax
    labels = labels.reshape(-1).long()  # (N,)
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, labels = logits[keep], labels[keep]
    weight = None
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=torch.float32, device=logits.device)
    if config.classification_loss == "ce":
        return F.cross_entropy(logits, labels, weight=weight)
    log_probs = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)  # (N,)
    focal = -((1.0 - log_probs.exp()) ** config.focal_gamma) * log_probs
    if weight is not None:
        alpha = weight[labels]
        return (alpha * focal).sum() / alpha.sum().clamp_min(1e-12)
    return focal.mean()


def next_step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of next-response logits (B, T) against 0/1 labels; labels < 0 are ignored."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float())


def masked_field_loss(
    categorical_logits: dict[str, torch.Tensor],
    numeric_prediction: torch.Tensor | None,
    categorical: dict[str, torch.Tensor],
    numeric: torch.Tensor | None,
    numeric_mask: torch.Tensor | None,
    mfm_mask: torch.Tensor,
) -> torch.Tensor:
    """Reconstruction loss of masked tokens: mean CE over categorical fields + MSE over present numerics.

    Args:
        categorical_logits: field -> (B, T, vocab) predictions.
        numeric_prediction: (B, T, F) predictions or None.
        categorical: field -> (B, T) true ids (0 = padding, never a target).
        numeric: (B, T, F) true values or None.
        numeric_mask: (B, T, F) bool, True where the true value exists.
        mfm_mask: (B, T) bool, the masked tokens.

    Returns:
        Scalar loss (0 when nothing is masked).
    """
    terms: list[torch.Tensor] = []
    for name, logits in categorical_logits.items():
        target = categorical[name].masked_fill(~mfm_mask, IGNORE_INDEX)
        target = target.masked_fill(target == 0, IGNORE_INDEX)  # padding is never a target
        if bool((target != IGNORE_INDEX).any()):
            terms.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)))
    if numeric_prediction is not None and numeric is not None:
        present = mfm_mask[..., None].expand_as(numeric)
        if numeric_mask is not None:
            present = present & numeric_mask
        if bool(present.any()):
            terms.append(F.mse_loss(numeric_prediction[present].float(), numeric[present].float()))
    if not terms:
        return mfm_mask.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()
