"""CoreModel: embedders -> N x [DynamicAttention + DomainMoE] -> heads, as a transformers PreTrainedModel.

Read top to bottom: the encoder layer, the heads, the output dataclass, then `CoreModel`, which assembles
one token sequence (CT patch tokens first, then field tokens), runs the encoder and applies whichever
heads the batch has targets for. Every loss, including the router balancing loss, is added here in
`CoreModel.forward` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from core.attention import AttentionTrace, DynamicAttention, ItemRetrieval
from core.config import CoreConfig
from core.embeddings import PAD_INDEX, FieldEmbedder, PeriodicEncoding, VolumeEmbedder
from core.errors import InputValidationError
from core.losses import classification_loss, load_balancing_loss, masked_field_loss, next_step_loss
from core.moe import DomainMoE, SwiGLU


class EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attention(norm(x)), then x + moe(norm(x)) (or a dense SwiGLU FFN); without the
    feed-forward block when block pruning dropped it (`CoreConfig.layer_has_ffn`)."""

    def __init__(self, config: CoreConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DynamicAttention(config, layer_idx)
        has_ffn = config.has_ffn(layer_idx)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps) if has_ffn else None
        self.ffn: DomainMoE | SwiGLU | None = None
        if has_ffn:
            self.ffn = (
                DomainMoE(config, layer_idx)
                if config.use_moe
                else SwiGLU(config.hidden_size, config.shared_ffn_size_in_layer(layer_idx))
            )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        domain_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, AttentionTrace]:
        """(B, T, hidden) -> (B, T, hidden), router logits (B*T, E) or None, attention trace."""
        attended, trace = self.attention(
            self.attention_norm(hidden_states),
            attention_mask,
            position_ids,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attended)
        if self.ffn is None:
            return hidden_states, None, trace
        normed = self.ffn_norm(hidden_states)
        router_logits = None
        if isinstance(self.ffn, DomainMoE):
            ffn_out, router_logits = self.ffn(normed, domain_ids=domain_ids, attention_mask=attention_mask)
        else:
            ffn_out = self.ffn(normed)
        return hidden_states + self.dropout(ffn_out), router_logits, trace


class NextStepHead(nn.Module):
    """Scores the next item from the state after each step: logit = MLP([h_t, e(item_{t+1})]).

    With `config.next_step_retrieval`, logit = MLP([h_t, e(item_{t+1}), r_t]) where r_t is what the item
    retrieves from the states of steps 0..t (`ItemRetrieval`). With `config.next_step_feature_buckets`, the
    item's embedding is e(item_{t+1}) + sum_f e_f(feature_f) (DKT-forget-style features of the item to
    predict, computed by the app from steps 0..t).
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.item = nn.Embedding(config.next_step_vocab, config.hidden_size, padding_idx=PAD_INDEX)
        buckets = getattr(config, "next_step_feature_buckets", [])
        self.features = (
            nn.ModuleList(nn.Embedding(n, config.hidden_size, padding_idx=PAD_INDEX) for n in buckets)
            if buckets
            else None
        )
        self.retrieval = ItemRetrieval(config) if config.next_step_retrieval else None
        n_inputs = 3 if self.retrieval is not None else 2
        self.mlp = nn.Sequential(
            nn.Linear(n_inputs * config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, 1),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        next_item_ids: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        next_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden) states and (B, T) next item ids -> (B, T) logits of P(correct next).

        The retrieval (when configured) reads `memory` (B, T_m, hidden) with `memory_mask` (B, T_m) up to
        `query_positions` (B, T); by default the states themselves, query t reading steps 0..t. Without
        retrieval these three are ignored. `next_features` (B, T, F) long: bucket ids of the next item's
        extra features, required when the head has feature embeddings, else ignored.

        Raises:
            InputValidationError: The head has feature embeddings and `next_features` is missing or has
                the wrong number of features.
        """
        item = self.item(next_item_ids)  # (B, T, hidden)
        if self.features is not None:
            if next_features is None or next_features.shape[-1] != len(self.features):
                raise InputValidationError(
                    f"NextStepHead: expected next_features (B, T, {len(self.features)}) "
                    "(config.next_step_feature_buckets); got "
                    f"{None if next_features is None else tuple(next_features.shape)}"
                )
            for f, table in enumerate(self.features):
                item = item + table(next_features[..., f])  # (B, T, hidden)
        features = [hidden_states, item]
        if self.retrieval is not None:
            if memory is None:
                memory = hidden_states
                steps = torch.arange(hidden_states.shape[1], device=hidden_states.device)
                query_positions = steps.expand(hidden_states.shape[0], -1)  # (B, T)
            features.append(self.retrieval(next_item_ids, query_positions, memory, memory_mask))
        return self.mlp(torch.cat(features, dim=-1)).squeeze(-1)  # (B, T, n_inputs*hidden) -> (B, T)


