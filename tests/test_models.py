"""The UNet family: one row per architecture, tiny CPU tensors, behaviour users rely on."""

from __future__ import annotations

import pytest
import torch

from unet.models import MODELS, AttentionUNet, UNet, build_model, count_parameters

NAMES = sorted(MODELS)
TINY = (4, 8, 16)  # two poolings: pads to multiples of 4, fast on CPU
# Pinned so the README's parameter table cannot drift from the code.
DEFAULT_PARAMETERS = {"unet": 1_942_289, "attention_unet": 2_007_813, "unet_plus_plus": 2_263_425}


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(37, 53), (32, 32), (17, 9)])
def test_forward_backward_any_size(name, size):
    model = build_model(name, channels=TINY)
    x = torch.rand(2, 1, *size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 1, *size)
    logits.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in forward"


@pytest.mark.parametrize("name", NAMES)
def test_busi_size_with_four_poolings(name):
    # 471×562 is a real BUSI size; with 4 poolings it is padded to 480×576 and cropped back.
    model = build_model(name, channels=(2, 4, 8, 8, 8)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 471, 562)).shape == (2, 1, 471, 562)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_seed_config(name):
    model = build_model(name)
    assert model.channels == (16, 32, 64, 128, 256) and model.depth == 4
    assert model.dropout == 0.07 and model.norm == "batch"
    assert (model.in_channels, model.out_channels) == (1, 1)
    assert count_parameters(model) == DEFAULT_PARAMETERS[name]
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 37, 53)).shape == (1, 1, 37, 53)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", ["instance", "none"])
def test_norms_and_multichannel(name, norm):
    model = build_model(name, in_channels=3, out_channels=2, channels=TINY, dropout=0.0, norm=norm)
    assert model(torch.rand(2, 3, 20, 24)).shape == (2, 2, 20, 24)


@pytest.mark.parametrize("name", NAMES)
def test_pad_mode_matters_only_when_padding(name):
    zeros = build_model(name, channels=TINY, pad_mode="zeros").eval()
    replicate = build_model(name, channels=TINY, pad_mode="replicate").eval()
    replicate.load_state_dict(zeros.state_dict())
    with torch.no_grad():
        x = torch.rand(1, 1, 30, 30)  # padded to 32×32: the border is seen differently
        assert not torch.equal(zeros(x), replicate(x))
        y = torch.rand(1, 1, 32, 32)  # already a multiple of 4: no padding, same function
        assert torch.equal(zeros(y), replicate(y))


