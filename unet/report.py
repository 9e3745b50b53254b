"""Evaluation report: matplotlib figures (PNG) and one self-contained ``report.html``.

``report.html`` carries its figures inside (base64 PNG ``data:`` URIs) and references no other
file, so the one file can be copied off a cluster, attached to a message or opened from anywhere.
The PNGs are also written beside it, for tools and listings that want the pictures alone::

    out/report.html                 summary tables (mean and 95 % CI), figures, definitions
    out/figures/overlays.png        class-stratified sample: image | truth | prediction | errors
    out/figures/worst.png           lesion images with the lowest Dice
    out/figures/best.png            lesion images with the highest Dice
    out/figures/false_lesions.png   normal images with predicted pixels (if any)
    out/figures/dice_by_class.png   per-image Dice and HD95 by class
    out/figures/curves.png          training curves, when the model artifact carries a history

Error colours (``errors`` panel): true positive green, false positive red, false negative blue.
The colours are chosen so red/blue stay distinguishable for the common red-green colour-vision
deficiencies; the legend is on every case figure.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display (headless clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from unet.shards import CLASSES  # noqa: E402

__all__ = ["ERROR_COLOURS", "error_overlay", "plot_cases", "plot_metric_distributions",
           "plot_training_curves", "write_report"]

ERROR_COLOURS = {"tp": (0, 190, 0), "fp": (230, 30, 30), "fn": (30, 90, 255)}
_TRUTH_COLOUR = (255, 210, 0)
_PRED_COLOUR = (0, 220, 220)
_DISPLAY_MAX = 256  # panel pixels: large ultrasound frames are shrunk for the figure only
_CLASS_COLOURS = dict(zip(CLASSES, ("tab:green", "tab:red", "tab:blue"), strict=True))
# Figure resolution. Speckled ultrasound panels barely compress, and every PNG is embedded in the
# HTML (base64, +33 %): at 80 dpi an overlay row (4 panels of ~190 px) is about 150 kB, so the
# default report (12 + 4 + 4 + 4 rows) stays under ~5 MB, still attachable, panels still readable.
_DPI = 80


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------

def _tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def error_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB uint8 image: grey ``image`` with TP green, FP red, FN blue blended in (TN untouched)."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    if not image.shape == truth.shape == pred.shape:
        raise ValueError(f"image {image.shape}, truth {truth.shape} and prediction {pred.shape} "
                         "must have the same (H, W)")
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    for key, region in (("tp", truth & pred), ("fp", ~truth & pred), ("fn", truth & ~pred)):
        rgb[region] = (1 - alpha) * rgb[region] + alpha * np.asarray(ERROR_COLOURS[key], np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def _shrink(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = image.shape
    scale = _DISPLAY_MAX / max(h, w)
    if scale >= 1:
        return image, truth, pred
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    near = lambda m: cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0  # noqa: E731
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), near(truth), near(pred)


def plot_cases(cases: Sequence[Any], path: str | Path, title: str) -> Path:
    """One row per case: image | ground truth | prediction | errors, labelled id/class/Dice.

    ``cases`` are :class:`unet.evaluation.Case` (``id, cls, image, gt, pred, dice``).
    """
    if not cases:
        raise ValueError(f"no cases to plot for {title!r}")
    rows = len(cases)
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows + 0.9), squeeze=False)
    for r, case in enumerate(cases):
        image, truth, pred = _shrink(case.image, case.gt, case.pred)
        panels = (
            (image, "image"),
            (_tint(image, truth, _TRUTH_COLOUR, 0.45), "ground truth"),
            (_tint(image, pred, _PRED_COLOUR, 0.45), "prediction"),
            (error_overlay(image, truth, pred), "errors"),
        )
        for c, (picture, label) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
        dice = "n/a" if math.isnan(case.dice) else f"{case.dice:.3f}"
        label = case.id if case.cls in case.id else f"{case.id} ({case.cls})"
        axes[r, 0].set_ylabel(f"{label}\nDice {dice}", fontsize=8)
    legend = [Patch(color=np.asarray(ERROR_COLOURS[k]) / 255, label=label)
              for k, label in (("tp", "true positive"), ("fp", "false positive"), ("fn", "false negative"))]
    fig.legend(handles=legend, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.9 / (2.6 * rows + 0.9), 1, 1 - 0.3 / (2.6 * rows + 0.9)))
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Distributions and curves
# --------------------------------------------------------------------------------------------

def plot_metric_distributions(per_image: Any, path: str | Path) -> Path:
    """Per-image Dice and HD95 by class (box plot with the individual images jittered on top)."""
    classes = [c for c in CLASSES if (per_image["class"] == c).any()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rng = np.random.default_rng(0)  # fixed jitter: identical figures for identical results
    for ax, metric, label in ((axes[0], "dice", "Dice per image"), (axes[1], "hd95", "HD95 per image (px)")):
        data = [per_image.loc[per_image["class"] == c, metric].dropna().to_numpy() for c in classes]
        positions = [i + 1 for i, d in enumerate(data) if len(d)]
        if positions:
            ax.boxplot([d for d in data if len(d)], positions=positions, widths=0.5, showfliers=False)
        for i, (cls, d) in enumerate(zip(classes, data, strict=True)):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6,
                       color=_CLASS_COLOURS[cls])
        ax.set_xticks(range(1, len(classes) + 1), [f"{c}\n(n={int((per_image['class'] == c).sum())})" for c in classes])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(-0.03, 1.03)
    fig.tight_layout()
    return _save(fig, path)


def _history_columns(history: Any) -> tuple[list[float], dict[str, list[float]]]:
    """``(x, {name: values})`` from a list of per-epoch dicts or a dict of per-epoch lists."""
    if isinstance(history, Mapping):
        columns = {k: list(v) for k, v in history.items() if isinstance(v, Sequence) and not isinstance(v, str)}
        n = max((len(v) for v in columns.values()), default=0)
        columns = {k: v for k, v in columns.items() if len(v) == n}
    elif isinstance(history, Sequence) and not isinstance(history, str):
        records = [r for r in history if isinstance(r, Mapping)]
        keys = sorted({k for r in records for k in r})
        columns = {k: [r.get(k) for r in records] for k in keys}
        n = len(records)
    else:
        return [], {}
    numeric = {}
    for k, values in columns.items():
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values):
            numeric[k] = [math.nan if v is None else float(v) for v in values]
    x = numeric.pop("epoch", None) or [float(i + 1) for i in range(n)]
    return x, numeric


def plot_training_curves(history: Any, path: str | Path) -> Path | None:
    """Loss curves and validation scores per epoch; ``None`` if ``history`` holds nothing plottable.

    Accepts the artifact's ``provenance["history"]`` as a list of per-epoch records (``{"epoch": 1,
    "train_loss": ..., "val_dice": ...}``) or a dict of lists. Keys containing ``loss`` go in the
    first panel, keys containing dice/iou/precision/recall in the second, ``lr`` in a third.
    """
    x, columns = _history_columns(history)
    groups = {
        "loss": [k for k in columns if "loss" in k.lower()],
        "score": [k for k in columns if any(s in k.lower() for s in ("dice", "iou", "precision", "recall"))],
        "learning rate": [k for k in columns if k.lower() in ("lr", "learning_rate")],
    }
    groups = {g: ks for g, ks in groups.items() if ks}
    if not x or not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (group, keys) in zip(axes[0], groups.items(), strict=True):
        for k in keys:
            ax.plot(x, columns[k], marker="o", markersize=3, label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if group == "score":
            ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

def _data_uri(path: Path) -> str:
    """The PNG at ``path`` as a ``data:`` URI, so the HTML needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(stat: Mapping[str, Any], digits: int = 3) -> str:
    mean = _fmt(stat.get("mean"), digits)
    if stat.get("ci_low") is None or (isinstance(stat.get("ci_low"), float) and math.isnan(stat["ci_low"])):
        return mean
    return f"{mean} <span class=ci>[{_fmt(stat['ci_low'], digits)}, {_fmt(stat['ci_high'], digits)}]</span>"


