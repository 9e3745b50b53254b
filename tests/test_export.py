"""ONNX export (unet.export, jobs.export), the onnxruntime backend of jobs.infer, probability maps.

Every architecture is exported once per module (the exporter takes seconds per model) with
random BatchNorm statistics, so that folding BatchNorm is visible in the logits, and ONNX
Runtime's logits are compared with PyTorch's: random inputs of several batch sizes and sizes, and
a BUSI-shaped one (471 x 562, padded to the stride as the model pads).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from test_infer import direct_prediction, gray, head_corpus, head_model_dir, read_output

from unet import inference as inf
from unet.artifact import load_artifact, save_artifact
from unet.cli import run_main
from unet.export import TOLERANCE, OnnxModel, export_onnx, max_logit_difference, max_probability_difference
from unet.inference.model import backend_model, postprocess
from unet.models import build_model
from unet.phantoms import generate
from unet.postprocess import final_mask
from unet.settings import ModelSettings
from unet.transforms import preprocess, resize_probability

REPO = Path(__file__).resolve().parents[1]
__all__ = ["head_corpus", "head_model_dir", "ray_local"]  # fixtures shared with test_infer

# name -> (architecture, build_model kwargs): every architecture, the encoder, image heads.
ARCHITECTURES = {
    "unet+head": ("unet", {"channels": [4, 8, 16], "image_classes": 3}),
    "attention_unet": ("attention_unet", {"channels": [4, 8, 16]}),
    "unet_plus_plus+deep_supervision": ("unet_plus_plus", {"channels": [4, 8, 16], "deep_supervision": True}),
    "efficientnet_lite0+head": ("unet", {"channels": [4, 4, 8, 8, 8], "encoder": "efficientnet_lite0",
                                         "encoder_weights": None, "image_classes": 3}),
}
BUSI_SHAPE = (471, 562)  # a typical BUSI scan, a multiple of neither 16 nor 32


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters: folding them is then not a no-op."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (LoadedModel, ONNX bytes), exported on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            architecture, kwargs = ARCHITECTURES[name]
            torch.manual_seed(0)
            model = randomised(build_model(architecture, **kwargs))
            dest = save_artifact(model, tmp_path_factory.mktemp("model") / name, architecture=architecture,
                                 input_size=(64, 64), normalization={"mean": 0.5, "std": 0.25}, threshold=0.4,
                                 postprocess={"min_area": 0.01, "tta": True})
            loaded = load_artifact(dest)
            cache[name] = (loaded, export_onnx(loaded))
        return cache[name]

    return get


def test_module_example_runs():
    import doctest

    import unet.export

    assert doctest.testmod(unet.export).failed == 0


def onnx_ops(graph: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(graph).graph.node}


@pytest.mark.parametrize("name", [
    "unet+head",
    pytest.param("attention_unet", marks=pytest.mark.slow),
    pytest.param("unet_plus_plus+deep_supervision", marks=pytest.mark.slow),
    pytest.param("efficientnet_lite0+head", marks=pytest.mark.slow),
])
def test_onnx_runtime_gives_pytorchs_logits_for_every_architecture(name, exported, seeded_one_thread):
    loaded, graph = exported(name)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
    assert "BatchNormalization" not in onnx_ops(graph)  # folded into the convolutions
    onnx_model = OnnxModel(graph)
    stride = onnx_model.metadata["stride"]
    assert stride == 2 ** loaded.model.depth
    for shape in [(1, 64, 64), (3, 2 * stride, 5 * stride), (2, 37, 53), (1, *BUSI_SHAPE)]:
        x = torch.randn(shape[0], 1, *shape[1:]) * 2
        assert max_logit_difference(loaded, onnx_model, x) <= TOLERANCE, shape
    # The probabilities as the model gives them, with the flip TTA and the image head.
    x = torch.randn(2, 1, 40, 48)
    with torch.inference_mode():
        want_prob, want_classes = loaded.model.predict_proba(x, tta=True)
    got_prob, got_classes = onnx_model.predict_proba(x.numpy(), tta=True)
    np.testing.assert_allclose(got_prob, want_prob.numpy(), atol=1e-5)
    if loaded.model.image_classes:
        np.testing.assert_allclose(got_classes, want_classes.numpy(), atol=1e-5)
    else:
        assert got_classes is None and want_classes is None


def test_graph_has_dynamic_batch_and_size_and_the_settings_in_its_metadata(exported):
    loaded, graph = exported("unet+head")
    proto = onnx.load_from_string(graph)
    onnx.checker.check_model(proto)
    (graph_input,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "input" and dims[1] == 1
    assert all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3])), dims  # symbolic
    assert [o.name for o in proto.graph.output] == ["logits", "class_logits"]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["unet.model_id"] == loaded.model_id
    assert meta["unet.normalization"] == {"mean": 0.5, "std": 0.25}
    assert meta["unet.input_size"] == [64, 64] and meta["unet.stride"] == 4
    assert meta["unet.threshold"] == 0.4
    assert meta["unet.postprocess"] == {"gate_threshold": None, "min_area": 0.01, "largest_component": False,
                                        "tta": True}
    assert meta["unet.classes"] == ["benign", "malignant", "normal"] and meta["unet.pad_mode"] == "replicate"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["busi-effunet", "busi"])
def test_pretrained_models_export_and_match_on_real_shaped_images(name, seeded_one_thread):
    """The shipped BUSI models: ``busi-effunet`` (EfficientNet-Lite0 encoder, image head, TTA) and
    ``busi`` (the ensemble of it, two more runs and busi-unet at 128 px, each resized to its own
    size inside the graph) on phantom scans preprocessed as inference does; the single model also
    at a BUSI scan's own size, which the ensemble's fixed-size graph refuses in one line."""
    loaded = load_artifact(name)
    onnx_model = OnnxModel(export_onnx(loaded))
    settings = loaded.settings
    images = [p.image for p in generate(2, seed=5, size=BUSI_SHAPE)]
    x = np.stack([preprocess(image, settings.input_size, settings.mean, settings.std) for image in images])
    assert max_probability_difference(loaded, onnx_model, x) <= TOLERANCE
    if settings.architecture != "ensemble":  # its logits are logit(mean p): see unet.export.export_artifact
        assert max_logit_difference(loaded, onnx_model, x) <= TOLERANCE
    full = preprocess(images[0], BUSI_SHAPE, settings.mean, settings.std)[None]
    if onnx_model.metadata["stride"] is None:
        assert loaded.settings.architecture == "ensemble"
        size = r"\[{}, {}\]".format(*settings.input_size)
        with pytest.raises(ValueError, match=rf"takes images of exactly its input_size {size}; got 471 x 562"):
            onnx_model.predict_all(full)
    else:
        assert max_logit_difference(loaded, onnx_model, full) <= TOLERANCE
    assert onnx_model.metadata["postprocess"] == settings.postprocess
    assert onnx_model.metadata["normalization"] == settings.normalization


def test_export_job_writes_a_checked_graph_and_refuses_bad_use(exported, tmp_path, capsys):
    from jobs.export import main

    loaded, _ = exported("unet+head")
    artifact = str(tmp_path / "artifact")
    save_artifact(loaded.model, artifact, input_size=(64, 64), normalization={"mean": 0.5, "std": 0.25})
    out = tmp_path / "exported" / "model.onnx"
    assert run_main(main, ["--model", artifact, "--format", "onnx", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["bytes"] == out.stat().st_size
    assert set(summary["max_abs_difference"]) == {"input_size", "odd"}
    assert all(v["logits"] <= TOLERANCE and v["probabilities"] <= TOLERANCE
               for v in summary["max_abs_difference"].values())
    onnx.checker.check_model(onnx.load(str(out)))
    assert OnnxModel(str(out)).metadata["model_id"] == summary["model_id"] == load_artifact(artifact).model_id

    assert run_main(main, ["--model", artifact, "--out", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert run_main(main, ["--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_export_job_prints_only_its_summary(exported, tmp_path):
    """The exporter's own chatter (torch.export and onnxscript logs, warnings) stays out."""
    loaded, _ = exported("unet+head")
    artifact = save_artifact(loaded.model, tmp_path / "artifact", input_size=(64, 64),
                             normalization={"mean": 0.5, "std": 0.25})
    proc = subprocess.run([sys.executable, "-m", "jobs.export", "--model", str(artifact), "--out",
                           str(tmp_path / "m.onnx")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    (line,) = proc.stdout.splitlines()
    assert json.loads(line)["out"] == str(tmp_path / "m.onnx")


@pytest.mark.parametrize("tta", [False, True])
def test_onnxruntime_predictor_gives_the_torch_predictors_output(exported, tta):
    loaded, graph = exported("unet+head")
    settings = ModelSettings("unet", (64, 64), 0.5, 0.25, tta=tta)
    x = np.stack([gray(64, 64, seed=i) for i in range(3)])
    batch = {"x": x, "error": np.array(["", "broken", ""]), "_seq": np.array([0, 1, 2])}
    threads = torch.get_num_threads()  # the torch actor sets this process's thread count: keep it
    want = inf.Predictor(loaded.model, settings=settings, use_gpu=False, num_threads=threads)(dict(batch))
    got = inf.Predictor(graph, settings=settings, use_gpu=False, num_threads=1, backend="onnxruntime")(dict(batch))
    for key in ("lesion_probability", "malignant_probability"):
        assert got[key].dtype == want[key].dtype == np.float32
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    # Both hand on uint8 round(p * 255); float32 differences of 1e-5 may round one step apart.
    assert got["prob"].dtype == want["prob"].dtype == np.uint8
    assert np.abs(got["prob"].astype(int) - want["prob"]).max() <= 1
    assert not got["prob"][1].any() and np.isnan(got["lesion_probability"][1])


def test_backend_model_exports_for_onnxruntime_only(exported):
    loaded, _ = exported("unet+head")
    assert backend_model(loaded, "torch") is loaded.model
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime"):
        backend_model(loaded, "tensorrt")
    with pytest.raises(ValueError, match="backend must be one of"):
        inf.InferenceConfig(model="m", input="i", output="o", backend="tensorrt")


def test_onnxruntime_actor_never_imports_torch(exported, tmp_path):
    """The ORT model actor needs neither torch's import time nor its memory."""
    _, graph = exported("unet+head")
    (tmp_path / "model.onnx").write_bytes(graph)
    code = f"""
import sys, numpy as np
from unet.inference.model import Predictor
from unet.settings import ModelSettings
predictor = Predictor(open({str(tmp_path / "model.onnx")!r}, "rb").read(), settings=ModelSettings("unet", (64, 64),
                      0.5, 0.25), use_gpu=False, num_threads=1, backend="onnxruntime")
out = predictor({{"x": np.zeros((2, 64, 64), np.uint8), "error": np.array(["", ""]), "_seq": np.arange(2)}})
assert out["prob"].shape == (2, 64, 64) and not np.isnan(out["lesion_probability"]).any()
print("torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_probability_png_is_written_only_when_asked_at_the_original_size():
    prob = np.zeros((3, 8, 8), np.uint8)  # as the model actor hands it on: round(p * 255)
    prob[:, 2:6, 2:6] = 230
    prob[:, 0, 0] = 77
    batch = {"_chunk": np.array(["c"] * 3), "_seq": np.arange(3), "_n": np.full(3, -1),
             "image_id": np.array(["a", "broken", "b"]), "source_uri": np.array(["u"] * 3),
             "error": np.array(["", "not an image", ""]), "height": np.array([8, 8, 20]),
             "width": np.array([8, 8, 12]), "prob": prob,
             "lesion_probability": np.full(3, np.nan, np.float32),
             "malignant_probability": np.full(3, np.nan, np.float32)}
    rule = {"threshold": 0.5, "gate_threshold": None, "min_area": 0.0, "largest_component": False}
    assert all(r["probability_png"] is None for r in postprocess(dict(batch), mask_rule=rule, model_id="m").to_pylist())
    rows = {r["image_id"]: r for r in postprocess(dict(batch), mask_rule=rule, model_id="m",
                                                  save_probabilities=True).to_pylist()}
    assert rows["broken"]["probability_png"] is None
    for name, i in (("a", 0), ("b", 2)):
        saved = np.asarray(Image.open(io.BytesIO(rows[name]["probability_png"])))
        full = resize_probability(prob[i], (int(batch["height"][i]), int(batch["width"][i])))
        assert saved.dtype == np.uint8 and saved.shape == full.shape
        np.testing.assert_array_equal(saved, np.rint(full * 255).astype(np.uint8))
        # Re-thresholding the saved map gives the mask back (0.5 * 255 = 127.5: no pixel on the edge).
        mask = np.asarray(Image.open(io.BytesIO(rows[name]["mask_png"]))) == 255
        np.testing.assert_array_equal(saved >= 128, mask)
    assert rows["a"]["probability_png"] != rows["b"]["probability_png"]


@pytest.mark.slow
def test_infer_job_with_onnxruntime_gives_torchs_masks_and_saves_probability_maps(ray_local, head_model_dir,
                                                                                  head_corpus, tmp_path):
    from jobs.infer import main

    root, images = head_corpus
    common = ["--model", str(head_model_dir), "--input", str(root), "--chunk-size", "4", "--batch-size", "4",
              "--gate-threshold", "0"]
    assert main([*common, "--output", str(tmp_path / "torch")]) == 0
    assert main([*common, "--output", str(tmp_path / "ort"), "--backend", "onnxruntime",
                 "--save-probabilities"]) == 0
    torch_rows = read_output(str(tmp_path / "torch")).set_index("image_id").sort_index()
    ort_rows = read_output(str(tmp_path / "ort")).set_index("image_id").sort_index()
    assert torch_rows["probability_png"].isna().all()  # off by default
    assert list(ort_rows.index) == list(torch_rows.index)
    assert ort_rows.loc["broken.png", "status"] == "error" and ort_rows.loc["broken.png", "probability_png"] is None
    for name in images:
        got, want = ort_rows.loc[name], torch_rows.loc[name]
        assert got["mask_png"] == want["mask_png"], name
        assert got["tumour_pixels"] == want["tumour_pixels"] > 0
        assert got["lesion_probability"] == pytest.approx(want["lesion_probability"], abs=1e-5)
        assert got["malignant_probability"] == pytest.approx(want["malignant_probability"], abs=1e-5)
        image = inf.decode_image((root / name).read_bytes())
        prob, _, _ = direct_prediction(head_model_dir, image, tta=True)
        saved = np.asarray(Image.open(io.BytesIO(got["probability_png"])))
        assert saved.shape == image.shape
        assert np.abs(saved.astype(int) - np.rint(prob * 255)).max() <= 1  # ORT vs torch rounding
        assert final_mask(prob, threshold=0.5).any()
