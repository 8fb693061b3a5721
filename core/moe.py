"""DomainMoE: shared + routed SwiGLU experts behind a domain-prior router, with aux-free load balancing.

Read top to bottom: `SwiGLU` (one expert, also the dense FFN), `DomainMoE` (router, sorted dispatch,
balancing and per-domain routing statistics), then the training hooks `update_all_balance` and
`MoEBalanceCallback` that apply the DeepSeek-V3 bias update once per optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from core.config import CoreConfig
from core.errors import InputValidationError

__all__ = [
    "BALANCE_LOAD_SOURCES",
    "DenseFFN",
    "DomainMoE",
    "MoEBalanceCallback",
    "SwiGLU",
    "captured_router_logits",
    "serving_load_pass",
    "update_all_balance",
]

logger = logging.getLogger(__name__)

_TINY = torch.finfo(torch.float32).tiny


BALANCE_LOAD_SOURCES = ("train", "serving")
"""Which forward passes the aux-free balancing counts (`DomainMoE.set_balance_load_source`).

- "train": the training forward passes (train mode: with dropout), the default.
- "serving": only passes inside `serving_load_pass` (eval mode, no dropout): the routing the model serves.
  With dropout, a token's router input in training is a noisy, rescaled copy of the one it has when served,
  so training spreads tokens over more experts than serving does; an expert that the training load keeps
  busy can then get almost nothing once served.