def _summary_table(metrics: Mapping[str, Any]) -> str:
    groups = [("all images", metrics["overall"])] + list(metrics["per_class"].items())
    head = ("<tr><th>group</th><th>images</th><th>Dice</th><th>IoU</th><th>precision</th><th>recall</th>"
            "<th>HD95 (px)</th><th>Dice (micro)</th><th>IoU (micro)</th></tr>")
    rows = []
    for name, g in groups:
        hd = g["hd95"]
        hd_note = f" <span class=ci>({hd['images_undefined']} undefined)</span>" if hd.get("images_undefined") else ""
        cells = [html.escape(name), str(g["images"])]
        cells += [_ci(g[k]) for k in ("dice", "iou", "precision", "recall")]
        cells += [_ci(hd, 1) + hd_note, _ci(g["dice_micro"]), _ci(g["iou_micro"])]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _rates_table(metrics: Mapping[str, Any]) -> str:
    """The two failure modes the project reports (Dice on lesion images, false lesions on normal
    images) and the missed-lesion rate."""
    rows = []
    lesion = metrics.get("lesion_dice")
    if lesion is not None:
        rows.append(f"<tr><td>lesion Dice (mean over benign/malignant images)</td><td>{lesion['images']}</td>"
                    f"<td>{_ci(lesion)}</td></tr>")
    for key, label in (("false_lesion_rate", "false-lesion rate (normal images with any predicted pixel)"),
                       ("missed_lesion_rate", "missed-lesion rate (lesion images with no predicted pixel)")):
        r = metrics[key]
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{r['count']} / {r['images']}</td><td>{_ci(r)}</td></tr>")
    return "<table><tr><th>failure mode</th><th>images</th><th>value [95 % CI]</th></tr>" + "".join(rows) + "</table>"