def test_eval_is_deterministic_and_train_uses_dropout():
    model = build_model("unet", channels=TINY, dropout=0.5)
    x = torch.rand(2, 1, 16, 16)
    assert not torch.equal(model.train()(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


BAD_ARGS = [
    ({"in_channels": 0}, "in_channels"),
    ({"out_channels": -1}, "out_channels"),
    ({"out_channels": 1.5}, "out_channels"),
    ({"channels": (16,)}, "channels"),
    ({"channels": (16, 0, 32)}, "channels"),
    ({"channels": (16, 32.5)}, "channels"),
    ({"channels": "16,32"}, "channels"),
    ({"channels": 16}, "channels"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"norm": "group"}, "norm"),
    ({"pad_mode": "reflect"}, "pad_mode"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("kwargs", "arg"), BAD_ARGS, ids=[f"{k}={v!r}" for (k, v), in (a.items() for a, _ in BAD_ARGS)])
def test_bad_arguments_raise_value_error_naming_them(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        build_model(name, **kwargs)


def test_deep_supervision_must_be_bool():
    with pytest.raises(ValueError, match="deep_supervision"):
        build_model("unet_plus_plus", deep_supervision="yes")


def test_argument_the_architecture_does_not_take():
    with pytest.raises(TypeError, match="deep_supervision"):
        build_model("unet", deep_supervision=True)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_channels(name):
    model = build_model(name, channels=TINY)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.rand(1, 16, 16))


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        build_model("segformer")
    for name in NAMES:
        assert name in str(info.value)


# --- UNet++ deep supervision -------------------------------------------------------------------


def test_deep_supervision_list_in_training_tensor_in_eval():
    # No norm and no dropout, so train and eval compute the same function and can be compared.
    model = build_model(
        "unet_plus_plus", channels=(4, 8, 16, 32), deep_supervision=True, norm="none", dropout=0.0
    )
    x = torch.rand(2, 1, 21, 27)
    heads = model.train()(x)
    assert isinstance(heads, list) and len(heads) == model.depth == 3
    assert all(h.shape == (2, 1, 21, 27) for h in heads)
    assert not torch.equal(heads[0], heads[-1]), "each head reads its own node x_0_j"
    sum(h.mean() for h in heads).backward()
    assert all(model.heads[f"x_0_{j}"].weight.grad is not None for j in (1, 2, 3))
    with torch.no_grad():
        final = model.eval()(x)
    assert isinstance(final, torch.Tensor)
    torch.testing.assert_close(final, heads[-1].detach())  # eval returns the final head x_0_L


# --- predict: the final logits, whatever the architecture ---------------------------------------


def _predict_kwargs(name: str) -> dict:
    # No dropout, so predict and forward can be compared even in training mode.
    return {"channels": TINY, "dropout": 0.0, **({"deep_supervision": True} if name == "unet_plus_plus" else {})}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_predict_returns_full_resolution_final_logits_without_grad(name, mode):
    model = build_model(name, **_predict_kwargs(name)).train(mode == "train")
    x = torch.rand(2, 1, 37, 53, requires_grad=True)
    logits = model.predict(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1, 37, 53)
    assert not logits.requires_grad, "predict runs without grad"
    assert model.training == (mode == "train"), "predict leaves the model's mode as it was"
    with torch.no_grad():
        out = model(x)
    if name == "unet_plus_plus" and mode == "train":
        # Deep supervision in training: forward gives every head; predict gives the final one, x_0_L.
        assert isinstance(out, list) and len(out) == model.depth
        assert not torch.equal(logits, out[0])
        out = out[-1]
    torch.testing.assert_close(logits, out)


def test_predict_of_deep_supervision_is_the_eval_output_in_both_modes():
    # Without norm or dropout train and eval compute the same function: the train-mode head that
    # predict picks must be exactly the single tensor eval mode returns.
    model = build_model("unet_plus_plus", channels=TINY, deep_supervision=True, norm="none", dropout=0.0)
    x = torch.rand(1, 1, 19, 30)
    torch.testing.assert_close(model.train().predict(x), model.eval().predict(x))


def test_without_deep_supervision_one_tensor_and_one_head():
    model = build_model("unet_plus_plus", channels=TINY)
    assert isinstance(model.train()(torch.rand(2, 1, 16, 16)), torch.Tensor)
    assert list(model.heads) == ["x_0_2"]


def test_unet_plus_plus_nodes_named_as_in_the_paper():
    model = build_model("unet_plus_plus", channels=(4, 8, 16, 32, 64))
    expected = {f"x_{i}_{j}" for j in range(5) for i in range(5 - j)}
    assert set(model.nodes) == expected
    # x_0_4 concatenates four same-row nodes (4 × 4 channels) with the up-sampled x_1_3 (4 channels).
    assert model.nodes["x_0_4"].block.conv1.in_channels == 5 * 4


# --- Attention U-Net gates ----------------------------------------------------------------------


def test_attention_coefficients_are_spatial_probabilities():
    model = build_model("attention_unet", channels=TINY).eval()
    assert model.attention_maps() == [None, None]
    with torch.no_grad():
        model(torch.rand(2, 1, 37, 53))  # padded to 40×56
    maps = model.attention_maps()
    assert [tuple(m.shape) for m in maps] == [(2, 1, 40, 56), (2, 1, 20, 28)]
    for m in maps:
        assert (m > 0).all() and (m < 1).all()
        assert m.std() > 0, "coefficients vary over space"


def test_gates_change_the_output():
    model = build_model("attention_unet", channels=TINY).eval()
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        before = model(x)
        model.gates()[0].psi.bias.fill_(-30.0)  # close the shallowest gate: alpha ≈ 0
        closed = model(x)
    assert not torch.allclose(before, closed, atol=1e-4)


def test_open_gates_reduce_attention_unet_to_unet():
    # With psi weights 0 and a large bias every coefficient is exactly 1.0 in float32, so the
    # skips pass unchanged and the model must equal a plain UNet with the same other weights:
    # the coefficients multiply exactly the skip features that reach the decoder.
    attention = build_model("attention_unet", channels=TINY).eval()
    with torch.no_grad():
        for gate in attention.gates():
            gate.psi.weight.zero_()
            gate.psi.bias.fill_(30.0)
    plain = build_model("unet", channels=TINY).eval()
    state = {k: v for k, v in attention.state_dict().items() if ".gate." not in k}
    plain.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(attention(x), plain(x))


def test_gate_parameters_receive_gradients():
    model = build_model("attention_unet", channels=TINY)
    model(torch.rand(2, 1, 24, 24)).mean().backward()
    for gate in model.gates():
        for p in (gate.theta_x.weight, gate.phi_g.weight, gate.psi.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_registry_classes():
    assert MODELS["unet"] is UNet and MODELS["attention_unet"] is AttentionUNet
    for name, cls in MODELS.items():
        assert cls.architecture == name
        assert type(build_model(name, channels=TINY)) is cls


@pytest.mark.parametrize("name", NAMES)
def test_fused_inference_copy_gives_the_same_logits_without_batchnorm(name):
    from torch import nn

    from unet.models import fuse_conv_bn

    model = build_model(name, channels=TINY)
    with torch.no_grad():  # non-trivial statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    fused = fuse_conv_bn(model)
    assert model.training, "the original is left as it was"
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert bns > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(2, 1, 24, 20)
    with torch.inference_mode():
        want, got = model.eval().predict(x), fused.predict(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


# --- pretrained encoder and image-level head -------------------------------------------------------

ENCODER = {"encoder": "efficientnet_lite0", "channels": (4, 8, 8, 16, 16)}
ENCODERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
@pytest.mark.parametrize("size", [(64, 64), (50, 71)])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_unet_any_size_and_every_parameter_trains(name, size, encoder):
    model = build_model(name, **{**ENCODER, "encoder": encoder})
    x = torch.rand(2, 1, *size)
    logits = model(x)
    assert logits.shape == (2, 1, *size)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_encoder_weights_are_loaded_and_the_artifact_rebuilds_without_them():
    from unet.models.encoders import build_encoder

    pretrained = build_model("unet", **ENCODER, encoder_weights="imagenet")
    reference = build_encoder("efficientnet_lite0", 1, "imagenet").state_dict()
    assert torch.equal(pretrained.encoder.state_dict()["_conv_stem.weight"], reference["_conv_stem.weight"])
    assert pretrained.input_normalization == {"mean": 127 / 255, "std": 128 / 255}
    assert pretrained.encoder_provenance["weights_source"]["sha256"].startswith("579344248a93")
    kwargs = pretrained.model_kwargs()
    assert kwargs["encoder"] == "efficientnet_lite0" and kwargs["encoder_weights"] is None
    rebuilt = build_model("unet", **kwargs)
    rebuilt.load_state_dict(pretrained.state_dict())
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(rebuilt.eval()(x), pretrained.eval()(x))
    # Random init: the same network, other weights, and the project's default normalisation.
    random = build_model("unet", **ENCODER)
    assert not torch.equal(random.encoder.state_dict()["_conv_stem.weight"], reference["_conv_stem.weight"])
    assert random.input_normalization == {"mean": 0.5, "std": 0.25}


def test_encoder_arguments_are_checked():
    with pytest.raises(ValueError, match=r"channels gives the decoder's filters .* 5 values"):
        build_model("unet", encoder="efficientnet_lite0", channels=(4, 8, 16))
    with pytest.raises(ValueError, match="encoder_weights='imagenet' needs an encoder"):
        build_model("unet", channels=TINY, encoder_weights="imagenet")
    with pytest.raises(KeyError, match="unknown encoder 'resnet9'; valid names: efficientnet_lite0"):
        build_model("unet", encoder="resnet9", channels=TINY)
    with pytest.raises(TypeError, match="unexpected argument"):  # UNet++ is wired for its own encoder
        build_model("unet_plus_plus", encoder="efficientnet_lite0")


@pytest.mark.parametrize("name,kwargs", [("unet", {"channels": TINY}), ("attention_unet", {"channels": TINY}),
                                         ("unet_plus_plus", {"channels": TINY, "deep_supervision": True}),
                                         ("unet", ENCODER)])
def test_image_head_returns_class_logits_beside_the_masks(name, kwargs):
    model = build_model(name, image_classes=3, **kwargs).train()
    x = torch.rand(2, 1, 64, 64)
    masks, classes = model(x)
    assert classes.shape == (2, 3)
    final = masks[-1] if isinstance(masks, list) else masks
    assert final.shape == (2, 1, 64, 64)
    (final.mean() + classes.square().mean()).backward()
    assert all(p.grad is not None for p in model.image_head.parameters())
    model.eval()
    assert torch.equal(model.predict(x), model.predict_all(x)[0])
    assert model.predict_all(x)[1].shape == (2, 3)
    assert build_model(name, **kwargs).eval().predict_all(x)[1] is None  # no head, no class logits
    assert build_model(name, **model.model_kwargs()).image_classes == 3


@pytest.mark.parametrize("value", [1, -1, 2.5, True])
def test_image_classes_must_be_zero_or_at_least_two(value):
    with pytest.raises(ValueError, match="image_classes must be 0"):
        build_model("unet", channels=TINY, image_classes=value)
