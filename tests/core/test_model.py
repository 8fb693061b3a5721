"""CoreModel contract tests: shapes, heads, padding, determinism, save/load round trip, Auto* registration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from core.config import CoreConfig
from core.data import collate
from core.embeddings import ConvStem
from core.errors import InputValidationError
from core.model import CoreModel, CoreOutput, prototype_logits


def model_config(**overrides) -> CoreConfig:
    values = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        top_k_blocks=1,
        dense_below=0,
        dense_tail_layers=0,
        n_routed_experts=3,
        moe_top_k=2,
        domains=("a", "b"),
        categorical_fields={"merchant": 10, "channel": 4},
        numeric_fields=["amount"],
        use_time_delta=True,
        num_labels=2,
        next_step_vocab=7,
        prototype_dim=8,
        num_modalities=2,
        volume_modality_id=1,
    )
    values.update(overrides)
    return CoreConfig(**values)


def make_batch(batch: int = 2, length: int = 9, with_volume: bool = True) -> dict:
    out = dict(
        attention_mask=torch.ones(batch, length, dtype=torch.bool),
        categorical={
            "merchant": torch.randint(1, 10, (batch, length)),
            "channel": torch.randint(1, 4, (batch, length)),
        },
        numeric=torch.randn(batch, length, 1),
        time_delta=torch.rand(batch, length) * 100,
        domain_ids=torch.tensor([0, 1])[:batch],
        labels=torch.tensor([0, 1])[:batch],
        token_labels=torch.randint(0, 2, (batch, length)),
        next_item_ids=torch.randint(1, 7, (batch, length)),
        next_labels=torch.randint(0, 2, (batch, length)).float(),
    )
    if with_volume:
        out["volume"] = torch.randn(batch, 1, 8, 32, 32)
    return out


def test_forward_returns_every_head_with_documented_shapes() -> None:
    model = CoreModel(model_config()).eval()
    out = model(**make_batch(), output_attentions=True)
    assert isinstance(out, CoreOutput)
    assert out.logits.shape == (2, 2)
    assert out.token_logits.shape == (2, 9, 2)
    assert out.next_step_logits.shape == (2, 9)
    assert out.embeddings.shape == (2, 8)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(2))
    assert out.hidden_states.shape == (2, 8 + 9, 32)  # 2x2x2 CT patches first, then 9 field tokens
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 17, 3)
    assert len(out.attentions) == 2 and out.attentions[0].attention_weights.shape == (2, 4, 17, 17)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_loss_backpropagates_to_every_head() -> None:
    model = CoreModel(model_config())
    batch = make_batch()
    batch["mfm_mask"] = torch.rand(2, 9) < 0.3
    batch["mfm_mask"][:, 0] = True
    model(**batch).loss.backward()
    for name in (
        "classifier.weight",
        "next_step.item.weight",
        "masked_field.numeric.weight",
        "volume_embedder.proj.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_padding_does_not_change_real_tokens() -> None:
    model = CoreModel(model_config(causal=True, classifier_pooling="last")).eval()
    short = make_batch(batch=1, length=6, with_volume=False)
    ref = model(**short)
    long = make_batch(batch=1, length=10, with_volume=False)
    for name in ("merchant", "channel"):
        long["categorical"][name][:, :6] = short["categorical"][name]
    long["numeric"][:, :6] = short["numeric"]
    long["time_delta"][:, :6] = short["time_delta"]
    long["attention_mask"][:, 6:] = False
    out = model(**long)
    torch.testing.assert_close(out.hidden_states[:, :6], ref.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_same_seed_same_output() -> None:
    torch.manual_seed(3)
    first = CoreModel(model_config()).eval()(**make_batch()).logits
    torch.manual_seed(3)
    second = CoreModel(model_config()).eval()(**make_batch()).logits
    assert torch.equal(first, second)


def test_missing_ct_modality_is_masked_out() -> None:
    model = CoreModel(model_config()).eval()
    batch = make_batch()
    batch["volume_present"] = torch.tensor([True, False])
    with_ct = model(**batch).logits
    batch["volume"] = batch["volume"] * 100.0  # change the image: only the case that has CT may change
    changed = model(**batch).logits
    assert not torch.allclose(with_ct[0], changed[0])
    torch.testing.assert_close(with_ct[1], changed[1])


def test_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    model = CoreModel(model_config()).eval()
    batch = make_batch()
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CoreModel)
    got = loaded(**batch)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(expected.next_step_logits, got.next_step_logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CoreConfig)


def test_dense_ffn_variant_has_no_router() -> None:
    model = CoreModel(model_config(use_moe=False)).eval()
    out = model(**make_batch(with_volume=False))
    assert out.router_logits is None and model.moe_layers() == []


def test_aux_loss_added_only_in_aux_loss_mode() -> None:
    batch = make_batch(with_volume=False)
    assert CoreModel(model_config(balance="aux_loss")).train()(**batch).aux_loss > 0
    assert CoreModel(model_config(balance="aux_free")).train()(**batch).aux_loss is None


def test_focal_loss_and_class_weights() -> None:
    batch = make_batch(with_volume=False)
    torch.manual_seed(1)
    ce = CoreModel(model_config()).eval()(**{k: batch[k] for k in batch if k != "token_labels"}).loss
    torch.manual_seed(1)
    focal = CoreModel(model_config(classification_loss="focal", class_weights=[1.0, 10.0])).eval()
    assert torch.isfinite(focal(**batch).loss) and not torch.isclose(
        ce, focal(**{k: batch[k] for k in batch if k != "token_labels"}).loss
    )


def test_out_of_vocabulary_ids_raise_a_typed_error() -> None:
    model = CoreModel(model_config()).eval()
    batch = make_batch(with_volume=False)
    batch["categorical"]["merchant"][0, 0] = 99
    with pytest.raises(InputValidationError, match="merchant"):
        model(**batch)


def test_collate_pads_and_model_accepts_it() -> None:
    examples = [
        {
            "categorical": {"merchant": [2, 3, 4], "channel": [1, 1, 2]},
            "numeric": [[0.1], [0.2], [0.3]],
            "labels": 1,
        },
        {"categorical": {"merchant": [5], "channel": [3]}, "numeric": [[1.0]], "labels": 0},
    ]
    batch = collate(examples, pad_to_multiple_of=4)
    assert batch.attention_mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    out = CoreModel(model_config(use_time_delta=False)).eval()(**batch.to_dict())
    assert out.logits.shape == (2, 2)


def test_prototype_logits_prefer_the_nearest_prototype() -> None:
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = prototype_logits(torch.tensor([[0.9, 0.1], [0.0, 1.0]]), prototypes)
    assert logits.argmax(dim=1).tolist() == [0, 1]


def test_convolutional_ct_stem_sees_a_small_finding_anywhere_in_its_patch() -> None:
    """With the stem, a bright 2-voxel spot moves the stem features of the patch that holds it most, wherever
    in the patch it lies (GroupNorm lets it move the others a little), and the stem keeps PyTorch's fan-in
    initialisation (not the 0.02 normal)."""
    torch.manual_seed(0)
    model = CoreModel(model_config(volume_stem_channels=4, volume_patch_size=(4, 8, 8))).eval()
    stem_conv = model.volume_embedder.stem.layers[0]
    assert stem_conv.weight.std() > 0.05  # 0.02 would shrink the signal conv by conv
    base = 0.1 * torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert model.volume_embedder(base).shape == (1, 2 * 4 * 4, model.config.hidden_size)  # per patch
        reference = model.volume_embedder.stem(base)  # (1, 16, 2, 4, 4)
        for z, y, x in [(1, 1, 1), (2, 6, 5)]:  # two places inside patch (0, 0, 0)
            spot = base.clone()
            spot[0, 0, z, y : y + 2, x] = 5.0
            changed = (model.volume_embedder.stem(spot) - reference).abs().amax(dim=1).flatten()
            assert int(changed.argmax()) == 0


def test_stem_pools_down_to_any_patch_grid() -> None:
    """Power-of-two patches pool stage by stage (thin axes last); other factors pool once at the end."""
    for patch, volume in [((4, 8, 8), (8, 16, 32)), ((2, 6, 6), (4, 12, 18)), ((16, 16, 16), (16, 32, 16))]:
        stem = ConvStem(2, 4, patch)
        features = stem(torch.rand(1, 2, *volume))
        assert features.shape == (1, 16, *(v // p for v, p in zip(volume, patch, strict=True)))


def test_max_pooling_ignores_padding_and_keeps_the_strongest_token() -> None:
    model = CoreModel(model_config(classifier_pooling="max"))
    hidden = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(model.pool(hidden, mask), torch.tensor([[3.0, 0.5]]))


def test_model_with_ct_stem_trains_and_round_trips(tmp_path) -> None:
    model = CoreModel(model_config(volume_stem_channels=4, volume_patch_size=(4, 8, 8)))
    out = model(**make_batch())
    out.loss.backward()
    assert model.volume_embedder.stem.layers[0].weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = CoreModel.from_pretrained(tmp_path).eval()
    batch = make_batch()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_modality_mean_pooling_weighs_the_ct_and_the_fields_alike() -> None:
    model = CoreModel(model_config(classifier_pooling="modality_mean"))
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [5.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])  # 3 CT tokens first
    mask = torch.tensor([[True, True, True, True, False]])
    # CT mean (3, 0) and field mean (0, 4) count alike, whatever the token counts; padding ignored.
    torch.testing.assert_close(model.pool(hidden, mask, n_volume=3), torch.tensor([[1.5, 2.0]]))
    no_ct = torch.tensor([[False, False, False, True, False]])  # a case without CT: the fields alone
    torch.testing.assert_close(model.pool(hidden, no_ct, n_volume=3), torch.tensor([[0.0, 4.0]]))


def test_modality_max_pooling_keeps_a_finding_in_one_ct_token() -> None:
    model = CoreModel(model_config(classifier_pooling="modality_max"))
    hidden = torch.tensor([[[1.0, 0.0], [3.0, -2.0], [5.0, -1.0], [0.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    # CT max (5, 0) and field mean (0, 4) count alike; padding ignored.
    torch.testing.assert_close(model.pool(hidden, mask, n_volume=3), torch.tensor([[2.5, 2.0]]))
    no_ct = torch.tensor([[False, False, False, True, False]])  # no CT: the fields alone, no -inf leaks
    torch.testing.assert_close(model.pool(hidden, no_ct, n_volume=3), torch.tensor([[0.0, 4.0]]))


def test_volume_conv_matches_conv3d_outputs_and_gradients_for_a_single_volume() -> None:
    """`VolumeConv3d` forces oneDNN's kernel on the CPU; PyTorch's own choice for a batch of one differs."""
    from core.embeddings import VolumeConv3d

    torch.manual_seed(0)
    reference = torch.nn.Conv3d(3, 8, kernel_size=3, padding=1)
    fast = VolumeConv3d(3, 8, kernel_size=3, padding=1)
    fast.load_state_dict(reference.state_dict())
    volume = torch.rand(1, 3, 8, 16, 16, requires_grad=True)
    expected, got = reference(volume), fast(volume)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), volume)
    (got_grad,) = torch.autograd.grad(got.square().sum(), volume)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-4, rtol=1e-4)
    fast(volume).sum().backward()
    assert fast.weight.grad is not None and fast.weight.grad.abs().sum() > 0


def test_a_loaded_model_starts_with_zero_balance_loads(tmp_path) -> None:
    config = model_config()
    assert config.use_moe
    CoreModel(config).save_pretrained(tmp_path)
    # Leave freed memory full of non-zero bytes where the loaded model's unsaved buffers may be allocated:
    # transformers allocates non-persistent buffers without initialising them.
    litter = [torch.full((n,), 7_000_003, dtype=torch.long) for n in range(1, 257) for _ in range(8)]
    del litter
    for loaded in (CoreModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        for moe in loaded.moe_layers():
            assert int(moe.expert_load.abs().sum()) == 0 and int(moe.domain_load.abs().sum()) == 0
            before = moe.expert_bias.clone()
            moe.update_balance()  # no tokens routed since loading: no bias moves
            assert torch.equal(moe.expert_bias, before)
    model, info = CoreModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(info, dict) and all(int(m.expert_load.abs().sum()) == 0 for m in model.moe_layers())
