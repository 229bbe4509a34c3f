"""Evaluation reports for predict.py: per-case metric rows, metrics.csv, summary.json/.md and the pictures.

Metrics follow DESIGN.md: hard Dice per case and class (NaN when both prediction and label are empty,
left out of the mean and counted), HD95 and ASSD in mm from the voxel spacing, volumes in ml. The
headline "mean foreground Dice" is the mean of the per-class means over the five foreground classes.
HD95 and ASSD are undefined (NaN, left out of their means) when a class is missed or spurious, so
summary.json/.md count those cases per class beside the means. `Evaluation` is the one path from a
case's (prediction, label, spacing, image) to these reports, whoever made the prediction.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import metrics
import utils

METRIC_FIELDS = ["case", "class", "dice", "hd95_mm", "assd_mm", "gt_ml", "pred_ml"]


def case_rows(key: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> list[dict]:
    """One row per class for one case; `pred`, `gt` uint8 of equal shape, `spacing` mm per axis."""
    dice = metrics.dice_per_class(pred, gt, utils.NUM_CLASSES)
    hd95, assd = metrics.surface_metrics(pred, gt, spacing, utils.NUM_CLASSES)
    gt_ml = metrics.volumes_ml(gt, spacing, utils.NUM_CLASSES)
    pred_ml = metrics.volumes_ml(pred, spacing, utils.NUM_CLASSES)
    return [{"case": key, "class": name, "dice": dice[c], "hd95_mm": hd95[c], "assd_mm": assd[c],
             "gt_ml": gt_ml[c], "pred_ml": pred_ml[c]} for c, name in enumerate(utils.CLASS_NAMES)]


def per_case_table(rows: list[dict], column: str) -> np.ndarray:
    """(n_cases, num_classes) array of one metric column, cases in the order they were added."""
    cases = list(dict.fromkeys(row["case"] for row in rows))
    table = np.full((len(cases), utils.NUM_CLASSES), np.nan)
    for row in rows:
        table[cases.index(row["case"]), utils.CLASS_NAMES.index(row["class"])] = row[column]
    return table


def presence_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per class, over cases: "truth_present" (the label holds the class), "missed" (label holds it, prediction
    has none) and "spurious" (prediction holds it, label has none). Volumes are voxel counts times a positive
    voxel volume, so a volume of 0 is an empty mask exactly."""
    gt_present = per_case_table(rows, "gt_ml") > 0
    pred_present = per_case_table(rows, "pred_ml") > 0
    counts = {"truth_present": gt_present, "missed": gt_present & ~pred_present,
              "spurious": pred_present & ~gt_present}
    return {key: {name: int(table[:, c].sum()) for c, name in enumerate(utils.CLASS_NAMES)}
            for key, table in counts.items()}


def summarise_rows(rows: list[dict]) -> dict:
    """summary.json: the DESIGN.md contract plus std, NaN counts, ASSD and per class the cases where the class
    was missed or spurious (HD95/ASSD leave those out of their means)."""
    dice = metrics.summarise(per_case_table(rows, "dice"), utils.CLASS_NAMES)
    hd95 = metrics.summarise(per_case_table(rows, "hd95_mm"), utils.CLASS_NAMES)
    assd = metrics.summarise(per_case_table(rows, "assd_mm"), utils.CLASS_NAMES)
    return {
        "n_cases": dice["n_cases"],
        "mean_foreground_dice": dice["mean_foreground"],
        "dice_mean": dice["mean"], "dice_std": dice["std"], "dice_n_nan": dice["n_nan"],
        "hd95_mean": hd95["mean"], "hd95_std": hd95["std"], "hd95_n_nan": hd95["n_nan"],
        "assd_mean": assd["mean"], "assd_std": assd["std"],
        **presence_counts(rows),
    }