def _head_table(metrics: Mapping[str, Any]) -> str:
    """The image-level head: how well p(lesion) separates lesion from normal images, what the gate
    keeps and removes, and p(malignant) among lesion images; one sentence for models without one."""
    gate = metrics.get("gate")
    if not gate:
        return "<p>This model has no image-level head: no gate, no image-level scores.</p>"
    threshold = ("off (every image kept)" if gate.get("threshold") is None
                 else f"images with p(lesion) &lt; {_fmt(gate['threshold'])} get an empty mask")
    rows = [("lesion vs normal AUROC of p(lesion)", f"{gate['auroc']['images']}", _ci(gate["auroc"]))]
    for key, label in (("sensitivity", "gate sensitivity (lesion images kept)"),
                       ("specificity", "gate specificity (normal images gated)")):
        r = gate[key]
        rows.append((label, f"{r['count']} / {r['images']}", _ci(r)))
    malignant = metrics.get("malignant_auroc")
    if malignant:
        rows.append(("malignant vs benign AUROC of p(malignant)", f"{malignant['images']}", _ci(malignant)))
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    return (f"<p>Gate: {threshold}.</p><table><tr><th>image head</th><th>images</th><th>value [95 % CI]</th></tr>"
            f"{body}</table>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.ci{color:#777;font-size:.85em}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}code{background:#f5f5f5;padding:0 .25em}
dl dt{font-weight:600}dl dd{margin:0 0 .5em 1.5em}
"""


def write_report(out_dir: str | Path, result: Any, cases: Mapping[str, Any], chosen: Mapping[str, Sequence[str]]) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.html`` (figures
    embedded, self-contained); returns its path.

    ``result`` is a :class:`unet.evaluation.EvaluationResult`; ``cases`` maps id -> ``Case`` for
    every id in ``chosen`` (``sample``, ``best``, ``worst``, ``false_lesions`` lists of ids).
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    m = result.metrics
    figures: list[tuple[Path, str, str]] = []  # (PNG written, heading, caption)

    def cases_figure(key: str, name: str, heading: str, caption: str) -> None:
        ids = list(chosen.get(key, []))
        if ids:
            figures.append((plot_cases([cases[i] for i in ids], fig_dir / name, heading), heading, caption))

    cases_figure("sample", "overlays.png", "Overlays (class-stratified sample)",
                 "Each row: the image, the ground truth (yellow), the prediction (cyan) and the errors: "
                 "true positive green, false positive red, false negative blue.")
    cases_figure("worst", "worst.png", "Worst cases (lesion images, lowest Dice)", "")
    cases_figure("best", "best.png", "Best cases (lesion images, highest Dice)", "")
    cases_figure("false_lesions", "false_lesions.png", "False lesions (normal images with predicted pixels)", "")
    figures.append((plot_metric_distributions(result.per_image, fig_dir / "dice_by_class.png"),
                    "Per-image Dice and HD95 by class", ""))
    curves = plot_training_curves(result.history, fig_dir / "curves.png")
    if curves is not None:
        figures.append((curves, "Training curves", "From the model artifact's training history."))

    model, data = m["model"], m["data"]
    esc = html.escape
    info = [
        ("model", f"<code>{esc(str(model.get('ref') or ''))}</code> (id <code>{esc(str(m['model_id']))}</code>, "
                  f"{esc(str(model['architecture']))}, input {model['input_size'][0]}×{model['input_size'][1]}, "
                  f"threshold {model['threshold']})"),
        ("post-processing", esc(", ".join(f"{k} {v}" for k, v in m.get("postprocess", {}).items() if k != "overridden"))
                            + (f" (overridden: {esc(', '.join(m['postprocess']['overridden']))})"
                               if m.get("postprocess", {}).get("overridden") else "")),
        ("data", f"<code>{esc(str(data['uri']))}</code>, split <code>{esc(str(data['split']))}</code>"
                 + (f", manifest sha256 <code>{esc(data['manifest_sha256'][:16])}…</code>" if data.get("manifest_sha256") else "")),
        ("images", ", ".join(f"{k} {v}" for k, v in m["counts"].items())),
        ("confidence intervals", f"95 % percentile bootstrap, {m['bootstrap']['resamples']} resamples of images, "
                                 f"seed {m['bootstrap']['seed']}"),
        ("created", esc(str(m.get("created_at", "")))),
    ]
    definitions = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in m.get("definitions", {}).items())
    figure_html = "".join(
        f"<h3>{esc(h)}</h3>" + (f"<p>{esc(c)}</p>" if c else "") + f'<img src="{_data_uri(p)}" alt="{esc(h)}">'
        for p, h, c in figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Segmentation report: {esc(str(m['model_id']))}</title>
<style>{_CSS}</style></head><body>
<h1>Segmentation report</h1>
<table>{''.join(f'<tr><th>{esc(k)}</th><td style="text-align:left">{v}</td></tr>' for k, v in info)}</table>
<h2>Summary</h2>
<p>Mean over images with the 95 % confidence interval in brackets. "micro" scores pool the pixel counts of
all images. Normal images have an empty ground truth: they score 1.0 with an empty prediction and 0.0 otherwise.</p>
{_summary_table(m)}
{_rates_table(m)}
<h2>Image-level head</h2>
{_head_table(m)}
<p>Beside this report in its output folder (not embedded; this page stands alone): per-image results
<code>per_image.csv</code> · <code>per_image.parquet</code> (with predicted masks) · all numbers
<code>metrics.json</code> · the figures as PNG files in <code>figures/</code>.</p>
<h2>Figures</h2>
{figure_html}
<h2>Definitions</h2>
<dl>{definitions}</dl>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