"""


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in: the autocast dtype inside autocast, else its own."""
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def _grouped_mm(inputs: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of `inputs` (M, K) times `weights[e]` (K, N) for every group e."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(inputs, weights, offs=offsets)


def _grouped_mm_usable(tensor: torch.Tensor) -> bool:
    """Grouped GEMMs pay off on CUDA in bf16 (one kernel instead of a launch and a host sync per expert)."""
    return tensor.device.type == "cuda" and _compute_dtype(tensor) == torch.bfloat16


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block `w2(silu(w1 x) * w3 x)` without biases (Shazeer 2020).

    Used for every routed and shared expert of `DomainMoE` and, at width `config.dense_ffn_size`, as the
    dense FFN of a layer when `config.use_moe` is False.

    Args:
        hidden_size: input and output width.
        ffn_size: hidden width of the gate/up projections.
    """

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)  # gate
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False)  # up
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)  # down

    def forward(self, hidden_states: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block to the last dimension.

        Args:
            hidden_states: (..., hidden_size).
            scale: optional (..., 1) per-token factor. Because `w2` is linear, scaling the hidden activation
                equals scaling the output; `DomainMoE` passes its combine weights here, which costs a pass
                over `ffn_size` values per token instead of `hidden_size`.

        Returns:
            (..., hidden_size).
        """
        activation = self.w3(hidden_states)  # (..., F)
        if scale is not None:
            activation = activation * scale.to(activation.dtype)  # (..., F)
        return self.w2(F.silu(self.w1(hidden_states)) * activation)


#: The dense FFN of a layer without MoE: `DenseFFN(config.hidden_size, config.dense_ffn_size)`.
DenseFFN = SwiGLU


class DomainMoE(nn.Module):
    """Mixture of SwiGLU experts: always-on shared experts plus top-k routed experts with a domain prior.

    Router logits are a bias-free linear map of the token plus, when `config.router_domain_prior`, a learned
    per-domain prior (`nn.Embedding(num_domains, n_routed_experts)`, zero at start). The top-k experts are
    chosen on `logits + expert_bias`; the bias (DeepSeek-V3 auxiliary-loss-free balancing) only steers the
    choice, while the combine weights are the unbiased softmax probabilities of the chosen experts,
    renormalised to sum to 1. Token-expert assignments are sorted by expert and every expert runs on its
    own contiguous slice only, so the routed compute is `top_k / n_routed_experts` of a dense evaluation.

    The `n_shared_experts` shared experts are stored fused as one SwiGLU of width
    `n_shared_experts * ffn_size`, which is exactly the sum of that many experts of width `ffn_size`
    (as in DeepSeek-V2/V3).

    Balancing (`config.balance`):
        - "aux_free": in training mode, forward counts the tokens each routed expert receives
          (`expert_load`); `update_balance()` (once per optimizer step, see `MoEBalanceCallback`) moves
          `expert_bias` by `bias_update_rate * sign(mean_load - load_e)` and resets the counts. The load is
          that of the tokens trained on, or with `set_balance_mix` each domain's shares averaged over a
          given mix of the domains (the mix the model serves). With `set_balance_load_source("serving")`
          only the passes inside `serving_load_pass` (eval mode, as served) are counted instead. After
          training, `settle_bias` settles the bias on a fixed set of served tokens with the router fixed.
        - "aux_loss": nothing here; the model adds `core.losses.load_balancing_loss(router_logits, ...)`
          once, scaled by `config.router_aux_loss_coef`.
        - "none": nothing.

    Routing statistics (telemetry and expert pruning): while `track_routing` is True (the default, in both
    training and eval) forward adds, per domain, the number of tokens routed to each expert
    (`domain_expert_counts`) and the summed router probabilities (`domain_expert_mass`) of real tokens.
    Both are saved with the model; read them with `routing_stats()`, clear them with `reset_routing_stats()`.

    Args:
        config: reads `hidden_size`, `ffn_size`, `n_routed_experts`, `n_shared_experts`, `moe_top_k`,
            `num_domains`, `router_domain_prior`, `balance` and `bias_update_rate`.
    """

    expert_bias: torch.Tensor
    expert_load: torch.Tensor
    domain_load: torch.Tensor
    domain_expert_counts: torch.Tensor
    domain_expert_mass: torch.Tensor
    _FLOAT32_BUFFERS = ("expert_bias", "domain_expert_mass")

    def __init__(self, config: CoreConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        # Expert and FFN pruning (`core.compress`) give each layer its own expert count and widths.
        self.num_experts = config.experts_in_layer(layer_idx)
        self.num_shared_experts = config.n_shared_experts
        self.top_k = config.moe_top_k
        self.num_domains = config.num_domains
        self.balance = config.balance
        self.bias_update_rate = config.bias_update_rate
        self.track_routing = True
        #: "auto" (grouped GEMMs on CUDA in bf16, the per-expert loop elsewhere), "grouped" or "loop".
        self.dispatch = "auto"
        #: None: aux-free balancing moves every expert towards the mean load of all experts. Else lists of
        #: expert ids (see `set_balance_groups`): each expert also moves towards its group's mean load.
        self.balance_groups: list[list[int]] | None = None
        self.balance_global = True
        #: Apply the aux-free update at every `balance_every`-th `update_balance()` call, on the loads summed
        #: since the last one (e.g. once per round when the optimizer steps take one domain's batch each).
        self.balance_every = 1
        self._balance_calls = 0
        #: None: the aux-free load counts every assignment alike, so it is the mix of the batches trained on.
        #: Else one weight per domain (see `set_balance_mix`): the load is each domain's per-assignment
        #: shares over the experts, averaged with these weights (the mix the model is balanced for).
        self.balance_mix: tuple[float, ...] | None = None
        #: Domain id -> (its expert group, the share of its assignments that group should get); see
        #: `set_balance_targets`. Empty: none.
        self.balance_targets: dict[int, tuple[list[int], float]] = {}
        #: One of `BALANCE_LOAD_SOURCES`; see `set_balance_load_source`.
        self.balance_load_source = "train"
        #: True inside `serving_load_pass`.
        self.in_serving_pass = False

        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.domain_prior: nn.Embedding | None = None
        # Initial prior of `config.domain_expert_groups` (None: no preference); only for unpruned layers,
        # whose expert ids are the ones the groups name.
        prior_init = config.domain_prior_init()
        self._domain_prior_init = prior_init if self.num_experts == config.n_routed_experts else None
        if config.router_domain_prior:
            self.domain_prior = nn.Embedding(self.num_domains, self.num_experts)
            self.reset_domain_prior()
        expert_sizes = (config.hidden_size, config.ffn_size_in_layer(layer_idx))
        self.experts = nn.ModuleList(SwiGLU(*expert_sizes) for _ in range(self.num_experts))
        self.shared_experts: SwiGLU | None = None
        if self.num_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.shared_ffn_size_in_layer(layer_idx))

        # Selection-only bias, float32 whatever the model dtype (see `_apply`): 1e-3 steps vanish in bf16.
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Tokens per expert since the last `update_balance()`; integer so `.to(dtype)` never rounds it.
        self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        # The same per domain, kept only while `balance_mix` or `balance_targets` is set.
        self.register_buffer(
            "domain_load", torch.zeros(self.num_domains, self.num_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "domain_expert_counts", torch.zeros(self.num_domains, self.num_experts, dtype=torch.long)
        )
        self.register_buffer(
            "domain_expert_mass", torch.zeros(self.num_domains, self.num_experts, dtype=torch.float32)
        )

    @torch.no_grad()
    def reset_domain_prior(self) -> None:
        """Set the router prior to its initial value: the expert-group prior of the config, else zero."""
        if self.domain_prior is None:
            return
        if self._domain_prior_init is None:
            nn.init.zeros_(self.domain_prior.weight)
            return
        weight = self.domain_prior.weight
        weight.copy_(torch.tensor(self._domain_prior_init, dtype=weight.dtype, device=weight.device))

    def _keep_float32_buffers(self) -> None:
        # The bias moves in steps of ~1e-3 and the mass is a long running sum: both stall in bf16/fp16.
        for name in self._FLOAT32_BUFFERS:
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()

    def _apply(self, fn: Any, recurse: bool = True) -> DomainMoE:
        """Let `.to(dtype)`, `.half()`, `.bfloat16()` cast the weights; the balancing state stays float32."""
        super()._apply(fn, recurse)
        self._keep_float32_buffers()
        return self

    # ------------------------------------------------------------------ routing

    def route(
        self, hidden_states_flat: torch.Tensor, domain_ids_flat: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose the top-k routed experts of every token and their combine weights.

        Args:
            hidden_states_flat: (N, hidden_size) tokens.
            domain_ids_flat: (N,) integer domain id per token, or None for domain 0.

        Returns:
            topk_idx: (N, top_k) long, distinct expert ids per token, chosen on logits + `expert_bias`.
            topk_weight: (N, top_k) combine weights in the dtype of the input, summing to 1 per token
                (unbiased probabilities of the chosen experts, renormalised).
            router_logits: (N, n_routed_experts) unbiased logits incl. the domain prior (input dtype).
            probs: (N, n_routed_experts) float32 softmax of `router_logits`.
        """
        router_logits = self.router(hidden_states_flat)  # (N, E)
        if self.domain_prior is not None:
            if domain_ids_flat is None:
                router_logits = router_logits + self.domain_prior.weight[0]  # (N, E)
            else:
                router_logits = router_logits + self.domain_prior(domain_ids_flat).to(router_logits.dtype)
        # Softmax in float32: in fp16 exp() overflows for large logits and bf16 keeps ~3 significant digits,
        # so the renormalised combine weights and the summed routing mass would carry visible rounding error.
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (N, E)
        with torch.no_grad():
            # The bias acts in logit space (a factor exp(b_e) on each probability). Added to softmax
            # probabilities it would swamp the near-zero probabilities of cold experts: the choice among
            # them would ignore the token and the load would swing between them from step to step.
            selection_scores = router_logits.float() + self.expert_bias  # (N, E)
            topk_idx = selection_scores.topk(self.top_k, dim=-1).indices  # (N, k)
        topk_weight = probs.gather(1, topk_idx)  # (N, k)
        # If the bias forced a choice of experts whose probabilities underflow, the weights become 0, not NaN.
        topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True).clamp_min(_TINY)  # (N, k)
        return topk_idx, topk_weight.to(hidden_states_flat.dtype), router_logits, probs

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared experts on every token plus the weighted top-k routed experts on the real tokens.

        Args:
            hidden_states: (B, T, hidden_size).
            domain_ids: (B, T) or (B,) (one domain per sequence) integer ids indexing `config.domains`,
                or None (every token is domain 0).
            attention_mask: optional (B, T) bool, True = real token. Padding tokens are not routed, not
                counted in any statistic, and their output is the shared-expert output (zero without one).

        Returns:
            hidden_states: (B, T, hidden_size).
            router_logits: (B * T, n_routed_experts) unbiased router logits (incl. the domain prior), for
                `core.losses.load_balancing_loss`.

        Raises:
            InputValidationError: hidden states that are not (B, T, hidden_size), or domain ids / attention
                mask of the wrong shape, or (on CPU tensors) domain ids outside [0, num_domains).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise InputValidationError(
                f"DomainMoE: hidden_states must be (B, T, hidden_size={self.hidden_size}), "
                f"got shape {tuple(hidden_states.shape)}"
            )
        batch_size, seq_len, hidden_size = hidden_states.shape
        hidden_states_flat = hidden_states.reshape(-1, hidden_size)  # (N, H), N = B * T
        domain_ids_flat = self._flatten_domain_ids(domain_ids, batch_size, seq_len, hidden_states.device)
        real_flat = self._flatten_attention_mask(attention_mask, batch_size, seq_len, hidden_states.device)

        topk_idx, topk_weight, router_logits, probs = self.route(hidden_states_flat, domain_ids_flat)
        flat_expert = topk_idx.reshape(-1)  # (N * k,) assignment a belongs to token a // k
        if real_flat is not None:
            # Padding assignments get the sentinel id E: they sort after every real one, are never run and
            # fall out of every count.
            flat_expert = flat_expert.masked_fill(~real_flat.repeat_interleave(self.top_k), self.num_experts)
        if torch.compiler.is_exporting():
            # torch.export / ONNX: no host sync and no statistics (inference graphs only).
            output = self._dispatch_export(hidden_states_flat, flat_expert, topk_weight)
            return output.reshape(batch_size, seq_len, hidden_size), router_logits
        expert_counts = torch.bincount(flat_expert, minlength=self.num_experts + 1)  # (E + 1,)
        expert_counts = expert_counts[: self.num_experts]  # (E,) real assignments per expert
        self._record_routing(flat_expert, expert_counts, probs, domain_ids_flat, real_flat)
        output = self._dispatch(hidden_states_flat, flat_expert, topk_weight, expert_counts)
        return output.reshape(batch_size, seq_len, hidden_size), router_logits  # (B, T, H), (N, E)

    def _shared_output(self, hidden_states_flat: torch.Tensor) -> torch.Tensor:
        """(N, H) output of the shared experts on every token, zeros without shared experts."""
        if self.shared_experts is not None:
            return self.shared_experts(hidden_states_flat)
        return torch.zeros_like(hidden_states_flat)

    def _dispatch(
        self,
        hidden_states_flat: torch.Tensor,
        flat_expert: torch.Tensor,
        topk_weight: torch.Tensor,
        expert_counts: torch.Tensor,
    ) -> torch.Tensor:
        """Sorted dispatch: each routed expert runs once on the contiguous slice of tokens that chose it.

        On CUDA in bf16 the experts run as three grouped GEMMs (`grouped_dispatch`) with no host sync;
        elsewhere as a loop over the experts, which needs the per-expert counts on the host.
        """
        if self.dispatch == "grouped" or (self.dispatch == "auto" and _grouped_mm_usable(hidden_states_flat)):
            return self._dispatch_grouped(hidden_states_flat, flat_expert, topk_weight, expert_counts)
        output = self._shared_output(hidden_states_flat)  # (N, H)

        counts = expert_counts.tolist()  # the one host sync: slice bounds must be Python ints
        num_routed = sum(counts)
        if num_routed == 0:
            return output
        order = flat_expert.argsort(stable=True)[:num_routed]  # (M,) real assignments grouped by expert
        token_idx = order // self.top_k  # (M,) token of each sorted assignment
        expert_inputs = hidden_states_flat.index_select(0, token_idx)  # (M, H), contiguous per expert
        combine_weight = topk_weight.reshape(-1).index_select(0, order).unsqueeze(-1)  # (M, 1)

        # One in-place index_add_ per expert straight into the shared output: no concatenation of expert
        # outputs and no extra (M, H) buffer.
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            expert = self.experts[expert_id]
            expert_output = expert(expert_inputs[start:end], combine_weight[start:end])  # (count, H)
            output.index_add_(0, token_idx[start:end], expert_output.to(output.dtype))
            start = end
        return output

    def _dispatch_grouped(
        self,
        hidden_states_flat: torch.Tensor,
        flat_expert: torch.Tensor,
        topk_weight: torch.Tensor,
        expert_counts: torch.Tensor,
    ) -> torch.Tensor:
        """Sorted dispatch as grouped GEMMs over all assignments: no Python loop and no host sync.

        Padding assignments (sentinel id E) sort last; their input rows are zeroed and the last group is
        extended over them, so every row the GEMMs touch is defined and the padding rows add exactly 0
        (SwiGLU has no bias) and pass no gradient on.
        """
        dtype = _compute_dtype(hidden_states_flat)
        output = self._shared_output(hidden_states_flat)  # (N, H)
        order = flat_expert.argsort(stable=True)  # (N * k,) assignments grouped by expert, padding last
        token_idx = order // self.top_k  # (N * k,)
        real = (flat_expert.index_select(0, order) < self.num_experts).unsqueeze(-1)  # (N * k, 1)
        total = flat_expert.new_full((1,), flat_expert.numel())
        offsets = torch.cat([expert_counts.cumsum(0)[:-1], total]).to(torch.int32)  # (E,) end of each group
        inputs = hidden_states_flat.index_select(0, token_idx).to(dtype)  # (N * k, H)
        inputs = torch.where(real, inputs, inputs.new_zeros(()))
        scale = topk_weight.reshape(-1).index_select(0, order).unsqueeze(-1).to(dtype)  # (N * k, 1)
        w1, w3, w2 = (
            torch.stack([getattr(expert, name).weight for expert in self.experts]).to(dtype).transpose(1, 2)
            for name in ("w1", "w3", "w2")
        )  # (E, H, F), (E, H, F), (E, F, H)
        gate = _grouped_mm(inputs, w1, offsets)  # (N * k, F)
        up = _grouped_mm(inputs, w3, offsets) * scale  # (N * k, F)
        expert_output = _grouped_mm(F.silu(gate) * up, w2, offsets)  # (N * k, H)
        return output.index_add(0, token_idx, expert_output.to(output.dtype))

    def _dispatch_export(
        self, hidden_states_flat: torch.Tensor, flat_expert: torch.Tensor, topk_weight: torch.Tensor
    ) -> torch.Tensor:
        """Export-friendly dispatch (ONNX): per expert, `nonzero` finds its assignments, the expert runs on
        those tokens only and `index_add` scatters the result; sizes stay data-dependent, never dense."""
        output = self._shared_output(hidden_states_flat)  # (N, H)
        weights = topk_weight.reshape(-1, 1)  # (N * k, 1)
        for expert_id, expert in enumerate(self.experts):
            assignment = (flat_expert == expert_id).nonzero().reshape(-1)  # (M_e,) padding never matches
            token_idx = assignment // self.top_k  # (M_e,)
            expert_output = expert(
                hidden_states_flat.index_select(0, token_idx), weights.index_select(0, assignment)
            )  # (M_e, H)
            output = output.index_add(0, token_idx, expert_output.to(output.dtype))
        return output

    @torch.no_grad()
    def _record_routing(
        self,
        flat_expert: torch.Tensor,
        expert_counts: torch.Tensor,
        probs: torch.Tensor,
        domain_ids_flat: torch.Tensor | None,
        real_flat: torch.Tensor | None,
    ) -> None:
        """Add real assignments to the aux-free load and, if tracking, to the per-domain statistics."""
        self._keep_float32_buffers()  # a checkpoint loaded in bf16 may have cast them
        counted = self.in_serving_pass if self.balance_load_source == "serving" else self.training
        balancing = counted and self.balance == "aux_free"
        if balancing:
            self.expert_load += expert_counts
        per_domain = None
        if balancing and (self.balance_mix is not None or self.balance_targets):
            per_domain = self._domain_counts(flat_expert, expert_counts, domain_ids_flat)
            self.domain_load += per_domain
        if not self.track_routing:
            return
        if real_flat is not None:
            probs = probs * real_flat.unsqueeze(-1)  # (N, E), padding rows zeroed
        if per_domain is None:
            per_domain = self._domain_counts(flat_expert, expert_counts, domain_ids_flat)
        self.domain_expert_counts += per_domain  # (D, E)
        if domain_ids_flat is None:
            self.domain_expert_mass[0] += probs.sum(0)
        else:
            self.domain_expert_mass.index_add_(0, domain_ids_flat, probs.to(self.domain_expert_mass.dtype))

    def _domain_counts(
        self, flat_expert: torch.Tensor, expert_counts: torch.Tensor, domain_ids_flat: torch.Tensor | None
    ) -> torch.Tensor:
        """(D, E) real assignments per domain and expert (every one in domain 0 without domain ids)."""
        if domain_ids_flat is None:
            counts = torch.zeros_like(self.domain_expert_counts)  # (D, E)
            counts[0] = expert_counts
            return counts
        num_cells = self.num_domains * self.num_experts
        domain_of_assignment = domain_ids_flat.repeat_interleave(self.top_k)  # (N * k,)
        cell = domain_of_assignment * self.num_experts + flat_expert  # (N * k,) index into D * E
        cell = cell.masked_fill(flat_expert == self.num_experts, num_cells)  # padding -> sentinel cell
        cell_counts = torch.bincount(cell, minlength=num_cells + 1)[:num_cells]  # (D * E,)
        return cell_counts.view(self.num_domains, self.num_experts)  # (D, E)

    def _flatten_domain_ids(
        self, domain_ids: torch.Tensor | None, batch_size: int, seq_len: int, device: torch.device
    ) -> torch.Tensor | None:
        if domain_ids is None:
            return None
        if domain_ids.dtype.is_floating_point or domain_ids.dtype == torch.bool:
            raise InputValidationError(
                f"DomainMoE: domain_ids must be integer ids, got dtype {domain_ids.dtype}"
            )
        if domain_ids.shape == (batch_size,):
            domain_ids = domain_ids[:, None].expand(batch_size, seq_len)  # (B, T)
        elif domain_ids.shape != (batch_size, seq_len):
            raise InputValidationError(
                f"DomainMoE: domain_ids must be (B, T)=({batch_size}, {seq_len}) or (B,)=({batch_size},), "
                f"got shape {tuple(domain_ids.shape)}"
            )
        # Range check only where it costs no device sync; CoreModel validates ids once at its entry.
        if domain_ids.device.type == "cpu" and domain_ids.numel() > 0 and not torch.compiler.is_exporting():
            low, high = int(domain_ids.min()), int(domain_ids.max())
            if low < 0 or high >= self.num_domains:
                raise InputValidationError(
                    f"DomainMoE: domain_ids must be in [0, num_domains={self.num_domains}), got values in "
                    f"[{low}, {high}]; map domain names with CoreConfig.domain_id"
                )
        return domain_ids.reshape(-1).to(device=device, dtype=torch.long)  # (N,)

    @staticmethod
    def _flatten_attention_mask(
        attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device: torch.device
    ) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.shape != (batch_size, seq_len):
            raise InputValidationError(
                f"DomainMoE: attention_mask must be (B, T)=({batch_size}, {seq_len}) with True = real token, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return attention_mask.reshape(-1).to(device=device, dtype=torch.bool)  # (N,)

    # ------------------------------------------------------------------ balancing and statistics

    @torch.no_grad()
    def update_balance(self) -> None:
        """DeepSeek-V3 aux-free update: `expert_bias += rate * sign(mean_load - load_e)`, then reset the load.

        Call once per optimizer step (`MoEBalanceCallback` does). Under torch.distributed the loads are summed
        over ranks first, so every rank applies the same update; run DDP with `broadcast_buffers=False`
        (`TrainingArguments(ddp_broadcast_buffers=False)`) so per-rank loads are not overwritten by rank 0's.
        With `balance_every` k > 1 (`set_balance_every`), only every k-th call updates, on the loads summed
        since the last update. Does nothing unless `config.balance == "aux_free"`.
        """
        if self.balance != "aux_free":
            return
        self._balance_calls += 1
        if self._balance_calls % self.balance_every:
            return  # keep summing the loads until the `balance_every`-th call
        self._keep_float32_buffers()
        load = self._balance_load()  # (E,)
        if load.sum().item() > 0 and (self.balance_groups is None or self.balance_global):
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        for experts in self.balance_groups or []:
            index = torch.as_tensor(experts, dtype=torch.long, device=load.device)
            group_load = load.index_select(0, index)  # (G,)
            if group_load.sum().item() > 0:
                step = self.bias_update_rate * torch.sign(group_load.mean() - group_load)  # (G,)
                self.expert_bias.index_add_(0, index, step)
        self._apply_targets()
        self.expert_load.zero_()
        self.domain_load.zero_()

    def _apply_targets(self) -> None:
        """Move the bias of a domain's whole group one step towards its target share of the domain's
        assignments (domains without assignments since the last update are left alone)."""
        if not self.balance_targets:
            return
        domain_load = self.domain_load.float()  # (D, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(domain_load)
        for domain, (experts, target) in self.balance_targets.items():
            assignments = domain_load[domain].sum().item()
            if assignments == 0:
                continue
            index = torch.as_tensor(experts, dtype=torch.long, device=domain_load.device)
            share = domain_load[domain, index].sum().item() / assignments
            direction = float(np.sign(target - share))
            step = torch.full((len(experts),), direction * self.bias_update_rate, device=domain_load.device)
            self.expert_bias.index_add_(0, index, step)  # (G,) the whole group one step

    def _balance_load(self) -> torch.Tensor:
        """(E,) the load the aux-free update evens out: the assignments since the last update, or with
        `balance_mix` each domain's shares of its assignments averaged with the mix's weights."""
        distributed = dist.is_available() and dist.is_initialized()
        if self.balance_mix is None:
            load = self.expert_load.float()  # (E,)
            if distributed:
                dist.all_reduce(load)
            return load
        domain_load = self.domain_load.float()  # (D, E)
        if distributed:
            dist.all_reduce(domain_load)
        assignments = domain_load.sum(dim=1)  # (D,)
        shares = domain_load / assignments.clamp_min(1.0).unsqueeze(1)  # (D, E) rows sum to 1 (or 0)
        # Only the domains seen since the last update count: a window of one domain's batches balances
        # that domain's own shares, not a mix with the others at zero.
        weights = torch.tensor(self.balance_mix, dtype=torch.float32, device=shares.device)  # (D,)
        weights = weights * (assignments > 0)
        if weights.sum().item() == 0:
            return torch.zeros_like(shares[0])
        return (weights.unsqueeze(1) * shares).sum(dim=0) / weights.sum()  # (E,)

    def set_balance_targets(self, targets: dict[int, tuple[list[int], float]] | None) -> None:
        """Keep each domain's share of its assignments on its own expert group at a target: at each update,
        every expert of the group moves by `bias_update_rate` towards it (up below it, down above it).

        Balancing inside groups only (`set_balance_groups(..., with_global=False)`) evens out the load within
        a group but never moves a group as a whole, so a domain's router can leave its own group idle (or
        the experts it shares with the other domains). A target at the group's share of the experts the
        domain may use (its group plus the general experts) is an even spread of the domain's own tokens;
        it reads only that domain's assignments, so unlike the global term it never pulls another domain's
        tokens into a quiet domain's group. It moves both ways: a one-sided floor only ever raised the group
        and ratcheted a busy domain wholly onto it, away from the general experts.

        Args:
            targets: domain id -> (expert ids of its group, target share in [0, 1]), or None for none.

        Raises:
            InputValidationError: a domain id outside [0, num_domains), an expert id outside
                [0, num_experts), an empty group, or a share outside [0, 1].
        """
        checked: dict[int, tuple[list[int], float]] = {}
        for domain, (experts, floor) in (targets or {}).items():
            experts = [int(e) for e in experts]
            if (
                not 0 <= int(domain) < self.num_domains
                or not experts
                or any(not 0 <= e < self.num_experts for e in experts)
                or not 0.0 <= float(floor) <= 1.0
            ):
                raise InputValidationError(
                    f"DomainMoE.set_balance_targets: expected domain id in [0, {self.num_domains}) -> (expert ids "
                    f"in [0, {self.num_experts}), share in [0, 1]), got {domain!r} -> ({experts}, {floor!r})"
                )
            checked[int(domain)] = (experts, float(floor))
        self.balance_targets = checked
        self.domain_load.zero_()

    def set_balance_mix(self, weights: list[float] | tuple[float, ...] | None) -> None:
        """Balance the experts' load on a mix of the domains, whatever mix the training batches hold.

        By default the update evens out the assignments of the tokens trained on, so the experts are
        balanced for the training mix. When the model serves another mix (domains of very different
        token counts trained one batch each in turn), an expert that only the quieter domains use looks
        busy in training and idle in service. With a mix, the load is each domain's share of its own
        assignments per expert, averaged with `weights` (e.g. each domain's share of the served tokens),
        which is the load per served assignment under that mix, however many tokens the batches held.

        Args:
            weights: one non-negative weight per domain (any scale, not all zero), or None for the
                default.

        Raises:
            InputValidationError: not one finite non-negative weight per domain, or all zero.
        """
        if weights is not None:
            values = [float(w) for w in weights]
            if (
                len(values) != self.num_domains
                or not all(np.isfinite(w) and w >= 0 for w in values)
                or sum(values) <= 0
            ):
                raise InputValidationError(
                    f"DomainMoE.set_balance_mix: expected {self.num_domains} finite non-negative weights "
                    f"(one per domain, not all zero), got {list(weights)}"
                )
            weights = tuple(values)
        self.balance_mix = weights
        self.domain_load.zero_()

    @torch.no_grad()
    def settle_bias(
        self,
        router_logits: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        steps: int = 300,
        start_rate: float = 0.1,
        final_rate: float = 1e-3,
        floor: float | None = None,
        example_ids: torch.Tensor | None = None,
        resamples: int = 0,
        quantile: float = 0.05,
    ) -> None:
        """Settle the selection bias on a fixed set of served tokens: `steps` aux-free updates, each on the
        load of all of them, with the step size going geometrically from `start_rate` down to `final_rate`
        (logit units; at the defaults the bias can move by up to ~6.5 in total).

        During training every update sees the load of a few batches only while the router still moves, so
        the bias ends wherever the last updates left it; a router that sends whole batches to one expert
        makes that a random walk. Here the router is fixed and the load is that of every given token, so
        the same update rule (the balance groups, targets and mix set on this layer) settles where it
        balances that load. Only the selection bias changes: the combine weights stay the router's.

        With `floor`, the update only lifts: an expert below `floor` of its balance group's load (all experts
        form one group without `set_balance_groups`; the load of the domain mix set with `set_balance_mix`,
        as the update rule reads it) moves up one step, nothing else moves. Shares of one load sum to 1, so
        at most all but one expert of a group are ever lifted. The served routing changes only as far as
        needed to give every expert that share; a full settle moves every token the balance rule would
        move, away from the routing the experts were trained with. (Measured on the suite: a floor on each
        domain's own shares instead, for domains that want different experts of a shared group, lifted the
        whole group and pulled every domain's tokens into it, or, kept level, cancelled out.)

        With `resamples` (a floor, and `example_ids` naming the example of every token), an expert is lifted
        while the `quantile` of its share over that many bootstrap resamples of the examples (each domain's
        examples drawn with replacement, as many as it has; the same resamples at every update) is below the
        floor: the floor must hold on other draws of examples like these, not only on these. The tokens of one
        example are alike (a CT volume's patches, a customer's transactions), so an expert can take its share
        from a few examples: measured on the suite (seed 12, layer 1, medical group), an expert with 5.4% of
        the group's training load got no token in 31 of the 48 training cases and 0.8% of the 12 validation
        cases' load; a cluster of a quarter of the medical tokens sat within 0.05 logits of a tie between it
        and another expert. (A margin on the selection score instead, counting only the tokens an expert keeps
        by 0.1 logits, lifted whole groups of finance experts, whose tokens are that close everywhere.)

        Args:
            router_logits: (N, E) unbiased router logits (incl. the domain prior) of real tokens, e.g. from
                `captured_router_logits` on eval-mode passes.
            domain_ids: (N,) their domain ids, or None (domain 0).
            steps: updates.
            start_rate: the step size of the first update.
            final_rate: the step size of the last update.
            floor: None (the full update rule) or a share in (0, 1) (only lift the experts below it).
            example_ids: (N,) the example of every token (ids of any range; one domain per example), for
                `resamples`.
            resamples: with a floor, the bootstrap resamples of the examples the floor must hold on (0: the
                given examples only).
            quantile: the share of the resamples allowed below the floor, in (0, 1).

        Raises:
            InputValidationError: logits that are not (N, num_experts), domain ids of another length,
                `steps` below 1, step sizes that are not 0 < final_rate <= start_rate, a floor outside
                (0, 1), negative `resamples`, `resamples` without `example_ids` of length N, or a quantile
                outside (0, 1).
        """
        if router_logits.dim() != 2 or router_logits.shape[1] != self.num_experts:
            raise InputValidationError(
                f"DomainMoE.settle_bias: router_logits must be (N, {self.num_experts}), "
                f"got shape {tuple(router_logits.shape)}"
            )
        if domain_ids is not None and domain_ids.shape != router_logits.shape[:1]:
            raise InputValidationError(
                f"DomainMoE.settle_bias: domain_ids must be ({router_logits.shape[0]},), "
                f"got shape {tuple(domain_ids.shape)}"
            )
        if steps < 1:
            raise InputValidationError(f"DomainMoE.settle_bias: expected steps >= 1, got {steps}")
        if not 0.0 < final_rate <= start_rate:
            raise InputValidationError(
                f"DomainMoE.settle_bias: expected 0 < final_rate <= start_rate, got {final_rate}, {start_rate}"
            )
        if floor is not None and not 0.0 < floor < 1.0:
            raise InputValidationError(f"DomainMoE.settle_bias: expected a floor in (0, 1), got {floor}")
        if resamples < 0 or (
            resamples > 0 and (example_ids is None or example_ids.shape != router_logits.shape[:1])
        ):
            raise InputValidationError(
                f"DomainMoE.settle_bias: resamples must be >= 0 and need example_ids of shape "
                f"({router_logits.shape[0]},), got {resamples} and "
                f"{None if example_ids is None else tuple(example_ids.shape)}"
            )
        if not 0.0 < quantile < 1.0:
            raise InputValidationError(
                f"DomainMoE.settle_bias: expected a quantile in (0, 1), got {quantile}"
            )
        if self.balance != "aux_free" or router_logits.shape[0] == 0:
            return
        logits = router_logits.float().to(self.expert_bias.device)  # (N, E)
        ids = None if domain_ids is None else domain_ids.to(device=logits.device, dtype=torch.long)
        bootstrap = None
        if floor is not None and resamples > 0 and example_ids is not None:
            bootstrap = self._bootstrap(example_ids.to(logits.device), ids, resamples)
        saved = (self.bias_update_rate, self.balance_every, self._balance_calls)
        try:
            self.balance_every, self._balance_calls = 1, 0
            for step in range(steps):
                # Geometric decay: large steps first to move far, small ones last to settle.
                self.bias_update_rate = start_rate * (final_rate / start_rate) ** (step / max(steps - 1, 1))
                flat_expert = (
                    (logits + self.expert_bias).topk(self.top_k, dim=-1).indices.reshape(-1)
                )  # (N*k,)
                counts = torch.bincount(flat_expert, minlength=self.num_experts)  # (E,)
                self.expert_load.copy_(counts)
                self.domain_load.copy_(self._domain_counts(flat_expert, counts, ids))
                if floor is None:
                    self.update_balance()
                elif bootstrap is not None:
                    self._lift_below(floor, self._resampled_shares(flat_expert, bootstrap, quantile))
                else:
                    self._lift_below(floor)
        finally:
            self.bias_update_rate, self.balance_every, self._balance_calls = saved
            self.expert_load.zero_()
            self.domain_load.zero_()

    def _bootstrap(
        self, example_ids: torch.Tensor, domain_ids: torch.Tensor | None, resamples: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed bootstrap resamples of the examples, each domain's examples drawn within the domain.

        Returns:
            (N,) every token's example as an index in [0, X), and (R, D, X) how often each resample draws
            each example for each domain (zero outside the domain).
        """
        _, token_example = torch.unique(example_ids.long(), return_inverse=True)  # (N,) in [0, X)
        n_examples = int(token_example.max().item()) + 1
        token_domain = torch.zeros_like(token_example) if domain_ids is None else domain_ids
        example_domain = torch.zeros(n_examples, dtype=torch.long, device=token_example.device)
        example_domain.scatter_(0, token_example, token_domain)  # (X,) one domain per example
        generator = torch.Generator().manual_seed(0)  # the same resamples every run: a deterministic settle
        draws = torch.zeros(resamples, self.num_domains, n_examples, dtype=torch.float32)
        for domain in range(self.num_domains):
            members = torch.nonzero(example_domain.cpu() == domain).flatten()  # (X_d,)
            if members.numel() == 0:
                continue
            picks = torch.randint(members.numel(), (resamples, members.numel()), generator=generator)
            drawn = torch.zeros(resamples, members.numel())
            drawn.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float32))  # (R, X_d) draw counts
            draws[:, domain, members] = drawn
        return token_example, draws.to(token_example.device)

    def _resampled_shares(
        self,
        flat_expert: torch.Tensor,
        bootstrap: tuple[torch.Tensor, torch.Tensor],
        quantile: float,
    ) -> torch.Tensor:
        """(E,) the `quantile` over the bootstrap resamples of every expert's share of its balance group's
        load (the load as `_balance_load` reads it: the mix of `balance_mix`, else every assignment)."""
        token_example, draws = bootstrap
        n_examples = draws.shape[2]
        example_of_assignment = token_example.repeat_interleave(self.top_k)  # (N*k,)
        cells = torch.bincount(
            example_of_assignment * self.num_experts + flat_expert, minlength=n_examples * self.num_experts
        )  # (X*E,)
        per_example = cells.view(n_examples, self.num_experts).float()  # (X, E)
        counts = torch.einsum("rdx,xe->rde", draws, per_example)  # (R, D, E) resampled assignments
        if self.balance_mix is None:
            load = counts.sum(dim=1)  # (R, E)
        else:
            assignments = counts.sum(dim=2, keepdim=True)  # (R, D, 1)
            shares = counts / assignments.clamp_min(1.0)  # (R, D, E)
            weights = torch.tensor(self.balance_mix, dtype=torch.float32, device=counts.device)
            weights = weights.view(1, -1, 1) * (assignments > 0)  # (R, D, 1)
            load = (weights * shares).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)  # (R, E)
        group_shares = torch.zeros_like(load)  # (R, E)
        for experts in self.balance_groups or [list(range(self.num_experts))]:
            index = torch.as_tensor(experts, dtype=torch.long, device=load.device)
            group_load = load.index_select(1, index)  # (R, G)
            group_shares[:, index] = group_load / group_load.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.quantile(group_shares, quantile, dim=0)  # (E,)

    def _lift_below(self, floor: float, shares: torch.Tensor | None = None) -> None:
        """Raise by `bias_update_rate` the bias of every expert below `floor` of its group's load (with
        `shares`, (E,): every expert whose share there is below `floor`)."""
        load = self._balance_load()  # (E,)
        for experts in self.balance_groups or [list(range(self.num_experts))]:
            index = torch.as_tensor(experts, dtype=torch.long, device=load.device)
            group_load = load.index_select(0, index)  # (G,)
            if group_load.sum().item() > 0:
                share = group_load / group_load.sum() if shares is None else shares.index_select(0, index)
                below = (share < floor).to(self.expert_bias.dtype)  # (G,)
                self.expert_bias.index_add_(0, index, self.bias_update_rate * below)
        self.expert_load.zero_()
        self.domain_load.zero_()

    def set_balance_load_source(self, source: str) -> None:
        """Count the aux-free load on the training passes ("train", the default) or on serving passes only
        ("serving": the passes inside `serving_load_pass`, e.g. one eval-mode pass of each training batch).

        Raises:
            InputValidationError: a source outside `BALANCE_LOAD_SOURCES`.
        """
        if source not in BALANCE_LOAD_SOURCES:
            raise InputValidationError(
                f"DomainMoE.set_balance_load_source: expected one of {BALANCE_LOAD_SOURCES}, got {source!r}"
            )
        self.balance_load_source = source

    def set_balance_every(self, calls: int) -> None:
        """Update the selection bias at every `calls`-th `update_balance()` call (1: every call), from now on.

        When each optimizer step trains on one domain's batch only (domains taking turns), a per-step update
        sees one domain's load: every other domain's experts look idle and gain, the experts all domains
        share look busy and lose, step after step. Summing the loads over a full turn of the domains gives
        the update the mixed load a step of all domains would have given.

        Raises:
            InputValidationError: `calls` below 1.
        """
        if calls < 1:
            raise InputValidationError(f"DomainMoE.set_balance_every: expected calls >= 1, got {calls}")
        self.balance_every = calls
        self._balance_calls = 0

    def set_balance_groups(self, groups: list[list[int]] | None, with_global: bool = True) -> None:
        """Balance the load inside groups of experts too (None: across all experts only, the default).

        With domain expert groups and domains of very different token counts, the global mean ranks whole
        groups (every expert of a busy domain's group is above it, every expert of a quiet one below), so
        the global sign update moves a group's experts together and never evens out the load inside a
        group: one expert can stay cold. With groups, an expert in a group also moves by
        `bias_update_rate * sign(group_mean - load_e)`, so inside a group the busier expert always loses
        ground to the colder one, while the global term keeps balancing the groups against each other.

        Args:
            groups: disjoint lists of expert ids of this layer, or None.
            with_global: keep the global term. False: only the experts in `groups` move, by the group term
                alone (e.g. while one domain trains alone and must not move the bias the others read).

        Raises:
            InputValidationError: an expert id outside [0, num_experts), or one listed twice.
        """
        if groups is not None:
            flat = [e for experts in groups for e in experts]
            if any(not 0 <= e < self.num_experts for e in flat) or len(set(flat)) != len(flat):
                raise InputValidationError(
                    f"DomainMoE.set_balance_groups: expected disjoint expert ids in [0, {self.num_experts}), "
                    f"got {groups}"
                )
            groups = [list(experts) for experts in groups if experts]
        self.balance_groups = groups
        self.balance_global = with_global or groups is None

    def reset_balance_load(self) -> None:
        """Clear the loads the next aux-free update reads (`expert_load`, `domain_load`, the call count).

        They are not saved with a checkpoint (`persistent=False`); a model loaded with `from_pretrained` gets
        them allocated, not zeroed, so `CoreModel.from_pretrained` clears them (garbage loads once moved
        every selection bias of a loaded model by a random step at its first update).
        """
        self.expert_load.zero_()
        self.domain_load.zero_()
        self._balance_calls = 0

    def reset_routing_stats(self) -> None:
        """Clear the per-domain routing statistics (`domain_expert_counts`, `domain_expert_mass`)."""
        self.domain_expert_counts.zero_()
        self.domain_expert_mass.zero_()

    def routing_stats(self) -> dict[str, np.ndarray]:
        """Per-domain routing statistics accumulated since the last reset, for telemetry and pruning.

        Returns:
            A dict of numpy arrays (D = num_domains, E = n_routed_experts):
                "counts": (D, E) int64, token-expert assignments of real tokens.
                "mass": (D, E) float64, summed router probabilities.
                "tokens": (D,) int64, real tokens seen per domain.
                "count_share": (D, E) float64, each domain's share of its assignments per expert (rows sum
                    to 1; 0 for a domain without tokens).
                "mass_share": (D, E) float64, each domain's share of its router probability mass.
                "expert_bias": (E,) float64, the current selection bias.
        """
        counts = self.domain_expert_counts.detach().cpu().numpy().astype(np.int64)
        mass = self.domain_expert_mass.detach().float().cpu().numpy().astype(np.float64)
        return {
            "counts": counts,
            "mass": mass,
            "tokens": counts.sum(axis=1) // self.top_k,
            "count_share": _row_shares(counts.astype(np.float64)),
            "mass_share": _row_shares(mass),
            "expert_bias": self.expert_bias.detach().float().cpu().numpy().astype(np.float64),
        }

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, num_shared_experts={self.num_shared_experts}, "
            f"top_k={self.top_k}, num_domains={self.num_domains}, balance={self.balance!r}"
        )


