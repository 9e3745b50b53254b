"""Worker side, model and post-processing stages (Ray Data actor pool, then tasks).

:class:`Predictor` turns the uint8 model-size images into foreground probabilities;
:func:`postprocess` resizes them back to each image's original size, thresholds, measures and
PNG-encodes the mask, producing output rows (:data:`unet.inference.output.OUTPUT_SCHEMA`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt

import numpy as np
import pyarrow as pa
from scipy import ndimage

from .. import faults
from ..codec import encode_mask_png
from ..transforms import normalize, resize_probability, single_threaded_opencv
from .decode import describe_error
from .output import PIPELINE_SCHEMA

__all__ = ["Predictor", "encode_mask_png", "mask_statistics", "postprocess",
           "postprocess_probability"]

class Predictor:
    """Ray Data actor: holds the model, maps a batch of uint8 ``x`` to foreground probabilities.

    The model runs with BatchNorm folded into the convolutions (:func:`unet.models.fuse_conv_bn`).
    CPU: channels-last tensors under ``torch.inference_mode``; GPU: the same under fp16 autocast.
    ``settings`` (:class:`unet.artifact.ModelSettings`) gives the normalisation; the rows' ``x``
    are already at its ``input_size``. Rows with an error (and tar end markers) are passed through
    with an all-zero ``prob``. ``fault_drill`` (:mod:`unet.faults`, tests only) makes the actor exit
    once on a given call, to prove exactly-once output under failures.
    """

    def __init__(self, model, *, settings, tta: bool, use_gpu: bool, num_threads: int,
                 fault_drill: dict | None = None):
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
        self.settings, self.tta = settings, tta
        self.fault_drill, self.calls = fault_drill, 0

    def _forward(self, x):
        return self.torch.sigmoid(self.model.predict(x).float())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        self.calls += 1
        faults.maybe_crash(self.fault_drill, "infer", self.calls)
        x = batch.pop("x")
        ok = (batch["error"] == "") & (batch["_seq"] >= 0)
        prob = np.zeros(x.shape, np.float32)
        if ok.any():
            inputs = torch.from_numpy(normalize(x[ok], self.settings.mean, self.settings.std)[:, None])
            inputs = inputs.to(self.device).contiguous(memory_format=torch.channels_last)
            amp = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                   else contextlib.nullcontext())
            with torch.inference_mode(), amp:
                p = self._forward(inputs)
                if self.tta:
                    p = (p + self._forward(inputs.flip(-1)).flip(-1)) / 2
            prob[ok] = p[:, 0].float().cpu().numpy()
        batch["prob"] = prob
        return batch


def postprocess_probability(prob: np.ndarray, size: tuple[int, int], threshold: float,
                            largest_component: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Model-size probability -> (bool mask, probability) at the original ``size`` = (h, w)."""
    full = resize_probability(np.ascontiguousarray(prob, dtype=np.float32), size)
    mask = full >= threshold
    if largest_component and mask.any():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == int(sizes.argmax())
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


def postprocess(batch: dict[str, np.ndarray], *, threshold: float, largest_component: bool,
                model_id: str) -> pa.Table:
    """Ray Data UDF: probabilities -> output rows (plus the internal chunk columns)."""
    single_threaded_opencv()
    n = len(batch["_seq"])
    now = _dt.datetime.now(_dt.timezone.utc)
    out: dict[str, list] = {name: [] for name in PIPELINE_SCHEMA.names}
    for i in range(n):
        error = str(batch["error"][i]) or None
        seq = int(batch["_seq"][i])
        row = {"_chunk": batch["_chunk"][i], "_seq": seq, "_n": int(batch["_n"][i]),
               "image_id": batch["image_id"][i], "source_uri": batch["source_uri"][i],
               "model_id": model_id, "processed_at": now, "error": error,
               "status": "error" if error is not None or seq < 0 else "ok",
               "height": None, "width": None, "mask_png": None, "tumour_pixels": None,
               "tumour_fraction": None, "bbox": None, "confidence": None}
        if row["status"] == "ok":
            h, w = int(batch["height"][i]), int(batch["width"][i])
            try:
                mask, prob = postprocess_probability(batch["prob"][i], (h, w), threshold, largest_component)
                row.update(height=h, width=w, mask_png=encode_mask_png(mask), **mask_statistics(mask, prob))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for one huge image: an error row
                row.update(status="error", error=f"post-processing failed: {describe_error(e)}")
        for name in out:
            out[name].append(row[name])
    return pa.table(out, schema=PIPELINE_SCHEMA)
