"""Choose a model's post-processing on a validation split, under a cap on false lesions.

The model runs once over the split (twice: without and with flip TTA), keeping every probability
map at its image's original size (about 1 MB per 500×500 image and pass: ~100 images fit in
memory). Then a grid of post-processing settings (:func:`unet.postprocess.final_mask`'s
arguments) is scored without running the model again:

* mask ``threshold`` in :data:`THRESHOLDS`;
* ``gate_threshold``: None, or (for a model with an image head) one value between each pair of
  neighbouring distinct ``p(lesion)`` of the split's images — the midpoint, so each candidate gates
  exactly the images below it here, with a margin on both sides for the float noise of a later run
  (a gate *at* an image's own ``p(lesion)`` would keep or drop that image on a rounding error);
* ``min_area`` in :data:`MIN_AREAS` (fraction of the image) up to half the smallest lesion of the
  data's *train* split (:func:`min_area_limit`): a ~100-image val split holds too few small lesions
  to show what a large minimum area costs (BUSI: 11 % of train lesions are under 1 % of the image,
  6 of 79 on val), and removing components the size of real lesions is never wanted;
* ``largest_component`` and ``tta`` each False/True.

Objective: the mean per-image Dice over all images of the split (a normal image scores 1 when its
mask is empty, 0 otherwise, as in :mod:`unet.metrics`), subject to the false-lesion rate on normal
images being at most the cap. Ties go to the simpler setting: no TTA, no largest component, smaller
min area, lower (or no) gate, threshold nearer 0.5.

Vectorised: per image, TTA pass and threshold the mask is labelled once (connected components,
8-connectivity as in ``final_mask``) and each component's size and overlap with the truth kept;
min area and largest component are then sums over those small tables, and the gate is one matrix
product over images. The chosen row is re-scored with ``final_mask`` itself, image by image, so
what is stored is what evaluation and inference will do. The test split is refused: it is looked
at once per shipped model and never used to choose anything.

For a cross-validation ensemble (``jobs.train --folds K``) the split ``"oof"`` runs each member over
its own held-out fold instead (:func:`predict_out_of_fold`): ~530 BUSI images, ~88 of them normal,
each predicted by a model that never saw it, rather than val's 94 and 15.

Example::

    from unet.artifact import load_artifact
    from unet.calibration import calibrate, write_calibrated
    loaded = load_artifact("runs/busi-unet/model")
    result = calibrate(loaded, "runs/busi_prepared", "val", max_false_lesion_rate=0.10)
    result.chosen                       # {"threshold": .., "gate_threshold": .., ..., "dice": ..}
    write_calibrated(loaded, result, "runs/busi-unet-cal")
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from unet import metrics as M
from unet.artifact import ALIASES, SHARD_MIB, WEIGHTS_DIR, load_artifact, save_artifact
from unet.evaluation import iter_split_batches, predict_probabilities
from unet.postprocess import CONNECTIVITY  # the components final_mask sees; defined once, there
from unet.postprocess import final_mask
from unet.runtime import ProgressLine, UsageError
from unet.shards import FOLD_SOURCES, fold_split, manifest_sha256, parse_split, split_ids

__all__ = ["MIN_AREAS", "OUT_OF_FOLD", "THRESHOLDS", "Calibration", "SplitPredictions", "calibrate", "check_split", "min_area_limit",
           "fold_members", "output_location", "predict_out_of_fold", "predict_split", "score_setting", "search", "write_calibrated"]

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.3, 0.35, ..., 0.7
MIN_AREAS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01)
SETTING_KEYS = ("threshold", "gate_threshold", "min_area", "largest_component", "tta")
METRIC_KEYS = ("dice", "lesion_dice", "false_lesion_rate", "false_lesions", "missed_lesion_rate")


OUT_OF_FOLD = "oof"  # every member of a cross-validation ensemble on its own held-out fold


def check_split(split: str) -> None:
    """Refuse to choose anything on the test split, or on a name that is no split (UsageError)."""
    if split == "test":
        raise UsageError("split 'test' cannot be used for calibration: the test split is looked at once per "
                         "shipped model and never used to choose settings; calibrate on 'val'")
    if split != OUT_OF_FOLD:
        try:
            parse_split(split)
        except ValueError as e:
            raise UsageError(f"{e}; or '{OUT_OF_FOLD}' for a cross-validation ensemble") from e


@dataclass
class SplitPredictions:
    """Everything calibration needs from the model, computed once: per image its id, class, true
    mask and, per TTA setting (False/True), the probability map at original size and ``p(lesion)``
    (an array over images, or None for a model without an image head)."""

    ids: list[str]
    classes: list[str]
    truths: list[np.ndarray]
    probs: dict[bool, list[np.ndarray]]
    lesion: dict[bool, np.ndarray | None]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.classes) == len(self.truths) == n) or any(len(v) != n for v in self.probs.values()):
            raise ValueError("ids, classes, truths and each pass's probabilities must have one entry per image")
        normal = sum(c == "normal" for c in self.classes)
        if normal == 0 or normal == n:
            raise UsageError(f"calibration needs normal and lesion images in the split; it has {normal} normal "
                             f"of {n} images")

    def subset(self, ids: set[str]) -> SplitPredictions:
        """The predictions of the images in ``ids`` only (e.g. the val images of out-of-fold predictions)."""
        keep = [i for i, image in enumerate(self.ids) if image in ids]
        return SplitPredictions([self.ids[i] for i in keep], [self.classes[i] for i in keep],
                                [self.truths[i] for i in keep],
                                {t: [p[i] for i in keep] for t, p in self.probs.items()},
                                {t: None if v is None else v[keep] for t, v in self.lesion.items()})


def predict_split(loaded: Any, data_uri: str, split: str = "val", *, batch_size: int = 8,
                  device: torch.device | str = "cpu", log: Any = None) -> SplitPredictions:
    """Run ``loaded`` over ``data_uri/split`` without and with TTA (:func:`predict_probabilities`)."""
    check_split(split)
    model = loaded.model.to(device).eval()
    passes = {tta: loaded.settings.with_postprocess(tta=tta) for tta in (False, True)}
    ids, classes, truths = [], [], []
    probs: dict[bool, list] = {False: [], True: []}
    lesion: dict[bool, list | None] = {False: [], True: []}
    progress = ProgressLine(log) if log is not None else None
    for batch in iter_split_batches(data_uri, split, batch_size):
        for tta, settings in passes.items():
            out = predict_probabilities(model, [s.image for s in batch], settings, device)
            probs[tta] += out.masks
            lesion[tta] = None if out.lesion is None else [*lesion[tta], *out.lesion.tolist()]
        ids.extend(s.id for s in batch)
        classes.extend(s.cls for s in batch)
        truths.extend(s.mask for s in batch)
        if progress is not None:
            progress.update(f"predicted {len(ids)} images (with and without TTA)")
    if progress is not None:
        progress.done(f"predicted {len(ids)} images (with and without TTA)")
    if not ids:
        raise ValueError(f"split '{split}' of {data_uri} has shards but no rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"split '{split}' of {data_uri} repeats image ids; re-run jobs.prepare")
    return SplitPredictions(ids, classes, truths, probs,
                            {t: None if v is None else np.asarray(v, np.float64) for t, v in lesion.items()})


def fold_members(loaded: Any, data_uri: str) -> list[tuple[Any, str]]:
    """Each member of a cross-validation ensemble (:func:`unet.training.fit_folds`) as a model of its
    own, with the split it never trained on: ``[(LoadedModel, "val@fold<k>of<K>"), ...]``.

    Raises :class:`UsageError` unless ``loaded`` is an ensemble whose members are the K folds of one
    cross-validation, each once, trained on the prepared data at ``data_uri`` (same manifest).
    """
    from unet.artifact import LoadedModel

    members = loaded.config.get("provenance", {}).get("members") or []
    if loaded.settings.architecture != "ensemble" or not members:
        raise UsageError(f"split '{OUT_OF_FOLD}' needs a cross-validation ensemble (jobs.train --folds K); "
                         f"{loaded.model_id} is not an ensemble")
    configs = [m.get("provenance", {}).get("config", {}) for m in members]
    folds = sorted((c.get("fold"), c.get("folds")) for c in configs)
    k = len(members)
    if folds != [(i, k) for i in range(k)]:
        raise UsageError(f"split '{OUT_OF_FOLD}' needs one member per fold of one K-fold cross-validation; "
                         f"{loaded.model_id}'s members are (fold, folds) {folds}")
    want = manifest_sha256(data_uri)
    for m in members:
        have = m.get("provenance", {}).get("data_manifest_sha256")
        if have != want:
            raise UsageError(f"member {m.get('model_id')} was trained on other prepared data ({m['provenance'].get('data')}, "
                             f"manifest sha256 {have}) than {data_uri} ({want}): its folds would not be its held-out images")
    out = []
    for module, spec, member, config in zip(loaded.model.members, loaded.model.member_specs, members, configs,
                                            strict=True):
        settings = dataclasses.replace(loaded.settings, architecture=spec["architecture"],
                                       input_size=tuple(spec["input_size"]), **spec["normalization"])
        out.append((LoadedModel(module, {**spec, "provenance": member["provenance"]}, member["model_id"], settings),
                    fold_split("val", config["fold"], config["folds"])))
    return out


def predict_out_of_fold(loaded: Any, data_uri: str, *, batch_size: int = 8, device: torch.device | str = "cpu",
                        log: Any = None) -> SplitPredictions:
    """Out-of-fold predictions of a cross-validation ensemble: each member (:func:`fold_members`) over
    its own held-out fold, so every image of train+val is predicted once, by the model that never saw it."""
    parts = [predict_split(member, data_uri, split, batch_size=batch_size, device=device, log=log)
             for member, split in fold_members(loaded, data_uri)]
    lesion = {tta: None if any(p.lesion[tta] is None for p in parts) else np.concatenate([p.lesion[tta] for p in parts])
              for tta in (False, True)}
    return SplitPredictions([i for p in parts for i in p.ids], [c for p in parts for c in p.classes],
                            [t for p in parts for t in p.truths],
                            {tta: [m for p in parts for m in p.probs[tta]] for tta in (False, True)}, lesion)


# --------------------------------------------------------------------------------------------
# Scoring: one setting exactly (final_mask), the whole grid vectorised
# --------------------------------------------------------------------------------------------

def _summary(dice: np.ndarray, pred_pixels: np.ndarray, normal: np.ndarray) -> dict[str, float]:
    """The objective and the failure modes from per-image Dice and predicted pixels (last axis:
    images); works on one setting (1-D) or many (2-D) alike."""
    flagged = (pred_pixels > 0)[..., normal]
    return {"dice": dice.mean(-1), "lesion_dice": dice[..., ~normal].mean(-1),
            "false_lesion_rate": flagged.mean(-1), "false_lesions": flagged.sum(-1),
            "missed_lesion_rate": (pred_pixels == 0)[..., ~normal].mean(-1)}


def score_setting(preds: SplitPredictions, setting: dict) -> dict:
    """``setting`` (the :data:`SETTING_KEYS`) and its scores on the split, every mask made by
    :func:`unet.postprocess.final_mask` (the definition evaluation and inference use)."""
    tta = bool(setting["tta"])
    lesion = preds.lesion[tta]
    tp, pred_pixels, gt = np.zeros((3, len(preds.ids)), np.int64)
    for i, (prob, truth) in enumerate(zip(preds.probs[tta], preds.truths, strict=True)):
        mask = final_mask(prob, threshold=setting["threshold"], gate_threshold=setting["gate_threshold"],
                          lesion_probability=None if lesion is None else float(lesion[i]),
                          min_area=setting["min_area"], largest_component=setting["largest_component"])
        tp[i], pred_pixels[i], gt[i] = (mask & truth).sum(), mask.sum(), truth.sum()
    dice = M.scores_from_counts(tp, pred_pixels - tp, gt - tp)["dice"]
    normal = np.array([c == "normal" for c in preds.classes])
    scores = {k: float(v) for k, v in _summary(dice, pred_pixels, normal).items()}
    return {**{k: setting[k] for k in SETTING_KEYS}, **scores, "false_lesions": int(scores["false_lesions"])}


def _component_tables(prob: np.ndarray, truth: np.ndarray, thresholds, min_areas) -> tuple[np.ndarray, np.ndarray]:
    """Predicted pixels and true positives of one image, shape ``(thresholds, min_areas, 2)``; the
    last axis is largest_component False/True. Same rules as ``final_mask``: components of at
    least ``min_area × H × W`` pixels are kept; with largest_component only the largest (the first
    in label order on ties), if it is kept."""
    pred = np.zeros((len(thresholds), len(min_areas), 2), np.int64)
    tp = np.zeros_like(pred)
    limits = np.asarray(min_areas, np.float64) * prob.size
    for k, threshold in enumerate(thresholds):
        mask = prob >= threshold
        labels, count = ndimage.label(mask, structure=CONNECTIVITY)
        if not count:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        hits = np.bincount(labels[truth], minlength=count + 1)[1:]
        keep = sizes[None, :] >= limits[:, None]  # (min_areas, components)
        pred[k, :, 0], tp[k, :, 0] = keep @ sizes, keep @ hits
        j = int(sizes.argmax())
        big = sizes[j] >= limits
        pred[k, :, 1], tp[k, :, 1] = np.where(big, sizes[j], 0), np.where(big, hits[j], 0)
    return pred, tp


def _gates(lesion: np.ndarray | None) -> list[float | None]:
    """None, then one gate between each pair of neighbouring distinct p(lesion) values, ascending."""
    if lesion is None:
        return [None]
    values = np.unique(lesion[~np.isnan(lesion)])
    return [None, *(float(v) for v in (values[:-1] + values[1:]) / 2)]


def search(preds: SplitPredictions, *, max_false_lesion_rate: float = 0.10, thresholds=THRESHOLDS,
           min_areas=MIN_AREAS) -> pd.DataFrame:
    """Every candidate setting with its scores on the split, best first.

    Columns: :data:`SETTING_KEYS` (``gate_threshold`` NaN = no gate), :data:`METRIC_KEYS` and
    ``feasible`` (false-lesion rate ≤ ``max_false_lesion_rate``). Order: feasible first, then by
    mean per-image Dice (descending, compared to 1e-9), then the simpler setting (see the module
    docstring). The first row is the choice when it is feasible.
    """
    if not 0.0 <= max_false_lesion_rate <= 1.0:
        raise ValueError(f"max_false_lesion_rate must be in [0, 1], e.g. 0.10; got {max_false_lesion_rate!r}")
    normal = np.array([c == "normal" for c in preds.classes])
    gt = np.array([t.sum() for t in preds.truths], np.int64)
    # Gated images have an empty mask: Dice 1 on an empty truth, 0 otherwise.
    gated_dice = M.scores_from_counts(np.zeros_like(gt), np.zeros_like(gt), gt)["dice"]
    frames = []
    for tta in (False, True):
        tables = [_component_tables(p, t, thresholds, min_areas) for p, t in zip(preds.probs[tta], preds.truths,
                                                                                   strict=True)]
        pred = np.stack([p for p, _ in tables], axis=-1).reshape(-1, len(gt))  # (settings, images)
        tp = np.stack([t for _, t in tables], axis=-1).reshape(-1, len(gt))
        dice = M.scores_from_counts(tp, pred - tp, gt - tp)["dice"]
        gates = _gates(preds.lesion[tta])
        lesion = preds.lesion[tta]
        gated = np.array([np.zeros(len(gt), bool) if g is None else lesion < g for g in gates])  # (gates, images)
        open_ = (~gated).astype(np.float64)
        # Each (setting, gate): per-image Dice is the setting's where the image is kept, gated_dice where not.
        dice_sum = lambda sel: dice[:, sel] @ open_[:, sel].T + (gated[:, sel] @ gated_dice[sel])[None, :]  # noqa: E731
        kept_pixels = lambda sel: (pred[:, sel] > 0).astype(np.float64) @ open_[:, sel].T  # noqa: E731
        n_normal, n_lesion = int(normal.sum()), int((~normal).sum())
        false_lesions = kept_pixels(normal)
        scores = {
            "dice": dice_sum(slice(None)) / len(gt),
            "lesion_dice": dice_sum(~normal) / n_lesion,
            "false_lesion_rate": false_lesions / n_normal,
            "false_lesions": false_lesions.round().astype(np.int64),
            "missed_lesion_rate": (n_lesion - kept_pixels(~normal)) / n_lesion,
        }
        grid = pd.MultiIndex.from_product([thresholds, min_areas, (False, True), range(len(gates))],
                                          names=["threshold", "min_area", "largest_component", "gate"])
        frame = grid.to_frame(index=False)
        frame["gate_threshold"] = [np.nan if gates[g] is None else gates[g] for g in frame.pop("gate")]
        frame["tta"] = tta
        for key, value in scores.items():
            frame[key] = value.reshape(-1)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["feasible"] = table["false_lesion_rate"] <= max_false_lesion_rate + 1e-12
    order = pd.DataFrame({
        "infeasible": ~table["feasible"], "dice": -table["dice"].round(9), "tta": table["tta"],
        "largest": table["largest_component"], "min_area": table["min_area"],
        "gate": table["gate_threshold"].fillna(-1.0), "off_half": (table["threshold"] - 0.5).abs().round(9),
        "threshold": table["threshold"],
    })
    ranked = order.sort_values(list(order.columns), kind="stable").index
    return table.loc[ranked, [*SETTING_KEYS, *METRIC_KEYS, "feasible"]].reset_index(drop=True)


def _row_setting(row: pd.Series) -> dict:
    gate = row["gate_threshold"]
    return {"threshold": float(row["threshold"]), "gate_threshold": None if math.isnan(gate) else float(gate),
            "min_area": float(row["min_area"]), "largest_component": bool(row["largest_component"]),
            "tta": bool(row["tta"])}


# --------------------------------------------------------------------------------------------
# The calibration step
# --------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """The result: ``table`` (every candidate, best first; :func:`search`), ``chosen`` and
    ``baseline`` (the artifact's own post-processing; both setting + scores, from
    :func:`score_setting`), and what it was computed on."""

    table: pd.DataFrame
    chosen: dict
    baseline: dict
    data_uri: str
    split: str
    max_false_lesion_rate: float
    images: dict = field(default_factory=dict)
    manifest_sha256: str | None = None
    by_split: dict = field(default_factory=dict)  # oof: the chosen setting scored on each prepared split's images

    def provenance(self, *, model_id: str, command: str | None = None) -> dict:
        """What ``config["provenance"]["calibration"]`` records."""
        gates = self.table["gate_threshold"].dropna().nunique()
        return {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "model_id": model_id,
            "data": {"uri": self.data_uri, "split": self.split, "manifest_sha256": self.manifest_sha256},
            "images": self.images,
            "max_false_lesion_rate": self.max_false_lesion_rate,
            "objective": "mean per-image Dice over all images of the split, subject to false_lesion_rate <= "
                         "max_false_lesion_rate; ties to no TTA, no largest component, smaller min_area, lower gate",
            "chosen": self.chosen, "baseline": self.baseline,
            **({"chosen_by_split": self.by_split} if self.by_split else {}),
            "grid": {"size": int(len(self.table)), "feasible": int(self.table["feasible"].sum()),
                     "thresholds": sorted(self.table["threshold"].unique().tolist()),
                     "min_areas": sorted(self.table["min_area"].unique().tolist()),
                     "largest_component": [False, True], "tta": [False, True],
                     "gate_thresholds": f"none + {gates} midpoints between the split's distinct p(lesion) "
                                        "(over both TTA passes)" if gates else "none (no image head)"},
        }


def min_area_limit(data_uri: str) -> float:
    """Half the area fraction of the smallest lesion in ``data_uri``'s train split (the largest
    ``min_area`` the search may try); the whole grid when the data has no train split."""
    from unet.evaluation import read_split

    try:
        smallest = min((float((s.mask > 0).mean()) for s in read_split(data_uri, "train") if s.mask.any()),
                       default=None)
    except FileNotFoundError:  # prepared data without a train split
        return max(MIN_AREAS)
    return max(MIN_AREAS) if smallest is None else smallest / 2


def calibrate(loaded: Any, data_uri: str, split: str = "val", *, max_false_lesion_rate: float = 0.10,
              batch_size: int = 8, device: torch.device | str = "cpu", log: Any = None,
              predictions: SplitPredictions | None = None) -> Calibration:
    """Choose ``loaded``'s post-processing on ``data_uri/split`` (see the module docstring).

    ``split`` is a split name (:func:`unet.shards.parse_split`; not test), or ``"oof"`` for a
    cross-validation ensemble: the out-of-fold predictions of its members (:func:`predict_out_of_fold`),
    i.e. all of train+val, each image scored by the fold model that never saw it (nnU-Net chooses
    its post-processing this way); the ensemble then applies the chosen setting to the members'
    averaged probabilities. ``predictions`` reuses a :func:`predict_split` result. Raises :class:`UsageError` for the test
    split, a split without normal or lesion images, or when no candidate meets the cap (the message
    gives the lowest false-lesion rate the grid reaches).
    """
    check_split(split)
    if not 0.0 <= max_false_lesion_rate <= 1.0:
        raise ValueError(f"max_false_lesion_rate must be in [0, 1], e.g. 0.10; got {max_false_lesion_rate!r}")
    if predictions is not None:
        preds = predictions
    elif split == OUT_OF_FOLD:
        preds = predict_out_of_fold(loaded, data_uri, batch_size=batch_size, device=device, log=log)
    else:
        preds = predict_split(loaded, data_uri, split, batch_size=batch_size, device=device, log=log)
    limit = min_area_limit(data_uri)
    min_areas = tuple(a for a in MIN_AREAS if a <= limit)
    if log is not None:
        log(f"min_area up to {limit:.4f} of the image (half the smallest train lesion): {min_areas}")
    table = search(preds, max_false_lesion_rate=max_false_lesion_rate, min_areas=min_areas)
    if not table["feasible"].iloc[0]:
        lowest = table.sort_values(["false_lesion_rate", "dice"], ascending=[True, False], kind="stable").iloc[0]
        raise UsageError(f"no post-processing in the grid keeps the false-lesion rate on '{split}' at or below "
                         f"{max_false_lesion_rate}; the lowest reached is {lowest['false_lesion_rate']:.3f} "
                         f"({_row_setting(lowest)}); raise the cap or improve the model")
    chosen = score_setting(preds, _row_setting(table.iloc[0]))
    for key in METRIC_KEYS:  # the vectorised search must agree with final_mask image by image
        if not math.isclose(chosen[key], float(table.iloc[0][key]), abs_tol=1e-9):
            raise RuntimeError(f"calibration search and final_mask disagree on {key}: "
                               f"{table.iloc[0][key]} vs {chosen[key]} for {_row_setting(table.iloc[0])}")
    s = loaded.settings
    baseline = score_setting(preds, {"threshold": s.threshold, **s.postprocess})
    counts = pd.Series(preds.classes).value_counts()
    images = {"images": len(preds.ids), **{c: int(counts.get(c, 0)) for c in ("benign", "malignant", "normal")}}
    if log is not None:
        log(f"searched {len(table)} settings, {int(table['feasible'].sum())} within the cap")
    # Out of fold, the val images' scores compare with a model trained on train alone and chosen on val.
    by_split = ({part: score_setting(preds.subset(set(split_ids(data_uri, part))), _row_setting(table.iloc[0]))
                 for part in FOLD_SOURCES} if split == OUT_OF_FOLD else {})
    return Calibration(table=table, chosen=chosen, baseline=baseline, data_uri=data_uri, split=split,
                       max_false_lesion_rate=max_false_lesion_rate, images=images,
                       manifest_sha256=manifest_sha256(data_uri), by_split=by_split)


# --------------------------------------------------------------------------------------------
# Writing the calibrated artifact
# --------------------------------------------------------------------------------------------

def _shipped(model_ref: str) -> Path | None:
    """The directory under ``unet/weights`` that ``model_ref`` loads from, or None."""
    if "://" in model_ref:
        return None
    path = Path(model_ref).expanduser()
    if not path.exists():
        path = WEIGHTS_DIR / ALIASES.get(model_ref, model_ref)
    path = path.resolve()
    return path if path.is_relative_to(WEIGHTS_DIR.resolve()) else None


def output_location(model_ref: str, out: str | None) -> str:
    """Where the calibrated artifact goes: ``out``, or in place for a directory/URI. Shipped models
    (``unet/weights``, by name or path) are never rewritten in place (UsageError)."""
    shipped = _shipped(model_ref)
    if out is None:
        if shipped is not None:
            raise UsageError(f"model {model_ref!r} is shipped in {shipped}: it is never changed in place; give an "
                             "output directory or URI for the calibrated copy (--out)")
        return model_ref
    if shipped is not None and "://" not in out and Path(out).expanduser().resolve() == shipped:
        raise UsageError(f"--out {out} is the shipped model {model_ref!r} itself; write the calibrated copy elsewhere")
    return out


def write_calibrated(loaded: Any, calibration: Calibration, dest: str, *, command: str | None = None) -> str:
    """Write ``loaded`` to ``dest`` with ``calibration.chosen`` as its post-processing and
    ``provenance["calibration"]``; the weights (so the ``model_id``) are unchanged, which is checked
    on a scratch copy before ``dest`` is touched. Returns ``dest``."""
    config = loaded.config
    chosen = calibration.chosen
    kwargs = dict(
        architecture=config["architecture"], model_kwargs=config["model_kwargs"], input_size=config["input_size"],
        normalization=config["normalization"], threshold=chosen["threshold"],
        postprocess={k: chosen[k] for k in SETTING_KEYS if k != "threshold"},
        provenance={**config.get("provenance", {}),
                    "calibration": calibration.provenance(model_id=loaded.model_id, command=command)},
        name=config.get("name") or config["architecture"],
        weights_dtype=config.get("weights_dtype", "float32"),
        # The same file layout as the artifact's own, so that its model id (which hashes the files) stays.
        shard_mib=SHARD_MIB if config.get("weights_shards") else math.inf,
    )
    with tempfile.TemporaryDirectory(prefix="unet-calibrate-") as tmp:
        scratch = load_artifact(save_artifact(loaded.model, Path(tmp) / "model", **kwargs))
        if scratch.model_id != loaded.model_id:
            raise RuntimeError(f"re-saving {loaded.model_id} changed its weights ({scratch.model_id}); not written")
    return save_artifact(loaded.model, dest, **kwargs)
