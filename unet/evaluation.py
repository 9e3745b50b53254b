"""Evaluate a model artifact on a prepared split: per-image metrics, bootstrap CIs, class summaries.

What is measured, and how (the choices a reader needs to trust a number):

* Each image is predicted at the model's own input size (``config["input_size"]``, normalised as
  its config says, :func:`unet.transforms.preprocess`); the probability map is resized back to the
  image's ORIGINAL size (:func:`unet.transforms.resize_probability`) and thresholded there
  (``prob >= threshold``), and scored against the original-size mask. So the numbers are what a
  user of ``jobs.infer`` gets, not a score on down-sampled masks.
* Per image: confusion counts, Dice, IoU, precision, recall (:func:`unet.metrics.scores_from_counts`,
  with its empty-mask rule: a normal image with an empty prediction scores 1.0, with any predicted
  pixel 0.0) and HD95 in pixels of the original image (NaN when exactly one mask is empty; such
  images are counted, never dropped).
* Summaries overall and per class (benign / malignant / normal): the mean over images ("macro",
  what BUSI papers report) of each metric, and the Dice/IoU of the summed counts ("micro"), each
  with a 95 % percentile-bootstrap confidence interval: images are resampled with replacement
  (numpy, seeded, ``n_bootstrap`` times) within the group being summarised.
* The false-lesion rate: the share of normal images with any predicted pixel. The missed-lesion
  rate: the share of benign/malignant images with no predicted pixel.

Example::

    from unet.artifact import load_artifact
    from unet.evaluation import evaluate, write_outputs
    result = evaluate(load_artifact("runs/phantom-unet/model"), "runs/prepared", split="test")
    paths = write_outputs(result, "runs/eval")        # metrics.json, per_image.{csv,parquet}, report.html
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unet import metrics as M
from unet import storage
from unet.transforms import DEFAULT_MEAN, DEFAULT_STD, preprocess, resize_probability

__all__ = [
    "CLASSES",
    "Case",
    "EvaluationResult",
    "bootstrap_ci",
    "evaluate",
    "load_cases",
    "model_settings",
    "predict_probabilities",
    "read_split",
    "score_image",
    "summarize",
    "write_outputs",
]

CLASSES = ("benign", "malignant", "normal")
SCORES = ("dice", "iou", "precision", "recall", "hd95")
# Columns of the per-image table, in order (pred_png only in the Parquet copy).
PER_IMAGE_COLUMNS = (
    "id", "class", "height", "width", "gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn",
    "dice", "iou", "precision", "recall", "hd95", "mean_prob_in_pred", "shard",
)  # fmt: skip
_SHARD_COLUMNS = ["id", "class", "image_png", "mask_png", "height", "width"]
# Fixed stream ids per group so that one group's CI does not change when another group is added.
_GROUP_STREAM = {"overall": 0, "benign": 1, "malignant": 2, "normal": 3, "false_lesion": 4, "missed_lesion": 5}


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


def _decode_png(data: bytes | None, what: str, where: str) -> np.ndarray:
    if data is None:
        raise ValueError(f"{where}: {what} is null; re-run jobs.prepare")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{where}: {what} is not a decodable PNG ({len(data)} bytes)")
    if img.ndim == 3:  # tolerate colour PNGs; the contract says 8-bit grey
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype != np.uint8:
        raise ValueError(f"{where}: {what} has dtype {img.dtype}; prepared shards hold 8-bit PNGs")
    return img


def _split_shards(data_uri: str, split: str) -> list[str]:
    split_uri = storage.join(data_uri, split)
    try:
        shards = list(storage.iter_files(split_uri, suffixes=(".parquet",)))
    except storage.StorageNotFoundError as e:
        raise storage.StorageNotFoundError(
            f"no split '{split}' in prepared data {data_uri}: {e}. Expected "
            f"{split_uri}/part-*.parquet as written by `python -m jobs.prepare`") from e
    if not shards:
        raise storage.StorageNotFoundError(
            f"no Parquet shards in {split_uri}; expected part-*.parquet as written by "
            f"`python -m jobs.prepare`")
    return shards


def read_split(data_uri: str, split: str, *, ids: Iterable[str] | None = None,
               batch_rows: int = 32) -> Iterator[Sample]:
    """Yield the decoded rows of ``data_uri/split/*.parquet`` in shard order, streaming.

    ``ids`` restricts the rows to those ids (used to fetch report cases). Rows are validated:
    known class, decodable 8-bit PNGs, mask the same size as the image and as ``height/width``;
    a bad row raises ``ValueError`` naming the shard and the row id.
    """
    wanted = None if ids is None else set(ids)
    for shard in _split_shards(data_uri, split):
        fs, path = storage.get_filesystem(shard)
        with storage.errors(shard, "read shard"), fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in _SHARD_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{shard}: missing column(s) {missing}; is this a jobs.prepare shard "
                                 f"(columns {_SHARD_COLUMNS} ...)?")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=_SHARD_COLUMNS):
                for row in batch.to_pylist():
                    if wanted is not None and row["id"] not in wanted:
                        continue
                    yield _decode_row(row, shard)


def _decode_row(row: dict, shard: str) -> Sample:
    where = f"{shard} row id={row['id']!r}"
    cls = row["class"]
    if cls not in CLASSES:
        raise ValueError(f"{where}: class {cls!r} is not one of {CLASSES}")
    image = _decode_png(row["image_png"], "image_png", where)
    mask = _decode_png(row["mask_png"], "mask_png", where) > 0
    size = (int(row["height"]), int(row["width"]))
    if image.shape != size or mask.shape != size:
        raise ValueError(f"{where}: image {image.shape} / mask {mask.shape} do not match "
                         f"height,width = {size}")
    return Sample(str(row["id"]), cls, image, mask, shard)


def manifest_sha256(data_uri: str) -> str | None:
    """sha256 of ``data_uri/manifest.json`` (ties the numbers to the exact prepared data), or None."""
    uri = storage.join(data_uri, "manifest.json")
    if not storage.exists(uri):
        return None
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


# --------------------------------------------------------------------------------------------
# Prediction and per-image scores
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    """What evaluation needs from an artifact's config.json."""

    architecture: str
    input_size: tuple[int, int]
    mean: float
    std: float
    threshold: float


def model_settings(config: dict, threshold: float | None = None) -> ModelSettings:
    """Read input size, normalisation and threshold from an artifact config (clear error if absent)."""
    try:
        h, w = (int(v) for v in config["input_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model config has no valid input_size [h, w] (got "
                         f"{config.get('input_size')!r}); is it a unet.artifact model?") from e
    norm = config.get("normalization") or {}
    thr = float(config.get("threshold", 0.5) if threshold is None else threshold)
    if not 0.0 < thr < 1.0:
        raise ValueError(f"threshold must be in (0, 1); got {thr}")
    return ModelSettings(str(config.get("architecture", "?")), (h, w),
                         float(norm.get("mean", DEFAULT_MEAN)), float(norm.get("std", DEFAULT_STD)), thr)


def predict_probabilities(model: torch.nn.Module, images: Sequence[np.ndarray], settings: ModelSettings,
                          device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Foreground probability for each (H, W) uint8 image, at that image's original size (float32)."""
    if not images:
        return []
    x = np.stack([preprocess(img, settings.input_size, settings.mean, settings.std) for img in images])
    with torch.inference_mode():
        logits = model(torch.from_numpy(x).to(device))
        if isinstance(logits, (list, tuple)):  # deep supervision in train mode: last = full res
            logits = logits[-1]
        prob = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return [resize_probability(p, img.shape[:2]) for p, img in zip(prob, images, strict=True)]


def score_image(prob: np.ndarray, target: np.ndarray, threshold: float) -> tuple[dict[str, Any], np.ndarray]:
    """Scores of one prediction at original size; returns ``(record, predicted_mask_bool)``."""
    pred = prob >= threshold
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
    return record, pred


def _encode_mask(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"could not encode a {mask.shape} mask as PNG")
    return buf.tobytes()


# --------------------------------------------------------------------------------------------
# Bootstrap and summaries
# --------------------------------------------------------------------------------------------

def bootstrap_ci(values: np.ndarray, *, n_bootstrap: int, seed: int | Sequence[int], ci: float = 0.95,
                 statistic: str = "mean", pooled: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over images (resampled with replacement).

    ``statistic="mean"``: NaN-ignoring mean of ``values`` (one per image). ``statistic="dice"`` or
    ``"iou"``: the micro score of summed counts, with ``pooled`` an ``(n, 3)`` array of per-image
    ``tp, fp, fn``. Resamples whose statistic is undefined (all NaN) are left out of the percentiles.
    Returns ``(nan, nan)`` for no images or ``n_bootstrap == 0``.
    """
    n = len(values) if pooled is None else len(pooled)
    if n == 0 or n_bootstrap <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.empty(n_bootstrap, dtype=np.float64)
    # Chunked so memory stays ~ 4M indices whatever the set size.
    chunk = max(1, min(n_bootstrap, 4_000_000 // n))
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        if statistic == "mean":
            v = values[idx]
            defined = ~np.isnan(v)
            k = defined.sum(axis=1)
            s = np.where(defined, v, 0.0).sum(axis=1)
            stats[start:stop] = np.divide(s, k, out=np.full(len(k), np.nan), where=k > 0)
        elif statistic in ("dice", "iou"):
            tp, fp, fn = (pooled[:, j][idx].sum(axis=1) for j in range(3))
            stats[start:stop] = M.scores_from_counts(tp, fp, fn)[statistic]
        else:
            raise ValueError(f"statistic must be 'mean', 'dice' or 'iou'; got {statistic!r}")
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _stat(mean: float, ci: tuple[float, float], **extra: Any) -> dict[str, Any]:
    return {"mean": mean, "ci_low": ci[0], "ci_high": ci[1], **extra}


def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _group_summary(df: pd.DataFrame, *, n_bootstrap: int, seed: int, stream: int, ci: float) -> dict:
    """Means with CIs for one group of images; every metric uses the same resamples (same seed)."""
    key = [seed, stream]
    out: dict[str, Any] = {"images": int(len(df))}
    for name in SCORES:
        v = df[name].to_numpy(dtype=np.float64)
        extra = {}
        if name == "hd95":
            defined = int((~np.isnan(v)).sum())
            extra = {"images_defined": defined, "images_undefined": int(len(v) - defined)}
        out[name] = _stat(_nanmean(v), bootstrap_ci(v, n_bootstrap=n_bootstrap, seed=key, ci=ci), **extra)
    pooled = df[["tp", "fp", "fn"]].to_numpy(dtype=np.float64)
    micro = M.scores_from_counts(*pooled.sum(axis=0)) if len(df) else {"dice": math.nan, "iou": math.nan}
    for name in ("dice", "iou"):
        ci_ = bootstrap_ci(np.empty(0), n_bootstrap=n_bootstrap, seed=key, ci=ci, statistic=name, pooled=pooled)
        out[f"{name}_micro"] = _stat(float(micro[name]), ci_)
    out["tp"], out["fp"], out["fn"], out["tn"] = (int(df[c].sum()) for c in ("tp", "fp", "fn", "tn"))
    return out


def _rate(flags: np.ndarray, *, n_bootstrap: int, seed: int, stream: int, ci: float) -> dict:
    v = flags.astype(np.float64)
    mean = float(v.mean()) if v.size else math.nan
    return _stat(mean, bootstrap_ci(v, n_bootstrap=n_bootstrap, seed=[seed, stream], ci=ci),
                 images=int(v.size), count=int(v.sum()))


def summarize(per_image: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Summaries overall, per class (classes present only), and the lesion detection rates.

    Keys: ``overall`` and ``per_class[cls]`` each hold ``images``, ``{dice,iou,precision,recall,
    hd95}`` and ``{dice,iou}_micro`` as ``{"mean", "ci_low", "ci_high"}`` (hd95 also counts the
    images where it is defined/undefined) plus summed ``tp, fp, fn, tn``;
    ``false_lesion_rate`` (normal images with any predicted pixel) and ``missed_lesion_rate``
    (benign/malignant images with none), each ``{"mean", "ci_low", "ci_high", "images", "count"}``.
    """
    if len(per_image) == 0:
        raise ValueError("no images to summarise: the split is empty")
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, ci=ci)
    per_class = {
        cls: _group_summary(per_image[per_image["class"] == cls], stream=_GROUP_STREAM[cls], **kw)
        for cls in CLASSES if (per_image["class"] == cls).any()
    }
    normal = per_image[per_image["class"] == "normal"]
    lesion = per_image[per_image["class"] != "normal"]
    return {
        "overall": _group_summary(per_image, stream=_GROUP_STREAM["overall"], **kw),
        "per_class": per_class,
        "false_lesion_rate": _rate((normal["pred_pixels"] > 0).to_numpy(), stream=_GROUP_STREAM["false_lesion"], **kw),
        "missed_lesion_rate": _rate((lesion["pred_pixels"] == 0).to_numpy(), stream=_GROUP_STREAM["missed_lesion"], **kw),
    }


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
             device: torch.device | str = "cpu", model_ref: str | None = None,
             command: str | None = None, log: Any = None) -> EvaluationResult:
    """Score ``loaded`` (a :class:`unet.artifact.LoadedModel`) on every image of ``data_uri/split``.

    Args:
        loaded: the artifact (``.model`` in eval mode, ``.config``, ``.model_id``).
        data_uri: prepared data (local path or ``s3://``), as written by ``jobs.prepare``.
        split: ``train``, ``val`` or ``test``.
        batch_size: images per forward pass (memory, not results, depends on it).
        n_bootstrap: bootstrap resamples for the CIs (0 = no CIs).
        seed: bootstrap seed; the same seed gives the same CIs.
        threshold: overrides the artifact's threshold.
        model_ref: how the user named the model (recorded in metrics.json).
        command: the command line that ran this evaluation (recorded in metrics.json).
        log: optional callable taking a progress line.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if n_bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0; got {n_bootstrap}")
    settings = model_settings(loaded.config, threshold)
    model = loaded.model.to(device).eval()
    records: list[dict] = []
    batch: list[Sample] = []

    def flush() -> None:
        probs = predict_probabilities(model, [s.image for s in batch], settings, device)
        for s, prob in zip(batch, probs, strict=True):
            record, pred = score_image(prob, s.mask, settings.threshold)
            records.append({"id": s.id, "class": s.cls, **record, "shard": s.shard,
                            "pred_png": _encode_mask(pred)})
        batch.clear()
        if log is not None:
            log(f"scored {len(records)} images")

    for sample in read_split(data_uri, split):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
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
        "data": {"uri": data_uri, "split": split, "manifest_sha256": manifest_sha256(data_uri)},
        "counts": {"images": int(len(per_image)), **counts_by_class},
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "ci": 0.95,
                      "method": "percentile, images resampled with replacement within each group"},
        "definitions": {
            "prediction": "sigmoid at the model input size, resized (bilinear) to the original image "
                          "size, then prob >= threshold",
            "macro": "mean over images of each image's score",
            "micro": "score of the counts summed over images",
            "empty_rule": "empty truth and empty prediction score 1.0; exactly one empty scores 0.0",
            "hd95": "pixels of the original image; undefined (NaN) when exactly one mask is empty",
            "false_lesion_rate": "share of normal images with any predicted pixel",
            "missed_lesion_rate": "share of benign/malignant images with no predicted pixel",
        },
        **summarize(per_image, n_bootstrap=n_bootstrap, seed=seed),
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
        pred = _decode_png(row["pred_png"], "pred_png", f"prediction for {s.id!r}") > 0
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


def read_per_image(path: str | os.PathLike) -> pd.DataFrame:
    """The per-image Parquet table written by :func:`write_outputs`."""
    return pq.read_table(io.BytesIO(storage.read_bytes(os.fspath(path)))).to_pandas()
