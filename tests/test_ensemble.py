"""Ensembles (unet.models.ensemble, jobs.ensemble): the members' probabilities averaged exactly,
members at other input sizes resized, one artifact that loads and predicts like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import ensemble as ensemble_job
from unet.artifact import load_artifact, save_artifact
from unet.cli import run_main
from unet.evaluation import predict_probabilities
from unet.models import build_model
from unet.models.ensemble import Ensemble, ensemble_of


NORM = {"mean": 0.5, "std": 0.25}


def _member(seed: int, image_classes: int = 3, **kw):
    torch.manual_seed(seed)
    return build_model("unet", channels=[4, 8, 16], dropout=0.0, image_classes=image_classes, **kw).eval()


def _save(model, path, size, mean=0.5, std=0.25):
    return save_artifact(model, path, input_size=size, normalization={"mean": mean, "std": std},
                         name=f"m{path.name}", provenance={"note": path.name})


@pytest.mark.parametrize("classes", [3, 0])
def test_probabilities_are_the_members_mean(classes):
    members = [_member(i, classes) for i in range(3)]
    spec = {"architecture": "unet", "model_kwargs": members[0].model_kwargs(), "input_size": [40, 40],
            "normalization": NORM}
    model = Ensemble([spec] * 3, [40, 40], NORM).eval()
    for mine, theirs in zip(model.members, members):
        mine.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 1, 40, 56)
    for tta in (False, True):
        prob, class_prob = model.predict_proba(x, tta=tta)
        expected = [m.predict_proba(x, tta=tta) for m in members]
        torch.testing.assert_close(prob, torch.stack([p for p, _ in expected]).mean(0), atol=1e-6, rtol=0)
        if classes:
            torch.testing.assert_close(class_prob, torch.stack([c for _, c in expected]).mean(0), atol=1e-6, rtol=0)
            assert torch.allclose(class_prob.sum(1), torch.ones(2))
        else:
            assert class_prob is None


def test_a_member_trained_at_another_size_sees_its_own_size():
    small, big = _member(0), _member(1)
    model = Ensemble([{"architecture": "unet", "model_kwargs": small.model_kwargs(), "input_size": [32, 32],
                       "normalization": NORM},
                      {"architecture": "unet", "model_kwargs": big.model_kwargs(), "input_size": [64, 64],
                       "normalization": NORM}], [64, 64], NORM).eval()
    model.members[0].load_state_dict(small.state_dict())
    model.members[1].load_state_dict(big.state_dict())
    x = torch.randn(1, 1, 64, 64)
    seen = {}
    model.members[0].register_forward_hook(lambda m, args, out: seen.update(small=args[0].shape))
    prob, _ = model.predict_proba(x)
    assert seen["small"] == (1, 1, 32, 32)
    p_small = F.interpolate(small.predict_proba(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True))[0],
                            size=(64, 64), mode="bilinear")
    torch.testing.assert_close(prob, (p_small + big.predict_proba(x)[0]) / 2, atol=1e-6, rtol=0)


def test_the_job_writes_one_artifact_that_predicts_like_its_members(tmp_path, capsys):
    a = _save(_member(0), tmp_path / "a", (32, 32))
    b = _save(_member(1), tmp_path / "b", (48, 48))
    out = tmp_path / "ens"
    assert ensemble_job.main(["--models", a, b, "--out", str(out), "--name", "pair"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    loaded = load_artifact(out)
    config = json.loads((out / "config.json").read_text())
    members = [load_artifact(a), load_artifact(b)]
    assert loaded.settings.architecture == "ensemble" and loaded.settings.input_size == (48, 48)
    assert loaded.model_id.startswith("pair-")
    assert [m["model_id"] for m in config["provenance"]["members"]] == [m.model_id for m in members]
    assert config["provenance"]["members"][0]["provenance"] == {"note": "a"}
    # The loaded artifact is exactly ensemble_of(the members), through the pipeline evaluation uses.
    images = [np.random.default_rng(i).integers(0, 256, (50 + 7 * i, 61), dtype=np.uint8) for i in range(3)]
    got = predict_probabilities(loaded.model, images, loaded.settings)
    want = predict_probabilities(ensemble_of(members), images, loaded.settings)
    for g, w in zip(got.masks, want.masks):
        assert g.shape == w.shape and np.allclose(g, w, atol=1e-6)
    assert np.allclose(got.lesion, want.lesion, atol=1e-6)


def test_members_with_their_own_normalisation_and_without_a_head(tmp_path):
    """A head-less member (e.g. the classic busi-unet) with another normalisation joins an ensemble
    of headed ones: it sees its own normalisation, adds to the masks and not to the classes."""
    plain, headed = _member(0, image_classes=0), _member(1)
    a = _save(plain, tmp_path / "a", (32, 32), mean=0.2, std=0.3)
    b = _save(headed, tmp_path / "b", (32, 32))
    model = ensemble_of([load_artifact(b), load_artifact(a)])
    assert model.input_normalization == {"mean": 0.5, "std": 0.25} and model.image_classes == 3
    raw = torch.rand(2, 1, 32, 32)
    prob, class_prob = model.predict_proba((raw - 0.5) / 0.25)
    p_headed, c_headed = headed.predict_proba((raw - 0.5) / 0.25)
    p_plain, _ = plain.predict_proba((raw - 0.2) / 0.3)
    torch.testing.assert_close(prob, (p_headed + p_plain) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(class_prob, c_headed, atol=1e-5, rtol=0)


def test_bad_ensembles_are_refused_in_one_line(tmp_path, capsys):
    a = _save(_member(0), tmp_path / "a", (32, 32))
    b = _save(_member(1, image_classes=2), tmp_path / "b", (32, 32))
    for argv, message in (([a], "at least 2"), ([a, b], "disagree on image_classes"),
                          ([a, str(tmp_path / "missing")], "does not exist")):
        assert run_main(ensemble_job.main, ["--models", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="ensembles do not nest"):
        Ensemble([{"architecture": "ensemble", "model_kwargs": {}, "input_size": [32, 32], "normalization": NORM}] * 2,
                 [32, 32], NORM)


def test_an_ensemble_grows_member_by_member(tmp_path, capsys):
    """jobs.ensemble --models <ensemble> <model>: the ensemble's members join one by one, so the result
    is the flat ensemble of all three (each weighs a third), with one provenance entry per member."""
    a, b, c = (_save(_member(i), tmp_path / n, size) for i, n, size in ((0, "a", (32, 32)), (1, "b", (48, 48)),
                                                                     (2, "c", (40, 40))))
    pair = str(tmp_path / "pair")
    assert ensemble_job.main(["--models", a, b, "--out", pair]) == 0
    grown, flat = str(tmp_path / "grown"), str(tmp_path / "flat")
    capsys.readouterr()
    assert ensemble_job.main(["--models", pair, c, "--out", grown]) == 0
    assert capsys.readouterr().out.startswith("[ensemble] 3 members, from ")
    assert ensemble_job.main(["--models", a, b, c, "--out", flat]) == 0
    grown_config = json.loads((tmp_path / "grown" / "config.json").read_text())
    flat_config = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert grown_config["model_kwargs"] == flat_config["model_kwargs"]
    assert ([m["model_id"] for m in grown_config["provenance"]["members"]]
            == [m["model_id"] for m in flat_config["provenance"]["members"]]
            == [load_artifact(p).model_id for p in (a, b, c)])
    x = torch.randn(2, 1, 48, 48)
    got, want = load_artifact(grown).model.predict_proba(x), load_artifact(flat).model.predict_proba(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