def markdown_table(summary: dict) -> str:
    lines = [f"{summary['n_cases']} cases; mean foreground Dice {summary['mean_foreground_dice']:.4f} "
             "(hard Dice per case, background excluded)", "",
             "| class | Dice mean ± std | HD95 mm mean ± std | missed | spurious | ASSD mm mean "
             "| NaN cases (Dice / HD95) |",
             "|---|---|---|---|---|---|---|"]
    for name in utils.CLASS_NAMES:
        dice = _pm(summary["dice_mean"][name], summary["dice_std"][name], 4)
        hd95 = _pm(summary["hd95_mean"][name], summary["hd95_std"][name], 2)
        missed = f"{summary['missed'][name]} of {summary['truth_present'][name]}"
        nans = f"{summary['dice_n_nan'][name]} / {summary['hd95_n_nan'][name]}"
        lines.append(f"| {name} | {dice} | {hd95} | {missed} | {summary['spurious'][name]} "
                     f"| {_number(summary['assd_mean'][name], 2)} | {nans} |")
    lines += ["", "missed: the label holds the class and the prediction has none of it (of the cases whose label "
              "holds it); spurious: the prediction holds a class the label lacks. HD95 and ASSD are undefined "
              "for both and left out of their means, so read those means beside these counts."]
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, digits: int) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------- what the pictures need


@dataclass
class PictureCases:
    """Per case, only the 2D slices the pictures need (not whole volumes): for each class the slice where the
    label has most of that class, and the slice richest in organs. Slices are taken along `slice_axis`
    (2D layout: 0, the stacked slice files; 3D: 1, the phantom's and the 2D layout's axial axis)."""
    slice_axis: int = 0
    slices: dict = field(default_factory=dict)  # (case, class or "middle") -> (image, gt, pred, aspect)

    def add(self, key: str, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> None:
        other_axes = tuple(a for a in range(gt.ndim) if a != self.slice_axis)
        aspect = spacing[other_axes[1]] / spacing[other_axes[0]]  # displayed pixel height / width
        for label in range(1, utils.NUM_CLASSES):
            index = int((gt == label).sum(axis=other_axes).argmax())
            self.slices[key, label] = (*self._take(index, image, gt, pred), aspect)
        index = int((gt > 1).sum(axis=other_axes).argmax())  # organs and bone, not the body outline
        self.slices[key, "middle"] = (*self._take(index, image, gt, pred), aspect)

    def _take(self, index: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.take(a, index, axis=self.slice_axis).copy() for a in arrays)


@dataclass
class Evaluation:
    """Metric rows and picture slices gathered case by case, then written by `write`: the one path from a
    prediction to the reports, for our own predictions and for masks scored with `predict.py --score`."""
    slice_axis: int = 0  # see PictureCases
    rows: list[dict] = field(default_factory=list)
    pictures: PictureCases = field(init=False)

    def __post_init__(self) -> None:
        self.pictures = PictureCases(slice_axis=self.slice_axis)

    def add(self, key: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], image: np.ndarray) -> None:
        """One case: `pred`, `gt` uint8 label maps and `image` (display intensities) of one shape at the label
        files' resolution, `spacing` mm per axis."""
        self.rows.extend(case_rows(key, pred, gt, spacing))
        self.pictures.add(key, image, gt, pred, spacing)

    def write(self, out: Path, title: str) -> dict:
        return write_reports(self.rows, self.pictures, out, title)


def write_reports(rows: list[dict], pictures: PictureCases, out: Path, title: str) -> dict:
    out = Path(out)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    utils.atomic_write_text(out / "metrics.csv", buffer.getvalue())
    summary = summarise_rows(rows)
    utils.write_json(out / "summary.json", summary)
    utils.atomic_write_text(out / "summary.md", f"# {title}\n\n{markdown_table(summary)}")
    dice = per_case_table(rows, "dice")
    cases = list(dict.fromkeys(row["case"] for row in rows))
    plot_dice_boxes(dice, out / "dice_boxplot.png", title)
    for label in range(1, utils.NUM_CLASSES):
        plot_best_and_worst(dice, cases, label, pictures, out / f"overlay_{utils.CLASS_NAMES[label]}.png")
    plot_montage(cases[:4], dice, pictures, out / "montage.png")
    return summary


# ---------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor=fig.get_facecolor())
    plt.close(fig)
    utils.atomic_write_bytes(path, buffer.getvalue())


