"""jobs.evaluate / unet.evaluation / unet.report on a tiny phantom split and a tiny real model.

No oracle model exists, so the checks are about consistency and bookkeeping a user relies on:
metrics.json equals what the per-image table recomputes to, per-image scores equal the metric
definitions at the ORIGINAL image size, CIs bracket their means, class counts add up, the figures
are real PNGs embedded in an HTML file that stands alone, and bad use ends in one line with exit code 2.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.evaluate import main as evaluate_main
from unet import metrics as M
from unet import storage
from unet.artifact import load_artifact, save_artifact
from unet.settings import ModelSettings
from unet.cli import run_main
from unet.evaluation import evaluate, predict_probabilities, write_outputs
from unet.statistics import bootstrap_ci, summarize
from unet.models import SegmentationModel, build_model
from unet.phantoms import make_phantom
from unet.postprocess import final_mask, image_probabilities
from unet.transforms import preprocess, quantize_probability, resize_probability

REPO = Path(__file__).resolve().parents[1]
# 4 benign, 3 malignant, 3 normal; sizes differ from each other and from the model's 32x32 input.
KINDS = ["benign"] * 4 + ["malignant"] * 3 + ["normal"] * 3


def _png(a: np.ndarray) -> bytes:
    return cv2.imencode(".png", a)[1].tobytes()


def write_prepared(root: Path) -> Path:
    """A prepared dataset as jobs.prepare writes it (spec: shard schema + manifest), test split only."""
    rows = []
    for i, kind in enumerate(KINDS):
        image, mask = make_phantom(100 + i, kind, size=(40 + 3 * i, 56 - 2 * i))
        rows.append({"id": f"{kind} ({i})", "class": kind, "image_png": _png(image), "mask_png": _png(mask),
                     "height": image.shape[0], "width": image.shape[1], "group": f"g{i}", "source": "phantom"})
    schema = pa.schema([("id", pa.string()), ("class", pa.string()), ("image_png", pa.binary()),
                        ("mask_png", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
                        ("group", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    (root / "test").mkdir(parents=True)
    pq.write_table(table.slice(0, 6), root / "test" / "part-00000.parquet")
    pq.write_table(table.slice(6), root / "test" / "part-00001.parquet")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "counts": {"test": len(rows)}}))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    data = write_prepared(root / "prepared")
    torch.manual_seed(0)
    model = build_model("unet", channels=(4, 8)).eval()
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_dice": 0.2 * e} for e in (1, 2, 3)]
    artifact = save_artifact(model, root / "model", architecture="unet", model_kwargs={"channels": [4, 8]},
                             input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25}, threshold=0.5,
                             provenance={"history": history})
    return {"root": root, "data": str(data), "model": str(artifact)}


@pytest.fixture(scope="module")
def evaluated(workspace) -> dict:
    out = workspace["root"] / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = evaluate_main(["--model", workspace["model"], "--data", workspace["data"], "--split", "test",
                              "--out", str(out), "--bootstrap", "300", "--seed", "3", "--batch-size", "4",
                              "--grid", "6", "--cases", "2"])
    assert code == 0
    return {**workspace, "out": out, "stdout": stdout.getvalue(), "metrics": json.loads((out / "metrics.json").read_text()),
            "csv": pd.read_csv(out / "per_image.csv"), "parquet": pd.read_parquet(out / "per_image.parquet")}


class _References(HTMLParser):
    """Every attribute through which a page loads or links something else."""

    ATTRIBUTES = {"src", "href", "srcset", "data", "poster", "action", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.found += [(tag, k, v or "") for k, v in attrs if k in self.ATTRIBUTES]


def test_outputs_exist_and_report_stands_alone_with_embedded_pngs(evaluated, tmp_path):
    out = evaluated["out"]
    printed = evaluated["stdout"].strip().splitlines()
    assert printed[-1] == str(out / "report.html")  # the path is the last line
    assert all((out / name).is_file() for name in ("metrics.json", "per_image.csv", "per_image.parquet"))
    # Copied on its own (scp, e-mail attachment) the page must still show everything.
    alone = tmp_path / "elsewhere" / "report.html"
    alone.parent.mkdir()
    shutil.copy(out / "report.html", alone)
    html = alone.read_text()
    parser = _References()
    parser.feed(html)
    assert "url(" not in html  # no CSS-loaded files either
    assert parser.found and all(tag == "img" and attr == "src" and value.startswith("data:image/png;base64,")
                                for tag, attr, value in parser.found), parser.found
    embedded = [base64.b64decode(v.removeprefix("data:image/png;base64,"), validate=True) for _, _, v in parser.found]
    for png in embedded:
        with Image.open(io.BytesIO(png)) as im:
            im.verify()  # a real PNG, not an empty file
            assert im.format == "PNG" and 100 < im.size[0] <= 1000 and im.size[1] > 100  # modest dpi
    # One picture per figure heading; the same PNGs are also kept as files for other tools.
    headings = re.findall(r"<h3>([^<]+)</h3>", html)
    assert len(embedded) == len(headings)
    assert {"Overlays (class-stratified sample)", "Worst cases (lesion images, lowest Dice)", "Training curves",
            "Best cases (lesion images, highest Dice)", "Per-image Dice and HD95 by class"} <= set(headings)
    assert sorted(embedded) == sorted(p.read_bytes() for p in (out / "figures").glob("*.png"))
    assert evaluated["metrics"]["model_id"] in html


def test_per_image_scores_follow_the_definitions_at_original_size(evaluated):
    df = evaluated["csv"]
    shards = pd.concat([pd.read_parquet(p) for p in sorted(Path(evaluated["data"], "test").glob("*.parquet"))])
    shards = shards.set_index("id")
    assert sorted(df["id"]) == sorted(shards.index)  # every image exactly once
    for row in df.itertuples():
        src = shards.loc[row.id]
        mask = cv2.imdecode(np.frombuffer(src["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED) > 0
        assert (row.height, row.width) == mask.shape == (src["height"], src["width"])
        assert row.tp + row.fp + row.fn + row.tn == row.height * row.width
        assert row.gt_pixels == mask.sum() == row.tp + row.fn
        s = M.scores_from_counts(row.tp, row.fp, row.fn)
        for k in ("dice", "iou", "precision", "recall"):
            assert getattr(row, k) == pytest.approx(s[k], abs=1e-12)
    # The Parquet copy holds the predicted masks at original size, agreeing with the counts.
    for row in evaluated["parquet"].itertuples():
        pred = cv2.imdecode(np.frombuffer(row.pred_png, np.uint8), cv2.IMREAD_UNCHANGED) > 0
        src_mask = cv2.imdecode(np.frombuffer(shards.loc[row.id]["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED) > 0
        assert pred.shape == (row.height, row.width)
        assert list(M.counts(pred, src_mask)[0]) == [row.tp, row.fp, row.fn, row.tn]
        expected_hd = M.hd95(pred, src_mask)
        assert (math.isnan(row.hd95) and math.isnan(expected_hd)) or row.hd95 == pytest.approx(expected_hd)


def _check_group(stat: dict, df: pd.DataFrame) -> None:
    assert stat["images"] == len(df)
    for k in ("dice", "iou", "precision", "recall"):
        assert stat[k]["mean"] == pytest.approx(df[k].mean(), abs=1e-12)
    hd = df["hd95"].dropna()
    assert stat["hd95"]["images_defined"] == len(hd)
    assert stat["hd95"]["images_undefined"] == len(df) - len(hd)
    assert (stat["hd95"]["mean"] is None) == hd.empty
    if not hd.empty:
        assert stat["hd95"]["mean"] == pytest.approx(hd.mean())
    micro = M.scores_from_counts(df["tp"].sum(), df["fp"].sum(), df["fn"].sum())
    assert stat["dice_micro"]["mean"] == pytest.approx(micro["dice"])
    assert stat["iou_micro"]["mean"] == pytest.approx(micro["iou"])
    assert [stat[c] for c in ("tp", "fp", "fn", "tn")] == [int(df[c].sum()) for c in ("tp", "fp", "fn", "tn")]
    for k in ("dice", "iou", "precision", "recall", "hd95", "dice_micro", "iou_micro"):
        s = stat[k]
        if s["mean"] is None:
            continue
        assert s["ci_low"] - 1e-9 <= s["mean"] <= s["ci_high"] + 1e-9, (k, s)


def test_metrics_json_equals_recomputation_from_per_image_table(evaluated, workspace):
    m, df = evaluated["metrics"], evaluated["csv"]
    _check_group(m["overall"], df)
    assert set(m["per_class"]) == {"benign", "malignant", "normal"}
    for cls, stat in m["per_class"].items():
        _check_group(stat, df[df["class"] == cls])
    counts = m["counts"]
    assert counts["images"] == len(KINDS) == sum(counts[c] for c in ("benign", "malignant", "normal"))
    assert counts == {"images": 10, "benign": 4, "malignant": 3, "normal": 3}
    normal = df[df["class"] == "normal"]
    flr = m["false_lesion_rate"]
    assert (flr["images"], flr["count"]) == (len(normal), int((normal["pred_pixels"] > 0).sum()))
    assert flr["mean"] == pytest.approx((normal["pred_pixels"] > 0).mean())
    assert flr["ci_low"] <= flr["mean"] <= flr["ci_high"]
    lesion = df[df["class"] != "normal"]
    assert m["missed_lesion_rate"]["count"] == int((lesion["pred_pixels"] == 0).sum())
    # Provenance: which model, which data (the manifest's hash), which split, how the CIs were made.
    assert m["model_id"] == load_artifact(workspace["model"]).model_id
    manifest = Path(workspace["data"], "manifest.json").read_bytes()
    assert m["data"] == {"uri": workspace["data"], "split": "test",
                         "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    assert m["bootstrap"]["resamples"] == 300 and m["bootstrap"]["seed"] == 3
    assert m["command"].startswith("python -m jobs.evaluate --model ")


def test_model_without_a_head_reports_lesion_dice_and_no_gate(evaluated):
    m, df = evaluated["metrics"], evaluated["csv"]
    assert df["lesion_probability"].isna().all() and df["malignant_probability"].isna().all()
    assert m["gate"] is None and m["malignant_auroc"] is None
    lesion = df[df["class"] != "normal"]
    assert m["lesion_dice"]["images"] == len(lesion) == 7
    assert m["lesion_dice"]["mean"] == pytest.approx(lesion["dice"].mean())
    assert m["lesion_dice"]["ci_low"] <= m["lesion_dice"]["mean"] <= m["lesion_dice"]["ci_high"]
    # The artifact has no stored post-processing: plain thresholding, recorded as such.
    assert m["postprocess"] == {"threshold": 0.5, "gate_threshold": None, "min_area": 0.0,
                                "largest_component": False, "tta": False, "overridden": []}
    html = (evaluated["out"] / "report.html").read_text()
    assert "no image-level head" in html and "lesion Dice" in html
    assert any("lesion Dice (7 benign/malignant images)" in line and "false-lesion rate" in line
               for line in evaluated["stdout"].splitlines())
    assert any("image head: none" in line for line in evaluated["stdout"].splitlines())


def _hand_table() -> pd.DataFrame:
    """Nine images with made-up scores and image-head probabilities."""
    classes = ["benign"] * 3 + ["malignant"] * 2 + ["normal"] * 4
    lesion = [0.9, 0.6, 0.3, 0.8, 0.95, 0.2, 0.5, 0.65, 0.1]
    malignant = [0.1, 0.5, 0.2, 0.7, 0.4, 0.0, 0.0, 0.0, 0.0]
    dice = [0.8, 0.6, 0.0, 0.9, 0.7, 1.0, 0.0, 1.0, 1.0]
    pred = [10, 8, 0, 12, 9, 0, 5, 0, 0]
    return pd.DataFrame({
        "id": [f"i{k}" for k in range(9)], "class": classes, "dice": dice, "iou": dice, "precision": dice,
        "recall": dice, "hd95": [1.0] * 9, "tp": pred, "fp": [0] * 9, "fn": [2] * 5 + [0] * 4, "tn": [100] * 9,
        "pred_pixels": pred, "lesion_probability": lesion, "malignant_probability": malignant,
    })


def test_gate_metrics_match_hand_computed_numbers():
    df = _hand_table()
    m = summarize(df, n_bootstrap=400, seed=0, gate_threshold=0.55)
    gate = m["gate"]
    # Lesion p(lesion) 0.9, 0.6, 0.3, 0.8, 0.95 vs normal 0.2, 0.5, 0.65, 0.1: 4 + 3 + 2 + 4 + 4 = 17
    # of the 20 pairs ranked correctly.
    assert gate["threshold"] == 0.55
    assert gate["auroc"]["mean"] == pytest.approx(17 / 20) and gate["auroc"]["images"] == 9
    # Kept: p >= 0.55. Lesion images kept 4/5 (0.3 is gated); normal images gated 3/4 (0.65 kept).
    assert (gate["sensitivity"]["count"], gate["sensitivity"]["images"]) == (4, 5)
    assert gate["sensitivity"]["mean"] == pytest.approx(0.8)
    assert (gate["specificity"]["count"], gate["specificity"]["images"]) == (3, 4)
    assert gate["specificity"]["mean"] == pytest.approx(0.75)
    # Malignant 0.7, 0.4 vs benign 0.1, 0.5, 0.2: 3 + 2 of 6 pairs.
    assert m["malignant_auroc"]["mean"] == pytest.approx(5 / 6) and m["malignant_auroc"]["images"] == 5
    assert m["lesion_dice"]["mean"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.9 + 0.7) / 5)
    for stat in (gate["auroc"], gate["sensitivity"], gate["specificity"], m["malignant_auroc"], m["lesion_dice"]):
        assert stat["ci_low"] - 1e-12 <= stat["mean"] <= stat["ci_high"] + 1e-12, stat
        assert stat["ci_low"] < stat["ci_high"]
    # No gate: every image kept.
    off = summarize(df, n_bootstrap=0, gate_threshold=None)["gate"]
    assert off["threshold"] is None and off["sensitivity"]["mean"] == 1.0 and off["specificity"]["mean"] == 0.0
    assert off["auroc"]["mean"] == pytest.approx(17 / 20) and math.isnan(off["auroc"]["ci_low"])
    # Without a head (column missing or all NaN) there is nothing to report.
    assert summarize(df.drop(columns=["lesion_probability", "malignant_probability"]), n_bootstrap=0)["gate"] is None
    nan = df.assign(lesion_probability=math.nan, malignant_probability=math.nan)
    assert summarize(nan, n_bootstrap=0)["malignant_auroc"] is None


def test_evaluation_with_an_image_head_and_postprocess_flags(workspace, tmp_path):
    """A real UNet with an image head: the per-image p(lesion)/p(malignant) are the head's (with
    TTA), the masks are final_mask's with the flags' values, and the gate metrics follow."""
    torch.manual_seed(1)
    model = build_model("unet", channels=(4, 8), image_classes=3).eval()
    path = save_artifact(model, tmp_path / "head", input_size=(32, 32), normalization={"mean": 0.5, "std": 0.25})
    first = evaluate(load_artifact(path), workspace["data"], "test", n_bootstrap=0, tta=True)
    gate = float(first.per_image["lesion_probability"].median())
    out = tmp_path / "eval"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = evaluate_main(["--model", str(path), "--data", workspace["data"], "--out", str(out),
                              "--bootstrap", "100", "--tta", "--gate-threshold", str(gate), "--min-area", "0.002",
                              "--largest-component", "--threshold", "0.45", "--grid", "3", "--cases", "1"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    df = pd.read_parquet(out / "per_image.parquet").set_index("id")
    assert m["postprocess"] == {"threshold": 0.45, "gate_threshold": gate, "min_area": 0.002, "largest_component": True,
                                "tta": True, "overridden": ["gate_threshold", "largest_component", "min_area",
                                                            "threshold", "tta"]}
    shards = pd.concat([pd.read_parquet(p) for p in sorted(Path(workspace["data"], "test").glob("*.parquet"))])
    for row in shards.itertuples():
        image = cv2.imdecode(np.frombuffer(row.image_png, np.uint8), cv2.IMREAD_UNCHANGED)
        x = torch.from_numpy(preprocess(image, (32, 32), 0.5, 0.25)[None])
        prob, class_prob = load_artifact(path).model.predict_proba(x, tta=True)
        lesion, malignant = image_probabilities(class_prob.numpy())
        assert df.loc[row.id, "lesion_probability"] == pytest.approx(float(lesion[0]), abs=1e-6)
        assert df.loc[row.id, "malignant_probability"] == pytest.approx(float(malignant[0]), abs=1e-6)
        expected = final_mask(resize_probability(quantize_probability(prob[0, 0].numpy()), image.shape), threshold=0.45,
                              lesion_probability=float(df.loc[row.id, "lesion_probability"]), gate_threshold=gate,
                              min_area=0.002, largest_component=True)
        pred = cv2.imdecode(np.frombuffer(df.loc[row.id, "pred_png"], np.uint8), cv2.IMREAD_UNCHANGED) > 0
        assert np.array_equal(pred, expected), row.id
    gated = df["lesion_probability"] < gate
    assert gated.any() and (df.loc[gated, "pred_pixels"] == 0).all()
    lesion = df["class"] != "normal"
    g = m["gate"]
    assert g["threshold"] == gate
    assert g["sensitivity"]["count"] == int((~gated & lesion).sum())
    assert g["specificity"]["count"] == int((gated & ~lesion).sum())
    assert g["auroc"]["mean"] == pytest.approx(M.auroc(df["lesion_probability"], lesion))
    assert m["malignant_auroc"]["images"] == int(lesion.sum())
    html = (out / "report.html").read_text()
    assert "lesion vs normal AUROC" in html and "gate sensitivity" in html
    assert any(line.count("AUROC") == 2 and "sensitivity" in line for line in printed.getvalue().splitlines())


def test_postprocess_flags_are_checked(workspace, tmp_path, capsys):
    code, err = _run_inprocess(capsys, ["--model", workspace["model"], "--data", workspace["data"], "--out",
                                        str(tmp_path / "o"), "--min-area", "1.5"])
    assert code == 2 and err.count("\n") == 1 and "min_area" in err


def test_summaries_are_seeded(evaluated):
    df = evaluated["csv"]
    a, b = summarize(df, n_bootstrap=200, seed=1), summarize(df, n_bootstrap=200, seed=1)
    c = summarize(df, n_bootstrap=200, seed=2)
    assert a == b
    assert a["overall"]["dice"]["mean"] == c["overall"]["dice"]["mean"]
    assert a["overall"]["dice"]["ci_low"] != c["overall"]["dice"]["ci_low"]


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(0)
    v = rng.uniform(size=50)
    lo, hi = bootstrap_ci(v, n_bootstrap=2000, seed=0)
    assert lo < v.mean() < hi
    # Roughly mean +- 1.96 standard errors for a well-behaved mean.
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci(np.full(7, 0.25), n_bootstrap=100, seed=0) == (0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([]), n_bootstrap=100, seed=0))
    # NaNs (undefined HD95) are ignored, not propagated.
    lo, hi = bootstrap_ci(np.array([1.0, np.nan, 3.0, np.nan]), n_bootstrap=500, seed=0)
    assert 1.0 <= lo <= hi <= 3.0


class _DarkIsLesion(SegmentationModel):
    """A transparent 'model': logits = -k * input, so darker pixels get higher probability."""

    def forward_padded(self, x):
        return -8.0 * x


def test_prediction_is_made_at_model_size_and_returned_at_original_size():
    image = np.full((45, 70), 200, np.uint8)
    image[10:30, 20:50] = 10  # a dark block
    settings = ModelSettings("test", (16, 16), mean=0.5, std=0.25, threshold=0.5)
    probs = predict_probabilities(_DarkIsLesion(), [image], settings)
    assert probs.lesion is None and probs.malignant is None  # no image head
    (prob,) = probs.masks
    assert prob.shape == (45, 70) and prob.dtype == np.float32
    pred = prob >= 0.5
    # Bilinear resizing from 16x16 blurs the block edges by at most a few pixels.
    assert pred[15:25, 25:45].all() and not pred[:5].any() and not pred[:, :10].any()


@pytest.mark.slow
def test_evaluate_reads_and_writes_s3(s3_env, workspace, tmp_path):
    bucket = s3_env
    for path in sorted(Path(workspace["data"]).rglob("*")):
        if path.is_file():
            rel = path.relative_to(workspace["data"]).as_posix()
            storage.write_bytes(storage.join(bucket, "prepared", rel), path.read_bytes())
    result = evaluate(load_artifact(workspace["model"]), storage.join(bucket, "prepared"), "test", n_bootstrap=50)
    paths = write_outputs(result, storage.join(bucket, "eval"), grid=3, extremes=1)
    assert paths["report"] == storage.join(bucket, "eval", "report.html")
    metrics = json.loads(storage.read_bytes(paths["metrics"]))
    assert metrics["counts"]["images"] == len(KINDS)
    assert metrics["data"]["manifest_sha256"] is not None
    assert storage.read_bytes(storage.join(bucket, "eval", "figures", "overlays.png"))[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluates_the_real_prepare_output(workspace, tmp_path):
    """The contract between jobs.prepare and jobs.evaluate: counts agree with prepare's manifest."""
    from jobs.prepare import main as prepare_main

    prepared = tmp_path / "prepared"
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_main(["--source", "phantoms", "--num", "24", "--size", "40", "--out", str(prepared)]) in (0, None)
    manifest = json.loads((prepared / "manifest.json").read_text())
    for split in ("val", "test"):
        result = evaluate(load_artifact(workspace["model"]), str(prepared), split, n_bootstrap=20)
        expected = {k: v for k, v in manifest["counts"][split].items() if k != "total"}
        assert result.metrics["counts"] == {"images": manifest["counts"][split]["total"], **expected}
        assert result.metrics["data"]["manifest_sha256"] == hashlib.sha256((prepared / "manifest.json").read_bytes()).hexdigest()


