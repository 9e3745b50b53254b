"""Evaluate a model artifact on a prepared split: per-image metrics, bootstrap CIs, class summaries.

What is measured, and how (the choices a reader needs to trust a number):

* Each image is predicted at the model's own input size (``loaded.settings.input_size``, normalised
  as its settings say, :func:`unet.transforms.preprocess`; averaged with the horizontal flip when the
  settings ask for TTA); the probability map is quantised to uint8 exactly as the inference job's
  model actor hands it on (:func:`unet.transforms.quantize_probability`), resized back to the image's
  ORIGINAL size (:func:`unet.transforms.resize_probability`) and turned into the final mask there by
  :func:`unet.postprocess.final_mask` with the artifact's post-processing (threshold, image-level
  gate, small-component removal, largest component; each can be overridden), and scored against
  the original-size mask. So the numbers are what a user of ``jobs.infer`` gets, not a score on
  down-sampled masks.
* Per image: confusion counts, Dice, IoU, precision, recall (:func:`unet.metrics.scores_from_counts`,
  with its empty-mask rule: a normal image with an empty prediction scores 1.0, with any predicted
  pixel 0.0) and HD95 in pixels of the original image (NaN when exactly one mask is empty; such
  images are counted, never dropped).
* Summaries overall and per class (benign / malignant / normal): the mean over images ("macro",
  what BUSI papers report) of each metric, and the Dice/IoU of the summed counts ("micro"), each
  with a 95 % percentile-bootstrap confidence interval: images are resampled with replacement
  (numpy, seeded, ``n_bootstrap`` times) within the group being summarised.
* The false-lesion rate: the share of normal images with any predicted pixel. The missed-lesion
  rate: the share of benign/malignant images with no predicted pixel. Lesion Dice: the mean Dice
  over benign/malignant images. For a model with an image head, the per-image ``p(lesion)`` and
  ``p(malignant)`` and their AUROCs, and what the gate keeps (:func:`unet.statistics.summarize`).

Example::

    from unet.artifact import load_artifact
    from unet.evaluation import evaluate, write_outputs
    result = evaluate(load_artifact("runs/phantom-unet/model"), "runs/prepared", split="test")
    paths = write_outputs(result, "runs/eval")        # metrics.json, per_image.{csv,parquet}, report.html
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unet import metrics as M
from unet import storage
from unet.codec import decode_png, encode_mask_png
from unet.postprocess import final_mask, image_probabilities
from unet.runtime import ProgressLine
from unet.settings import ModelSettings
from unet.shards import CLASSES, manifest_sha256, split_shards
from unet.statistics import summarize
from unet.transforms import preprocess, quantize_probability, resize_probability

__all__ = [
    "CLASSES",
    "Case",
    "EvaluationResult",
    "Probabilities",
    "evaluate",
    "iter_split_batches",
    "load_cases",
    "predict_masks",
    "predict_probabilities",
    "read_split",
    "score_image",
    "write_outputs",
]

# Columns of the per-image table, in order (pred_png only in the Parquet copy).
PER_IMAGE_COLUMNS = (
    "id", "class", "height", "width", "gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn",
    "dice", "iou", "precision", "recall", "hd95", "mean_prob_in_pred", "lesion_probability",
    "malignant_probability", "shard",
)  # fmt: skip
_SHARD_COLUMNS = ["id", "class", "image_png", "mask_png", "height", "width"]


# --------------------------------------------------------------------------------------------
# Reading the prepared split
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One decoded row of a prepared shard."""

    id: str
    cls: str
    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray  # (H, W) bool
    shard: str


def read_split(data_uri: str, split: str, *, ids: Iterable[str] | None = None,
               batch_rows: int = 32) -> Iterator[Sample]:
    """Yield the decoded rows of ``split`` (:func:`unet.shards.split_shards`: a prepared folder, or
    one side of a cross-validation fold) in shard order, streaming.

    ``ids`` restricts the rows to those ids (used to fetch report cases). Rows are validated:
    known class, decodable 8-bit PNGs, mask the same size as the image and as ``height/width``;
    a bad row raises ``ValueError`` naming the shard and the row id.
    """
    wanted = None if ids is None else set(ids)
    shards, groups = split_shards(data_uri, split)
    columns = _SHARD_COLUMNS if groups is None else [*_SHARD_COLUMNS, "group"]
    for shard in shards:
        fs, path = storage.get_filesystem(shard)
        with storage.errors(shard, "read shard"), fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in _SHARD_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{shard}: missing column(s) {missing}; is this a jobs.prepare shard "
                                 f"(columns {_SHARD_COLUMNS} ...)?")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                for row in batch.to_pylist():
                    if (wanted is not None and row["id"] not in wanted) or (groups is not None
                                                                             and row["group"] not in groups):
                        continue
                    yield _decode_row(row, shard)