class MaskedFieldHead(nn.Module):
    """Reconstructs a masked token's fields: one classifier per categorical field, a regressor for numerics."""

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.categorical = nn.ModuleDict(
            {name: nn.Linear(config.hidden_size, size) for name, size in config.categorical_fields.items()}
        )
        n_numeric = len(config.numeric_fields)
        self.numeric = nn.Linear(config.hidden_size, n_numeric) if n_numeric else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(B, T, hidden) -> ({field: (B, T, vocab)}, (B, T, F) or None)."""
        logits = {name: head(hidden_states) for name, head in self.categorical.items()}
        numeric = self.numeric(hidden_states) if self.numeric is not None else None
        return logits, numeric


def prototype_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Cosine-similarity logits (B, K) of normalised embeddings (B, P) against class prototypes (K, P)."""
    return scale * embeddings @ F.normalize(prototypes, dim=-1).T


@dataclass
class CoreOutput(ModelOutput):
    """Output of `CoreModel.forward` (a transformers `ModelOutput`, so `Trainer` can read `loss`).

    Attributes:
        loss: sum of the task losses present in the batch plus the router balancing loss.
        logits: (B, num_labels) sequence classification logits.
        token_logits: (B, T, num_labels) per field-token classification logits (causal scoring).
        next_step_logits: (B, T) logits of P(correct) of the next item.
        embeddings: (B, prototype_dim) L2-normalised embeddings for the prototype (few-shot) head.
        mfm_loss: the masked-field reconstruction loss (stage 1), also included in `loss`.
        aux_loss: the router balancing loss (already scaled), also included in `loss`.
        hidden_states: (B, T_total, hidden) final states (CT tokens first, then field tokens).
        router_logits: per MoE layer, (B*T_total, n_routed_experts).
        attentions: per layer, the `AttentionTrace` (when requested).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_logits: torch.Tensor | None = None
    next_step_logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    mfm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[AttentionTrace, ...] | None = None


class CoreModel(PreTrainedModel):
    """The shared model: field and CT embedders, dynamic-attention + MoE encoder, task heads.

    Heads exist when the config asks for them: classification (`num_labels > 0`, used for sequence
    labels and per-token labels), next-step (`next_step_vocab > 0`), prototype (`prototype_dim > 0`),
    and masked-field (whenever the config has categorical or numeric fields).
    """

    config_class = CoreConfig
    base_model_prefix = "core"
    main_input_name = "attention_mask"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["EncoderLayer"]

    def __init__(self, config: CoreConfig) -> None:
        super().__init__(config)
        self.field_embedder = FieldEmbedder(config)
        self.volume_embedder = VolumeEmbedder(config)
        self.layers = nn.ModuleList([EncoderLayer(config, i) for i in range(config.num_layers)])
        self.final_norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels else None
        self.next_step = NextStepHead(config) if config.next_step_vocab else None
        self.prototype = nn.Linear(config.hidden_size, config.prototype_dim) if config.prototype_dim else None
        has_fields = bool(config.categorical_fields or config.numeric_fields)
        self.masked_field = MaskedFieldHead(config) if has_fields else None
        self.post_init()

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, with each MoE layer's unsaved balance loads cleared.

        The loads are non-persistent buffers: transformers allocates them for the loaded model without
        initialising them (`DomainMoE.reset_balance_load`).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.reset_balance_load()
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Conv3d) and getattr(module, "fan_in_init", False):
            # The CT stem's convolutions: PyTorch's fan-in initialisation (the 0.02 normal meant for
            # patch projections would shrink the signal conv by conv).
            module.reset_parameters()
        elif isinstance(module, nn.Conv3d):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PeriodicEncoding):
            nn.init.normal_(module.frequencies, std=1.0)
            nn.init.normal_(module.linear, std=module.linear.shape[1] ** -0.5)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DynamicAttention):
            # The gate starts as plain pooled-query x pooled-key similarity.
            nn.init.zeros_(module.gating_factor)
        elif isinstance(module, FieldEmbedder):
            nn.init.normal_(module.mask_token, std=std)
            if module.n_numeric:
                nn.init.normal_(module.numeric_missing, std=std)
        elif isinstance(module, DomainMoE) and module.domain_prior is not None:
            # No domain preference until training finds one, beyond the configured expert groups
            # (children were initialised first).
            module.reset_domain_prior()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        attention_mask: torch.Tensor | None = None,
        categorical: dict[str, torch.Tensor] | None = None,
        numeric: torch.Tensor | None = None,
        numeric_mask: torch.Tensor | None = None,
        time_delta: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        domain_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        volume: torch.Tensor | None = None,
        volume_present: torch.Tensor | None = None,
        volume_domain_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_labels: torch.Tensor | None = None,
        next_item_ids: torch.Tensor | None = None,
        next_labels: torch.Tensor | None = None,
        next_features: torch.Tensor | None = None,
        mfm_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> CoreOutput:
        """Run the model on one batch (the fields of `core.data.Batch`).

        Args:
            attention_mask: (B, T) bool, True for real field tokens.
            categorical, numeric, numeric_mask, time_delta, modality_ids: field inputs, see `FieldEmbedder`.
            domain_ids: (B, T) or (B,) long domain ids of the field tokens (router prior, domain embedding).
            position_ids: (B, T_total) or (T_total,) positions for RoPE; default 0..T_total-1.
            volume: (B, C, D, H, W) CT volumes; their patch tokens are placed before the field tokens.
            volume_present: (B,) bool, False for cases without CT (the modality is masked out).
            volume_domain_ids: (B,) domain id of the CT tokens; default `domain_ids` when it is (B,), else 0.
            labels: (B,) class ids for sequence classification.
            token_labels: (B, T) class ids per field token (-100 to ignore), e.g. one fraud label per transaction.
            next_item_ids: (B, T) the item answered after each step (0 where none).
            next_labels: (B, T) float 0/1 correctness of that next answer (-1 to ignore).
            next_features: (B, T, F) long bucket ids of that next item's extra features (only read when
                `config.next_step_feature_buckets` is set).
            mfm_mask: (B, T) bool field tokens masked for masked-field modelling (stage 1).
            output_attentions: return each layer's `AttentionTrace` with attention weights.

        Returns:
            `CoreOutput`.
        """
        hidden_states, full_mask, token_domains, n_volume = self._embed(
            attention_mask,
            categorical,
            numeric,
            numeric_mask,
            time_delta,
            modality_ids,
            domain_ids,
            volume,
            volume_present,
            volume_domain_ids,
            mfm_mask,
        )
        router_logits, traces = [], []
        for layer in self.layers:
            hidden_states, layer_router_logits, trace = layer(
                hidden_states, full_mask, token_domains, position_ids, output_attentions=output_attentions
            )
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
            traces.append(trace)
        hidden_states = self.final_norm(hidden_states)  # (B, T_total, hidden)
        field_states = hidden_states[:, n_volume:]  # (B, T, hidden)

        out: dict[str, torch.Tensor | None] = {}
        losses: list[torch.Tensor] = []
        if self.classifier is not None:
            out["logits"] = self.classifier(self.pool(hidden_states, full_mask, n_volume))
            if labels is not None:
                losses.append(classification_loss(out["logits"], labels, self.config))
            if token_labels is not None:
                out["token_logits"] = self.classifier(field_states)
                losses.append(classification_loss(out["token_logits"], token_labels, self.config))
        if self.next_step is not None and next_item_ids is not None:
            out["next_step_logits"] = self.next_step(
                field_states,
                next_item_ids,
                memory_mask=full_mask[:, n_volume:],
                next_features=next_features,
            )
            if next_labels is not None:
                losses.append(next_step_loss(out["next_step_logits"], next_labels))
        if self.prototype is not None:
            out["embeddings"] = F.normalize(
                self.prototype(self.pool(hidden_states, full_mask, n_volume)), dim=-1
            )
        mfm_loss = None
        if mfm_mask is not None:
            if self.masked_field is None:
                raise InputValidationError("mfm_mask given but the config has no fields to reconstruct")
            cat_logits, num_pred = self.masked_field(field_states)
            mfm_loss = masked_field_loss(
                cat_logits, num_pred, categorical or {}, numeric, numeric_mask, mfm_mask
            )
            losses.append(mfm_loss)
        aux_loss = None
        if self.config.balance == "aux_loss" and router_logits and self.training:
            aux_loss = self.config.router_aux_loss_coef * load_balancing_loss(
                tuple(router_logits), self.config.moe_top_k, self.config.n_routed_experts, full_mask
            )
            losses.append(aux_loss)
        return CoreOutput(
            loss=torch.stack(losses).sum() if losses else None,
            mfm_loss=mfm_loss,
            aux_loss=aux_loss,
            hidden_states=hidden_states,
            router_logits=tuple(router_logits) or None,
            attentions=tuple(traces) if output_attentions else None,
            **out,
        )

    def _embed(
        self,
        attention_mask,
        categorical,
        numeric,
        numeric_mask,
        time_delta,
        modality_ids,
        domain_ids,
        volume,
        volume_present,
        volume_domain_ids,
        mfm_mask,
    ):
        """Build the token sequence: (B, T_total, hidden), (B, T_total) mask, (B, T_total) domains, #CT tokens."""
        has_fields = bool(categorical) or numeric is not None or time_delta is not None
        parts, masks, domains = [], [], []
        batch = None
        if volume is not None:
            batch = volume.shape[0]
            tokens = self.volume_embedder(volume.to(self.dtype))  # (B, Nv, hidden)
            n_volume = tokens.shape[1]
            if volume_domain_ids is None:
                volume_domain_ids = (
                    domain_ids
                    if domain_ids is not None and domain_ids.dim() == 1
                    else torch.zeros(batch, dtype=torch.long, device=tokens.device)
                )
            modality = torch.full((batch, n_volume), self.config.volume_modality_id, device=tokens.device)
            vol_domains = volume_domain_ids[:, None].expand(batch, n_volume)
            tokens = tokens + self.field_embedder.modality(modality) + self.field_embedder.domain(vol_domains)
            present = (
                torch.ones(batch, dtype=torch.bool, device=tokens.device)
                if volume_present is None
                else volume_present.to(torch.bool)
            )
            parts.append(tokens)
            masks.append(present[:, None].expand(batch, n_volume))
            domains.append(vol_domains)
        else:
            n_volume = 0
        if has_fields:
            tokens = self.field_embedder(
                categorical, numeric, numeric_mask, time_delta, modality_ids, domain_ids, mfm_mask
            )  # (B, T, hidden)
            batch, length = tokens.shape[:2]
            parts.append(tokens.to(self.dtype))
            field_mask = (
                torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
                if attention_mask is None
                else attention_mask.to(torch.bool)
            )
            masks.append(field_mask)
            if domain_ids is None:
                domain_ids = torch.zeros(batch, length, dtype=torch.long, device=tokens.device)
            domains.append(domain_ids[:, None].expand(batch, length) if domain_ids.dim() == 1 else domain_ids)
        if not parts:
            raise InputValidationError("the batch has neither field tokens nor a CT volume")
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1), torch.cat(domains, dim=1), n_volume

    def pool(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, n_volume: int = 0
    ) -> torch.Tensor:
        """(B, T, hidden) -> (B, hidden) by the configured pooling over real tokens.

        `n_volume`: how many leading tokens are CT patch tokens ("modality_mean" averages them apart).
        """
        mask = attention_mask.to(hidden_states.dtype)  # (B, T)
        if self.config.classifier_pooling == "mean":
            return (hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        if self.config.classifier_pooling in ("modality_mean", "modality_max"):
            # The average of a CT summary and the field tokens' mean (of those present): hundreds of CT
            # tokens do not drown a record's twenty. "modality_max" summarises the CT by its max over
            # tokens, so a lesion in one or two of 512 tokens is not averaged away.
            summaries, present = [], []
            for part in (slice(0, n_volume), slice(n_volume, None)):
                states, weights = hidden_states[:, part], mask[:, part]
                count = weights.sum(1, keepdim=True)  # (B, 1)
                if part.start == 0 and self.config.classifier_pooling == "modality_max":
                    peak = states.masked_fill(weights[..., None] == 0, float("-inf")).amax(dim=1)
                    summaries.append(torch.where(count > 0, peak, torch.zeros_like(peak)))
                else:
                    summaries.append((states * weights[..., None]).sum(1) / count.clamp_min(1.0))
                present.append((count > 0).to(hidden_states.dtype))
            total = (present[0] + present[1]).clamp_min(1.0)
            return (summaries[0] * present[0] + summaries[1] * present[1]) / total
        if self.config.classifier_pooling == "max":  # a finding in a few tokens is not averaged away
            return hidden_states.masked_fill(~attention_mask.bool()[..., None], float("-inf")).amax(dim=1)
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        if self.config.classifier_pooling == "last":
            index = (attention_mask * positions).amax(dim=1)  # last real token
        else:
            index = torch.where(attention_mask, positions, hidden_states.shape[1]).amin(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]

    # ------------------------------------------------------------------ telemetry
    def moe_layers(self) -> list[DomainMoE]:
        """The DomainMoE blocks in layer order (empty when `use_moe` is False)."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, DomainMoE)]


AutoConfig.register(CoreConfig.model_type, CoreConfig)
AutoModel.register(CoreConfig, CoreModel)