# --- bad use: one line, exit code 2 -------------------------------------------------------------

def _run_inprocess(capsys, argv) -> tuple[int, str]:
    code = run_main(evaluate_main, argv, prog="jobs.evaluate")
    err = capsys.readouterr().err
    return code, err


def test_wrong_data_uri_is_one_clear_line(workspace, tmp_path, capsys):
    missing = tmp_path / "no-such-prepared"
    code, err = _run_inprocess(capsys, ["--model", workspace["model"], "--data", str(missing), "--out", str(tmp_path / "o")])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jobs.evaluate: error: ")
    assert str(missing) in err and "jobs.prepare" in err


def test_wrong_split_is_one_clear_line(workspace, tmp_path, capsys):
    code, err = _run_inprocess(capsys, ["--model", workspace["model"], "--data", workspace["data"], "--split", "val",
                                        "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1 and "no split 'val'" in err


def test_artifact_of_another_architecture_is_one_clear_line(workspace, tmp_path, capsys):
    wrong = tmp_path / "wrong-arch"
    shutil.copytree(workspace["model"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["architecture"] = "attention_unet"  # same weights, different network
    (wrong / "config.json").write_text(json.dumps(config))
    code, err = _run_inprocess(capsys, ["--model", str(wrong), "--data", workspace["data"], "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1
    assert "attention_unet" in err and "do not fit" in err


@pytest.mark.slow
def test_s3_bucket_that_does_not_exist_is_one_clear_line(s3_env, workspace, tmp_path, capsys):
    data = s3_env.replace("s3://", "s3://missing-") + "/prepared"
    code, err = _run_inprocess(capsys, ["--model", workspace["model"], "--data", data, "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1
    assert "does not exist" in err and data.split("/")[2] in err
    assert "AWS_SECRET_ACCESS_KEY=" not in err


def test_unknown_model_name_from_the_real_cli(tmp_path):
    """The real command line: no traceback, one line on stderr, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--model", "no-such-model", "--data", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("jobs.evaluate: error: ")
    assert "'no-such-model'" in lines[0] and "pretrained" in lines[0]


def test_run_main_keeps_tracebacks_for_bugs_and_unwraps_ray_errors(capsys):
    from ray.exceptions import RayTaskError

    def bug(argv):
        raise TypeError("a programming error")

    with pytest.raises(TypeError):
        run_main(bug, [])

    def remote_failure(argv):
        cause = FileNotFoundError("s3://b/x: no such object")
        raise RayTaskError("read_task", "Traceback (most recent call last):\n  ...\n" * 30, cause).as_instanceof_cause()

    assert run_main(remote_failure, [], prog="jobs.x") == 2
    assert capsys.readouterr().err == "jobs.x: error: s3://b/x: no such object\n"

    def bad_name(argv):  # a KeyError outside unet.cli.usage_errors() is a bug: it keeps its traceback
        raise KeyError("unknown model 'x'; valid: unet, attention_unet")

    with pytest.raises(KeyError):
        run_main(bad_name, [], prog="jobs.x")