def iter_split_batches(data_uri: str, split: str, batch_size: int) -> Iterator[list[Sample]]:
    """The split's samples (:func:`read_split`) in lists of ``batch_size``; the last may be shorter."""
    batch: list[Sample] = []
    for sample in read_split(data_uri, split):
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_row(row: dict, shard: str) -> Sample:
    where = f"{shard} row id={row['id']!r}"
    cls = row["class"]
    if cls not in CLASSES:
        raise ValueError(f"{where}: class {cls!r} is not one of {CLASSES}")
    image = decode_png(row["image_png"], sample=row["id"], column="image_png", where=shard)
    mask = decode_png(row["mask_png"], sample=row["id"], column="mask_png", where=shard) > 0
    size = (int(row["height"]), int(row["width"]))
    if image.shape != size or mask.shape != size:
        raise ValueError(f"{where}: image {image.shape} / mask {mask.shape} do not match "
                         f"height,width = {size}")
    return Sample(str(row["id"]), cls, image, mask, shard)


# --------------------------------------------------------------------------------------------
# Prediction and per-image scores
# --------------------------------------------------------------------------------------------

class Probabilities(NamedTuple):
    """What the model says about a batch of images, before post-processing."""

    masks: list[np.ndarray]  # foreground probability per image, (H, W) float32 at its original size
    lesion: np.ndarray | None  # (B,) p(lesion) = 1 - p(normal) from the image head; None without one
    malignant: np.ndarray | None  # (B,) p(malignant) from the image head; None without one


def predict_probabilities(model: torch.nn.Module, images: Sequence[np.ndarray], settings: ModelSettings,
                          device: torch.device | str = "cpu") -> Probabilities:
    """Foreground probabilities of (H, W) uint8 images at their original sizes, and the image
    head's ``p(lesion)``/``p(malignant)`` when the model has one.

    ``model`` is a :class:`unet.models.SegmentationModel` (``predict_proba``); ``settings``
    (:class:`unet.settings.ModelSettings`) gives the input size, the normalisation and ``tta``.
    """
    if not images:
        return Probabilities([], None, None)
    x = np.stack([preprocess(img, settings.input_size, settings.mean, settings.std) for img in images])
    with torch.inference_mode():
        prob, class_prob = model.predict_proba(torch.from_numpy(x).to(device), tta=settings.tta)
    prob = quantize_probability(prob[:, 0].float().cpu().numpy())  # as the inference job's model actor
    lesion, malignant = image_probabilities(None if class_prob is None else class_prob.cpu().numpy())
    masks = [resize_probability(p, img.shape[:2]) for p, img in zip(prob, images, strict=True)]
    return Probabilities(masks, lesion, malignant)


def predict_masks(probs: Probabilities, settings: ModelSettings) -> list[np.ndarray]:
    """The final bool masks (:func:`unet.postprocess.final_mask`) with ``settings``' post-processing."""
    lesion = [None] * len(probs.masks) if probs.lesion is None else [float(v) for v in probs.lesion]
    return [final_mask(prob, threshold=settings.threshold, lesion_probability=p, gate_threshold=settings.gate_threshold,
                       min_area=settings.min_area, largest_component=settings.largest_component)
            for prob, p in zip(probs.masks, lesion, strict=True)]


