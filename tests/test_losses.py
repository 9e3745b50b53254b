"""Losses: values against hand formulas, empty masks, argument checks, deep-supervision weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet.losses import (
    LOSSES,
    BCEWithLogitsLoss,
    DeepSupervisionLoss,
    DiceBCELoss,
    SoftDiceLoss,
    build_loss,
    deep_supervision_weights,
)

ALL_LOSSES = sorted(LOSSES)


def _random_batch(seed: int = 0, b: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, size, size, generator=g)
    target = (torch.rand(b, 1, size, size, generator=g) > 0.6).float()
    return logits, target


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("fill", [-5.0, 0.0, 5.0])
def test_finite_with_gradients_on_all_empty_masks(name, fill):
    # Normal images: the whole batch has empty masks.
    logits = torch.full((2, 1, 16, 16), fill, requires_grad=True)
    target = torch.zeros(2, 1, 16, 16)
    loss = build_loss(name)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # Predicting foreground on an empty mask must be penalised, i.e. the gradient pushes logits down.
    assert (logits.grad > 0).all()


@pytest.mark.parametrize("per_image", [True, False])
def test_dice_is_zero_for_perfect_logits_including_empty_masks(per_image):
    _, target = _random_batch()
    target[1] = 0  # one empty (normal) image in the batch
    logits = (target * 2 - 1) * 30.0
    loss = SoftDiceLoss(per_image=per_image)(logits, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(1, 1, 16, 16)
    empty_loss = SoftDiceLoss(per_image=per_image)(torch.full_like(empty, -30.0), empty)
    assert empty_loss.item() == pytest.approx(0.0, abs=1e-6)


def test_dice_is_near_one_for_inverted_logits():
    _, target = _random_batch()
    logits = (1 - target * 2) * 30.0
    assert SoftDiceLoss(smooth=1e-3)(logits, target).item() == pytest.approx(1.0, abs=1e-3)


def test_dice_matches_hand_formula_per_image_and_batch_global():
    logits, target = _random_batch(seed=1)
    target[0] = 0
    p = torch.sigmoid(logits)
    s = 1.0
    per = [1 - (2 * (p[i] * target[i]).sum() + s) / (p[i].sum() + target[i].sum() + s) for i in range(3)]
    expected_per_image = torch.stack(per).mean()
    expected_global = 1 - (2 * (p * target).sum() + s) / (p.sum() + target.sum() + s)
    assert SoftDiceLoss(smooth=s)(logits, target).item() == pytest.approx(expected_per_image.item(), rel=1e-6)
    assert SoftDiceLoss(smooth=s, per_image=False)(logits, target).item() == pytest.approx(
        expected_global.item(), rel=1e-6
    )
    assert not math.isclose(expected_per_image.item(), expected_global.item(), rel_tol=1e-3)


def test_bce_matches_elementwise_formula():
    logits, target = _random_batch(seed=2)
    p = torch.sigmoid(logits.double())
    expected = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert BCEWithLogitsLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_stable_for_extreme_logits():
    logits = torch.tensor([[[[1e4, -1e4]]]])
    target = torch.tensor([[[[0.0, 1.0]]]])
    loss = BCEWithLogitsLoss()(logits, target)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4)


def test_dice_bce_is_weighted_sum():
    logits, target = _random_batch(seed=3)
    dice = SoftDiceLoss()(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    loss = build_loss("dice_bce", dice_weight=0.7, bce_weight=2.0)(logits, target)
    assert loss.item() == pytest.approx((0.7 * dice + 2.0 * bce).item(), rel=1e-6)
    only_dice = DiceBCELoss(dice_weight=1.0, bce_weight=0.0)(logits, target)
    assert only_dice.item() == pytest.approx(dice.item(), rel=1e-6)


def test_accepts_3d_bool_target_and_half_precision_logits():
    logits, target = _random_batch(seed=4)
    ref = build_loss("dice_bce")(logits, target)
    got = build_loss("dice_bce")(logits.half(), target[:, 0].bool())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)


def test_shape_mismatch_raises_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 1, 16, 16\)"):
        SoftDiceLoss()(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="logits must have shape"):
        SoftDiceLoss()(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16))


def test_build_loss_names_and_errors():
    assert isinstance(build_loss("dice"), SoftDiceLoss)
    assert isinstance(build_loss("bce"), BCEWithLogitsLoss)
    assert isinstance(build_loss("dice_bce"), DiceBCELoss)
    with pytest.raises(KeyError, match="dice_bce") as info:
        build_loss("focal")
    assert all(n in str(info.value) for n in ALL_LOSSES)
    with pytest.raises(TypeError, match="dice_weight"):
        build_loss("bce", dice_weight=1.0)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"bce_weight": float("nan")}, "bce_weight"),
        ({"bce_weight": "1"}, "bce_weight"),
        ({"dice_weight": True}, "dice_weight"),
        ({"dice_weight": 0.0, "bce_weight": 0.0}, "dice_weight and bce_weight"),
        ({"smooth": 0.0}, "smooth"),
    ],
)
def test_bad_weights_raise_value_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        build_loss("dice_bce", **kwargs)


def test_deep_supervision_weights_halve_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(4)
    assert w == pytest.approx([1 / 15, 2 / 15, 4 / 15, 8 / 15])
    assert sum(w) == pytest.approx(1.0)
    assert all(w[i + 1] == pytest.approx(2 * w[i]) for i in range(3))
    with pytest.raises(ValueError, match="num_heads"):
        deep_supervision_weights(0)


def test_deep_supervision_loss_is_weighted_sum_over_heads_final_last():
    base = build_loss("dice_bce")
    ds = DeepSupervisionLoss(base)
    _, target = _random_batch(seed=5)
    heads = [torch.randn_like(target, requires_grad=True) for _ in range(4)]
    loss = ds(heads, target)
    expected = sum(w * base(h, target) for w, h in zip([1, 2, 4, 8], heads, strict=True)) / 15
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)

    # The last head is the final output: making it perfect lowers the loss more than the first.
    perfect = (target * 2 - 1) * 30.0
    bad = torch.zeros_like(target)
    assert ds([bad, bad, bad, perfect], target) < ds([perfect, bad, bad, bad], target)


def test_deep_supervision_passes_single_tensor_through_and_rejects_empty_list():
    base = build_loss("dice")
    logits, target = _random_batch(seed=6)
    assert DeepSupervisionLoss(base)(logits, target).item() == pytest.approx(base(logits, target).item())
    assert DeepSupervisionLoss(base)((logits,), target).item() == pytest.approx(base(logits, target).item())
    with pytest.raises(ValueError, match="empty list"):
        DeepSupervisionLoss(base)([], target)
