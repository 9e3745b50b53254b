"""Worker side, model and post-processing stages (Ray Data actor pool, then tasks).

:class:`Predictor` turns the uint8 model-size images into foreground probabilities (and, for a
model with an image-level head, each image's lesion and malignancy probabilities), with PyTorch
or with ONNX Runtime running the exported graph (:data:`BACKENDS`); :func:`postprocess` resizes
them back to each image's original size, applies the model's post-processing
(:func:`unet.postprocess.final_mask`), measures and PNG-encodes the mask (and, if asked, the
probability map), producing output rows (:data:`unet.inference.output.OUTPUT_SCHEMA`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import time

import numpy as np
import pyarrow as pa

from .. import faults
from ..codec import encode_mask_png, encode_png
from ..postprocess import final_mask, image_probabilities
from ..transforms import normalize, quantize_probability, resize_probability, single_threaded_opencv
from .decode import describe_error
from .output import pipeline_schema

__all__ = ["BACKENDS", "MASK_RULE_KEYS", "Predictor", "backend_model", "encode_mask_png", "encode_probability_png",
           "mask_statistics", "postprocess", "postprocess_probability"]

logger = logging.getLogger("unet.inference")

# What runs the network in the model actors: PyTorch, or ONNX Runtime on the exported graph.
BACKENDS = ("torch", "onnxruntime")

# The ModelSettings values that turn a probability map into a mask (tta acts in the model actor).
# The post-processing tasks get them as a plain dict: unpickling a ModelSettings would import
# unet.settings and with it torch in every post-processing worker.
MASK_RULE_KEYS = ("threshold", "gate_threshold", "min_area", "largest_component")


def backend_model(loaded, backend: str):
    """What the model actors of ``backend`` are given: the torch model, or for ``"onnxruntime"``
    the ONNX graph exported from it (:func:`unet.export.export_onnx`), once, here on the driver."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return loaded.model
    from ..export import export_onnx

    started = time.monotonic()
    graph = export_onnx(loaded)
    logger.info("exported %s to ONNX for onnxruntime (%.1f MB) in %.1f s", loaded.model_id, len(graph) / 1e6,
                time.monotonic() - started)
    return graph


class Predictor:
    """Ray Data actor: holds the model, maps a batch of uint8 ``x`` to foreground probabilities.

    ``backend="torch"`` (default): ``model`` is the torch model; it runs with BatchNorm folded
    into the convolutions (:func:`unet.models.fuse_conv_bn`), CPU: channels-last tensors under
    ``torch.inference_mode``; GPU: the same under fp16 autocast. ``backend="onnxruntime"``:
    ``model`` is the exported ONNX graph (:func:`backend_model`), run by
    :class:`unet.export.OnnxModel` in float32 (CPU, or CUDA with ``onnxruntime-gpu``) with
    ``num_threads`` intra-op threads; the actor then never imports torch.
    ``settings`` (:class:`unet.settings.ModelSettings`) gives the normalisation and ``tta``; the
    rows' ``x`` are already at its ``input_size``. Adds ``prob`` (model size, uint8 ``round(p * 255)``
    from :func:`unet.transforms.quantize_probability`, as evaluation has it) and, per row,
    float32 ``lesion_probability`` (1 - p(normal)) and ``malignant_probability`` from the image
    head (:func:`unet.postprocess.image_probabilities`); NaN without a head. Rows with an error
    (and tar end markers) are passed through with an all-zero ``prob`` and NaN probabilities.
    ``fault_drill`` (:mod:`unet.faults`, tests only) makes the actor exit once on a given call, to
    prove exactly-once output under failures.
    """

    def __init__(self, model, *, settings, use_gpu: bool, num_threads: int, fault_drill: dict | None = None,
                 backend: str = "torch"):
        self.settings = settings
        self.fault_drill, self.calls = fault_drill, 0
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.onnx = None
        if backend == "onnxruntime":
            from ..export import OnnxModel

            self.onnx = OnnxModel(model, use_gpu=use_gpu, num_threads=num_threads)
            return
        # torch only here: this module also serves the decode/post-processing tasks, whose worker
        # processes would otherwise spend seconds of CPU importing it.
        import torch

        from ..models import fuse_conv_bn

        self.torch = torch
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("gpus_per_worker > 0 but this actor's torch sees no CUDA device (CPU-only "
                               "torch build, or no driver); install a CUDA torch or run without GPUs")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model = fuse_conv_bn(model).to(self.device).to(memory_format=torch.channels_last)

    def _predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (n, H, W), class probabilities (n, K) or None) for uint8 ``x`` (n, H, W)."""
        if self.onnx is not None:
            inputs = normalize(x, self.settings.mean, self.settings.std)[:, None]
            p, class_prob = self.onnx.predict_proba(inputs, tta=self.settings.tta)
            return p[:, 0], class_prob
        torch = self.torch
        # uint8 crosses to the device (a quarter of float32's bytes), from pinned memory without
        # blocking; normalised there, as unet.transforms.normalize does (the same float32 steps).
        inputs = torch.from_numpy(x)
        if self.device.type == "cuda":
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
        inputs = ((inputs.float() / 255.0 - self.settings.mean) / self.settings.std)[:, None]
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            p, class_prob = self.model.predict_proba(inputs, tta=self.settings.tta)
        return p[:, 0].float().cpu().numpy(), None if class_prob is None else class_prob.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        faults.maybe_crash(self.fault_drill, "infer", self.calls)
        x = batch.pop("x")
        ok = (batch["error"] == "") & (batch["_seq"] >= 0)
        prob = np.zeros(x.shape, np.uint8)
        lesion = np.full(len(x), np.nan, np.float32)
        malignant = np.full(len(x), np.nan, np.float32)
        if ok.any():
            p, class_prob = self._predict(x[ok])
            prob[ok] = quantize_probability(p)
            p_lesion, p_malignant = image_probabilities(class_prob)
            if p_lesion is not None:
                lesion[ok], malignant[ok] = p_lesion, p_malignant
        batch["prob"] = prob
        batch["lesion_probability"], batch["malignant_probability"] = lesion, malignant
        return batch


def postprocess_probability(prob: np.ndarray, size: tuple[int, int], threshold: float, *,
                            lesion_probability: float | None = None, gate_threshold: float | None = None,
                            min_area: float = 0.0, largest_component: bool = False
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Model-size probability (uint8 from :func:`unet.transforms.quantize_probability`, as the
    model actor hands it on, or float) -> (bool mask, float32 probability) at the original
    ``size`` = (h, w).

    The mask is :func:`unet.postprocess.final_mask` of the resized probability (threshold, gate
    on ``lesion_probability``, small components, largest component), as in evaluation.
    """
    full = resize_probability(np.ascontiguousarray(prob), size)
    mask = final_mask(full, threshold=threshold, lesion_probability=lesion_probability,
                      gate_threshold=gate_threshold, min_area=min_area, largest_component=largest_component)
    return mask, full