def _row_shares(values: np.ndarray) -> np.ndarray:
    totals = values.sum(axis=1, keepdims=True)
    return np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)


@contextmanager
def serving_load_pass(model: nn.Module) -> Iterator[None]:
    """Within the block `model` runs as it serves (eval mode: no dropout; no gradient), and its `DomainMoE`
    layers whose load source is "serving" count these passes in their aux-free load.

    The routing statistics (`domain_expert_counts`, `domain_expert_mass`) are left as they are, so a
    training run still records its training passes only. On exit every module's training mode is restored.

    Example:
        `with serving_load_pass(model): model(**batch)` next to the training step's own forward pass.
    """
    moe_layers = [module for module in model.modules() if isinstance(module, DomainMoE)]
    modes = [(module, module.training) for module in model.modules()]
    tracking = [moe.track_routing for moe in moe_layers]
    model.eval()
    try:
        for moe in moe_layers:
            moe.in_serving_pass, moe.track_routing = True, False
        with torch.no_grad():
            yield
    finally:
        for moe, track in zip(moe_layers, tracking, strict=True):
            moe.in_serving_pass, moe.track_routing = False, track
        for module, training in modes:
            module.training = training


@contextmanager
def captured_router_logits(
    moe: DomainMoE, rows: bool = False
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Within the block every forward of `moe` appends (router logits (n, E) float32, domain ids (n,) or
    None) of its real tokens to the yielded list (for `DomainMoE.settle_bias`); with `rows`, a third item:
    (n,) the batch row (example) of every token."""
    captured: list[tuple[torch.Tensor, ...]] = []

    def hook(module: DomainMoE, args: tuple, kwargs: dict, output: tuple) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        batch_size, seq_len, _ = hidden_states.shape
        device = hidden_states.device
        ids = module._flatten_domain_ids(kwargs.get("domain_ids"), batch_size, seq_len, device)  # (N,)
        real = module._flatten_attention_mask(kwargs.get("attention_mask"), batch_size, seq_len, device)
        logits = output[1].detach().float()  # (N, E)
        row = torch.arange(batch_size, device=device).repeat_interleave(seq_len)  # (N,)
        if real is not None:
            logits, row = logits[real], row[real]
            ids = None if ids is None else ids[real]
        captured.append((logits, ids, row) if rows else (logits, ids))

    handle = moe.register_forward_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def update_all_balance(model: nn.Module) -> int:
    """Apply `DomainMoE.update_balance()` to every MoE layer of a model.

    Args:
        model: any module (a `CoreModel`, a DDP wrapper, a plain container).

    Returns:
        The number of `DomainMoE` modules found.
    """
    moe_layers = [module for module in model.modules() if isinstance(module, DomainMoE)]
    for moe in moe_layers:
        moe.update_balance()
    return len(moe_layers)


class MoEBalanceCallback(TrainerCallback):
    """`transformers.Trainer` callback applying the aux-free bias update after every optimizer step.

    Example:
        `Trainer(model=model, args=args, callbacks=[MoEBalanceCallback()])`
    """

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        """Update the selection bias of every `DomainMoE` in `model` (a no-op when no model is passed)."""
        if model is None:
            logger.warning("MoEBalanceCallback.on_step_end received no model; expert biases were not updated")
            return
        update_all_balance(model)
