"""jobs.calibrate / unet.calibration: the search on hand-made probabilities (exact expectations),
and end to end with a transparent model whose image head reads a marker painted into each image.

What a user relies on: the chosen post-processing keeps the false-lesion rate within the cap on the
split; a gate is found when p(lesion) separates normal from lesion images; the vectorised search
scores every candidate exactly as ``unet.postprocess.final_mask`` would; the test split and
in-place rewrites of shipped models are refused; the written artifact loads with the new
post-processing and the very same weights, and evaluation then uses it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from jobs.calibrate import main as calibrate_main
from jobs.evaluate import main as evaluate_main
from unet.artifact import WEIGHTS_DIR, WEIGHTS_NAME, load_artifact, save_artifact
from unet.calibration import (MIN_AREAS, THRESHOLDS, SplitPredictions, calibrate, output_location, score_setting,
                              search)
from unet.cli import run_main
from unet.models import MODELS, SegmentationModel
from unet.phantoms import make_phantom
from unet.runtime import UsageError
from unet.shards import manifest_sha256

# --- hand-made predictions: exact expectations -------------------------------------------------


def _blob(shape, *boxes, value=0.9) -> np.ndarray:
    prob = np.zeros(shape, np.float32)
    for y0, y1, x0, x1 in boxes:
        prob[y0:y1, x0:x1] = value
    return prob


def _predictions(probs, truths, classes, lesion=None) -> SplitPredictions:
    # The same maps for both passes: TTA can only tie, and ties go to no TTA.
    return SplitPredictions(ids=[f"i{k}" for k in range(len(probs))], classes=classes, truths=truths,
                            probs={False: probs, True: probs},
                            lesion={False: lesion, True: lesion})


def test_min_area_and_largest_component_chosen_exactly():
    """20x20 images: the lesion image has its lesion (36 px) and a 4 px speck; each normal image a
    1 px speck. Only min_area >= 0.005 (2 px) clears the normals and only largest_component clears
    the speck (4 px = 0.01 of the image survives every min_area), so the one perfect setting is
    min_area 0.005 + largest; the threshold ties over the whole grid and goes to 0.5."""
    truth = np.zeros((20, 20), bool)
    truth[2:8, 2:8] = True
    probs = [_blob((20, 20), (2, 8, 2, 8), (15, 17, 15, 17)), _blob((20, 20), (10, 11, 10, 11)),
             _blob((20, 20), (3, 4, 15, 16))]
    preds = _predictions(probs, [truth, np.zeros_like(truth), np.zeros_like(truth)], ["benign", "normal", "normal"])
    table = search(preds, max_false_lesion_rate=0.0)
    assert len(table) == len(THRESHOLDS) * len(MIN_AREAS) * 2 * 2  # no head: no gate candidates
    best = table.iloc[0]
    assert best["feasible"] and best["dice"] == 1.0 and best["false_lesions"] == 0
    assert (best["threshold"], best["min_area"], bool(best["largest_component"]), bool(best["tta"])) == \
           (0.5, 0.005, True, False)
    assert np.isnan(best["gate_threshold"])
    # Without largest_component the speck costs Dice on the lesion image: 2*36 / (36 + 40 + 0).
    plain = table[(table["min_area"] == 0.005) & ~table["largest_component"] & ~table["tta"]
                  & (table["threshold"] == 0.5)].iloc[0]
    assert plain["lesion_dice"] == pytest.approx(72 / 76) and plain["dice"] == pytest.approx((72 / 76 + 2) / 3)
    # No min area: both normal images keep their speck.
    bare = table[(table["min_area"] == 0.0) & table["largest_component"] & ~table["tta"] & (table["threshold"] == 0.5)]
    assert bare.iloc[0]["false_lesion_rate"] == 1.0 and not bare.iloc[0]["feasible"]


def test_a_gate_that_separates_is_found_and_ties_go_to_the_lower_gate():
    """Normal images carry large false lesions that no min area removes; p(lesion) separates them
    from the lesion images (0.2, 0.4 vs 0.7, 0.8), so the gate lands between 0.4 and 0.7."""
    truth = np.zeros((20, 20), bool)
    truth[4:12, 4:12] = True
    big = _blob((20, 20), (4, 12, 4, 12))
    preds = _predictions([big, big, big, big], [truth, truth, np.zeros_like(truth), np.zeros_like(truth)],
                         ["benign", "malignant", "normal", "normal"], lesion=np.array([0.8, 0.7, 0.2, 0.4]))
    table = search(preds, max_false_lesion_rate=0.0)
    best = table.iloc[0]
    assert best["dice"] == 1.0 and best["false_lesion_rate"] == 0.0
    assert best["gate_threshold"] == pytest.approx(0.55)  # midpoint of 0.4 and 0.7
    assert (best["min_area"], bool(best["largest_component"]), bool(best["tta"])) == (0.0, False, False)
    gates = sorted(table["gate_threshold"].dropna().unique())
    assert gates == pytest.approx([0.3, 0.55, 0.75])
    # The 0.3 gate removes one normal image: rate 1/2, not within the cap of 0.
    half = table[table["gate_threshold"].round(6) == 0.3]
    assert (half["false_lesion_rate"] == 0.5).all() and not half["feasible"].any()
    # A looser cap admits the 0.3 gate, but gating both normal images still scores higher.
    assert search(preds, max_false_lesion_rate=0.5).iloc[0]["gate_threshold"] == pytest.approx(0.55)


def test_every_candidate_matches_final_mask_at_area_boundaries():
    """Components of exactly min_area x 400 pixels (2 and 4 px) are kept, as final_mask keeps them;
    of two equally large components the first in raster order is "the largest" (the last image's
    truth is the second); graded probabilities make the thresholds differ; the TTA pass differs too."""
    truth = np.zeros((20, 20), bool)
    truth[2:8, 2:8] = True
    graded = _blob((20, 20), (2, 8, 2, 8), value=0.62) + _blob((20, 20), (2, 5, 2, 5), value=0.2)
    probs = [graded + _blob((20, 20), (15, 17, 15, 17), value=0.45), _blob((20, 20), (10, 11, 10, 12), value=0.5),
             _blob((20, 20), (3, 5, 15, 17), value=0.66) + _blob((20, 20), (12, 13, 2, 4), value=0.4)]
    second = np.zeros_like(truth)
    second[12:14, 12:14] = True
    probs.append(_blob((20, 20), (2, 4, 2, 4), (12, 14, 12, 14), value=0.8))
    flipped = [p[:, ::-1].copy() * 0.95 for p in probs]
    truths = [truth, np.zeros_like(truth), np.zeros_like(truth), second]
    preds = SplitPredictions(["a", "b", "c", "d"], ["malignant", "normal", "normal", "benign"], truths,
                             {False: probs, True: flipped},
                             {False: np.array([0.9, 0.3, 0.6, 0.7]), True: np.array([0.8, 0.35, 0.5, 0.8])})
    table = search(preds, max_false_lesion_rate=0.5)
    assert len(table) == len(THRESHOLDS) * len(MIN_AREAS) * 2 * (4 + 3)  # per pass: none + 3 or 2 midpoints
    for row in table.itertuples():
        gate = None if np.isnan(row.gate_threshold) else row.gate_threshold
        exact = score_setting(preds, {"threshold": row.threshold, "gate_threshold": gate, "min_area": row.min_area,
                                      "largest_component": row.largest_component, "tta": row.tta})
        for key in ("dice", "lesion_dice", "false_lesion_rate", "false_lesions", "missed_lesion_rate"):
            assert exact[key] == pytest.approx(getattr(row, key), abs=1e-12), (key, row)


def test_split_without_normal_images_is_refused():
    truth = np.ones((4, 4), bool)
    with pytest.raises(UsageError, match="normal and lesion images"):
        _predictions([_blob((4, 4), (0, 4, 0, 4))], [truth], ["benign"])


# --- a transparent model with a controllable image head -------------------------------------------


class MarkerHead(SegmentationModel):
    """Dark pixels are lesion (mask logits ``gain * (cut - x)``); the image head reads the mean of
    the top-left 4x4 input pixels, where the test data paint a bright (lesion) or dark (normal)
    marker: class logits ``(s, s - 1, -s)`` with ``s = head * marker``, so ``head`` = 0 makes it
    uninformative. Its three parameters are its weights (they give the model id)."""

    architecture = "test_marker_head"

    def __init__(self, in_channels=1, out_channels=1, channels=(4, 8), dropout=0.0, norm="none",
                 pad_mode="replicate", image_classes=3):
        super().__init__(in_channels, out_channels, channels, dropout, norm, pad_mode, image_classes)
        self.cut = nn.Parameter(torch.tensor(-1.0))
        self.gain = nn.Parameter(torch.tensor(6.0))
        self.head = nn.Parameter(torch.tensor(1.0))

    def forward_padded(self, x):
        s = self.head * x[:, 0, :4, :4].mean(dim=(1, 2))
        return self.gain * (self.cut - x), torch.stack([s, s - 1, -s], dim=1)


KINDS = ["benign"] * 5 + ["malignant"] * 3 + ["normal"] * 4


def _png(a: np.ndarray) -> bytes:
    return cv2.imencode(".png", a)[1].tobytes()


def write_prepared(root: Path) -> Path:
    """val and test splits as jobs.prepare writes them; each image has a marker in its top-left
    quarter: bright (180-255) on lesion images, dark (0-45, predicted as a false lesion at every
    threshold of the grid) on normal ones."""
    schema = pa.schema([("id", pa.string()), ("class", pa.string()), ("image_png", pa.binary()),
                        ("mask_png", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
                        ("group", pa.string()), ("source", pa.string())])
    for split, offset in (("val", 0), ("test", 50)):
        rows = []
        for i, kind in enumerate(KINDS):
            image, mask = make_phantom(300 + offset + i, kind, size=(44 + 2 * i, 52 - i))
            h, w = image.shape
            image[: h // 4, : w // 4] = 180 + 9 * i if kind != "normal" else 45 - 11 * (i - 8)
            rows.append({"id": f"{kind} ({i})", "class": kind, "image_png": _png(image), "mask_png": _png(mask),
                         "height": h, "width": w, "group": f"g{i}", "source": "phantom"})
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / split / "part-00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "counts": {"val": 12, "test": 12}}))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    MODELS[MarkerHead.architecture] = MarkerHead
    try:
        data = write_prepared(root / "prepared")
        artifacts = {}
        for name, head in (("informative", 1.0), ("blind", 0.0)):
            model = MarkerHead()
            with torch.no_grad():
                model.head.fill_(head)
            artifacts[name] = save_artifact(model, root / name, input_size=(32, 32),
                                            normalization={"mean": 0.5, "std": 0.25}, name=f"marker-{name}")
        yield {"root": root, "data": str(data), **{k: str(v) for k, v in artifacts.items()}}
    finally:
        del MODELS[MarkerHead.architecture]


def _run(fn, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn(argv)
    return code, out.getvalue()


def test_calibration_respects_the_cap_finds_the_gate_and_matches_final_mask(workspace):
    loaded = load_artifact(workspace["informative"])
    result = calibrate(loaded, workspace["data"], "val", max_false_lesion_rate=0.0, batch_size=5)
    chosen, table = result.chosen, result.table
    assert chosen["false_lesion_rate"] == 0.0 and chosen["false_lesions"] == 0
    assert result.baseline["false_lesion_rate"] == 1.0  # every normal image's dark marker is a lesion
    # The gate sits between the normal images' p(lesion) and the lesion images' (both passes agree here).
    from unet.calibration import predict_split

    preds = predict_split(loaded, workspace["data"], "val")
    p = preds.lesion[chosen["tta"]]
    normal = np.array([c == "normal" for c in preds.classes])
    assert p[normal].max() < chosen["gate_threshold"] < p[~normal].min()
    assert chosen["missed_lesion_rate"] == pytest.approx(table.iloc[0]["missed_lesion_rate"])
    assert (table.loc[table["feasible"], "false_lesion_rate"] <= 0.0).all()
    # Any candidate of the vectorised table is what final_mask gives image by image.
    rng = np.random.default_rng(0)
    for i in rng.choice(len(table), size=25, replace=False):
        row = table.iloc[i]
        gate = None if np.isnan(row["gate_threshold"]) else float(row["gate_threshold"])
        exact = score_setting(preds, {"threshold": float(row["threshold"]), "gate_threshold": gate,
                                      "min_area": float(row["min_area"]),
                                      "largest_component": bool(row["largest_component"]), "tta": bool(row["tta"])})
        for key in ("dice", "lesion_dice", "false_lesion_rate", "missed_lesion_rate"):
            assert exact[key] == pytest.approx(row[key], abs=1e-9), (key, row.to_dict())


def test_uninformative_head_cannot_meet_the_cap(workspace):
    with pytest.raises(UsageError, match="lowest reached is 1.000"):
        calibrate(load_artifact(workspace["blind"]), workspace["data"], "val", max_false_lesion_rate=0.1)


def test_cli_writes_an_artifact_with_the_postprocess_and_identical_weights(workspace):
    out = workspace["root"] / "calibrated"
    code, printed = _run(calibrate_main, ["--model", workspace["informative"], "--data", workspace["data"],
                                          "--max-false-lesion-rate", "0.0", "--out", str(out), "--top", "5"])
    assert code == 0
    lines = printed.strip().splitlines()
    assert lines[-1] == str(out)
    assert any("lesion Dice" in line and "false-lesion rate" in line for line in lines)  # the table's header
    assert any(line.startswith("[calibrate") and "chosen:" in line for line in lines)
    source, written = load_artifact(workspace["informative"]), load_artifact(out)
    assert written.model_id == source.model_id
    assert (out / WEIGHTS_NAME).read_bytes() == Path(workspace["informative"], WEIGHTS_NAME).read_bytes()
    calibration = written.config["provenance"]["calibration"]
    chosen = calibration["chosen"]
    assert written.settings.postprocess == {k: chosen[k] for k in ("gate_threshold", "min_area",
                                                                   "largest_component", "tta")}
    assert written.settings.threshold == chosen["threshold"] and chosen["gate_threshold"] is not None
    assert calibration["data"] == {"uri": workspace["data"], "split": "val",
                                   "manifest_sha256": manifest_sha256(workspace["data"])}
    assert calibration["max_false_lesion_rate"] == 0.0 and chosen["false_lesion_rate"] == 0.0
    assert calibration["grid"]["size"] > 2 * len(THRESHOLDS) * len(MIN_AREAS) * 2  # gates were searched
    assert calibration["command"].startswith("python -m jobs.calibrate --model ")

    # Evaluation uses the stored post-processing: no false lesions on val, unlike with the gate off.
    code, _ = _run(evaluate_main, ["--model", str(out), "--data", workspace["data"], "--split", "val",
                                   "--out", str(workspace["root"] / "eval-cal"), "--bootstrap", "50", "--no-report"])
    assert code == 0
    code, _ = _run(evaluate_main, ["--model", str(out), "--data", workspace["data"], "--split", "val",
                                   "--out", str(workspace["root"] / "eval-nogate"), "--bootstrap", "50",
                                   "--no-report", "--gate-threshold", "0"])
    assert code == 0
    cal = json.loads((workspace["root"] / "eval-cal" / "metrics.json").read_text())
    nogate = json.loads((workspace["root"] / "eval-nogate" / "metrics.json").read_text())
    assert cal["postprocess"] == {"threshold": chosen["threshold"], **written.settings.postprocess, "overridden": []}
    assert nogate["postprocess"]["gate_threshold"] == 0.0 and nogate["postprocess"]["overridden"] == ["gate_threshold"]
    assert cal["false_lesion_rate"]["count"] == 0 < nogate["false_lesion_rate"]["count"] == 4
    assert cal["overall"]["dice"]["mean"] == pytest.approx(chosen["dice"])
    assert cal["gate"]["specificity"]["mean"] == 1.0 and cal["gate"]["auroc"]["mean"] == 1.0


def test_directory_models_are_rewritten_in_place_by_default(workspace, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(workspace["informative"], model)
    code, printed = _run(calibrate_main, ["--model", str(model), "--data", workspace["data"],
                                          "--max-false-lesion-rate", "0.25"])
    assert code == 0 and printed.strip().splitlines()[-1] == str(model)
    loaded = load_artifact(model)
    assert loaded.model_id == load_artifact(workspace["informative"]).model_id
    assert loaded.config["provenance"]["calibration"]["chosen"]["false_lesion_rate"] <= 0.25


def test_test_split_is_refused_in_one_line(workspace, tmp_path, capsys):
    code = run_main(calibrate_main, ["--model", workspace["informative"], "--data", workspace["data"],
                                     "--split", "test", "--out", str(tmp_path / "o")], prog="jobs.calibrate")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("jobs.calibrate: error: ")
    assert "split 'test'" in err and "never used to choose" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="split 'test'"):
        calibrate(load_artifact(workspace["informative"]), workspace["data"], "test")


@pytest.mark.skipif(not (WEIGHTS_DIR / "busi-unet").is_dir(), reason="shipped busi-unet not in this checkout")
def test_shipped_models_are_never_rewritten_in_place(tmp_path, capsys):
    with pytest.raises(UsageError, match="never changed in place"):
        output_location("busi-unet", None)
    with pytest.raises(UsageError, match="never changed in place"):
        output_location(str(WEIGHTS_DIR / "busi-unet"), None)
    with pytest.raises(UsageError, match="shipped model"):
        output_location("busi-unet", str(WEIGHTS_DIR / "busi-unet"))
    assert output_location("busi-unet", str(tmp_path / "cal")) == str(tmp_path / "cal")
    assert output_location(str(tmp_path), None) == str(tmp_path)
    code = run_main(calibrate_main, ["--model", "busi-unet", "--data", str(tmp_path)], prog="jobs.calibrate")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out" in err


def test_min_area_never_reaches_the_size_of_real_lesions(workspace, tmp_path):
    """The search tries no minimum area above half the smallest lesion of the train split (val
    alone holds too few small lesions to show what a large one costs); without a train split the
    whole grid is searched."""
    import shutil

    from unet.calibration import MIN_AREAS, min_area_limit

    assert min_area_limit(workspace["data"]) == max(MIN_AREAS)             # no train split here
    data = tmp_path / "prepared"
    shutil.copytree(workspace["data"], data)
    shutil.copytree(data / "val", data / "train")
    table = pq.read_table(data / "train" / "part-00000.parquet").to_pylist()
    small = np.zeros((40, 50), np.uint8)
    small[10:13, 10:13] = 255                                               # 9 of 2000 pixels: 0.45 %
    table[0] |= {"mask_png": _png(small), "height": 40, "width": 50,
                 "image_png": _png(np.full((40, 50), 128, np.uint8)), "class": "benign"}
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(data / "train" / "part-00000.parquet")),
                   data / "train" / "part-00000.parquet")
    assert min_area_limit(str(data)) == pytest.approx(9 / 2000 / 2)
    result = calibrate(load_artifact(workspace["informative"]), str(data), "val", max_false_lesion_rate=0.0)
    assert set(result.table["min_area"]) == {a for a in MIN_AREAS if a <= 9 / 2000 / 2} == {0.0, 0.0005, 0.001, 0.002}


@pytest.mark.parametrize("sharded", [False, True])
def test_calibrating_keeps_the_weights_files_as_they_were(workspace, tmp_path, monkeypatch, sharded):
    """A model stored in one file stays in one file, a sharded one keeps its shards, whatever the
    shard size now is: the model id hashes the files, and calibration never changes the model id."""
    from unet import artifact, calibration

    source = load_artifact(workspace["informative"])
    shard_mib = 4 / 2**20  # 4 bytes: each of the three scalar weights in a shard of its own
    model = save_artifact(source.model, tmp_path / "model", input_size=(32, 32), name="marker",
                          normalization={"mean": 0.5, "std": 0.25}, shard_mib=shard_mib if sharded else math.inf)
    monkeypatch.setattr(calibration, "SHARD_MIB", shard_mib)  # "now": even a small model would be sharded
    before = load_artifact(model)
    assert ("weights_shards" in before.config) == sharded
    out = tmp_path / "calibrated"
    code, _ = _run(calibrate_main, ["--model", str(model), "--data", workspace["data"],
                                    "--max-false-lesion-rate", "0.25", "--out", str(out)])
    assert code == 0
    after = load_artifact(out)
    assert after.model_id == before.model_id and after.config.get("weights_shards") == before.config.get("weights_shards")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in Path(model).glob("*.safetensors"))
    assert artifact.SHARD_MIB == 16
