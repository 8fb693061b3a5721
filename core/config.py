"""CoreConfig: every architecture knob of the shared model, validated on construction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

from core.errors import ConfigError

_POOLINGS = ("mean", "max", "last", "first", "modality_mean", "modality_max")

BALANCE_MODES = ("aux_free", "aux_loss", "none")
ATTENTION_BACKENDS = ("auto", "gather", "flex")
POSITION_ENCODINGS = ("rope", "none")


def _expect(condition: bool, field: str, expected: str, got: Any) -> None:
    if not condition:
        raise ConfigError(f"CoreConfig.{field}: expected {expected}, got {got!r}")


class CoreConfig(PretrainedConfig):
    """Architecture of `CoreModel`: sizes, dynamic attention, domain MoE, embedders and heads.

    Training knobs (learning rate, epochs, precision) are `transformers.TrainingArguments`, not fields here.

    Args:
        hidden_size: width of the residual stream.
        num_layers: number of encoder layers (each DynamicAttention + DomainMoE).
        num_heads: attention heads; `hidden_size` must be divisible by it.
        ffn_size: hidden width of each SwiGLU expert (routed and shared).
        dense_ffn_size: width of the dense SwiGLU FFN used when `use_moe` is False (default 4 x hidden).
        dropout: dropout on attention output and FFN output.
        layer_norm_eps: epsilon of the RMS norms.
        position_encoding: "rope" (rotary on queries/keys over the flattened token order) or "none".
        rope_theta: rotary base.
        recency_bias: add a learned per-head recency bias to the attention logits, `-slope_h * (i - j)` for
            query position i and key position j (ALiBi with learned slopes, kept >= 0 by a softplus), so
            each head's attention decays with distance at its own rate, like AKT's monotonic attention.
            Causal attention only; the dense, gather and FlexAttention paths all apply it. Off by default.
        block_size: tokens per key/query block of the dynamic attention.
        top_k_blocks: key blocks each query block keeps besides its own block.
        dense_below: sequences shorter than this use exact dense attention.
        dense_below_gpu: the same threshold on CUDA, where fused dense kernels win longer (training a small
            model on an H200 broke even at 8192 tokens; see bench/core_bench.py).
        dense_tail_layers: the last N layers always use dense attention.
        output_gate: sigmoid output gate per head after attention.
        causal: causal (next-step) or bidirectional attention.
        attention_backend: "auto" (FlexAttention on CUDA, gather + fused SDPA elsewhere), "gather" or "flex".
        use_moe: DomainMoE in every layer (True) or a dense SwiGLU FFN (False).
        n_routed_experts: routed experts per MoE layer.
        n_shared_experts: always-on experts per MoE layer.
        moe_top_k: routed experts per token.
        domains: domain names; a token's `domain_ids` index this tuple.
        balance: "aux_free" (DeepSeek-V3 selection bias), "aux_loss" (Switch auxiliary loss) or "none".
        bias_update_rate: step of the aux-free bias update.
        router_aux_loss_coef: weight of the Switch auxiliary loss when `balance="aux_loss"`.
        router_domain_prior: add a learned per-domain prior to the router logits.
        categorical_fields: name -> vocabulary size (index 0 is padding, 1 is the unknown bucket).
        numeric_fields: names of numeric fields (a learned numeric encoding each).
        numeric_frequencies: Fourier frequencies of the numeric encoding.
        use_time_delta: embed the time since the previous token (seconds, log-scaled).
        num_modalities: modality embeddings (e.g. record fields, CT patches).
        volume_patch_size: (depth, height, width) voxels per CT patch token.
        volume_channels: channels of the CT input (window presets stacked as channels).
        volume_stem_channels: 0: each patch is one linear projection (ViT). > 0: the width w of a small
            3-D CNN (`core.embeddings.ConvStem`: three stages of two 3x3x3 convolutions, widths w, 2w,
            4w, max-pooled down to the patch grid) whose features per patch are projected to the tokens,
            so a lesion a few voxels wide anywhere in the patch shows in its token.
        num_labels: classes of the classification head (0: no head).
        classifier_pooling: "mean", "max", "last" or "first" token pooling for classification, or
            "modality_mean": the mean of the CT tokens' mean and the field tokens' mean, or
            "modality_max": the mean of the CT tokens' max and the field tokens' mean.
        next_step_vocab: items the next-step head can score (0: no head).
        next_step_retrieval: the next-step head also reads a question-aware summary of the history: the
            item to predict attends (multi-head, with a learned per-head recency decay as in AKT's knowledge
            retriever) over the final states of the steps up to the current one, and the head scores
            [state, item, retrieved]. Causal models only. Off by default.
        next_step_feature_buckets: bucket counts of extra categorical features of the item to predict
            (e.g. an app's practice history of that item's skill, computed from earlier steps only), each
            embedded and added to the head's item embedding; index 0 is padding. Empty: none (default).
        prototype_dim: size of the prototype (few-shot) embedding (0: no head).
        classification_loss: "ce" (cross-entropy) or "focal" for the classification heads.
        focal_gamma: focusing parameter of the focal loss.
        class_weights: per-class loss weights (imbalanced labels), or None.
        volume_modality_id: modality id given to CT patch tokens.
        domain_expert_groups: domain name -> the routed experts reserved for it (e.g. 16 experts as four
            groups of four: one per app of the suite and a general group). Experts in no group are general,
            open to every domain. None: no groups. Only initialises the router prior (see
            `domain_prior_init`); training is free to move it.
        domain_group_prior: initial prior logit gap between a domain's own group and general experts (0)
            and the experts of the other domains' groups (`-domain_group_prior`).
        layer_num_heads: per layer, the attention heads kept by structured pruning (`core.compress`), or None
            (every layer has `num_heads`). The head size stays `hidden_size // num_heads`.
        layer_routed_experts: per layer, the routed experts kept by expert pruning, or None (every layer has
            `n_routed_experts`); each must be at least `moe_top_k`.
        layer_ffn_sizes: per layer, the hidden width of every routed expert after FFN pruning, or None
            (`ffn_size`).
        layer_shared_ffn_sizes: per layer, the width of the fused shared experts (MoE layers) or of the dense
            FFN (`use_moe=False`) after FFN pruning, or None (`n_shared_experts * ffn_size`, resp.
            `dense_ffn_size`).
        layer_has_ffn: per layer, whether it keeps its feed-forward block (MoE or dense FFN); None keeps
            every one. Block pruning (`core.compress.plan_block_pruning`) drops the blocks that change the
            hidden states least; such a layer is attention plus residual only.
    """

    model_type = "verticals-core"

    def __init__(
        self,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_size: int = 128,
        dense_ffn_size: int | None = None,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        position_encoding: str = "rope",
        rope_theta: float = 10000.0,
        recency_bias: bool = False,
        block_size: int = 128,
        top_k_blocks: int = 1,
        dense_below: int = 512,
        dense_below_gpu: int = 8192,
        dense_tail_layers: int = 1,
        output_gate: bool = True,
        causal: bool = False,
        attention_backend: str = "auto",
        use_moe: bool = True,
        n_routed_experts: int = 16,
        n_shared_experts: int = 1,
        moe_top_k: int = 2,
        domains: Sequence[str] = ("general",),
        balance: str = "aux_free",
        bias_update_rate: float = 1e-3,
        router_aux_loss_coef: float = 0.01,
        router_domain_prior: bool = True,
        categorical_fields: Mapping[str, int] | None = None,
        numeric_fields: Sequence[str] = (),
        numeric_frequencies: int = 8,
        use_time_delta: bool = False,
        num_modalities: int = 1,
        volume_patch_size: Sequence[int] = (4, 16, 16),
        volume_channels: int = 1,
        volume_stem_channels: int = 0,
        num_labels: int = 0,
        classifier_pooling: str = "mean",
        next_step_vocab: int = 0,
        next_step_retrieval: bool = False,
        next_step_feature_buckets: Sequence[int] = (),
        prototype_dim: int = 0,
        classification_loss: str = "ce",
        focal_gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        volume_modality_id: int = 0,
        initializer_range: float = 0.02,
        domain_expert_groups: Mapping[str, Sequence[int]] | None = None,
        domain_group_prior: float = 4.0,
        layer_num_heads: Sequence[int] | None = None,
        layer_routed_experts: Sequence[int] | None = None,
        layer_ffn_sizes: Sequence[int] | None = None,
        layer_shared_ffn_sizes: Sequence[int] | None = None,
        layer_has_ffn: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ffn_size = ffn_size
        self.dense_ffn_size = dense_ffn_size if dense_ffn_size is not None else 4 * hidden_size
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.position_encoding = position_encoding
        self.rope_theta = rope_theta
        self.recency_bias = recency_bias
        self.block_size = block_size
        self.top_k_blocks = top_k_blocks
        self.dense_below = dense_below
        self.dense_below_gpu = dense_below_gpu
        self.dense_tail_layers = dense_tail_layers
        self.output_gate = output_gate
        self.causal = causal
        self.attention_backend = attention_backend
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.moe_top_k = moe_top_k
        self.domains = list(domains)
        self.balance = balance
        self.bias_update_rate = bias_update_rate
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_domain_prior = router_domain_prior
        self.categorical_fields = dict(categorical_fields or {})
        self.numeric_fields = list(numeric_fields)
        self.numeric_frequencies = numeric_frequencies
        self.use_time_delta = use_time_delta
        self.num_modalities = num_modalities
        self.volume_patch_size = list(volume_patch_size)
        self.volume_channels = volume_channels
        self.volume_stem_channels = volume_stem_channels
        self.classifier_pooling = classifier_pooling
        self.next_step_vocab = next_step_vocab
        self.next_step_retrieval = next_step_retrieval
        self.next_step_feature_buckets = [int(n) for n in next_step_feature_buckets]
        self.prototype_dim = prototype_dim
        self.classification_loss = classification_loss
        self.focal_gamma = focal_gamma
        self.class_weights = list(class_weights) if class_weights is not None else None
        self.volume_modality_id = volume_modality_id
        self.initializer_range = initializer_range
        self.domain_expert_groups = (
            {str(name): [int(e) for e in experts] for name, experts in domain_expert_groups.items()}
            if domain_expert_groups is not None
            else None
        )
        self.domain_group_prior = domain_group_prior
        self.layer_num_heads = list(layer_num_heads) if layer_num_heads is not None else None
        self.layer_routed_experts = list(layer_routed_experts) if layer_routed_experts is not None else None
        self.layer_ffn_sizes = list(layer_ffn_sizes) if layer_ffn_sizes is not None else None
        self.layer_shared_ffn_sizes = (
            list(layer_shared_ffn_sizes) if layer_shared_ffn_sizes is not None else None
        )
        self.layer_has_ffn = [bool(v) for v in layer_has_ffn] if layer_has_ffn is not None else None
        # `num_labels` is owned by PretrainedConfig (it builds id2label from it).
        # A saved config carries id2label instead; it then decides the number of labels.
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", num_labels)
        super().__init__(**kwargs)
        self._validate()

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # transformers keeps only id2label, and drops it when it has the default two labels; the number of
        # labels is part of the architecture here (0 means no head), so it is always written.
        output["num_labels"] = self.num_labels
        return output

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def heads_in_layer(self, layer_idx: int) -> int:
        """Attention heads of layer `layer_idx` (fewer than `num_heads` after head pruning)."""
        return self.num_heads if self.layer_num_heads is None else self.layer_num_heads[layer_idx]

    def experts_in_layer(self, layer_idx: int) -> int:
        """Routed experts of layer `layer_idx` (fewer than `n_routed_experts` after expert pruning)."""
        return (
            self.n_routed_experts
            if self.layer_routed_experts is None
            else self.layer_routed_experts[layer_idx]
        )

    def ffn_size_in_layer(self, layer_idx: int) -> int:
        """Hidden width of each routed expert of layer `layer_idx`."""
        return self.ffn_size if self.layer_ffn_sizes is None else self.layer_ffn_sizes[layer_idx]

    def shared_ffn_size_in_layer(self, layer_idx: int) -> int:
        """Width of the fused shared experts (MoE) or of the dense FFN (no MoE) of layer `layer_idx`."""
        if self.layer_shared_ffn_sizes is not None:
            return self.layer_shared_ffn_sizes[layer_idx]
        return self.n_shared_experts * self.ffn_size if self.use_moe else self.dense_ffn_size

    def has_ffn(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a feed-forward block (False after block pruning dropped it)."""
        return self.layer_has_ffn is None or self.layer_has_ffn[layer_idx]

    def domain_id(self, name: str) -> int:
        """Index of a domain name, raising `ConfigError` listing the known domains."""
        if name not in self.domains:
            raise ConfigError(f"CoreConfig.domains: unknown domain {name!r}; known domains: {self.domains}")
        return self.domains.index(name)

    def general_experts(self) -> list[int]:
        """Routed experts in no domain's group (all of them without `domain_expert_groups`)."""
        grouped = {e for experts in (self.domain_expert_groups or {}).values() for e in experts}
        return [e for e in range(self.n_routed_experts) if e not in grouped]

    def domain_prior_init(self) -> list[list[float]] | None:
        """Initial router prior (num_domains x n_routed_experts logits) from `domain_expert_groups`.

        A domain with a group gets 0 on its own group and the general experts and `-domain_group_prior` on
        the other domains' groups; a domain without a group gets 0 everywhere. None without groups.
        """
        if not self.domain_expert_groups:
            return None
        rows = []
        for name in self.domains:
            own = self.domain_expert_groups.get(name)
            if own is None:
                rows.append([0.0] * self.n_routed_experts)
                continue
            allowed = set(own) | set(self.general_experts())
            rows.append(
                [
                    0.0 if e in allowed else -float(self.domain_group_prior)
                    for e in range(self.n_routed_experts)
                ]
            )
        return rows

    def _validate(self) -> None:
        for field in ("hidden_size", "num_layers", "num_heads", "ffn_size", "dense_ffn_size", "block_size"):
            value = getattr(self, field)
            _expect(isinstance(value, int) and value > 0, field, "a positive integer", value)
        _expect(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"a multiple of num_heads={self.num_heads}",
            self.hidden_size,
        )
        _expect(
            self.head_dim % 2 == 0,
            "num_heads",
            "a head size (hidden_size / num_heads) that is even",
            self.num_heads,
        )
        _expect(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        _expect(
            self.position_encoding in POSITION_ENCODINGS,
            "position_encoding",
            f"one of {POSITION_ENCODINGS}",
            self.position_encoding,
        )
        _expect(
            isinstance(self.recency_bias, bool) and (self.causal or not self.recency_bias),
            "recency_bias",
            "a bool, True only with causal=True (the bias decays with how far a key lies in the past)",
            self.recency_bias,
        )
        _expect(
            isinstance(self.top_k_blocks, int) and self.top_k_blocks >= 0,
            "top_k_blocks",
            "an integer >= 0",
            self.top_k_blocks,
        )
        for field in ("dense_below", "dense_below_gpu", "dense_tail_layers", "n_shared_experts"):
            value = getattr(self, field)
            _expect(isinstance(value, int) and value >= 0, field, "an integer >= 0", value)
        _expect(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            f"one of {ATTENTION_BACKENDS}",
            self.attention_backend,
        )
        _expect(
            isinstance(self.n_routed_experts, int) and self.n_routed_experts >= 1,
            "n_routed_experts",
            "an integer >= 1",
            self.n_routed_experts,
        )
        _expect(
            isinstance(self.moe_top_k, int) and 1 <= self.moe_top_k <= self.n_routed_experts,
            "moe_top_k",
            f"an integer in [1, n_routed_experts={self.n_routed_experts}]",
            self.moe_top_k,
        )
        _expect(
            len(self.domains) >= 1 and all(isinstance(d, str) and d for d in self.domains),
            "domains",
            "a non-empty list of non-empty names",
            self.domains,
        )
        _expect(len(set(self.domains)) == len(self.domains), "domains", "unique names", self.domains)
        _expect(self.balance in BALANCE_MODES, "balance", f"one of {BALANCE_MODES}", self.balance)
        _expect(self.bias_update_rate >= 0, "bias_update_rate", "a float >= 0", self.bias_update_rate)
        _expect(
            self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "a float >= 0", self.router_aux_loss_coef
        )
        for name, size in self.categorical_fields.items():
            _expect(
                isinstance(size, int) and size >= 2,
                f"categorical_fields[{name!r}]",
                "a vocabulary size >= 2",
                size,
            )
        _expect(
            self.numeric_frequencies >= 1, "numeric_frequencies", "an integer >= 1", self.numeric_frequencies
        )
        _expect(self.num_modalities >= 1, "num_modalities", "an integer >= 1", self.num_modalities)
        _expect(
            len(self.volume_patch_size) == 3
            and all(isinstance(p, int) and p > 0 for p in self.volume_patch_size),
            "volume_patch_size",
            "three positive integers (depth, height, width)",
            self.volume_patch_size,
        )
        _expect(
            self.volume_stem_channels >= 0,
            "volume_stem_channels",
            "an integer >= 0",
            self.volume_stem_channels,
        )
        _expect(self.num_labels >= 0, "num_labels", "an integer >= 0", self.num_labels)
        _expect(
            self.classifier_pooling in _POOLINGS,
            "classifier_pooling",
            f"one of {_POOLINGS}",
            self.classifier_pooling,
        )
        _expect(self.next_step_vocab >= 0, "next_step_vocab", "an integer >= 0", self.next_step_vocab)
        _expect(
            isinstance(self.next_step_retrieval, bool) and (self.causal or not self.next_step_retrieval),
            "next_step_retrieval",
            "a bool, True only with causal=True (a step may only read the states before it)",
            self.next_step_retrieval,
        )
        _expect(
            all(n >= 2 for n in self.next_step_feature_buckets)
            and (self.next_step_vocab > 0 or not self.next_step_feature_buckets),
            "next_step_feature_buckets",
            "bucket counts >= 2 (padding + at least one value), only with a next-step head",
            self.next_step_feature_buckets,
        )
        _expect(self.prototype_dim >= 0, "prototype_dim", "an integer >= 0", self.prototype_dim)
        _expect(
            self.classification_loss in ("ce", "focal"),
            "classification_loss",
            "one of ('ce', 'focal')",
            self.classification_loss,
        )
        _expect(self.focal_gamma >= 0, "focal_gamma", "a float >= 0", self.focal_gamma)
        if self.class_weights is not None:
            _expect(
                len(self.class_weights) == self.num_labels and all(w >= 0 for w in self.class_weights),
                "class_weights",
                f"{self.num_labels} non-negative weights (one per label)",
                self.class_weights,
            )
        _expect(
            0 <= self.volume_modality_id < self.num_modalities,
            "volume_modality_id",
            f"an integer in [0, num_modalities={self.num_modalities})",
            self.volume_modality_id,
        )
        self._validate_pruned_layers()
        self._validate_expert_groups()

    def _validate_pruned_layers(self) -> None:
        limits = {
            "layer_num_heads": (1, self.num_heads),
            "layer_routed_experts": (self.moe_top_k, self.n_routed_experts),
            "layer_ffn_sizes": (1, None),
            "layer_shared_ffn_sizes": (0 if self.use_moe else 1, None),
        }
        for field, (low, high) in limits.items():
            values = getattr(self, field)
            if values is None:
                continue
            upper = "" if high is None else f" and <= {high}"
            _expect(
                len(values) == self.num_layers
                and all(isinstance(v, int) and v >= low and (high is None or v <= high) for v in values),
                field,
                f"None or {self.num_layers} integers (one per layer) >= {low}{upper}",
                values,
            )
        if self.layer_has_ffn is not None:
            _expect(
                len(self.layer_has_ffn) == self.num_layers,
                "layer_has_ffn",
                f"None or {self.num_layers} booleans (one per layer)",
                self.layer_has_ffn,
            )
        if self.layer_shared_ffn_sizes is not None and self.use_moe:
            _expect(
                all((v > 0) == (self.n_shared_experts > 0) for v in self.layer_shared_ffn_sizes),
                "layer_shared_ffn_sizes",
                f"widths > 0 exactly when n_shared_experts > 0 (n_shared_experts={self.n_shared_experts})",
                self.layer_shared_ffn_sizes,
            )

    def _validate_expert_groups(self) -> None:
        _expect(self.domain_group_prior >= 0, "domain_group_prior", "a float >= 0", self.domain_group_prior)
        if self.domain_expert_groups is None:
            return
        unknown = sorted(set(self.domain_expert_groups) - set(self.domains))
        _expect(not unknown, "domain_expert_groups", f"keys among domains {self.domains}", unknown)
        seen: set[int] = set()
        for name, experts in self.domain_expert_groups.items():
            _expect(
                len(experts) >= 1
                and all(0 <= e < self.n_routed_experts for e in experts)
                and not seen & set(experts)
                and len(set(experts)) == len(experts),
                f"domain_expert_groups[{name!r}]",
                f"distinct expert ids in [0, n_routed_experts={self.n_routed_experts}) in no other group",
                experts,
            )
            seen |= set(experts)
            reachable = len(experts) + len(self.general_experts())
            _expect(
                reachable >= self.moe_top_k,
                f"domain_expert_groups[{name!r}]",
                f"a group that with the general experts holds at least moe_top_k={self.moe_top_k} experts",
                experts,
            )