def mask_statistics(mask: np.ndarray, prob: np.ndarray) -> dict:
    """tumour_pixels, tumour_fraction, bbox (half-open [x0, y0, x1, y1] or None), confidence."""
    pixels = int(mask.sum())
    if pixels:
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        bbox = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
        confidence = float(prob[mask].mean())
    else:
        bbox, confidence = None, float(prob.max())
    return {"tumour_pixels": pixels, "tumour_fraction": pixels / mask.size, "bbox": bbox, "confidence": confidence}


def encode_probability_png(prob: np.ndarray) -> bytes:
    """(H, W) probabilities in [0, 1] -> 8-bit grey PNG of ``round(prob * 255)`` (value / 255 gives
    the probability back to within 1/510)."""
    return encode_png(quantize_probability(prob))


def postprocess(batch: dict[str, np.ndarray], *, mask_rule: dict, model_id: str,
                save_probabilities: bool = False, dicom_columns: tuple[str, ...] = ()) -> pa.Table:
    """Ray Data UDF: probabilities -> output rows (plus the internal chunk columns).

    ``mask_rule``: the settings' :data:`MASK_RULE_KEYS` values, passed to
    :func:`postprocess_probability`. ``save_probabilities``: also fill ``probability_png``
    (:func:`encode_probability_png` of the probability at the original size); else it is null.
    ``dicom_columns``: identifying DICOM columns the rows carry ("" = null), passed on as they are.
    """
    single_threaded_opencv()
    n = len(batch["_seq"])
    now = _dt.datetime.now(_dt.timezone.utc)
    schema = pipeline_schema(dicom_columns)
    out: dict[str, list] = {name: [] for name in schema.names}
    for i in range(n):
        error = str(batch["error"][i]) or None
        seq = int(batch["_seq"][i])
        row = {"_chunk": batch["_chunk"][i], "_seq": seq, "_n": int(batch["_n"][i]),
               "image_id": batch["image_id"][i], "source_uri": batch["source_uri"][i],
               "model_id": model_id, "processed_at": now, "error": error,
               "status": "error" if error is not None or seq < 0 else "ok",
               "height": None, "width": None, "mask_png": None, "probability_png": None, "tumour_pixels": None,
               "tumour_fraction": None, "bbox": None, "confidence": None,
               "lesion_probability": None, "malignant_probability": None,
               **{name: str(batch[name][i]) or None for name in dicom_columns}}
        if row["status"] == "ok":
            h, w = int(batch["height"][i]), int(batch["width"][i])
            lesion = float(batch["lesion_probability"][i])
            malignant = float(batch["malignant_probability"][i])
            try:
                mask, prob = postprocess_probability(batch["prob"][i], (h, w), lesion_probability=lesion,
                                                     **mask_rule)
                row.update(height=h, width=w, mask_png=encode_mask_png(mask), **mask_statistics(mask, prob),
                           probability_png=encode_probability_png(prob) if save_probabilities else None,
                           lesion_probability=None if math.isnan(lesion) else lesion,
                           malignant_probability=None if math.isnan(malignant) else malignant)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for one huge image: an error row
                row.update(status="error", error=f"post-processing failed: {describe_error(e)}")
        for name in out:
            out[name].append(row[name])
    return pa.table(out, schema=schema)