def plot_dice_boxes(dice: np.ndarray, path: Path, title: str) -> None:
    """Box plot of per-case Dice per foreground class with every case drawn as a point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    names = utils.CLASS_NAMES[1:]
    columns = [dice[:, c][~np.isnan(dice[:, c])] for c in range(1, utils.NUM_CLASSES)]
    ax.boxplot(columns, tick_labels=names, widths=0.5, showfliers=False, medianprops={"color": "black"})
    rng = np.random.default_rng(0)  # jitter only, fixed so the picture is reproducible
    for position, (values, label) in enumerate(zip(columns, range(1, utils.NUM_CLASSES)), start=1):
        colour = utils.CLASS_COLOURS[label] if label != 2 else "#8d99ae"
        ax.scatter(position + rng.uniform(-0.12, 0.12, len(values)), values, s=18, color=colour,
                   edgecolor="black", linewidth=0.4, zorder=3)
        ax.text(position, -0.07, f"n={len(values)}", ha="center", fontsize=8)
    ax.set(ylim=(-0.1, 1.02), ylabel="Dice (hard, per case)", title=f"Per-case Dice: {title}")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def draw_slice(ax, image: np.ndarray, label: np.ndarray, aspect: float, highlight: int | None = None,
               fill: bool = True) -> None:
    """Grey-scale slice (x right, last axis up) with every class filled faintly and `highlight` outlined."""
    from matplotlib.colors import to_rgba

    low, high = np.percentile(image, (1, 99.5))
    ax.imshow(image.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect, interpolation="nearest")
    if fill:
        overlay = np.zeros((*label.T.shape, 4))
        for value, colour in utils.CLASS_COLOURS.items():
            overlay[label.T == value] = to_rgba(colour, 0.0 if value == 1 else 0.35)
        ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
    for value, colour in utils.CLASS_COLOURS.items():
        if value == highlight or (highlight is None and value > 1):
            if (label == value).any():
                ax.contour((label == value).T, levels=[0.5], colors=[colour], linewidths=1.2, origin="lower")
    ax.set_axis_off()


def _legend(fig) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=utils.CLASS_COLOURS[v], label=utils.CLASS_NAMES[v]) for v in sorted(utils.CLASS_COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")


def plot_best_and_worst(dice: np.ndarray, cases: list[str], label: int, pictures: PictureCases, path: Path) -> None:
    """Two rows (best and worst case for this class by Dice), each: ground truth | prediction."""
    plt = _pyplot()
    scores = dice[:, label]
    if np.isnan(scores).all():
        return
    order = np.argsort(np.where(np.isnan(scores), np.inf, scores))
    picks = [("best", int(np.nanargmax(scores))), ("worst", int(order[0]))]
    name = utils.CLASS_NAMES[label]
    fig, axes = plt.subplots(2, 2, figsize=(9, 7.2), facecolor="black")
    for row, (which, index) in enumerate(picks):
        image, gt, pred, aspect = pictures.slices[cases[index], label]
        for col, (what, shown) in enumerate((("ground truth", gt), ("prediction", pred))):
            draw_slice(axes[row, col], image, shown, aspect, highlight=label)
            axes[row, col].set_title(f"{which} {name}: {cases[index]} (Dice {scores[index]:.3f}) - {what}",
                                     color="white", fontsize=9)
    _legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path)


def plot_montage(cases: list[str], dice: np.ndarray, pictures: PictureCases, path: Path) -> None:
    """A few cases side by side: ground truth (top) and prediction (bottom) on the slice richest in organs."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(cases), figsize=(3.4 * len(cases), 6.8), facecolor="black", squeeze=False)
    for col, key in enumerate(cases):
        image, gt, pred, aspect = pictures.slices[key, "middle"]
        mean_fg = np.nanmean(dice[col, 1:])
        for row, (what, shown) in enumerate((("ground truth", gt), ("prediction", pred))):
            draw_slice(axes[row, col], image, shown, aspect)
            axes[row, col].set_title(f"{key} - {what}" + (f"\nmean fg Dice {mean_fg:.3f}" if row else ""),
                                     color="white", fontsize=9)
    _legend(fig)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)