def score_image(prob: np.ndarray, target: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Scores of one final mask ``pred`` (bool, original size) against ``target``; ``prob`` is the
    probability map it came from (for the mean probability inside the mask)."""
    tp, fp, fn, tn = (int(v) for v in M.counts(pred, target)[0])
    scores = M.scores_from_counts(tp, fp, fn)
    pred_pixels = tp + fp
    record = {
        "height": int(target.shape[0]), "width": int(target.shape[1]),
        "gt_pixels": tp + fn, "pred_pixels": pred_pixels, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        **scores, "hd95": M.hd95(pred, target),
        # Mean probability inside the predicted mask: a cheap confidence for the report.
        "mean_prob_in_pred": float(prob[pred].mean()) if pred_pixels else math.nan,
    }
    return record


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------

@dataclass
class EvaluationResult:
    """Per-image table (with predicted masks as PNG bytes in ``pred_png``) and ``metrics.json`` content."""

    per_image: pd.DataFrame
    metrics: dict
    data_uri: str
    split: str
    history: Any = None  # training history from the artifact's provenance, if any
    extras: dict = field(default_factory=dict)


def evaluate(loaded: Any, data_uri: str, split: str = "test", *, batch_size: int = 8,
             n_bootstrap: int = 1000, seed: int = 0, threshold: float | None = None,
             gate_threshold: float | None = None, min_area: float | None = None,
             largest_component: bool | None = None, tta: bool | None = None,
             device: torch.device | str = "cpu", model_ref: str | None = None,
             command: str | None = None, log: Any = None) -> EvaluationResult:
    """Score ``loaded`` (a :class:`unet.artifact.LoadedModel`) on every image of ``data_uri/split``.

    Args:
        loaded: the artifact (``.model`` in eval mode, ``.config``, ``.model_id``, ``.settings``).
        data_uri: prepared data (local path or ``s3://``), as written by ``jobs.prepare``.
        split: ``train``, ``val`` or ``test``.
        batch_size: images per forward pass (memory, not results, depends on it).
        n_bootstrap: bootstrap resamples for the CIs (0 = no CIs).
        seed: bootstrap seed; the same seed gives the same CIs.
        threshold, gate_threshold, min_area, largest_component, tta: override the artifact's
            post-processing (:class:`unet.settings.ModelSettings`); None keeps the artifact's value,
            ``gate_threshold=0`` switches its gate off.
        model_ref: how the user named the model (recorded in metrics.json).
        command: the command line that ran this evaluation (recorded in metrics.json).
        log: optional callable taking a progress line (one every ~10 s, and the last one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if n_bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0; got {n_bootstrap}")
    overrides = {"threshold": threshold, "gate_threshold": gate_threshold, "min_area": min_area,
                 "largest_component": largest_component, "tta": tta}
    settings = loaded.settings.with_postprocess(**overrides)
    model = loaded.model.to(device).eval()
    records: list[dict] = []
    progress = ProgressLine(log) if log is not None else None
    for batch in iter_split_batches(data_uri, split, batch_size):
        probs = predict_probabilities(model, [s.image for s in batch], settings, device)
        preds = predict_masks(probs, settings)
        for i, (s, prob, pred) in enumerate(zip(batch, probs.masks, preds, strict=True)):
            head = {"lesion_probability": math.nan if probs.lesion is None else float(probs.lesion[i]),
                    "malignant_probability": math.nan if probs.malignant is None else float(probs.malignant[i])}
            records.append({"id": s.id, "class": s.cls, **score_image(prob, s.mask, pred), **head,
                            "shard": s.shard, "pred_png": encode_mask_png(pred)})
        if progress is not None:
            progress.update(f"scored {len(records)} images")
    if progress is not None:
        progress.done(f"scored {len(records)} images")
    if not records:
        raise ValueError(f"split '{split}' of {data_uri} has shards but no rows")
    per_image = pd.DataFrame.from_records(records, columns=[*PER_IMAGE_COLUMNS, "pred_png"])
    dupes = per_image["id"][per_image["id"].duplicated()].unique()
    if len(dupes):
        raise ValueError(f"split '{split}' of {data_uri} repeats image id(s) {list(dupes[:5])}: "
                         "per-image results would be ambiguous; re-run jobs.prepare")

    config = loaded.config
    provenance = config.get("provenance") or {}
    counts_by_class = {cls: int((per_image["class"] == cls).sum()) for cls in CLASSES}
    postprocess = {"threshold": settings.threshold, **settings.postprocess,
                   "overridden": sorted(k for k, v in overrides.items() if v is not None)}
    metrics = {
        "schema_version": 1,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": {
            "ref": model_ref, "model_id": loaded.model_id, "architecture": settings.architecture,
            "input_size": list(settings.input_size), "threshold": settings.threshold,
            "normalization": {"mean": settings.mean, "std": settings.std},
        },
        "model_id": loaded.model_id,
        "postprocess": postprocess,
        "data": {"uri": data_uri, "split": split, "manifest_sha256": manifest_sha256(data_uri)},
        "counts": {"images": int(len(per_image)), **counts_by_class},
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "ci": 0.95,
                      "method": "percentile, images resampled with replacement within each group"},
        "definitions": {
            "prediction": "sigmoid at the model input size (with tta: mean with the horizontal flip), "
                          "resized (bilinear) to the original image size, then unet.postprocess.final_mask: "
                          "prob >= threshold; emptied when p(lesion) < gate_threshold; components smaller "
                          "than min_area x image pixels removed; largest component only if largest_component",
            "macro": "mean over images of each image's score",
            "micro": "score of the counts summed over images",
            "empty_rule": "empty truth and empty prediction score 1.0; exactly one empty scores 0.0",
            "hd95": "pixels of the original image; undefined (NaN) when exactly one mask is empty",
            "false_lesion_rate": "share of normal images with any predicted pixel",
            "missed_lesion_rate": "share of benign/malignant images with no predicted pixel",
            "lesion_dice": "mean per-image Dice over benign/malignant images",
            "lesion_probability": "image head: 1 - p(normal); NaN without an image head",
            "gate": "AUROC of lesion_probability for lesion vs normal images; at the gate threshold used, "
                    "sensitivity = share of lesion images kept, specificity = share of normal images gated",
            "malignant_auroc": "AUROC of malignant_probability for malignant vs benign (lesion images only)",
        },
        **summarize(per_image, n_bootstrap=n_bootstrap, seed=seed, gate_threshold=settings.gate_threshold),
    }
    return EvaluationResult(per_image=per_image, metrics=metrics, data_uri=data_uri, split=split,
                            history=provenance.get("history"))


# --------------------------------------------------------------------------------------------
# Cases for the report
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One image with its truth and prediction, for plotting."""

    id: str
    cls: str
    image: np.ndarray
    gt: np.ndarray  # bool
    pred: np.ndarray  # bool
    dice: float


def select_cases(per_image: pd.DataFrame, *, grid: int = 12, extremes: int = 4, seed: int = 0) -> dict[str, list[str]]:
    """Ids to show: a class-stratified sample, the best and worst lesion images by Dice, and the
    normal images with the most predicted pixels (false lesions)."""
    rng = np.random.default_rng(seed)
    present = [c for c in CLASSES if (per_image["class"] == c).any()]
    sample: list[str] = []
    per_class = max(1, grid // max(1, len(present)))
    for cls in present:
        ids = sorted(per_image.loc[per_image["class"] == cls, "id"])
        sample += [ids[i] for i in sorted(rng.choice(len(ids), size=min(per_class, len(ids)), replace=False))]
    lesion = per_image[per_image["class"] != "normal"].sort_values(["dice", "id"], kind="stable")
    # With few lesion images, split them so that no image is both "best" and "worst".
    k = min(extremes, max(1, len(lesion) // 2)) if len(lesion) else 0
    worst = list(lesion["id"][:k])
    best = [i for i in lesion["id"][::-1][:k] if i not in worst]
    false = per_image[(per_image["class"] == "normal") & (per_image["pred_pixels"] > 0)]
    false = false.sort_values(["pred_pixels", "id"], ascending=[False, True], kind="stable")
    return {"sample": sample[:grid], "best": best, "worst": worst, "false_lesions": list(false["id"][:extremes])}


def load_cases(result: EvaluationResult, ids: Iterable[str]) -> dict[str, Case]:
    """Re-read the images/masks of ``ids`` from the split and pair them with the stored predictions."""
    ids = set(ids)
    table = result.per_image.set_index("id")
    cases = {}
    for s in read_split(result.data_uri, result.split, ids=ids):
        row = table.loc[s.id]
        pred = decode_png(row["pred_png"], sample=s.id, column="pred_png", where="stored prediction") > 0
        cases[s.id] = Case(s.id, s.cls, s.image, s.mask, pred, float(row["dice"]))
    missing = ids - cases.keys()
    if missing:
        raise ValueError(f"ids {sorted(missing)[:5]} vanished from {result.data_uri}/{result.split} "
                         "between scoring and reporting")
    return cases


# --------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------

def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(result: EvaluationResult, out: str, *, grid: int = 12, extremes: int = 4,
                  seed: int = 0, report: bool = True) -> dict[str, str]:
    """Write ``metrics.json``, ``per_image.csv``, ``per_image.parquet`` and (``report``) the HTML
    report with its PNG figures into ``out`` (local directory or ``s3://`` prefix).

    Returns the written paths/URIs by name (``metrics``, ``per_image_csv``, ``per_image_parquet``,
    ``report``).
    """
    local = not storage.is_s3(out)
    with tempfile.TemporaryDirectory(prefix="unet-eval-") as tmp:
        root = Path(storage.get_filesystem(out)[1]) if local else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        files = {
            "metrics": "metrics.json", "per_image_csv": "per_image.csv",
            "per_image_parquet": "per_image.parquet",
        }
        (root / files["metrics"]).write_text(json.dumps(_json_safe(result.metrics), indent=2, allow_nan=False) + "\n")
        result.per_image.drop(columns=["pred_png"]).to_csv(root / files["per_image_csv"], index=False)
        pq.write_table(pa.Table.from_pandas(result.per_image, preserve_index=False), root / files["per_image_parquet"])
        if report:
            from unet.report import write_report  # matplotlib only when a report is asked for

            chosen = select_cases(result.per_image, grid=grid, extremes=extremes, seed=seed)
            cases = load_cases(result, {i for ids in chosen.values() for i in ids})
            report_path = write_report(root, result, cases, chosen)
            files["report"] = str(report_path.relative_to(root))
        if local:
            return {k: str(root / v) for k, v in files.items()}
        written = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            storage.write_bytes(storage.join(out, rel), path.read_bytes())
        for k, v in files.items():
            written[k] = storage.join(out, v)
        return written

