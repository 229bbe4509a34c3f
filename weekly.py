"""Weekly scans as a series: which patient and week each scan is, what the training labels say is a usual
week-to-week volume change, and the per-patient report: weekly.csv, weekly.png and summary.md's "Weekly volumes".

HipMRI patients were scanned weekly through treatment (Week0..Week7, with gaps). A scan's patient and week come
from its file name, read with the namings table (layouts.NAMINGS), in both layouts; the number is the patient,
whatever letter comes with it. review.py ranks the scans for checking and calls the writers here.

- weekly.csv: one row per patient, week and organ (bladder, rectum, prostate): predicted volume (ml), true volume,
  Dice and HD95 (when labels exist), and the change from the patient's first available week (ml and %);
- weekly.png: each patient's organ volumes over the weeks, predicted solid and true dashed;
- summary.md: per organ the mean absolute week-to-week volume change, predicted and true, and that of Dice.

Volumes in the 2D layout are those of the 60 stored slices, not of the whole organ.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cache
import dataset
import layouts
import utils

log = logging.getLogger("hipmri.weekly")

ORGANS = ("bladder", "rectum", "prostate")  # followed over the weeks and reviewed
USUAL_FILE = "weekly_usual.json"  # what the training labels say is usual: in the run folder (or OUT, see below)
MIN_CHANGE_SCALE = 0.01  # floor of the log-volume-ratio scale: 1 %, below what a contour can be repeated to
WEEKLY_FIELDS = ["patient", "week", "scan", "organ", "pred_ml", "true_ml", "dice", "hd95_mm", "pred_change_ml",
                 "pred_change_pct", "true_change_ml", "true_change_pct"]
MAX_LINES = 5  # weekly.png: up to this many patients share one panel per organ; more get one panel each
MAX_PANELS = 40  # weekly.png shows at most this many patients (the rest are in weekly.csv)


# ---------------------------------------------------------------- scans: patient and week


@dataclass(frozen=True, order=True)
class ScanRef:
    """One scan: sorted by patient number, then week."""

    patient_number: int
    week: int
    key: str  # "case_004_week_0" (2D), "Case_004_Week0", "K019_Week1" (3D)
    patient: str  # the number in 3 digits, as the study writes it: "004" (also for K004)


def scan_ref(pair: layouts.Pair) -> ScanRef:
    """The scan a file pair belongs to (any slice of it in 2D). The number is the patient, whatever letter or
    naming comes with it (K019_Week1 and Case_019_Week1 are one patient's Week1)."""
    number = int(pair.case_id)
    return ScanRef(number, pair.week, pair.case_key, f"{number:03d}")


def parse_file(path: Path, spatial_dims: int) -> tuple[ScanRef, int | None] | None:
    """(scan, slice index or None) of an image (or label) file named by one of layouts.NAMINGS of these dims, or
    None when its name follows none of them."""
    for naming in layouts.NAMINGS.values():
        for label in (False, True):
            parsed = naming.parse(path.name, label)
            if parsed is not None and naming.spatial_dims == spatial_dims:
                pair = layouts.Pair(naming.key(parsed), parsed.patient, parsed.week, parsed.slice_index, path, None)
                return scan_ref(pair), parsed.slice_index
    return None


def by_patient(scans: Sequence[ScanRef]) -> dict[str, list[ScanRef]]:
    """Patient -> that patient's scans in week order (weeks may have gaps), patients in number order."""
    groups: dict[str, list[ScanRef]] = defaultdict(list)
    for scan in sorted(scans):
        groups[scan.patient].append(scan)
    return dict(groups)


# ---------------------------------------------------------------- what training labels say is usual


def _robust(values: Sequence[float] | np.ndarray, floor: float) -> tuple[float, float]:
    """(median, scale) with scale = 1.4826 * median absolute deviation (a normal distribution's SD), >= floor."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0, float("nan")
    median = float(np.median(values))
    return median, max(1.4826 * float(np.median(np.abs(values - median))), floor)


def log_volume_ratios(volumes: dict[ScanRef, float], floor_ml: float) -> dict[ScanRef, float]:
    """Per scan of a patient with other weeks: log((v + floor) / (median of the other weeks' v + floor)).

    Symmetric in over- and under-estimation, and the leave-one-out median keeps one wrong week from moving the
    reference of the others much (with two weeks each is the other's reference)."""
    ratios = {}
    for scans in by_patient(list(volumes)).values():
        for scan in scans:
            others = [volumes[s] for s in scans if s != scan]
            if others:
                ratios[scan] = math.log((volumes[scan] + floor_ml) / (float(np.median(others)) + floor_ml))
    return ratios


@dataclass
class UsualVariation:
    """Per organ, from the training labels: the volumes (ml) and the week-to-week change within a patient
    (log ratio to the median of the patient's other weeks, as median and robust scale)."""

    n_scans: int
    n_patients: int  # patients with two or more weeks (those that teach the change statistics)
    median_ml: dict[str, float]
    min_ml: dict[str, float]
    change_median: dict[str, float]
    change_scale: dict[str, float]

    def floor_ml(self, organ: str) -> float:
        """Added to volumes before their ratio: 1 % of the median organ, so that an empty week stays finite."""
        return 0.01 * self.median_ml[organ]

    def save(self, path: Path) -> None:
        utils.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> UsualVariation:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise dataset.DataError(f"{path}: not a {USUAL_FILE} written by weekly.py ({exc}); delete it") from exc


def learn_usual_variation(cases: cache.CaseSet) -> UsualVariation:
    """What is usual, from a labelled split's cached class counts and spacings (no file is read again); call it on
    the training split only. DataError when it holds no patient with two weeks."""
    scans = [scan_ref(pairs[0]) for pairs in cases.sources]
    voxel_ml = [float(np.prod(s)) / 1000.0 for s in cases.spacings]
    stats: dict[str, dict] = defaultdict(dict)
    for organ in ORGANS:
        c = utils.CLASS_NAMES.index(organ)
        volumes = {scan: float(counts[c]) * ml for scan, counts, ml in zip(scans, cases.class_counts, voxel_ml)}
        stats["median_ml"][organ] = float(np.median(list(volumes.values())))
        stats["min_ml"][organ] = float(min(volumes.values()))
        ratios = log_volume_ratios(volumes, 0.01 * stats["median_ml"][organ])
        stats["change_median"][organ], stats["change_scale"][organ] = _robust(list(ratios.values()),
                                                                            MIN_CHANGE_SCALE)
    n_patients = sum(len(s) > 1 for s in by_patient(scans).values())
    if n_patients == 0:
        raise dataset.DataError(f"the training split ({len(scans)} scans) has no patient with two or more weeks: "
                                f"nothing to learn the usual week-to-week change from")
    return UsualVariation(len(scans), n_patients, **stats)


def save_usual_variation(train_cases: cache.CaseSet, run_dir: Path) -> None:
    """For train.py: learn from the training split and write RUN/USUAL_FILE, which predict.py reads (with
    --input too); a warning and no file when no training patient has two weeks."""
    try:
        learn_usual_variation(train_cases).save(Path(run_dir) / USUAL_FILE)
    except dataset.DataError as exc:
        log.warning("%s; predict.py's review list will leave out consistency over weeks", exc)


def usual_variation(checkpoint: Path, data_dir: str | None = None, data_config: dataset.DataConfig | None = None,
                    cache_dir: str | None = None, split_file: Path | None = None) -> UsualVariation | None:
    """The checkpoint's run folder's USUAL_FILE (train.py writes it), else learnt from the training split of
    `data_dir` now (3D: the patients of `split_file`), else None (with a warning: consistency over weeks is off)."""
    path = Path(checkpoint).parent / USUAL_FILE
    if path.is_file():
        return UsualVariation.load(path)
    if data_dir is None:
        log.warning("%s: not found, so the review list leaves out consistency over weeks; run predict.py with "
                    "--data-dir on the training data once and copy OUT/%s beside the checkpoint", path, USUAL_FILE)
        return None
    log.info("learning the usual week-to-week volume change from the training split of %s", data_dir)
    try:
        return learn_usual_variation(cache.load_split(data_dir, "train", data_config, cache_dir=cache_dir,
                                                      split_file=split_file))
    except dataset.DataError as exc:  # no training split here, or no patient with two weeks in it
        log.warning("%s; the review list leaves out consistency over weeks", exc)
        return None


# ---------------------------------------------------------------- weekly table and summary


def weekly_rows(pred_ml: dict[ScanRef, dict[str, float]], metric_rows: list[dict] | None = None) -> list[dict]:
    """weekly.csv: one row per patient, week and organ from the predicted volumes (scan -> organ -> ml); true
    volume, Dice and HD95 from report.case_rows' rows (by scan key and class) when given; the changes from the
    patient's first available week."""
    metrics_of = {(r["case"], r["class"]): r for r in metric_rows or []}
    rows = []
    for scans in by_patient(list(pred_ml)).values():
        first = scans[0]
        for organ in ORGANS:
            for scan in scans:
                m = metrics_of.get((scan.key, organ), {})
                rows.append({"patient": scan.patient, "week": scan.week, "scan": scan.key, "organ": organ,
                             "pred_ml": pred_ml[scan][organ],
                             "true_ml": m.get("gt_ml", float("nan")), "dice": m.get("dice", float("nan")),
                             "hd95_mm": m.get("hd95_mm", float("nan")), "first": first.key})
    first_of = {(r["scan"], r["organ"]): r for r in rows}
    for row in rows:
        base = first_of[row["first"], row["organ"]]
        for what in ("pred", "true"):
            now, then = row[f"{what}_ml"], base[f"{what}_ml"]
            row[f"{what}_change_ml"] = now - then
            row[f"{what}_change_pct"] = 100.0 * (now - then) / then if then > 0 else float("nan")
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    utils.atomic_write_text(path, buffer.getvalue())


def _week_to_week(rows: list[dict], organ: str, column: str) -> np.ndarray:
    """Absolute change of `column` between consecutive available weeks of each patient (gaps allowed)."""
    series: dict[str, list[float]] = defaultdict(list)
    for row in rows:  # weekly_rows lists each patient's weeks in order
        if row["organ"] == organ:
            series[row["patient"]].append(row[column])
    return np.array([abs(b - a) for values in series.values() for a, b in zip(values, values[1:])], dtype=float)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def weekly_markdown(rows: list[dict]) -> str:
    """summary.md section: per organ, the mean absolute week-to-week volume change, predicted vs true, and the
    mean absolute week-to-week change of Dice (n/a without labels)."""
    lines = ["## Weekly volumes", "",
             "Per organ, between consecutive available weeks of each patient (weekly.csv has each week's volume and "
             "its change from the patient's first week):", "",
             "| organ | mean abs. change predicted (ml) | true (ml) | mean abs. change of Dice |", "|---|---|---|---|"]
    for organ in ORGANS:
        pred, true, dice = (_mean(_week_to_week(rows, organ, c)) for c in ("pred_ml", "true_ml", "dice"))
        lines.append(f"| {organ} | {pred:.1f} | {true:.1f} | {dice:.3f} |".replace("nan", "n/a"))
    if not _week_to_week(rows, ORGANS[0], "pred_ml").size:
        lines += ["", "No patient has two weeks here: no week-to-week change to report."]
    return "\n".join(lines) + "\n\n"


def left_out_markdown(left_out: list[tuple[Path, str]]) -> str:
    lines = ["## Files left out of the weekly report", ""]
    lines += [f"- {path.name}: {why}" for path, why in left_out[:20]]
    if len(left_out) > 20:
        lines.append(f"- ... and {len(left_out) - 20} more (listed in the log)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- weekly.png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], patient: str, organ: str, column: str) -> tuple[list[int], list[float]]:
    chosen = [r for r in rows if r["patient"] == patient and r["organ"] == organ]
    return [r["week"] for r in chosen], [r[column] for r in chosen]


def plot_weekly(rows: list[dict], review_order: list[str], path: Path) -> None:
    """Organ volumes over the weeks, predicted solid and true dashed. Up to MAX_LINES patients: one panel per organ,
    one colour per patient. More: one small panel per patient (organs in their class colours, log scale so the
    bladder's swings and the prostate's constancy both show), at most MAX_PANELS patients, those whose scans
    rank highest on the review list; the rest are in weekly.csv."""
    plt = _pyplot()
    patients = list(dict.fromkeys(r["patient"] for r in rows))
    labelled = any(not math.isnan(r["true_ml"]) for r in rows)
    if len(patients) <= MAX_LINES:
        fig = _organ_panels(plt, rows, patients, labelled)
    else:
        rank = {key: i for i, key in enumerate(review_order)}
        first_rank = {p: min(rank.get(r["scan"], len(rank)) for r in rows if r["patient"] == p) for p in patients}
        shown = sorted(sorted(patients, key=first_rank.get)[:MAX_PANELS], key=patients.index)
        fig = _patient_panels(plt, rows, shown, labelled, len(patients) - len(shown))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    utils.atomic_write_bytes(path, buffer.getvalue())


def _organ_panels(plt, rows: list[dict], patients: list[str], labelled: bool):
    fig, axes = plt.subplots(1, len(ORGANS), figsize=(4.2 * len(ORGANS), 3.8), constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for ax, organ in zip(axes, ORGANS):
        for i, patient in enumerate(patients):
            weeks, pred = _series(rows, patient, organ, "pred_ml")
            ax.plot(weeks, pred, "-o", color=colours[i % 10], markersize=3, label=patient)
            if labelled:
                ax.plot(weeks, _series(rows, patient, organ, "true_ml")[1], "--", color=colours[i % 10])
        ax.set(title=organ, xlabel="week", ylabel="volume (ml)", ylim=(0, None))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[-1].legend(title="patient", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Volume per week: predicted solid" + (", true dashed" if labelled else ""), fontsize=10)
    return fig


def _patient_panels(plt, rows: list[dict], patients: list[str], labelled: bool, hidden: int):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    columns = min(8, math.ceil(math.sqrt(2 * len(patients))))  # about twice as wide as tall
    n_rows = math.ceil(len(patients) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(2.1 * columns, 1.7 * n_rows + 0.8), sharex=True, sharey=True,
                             squeeze=False, constrained_layout=True)
    for ax, patient in zip(axes.flat, patients):
        for organ in ORGANS:
            colour = utils.CLASS_COLOURS[utils.CLASS_NAMES.index(organ)]
            weeks, pred = _series(rows, patient, organ, "pred_ml")
            ax.plot(weeks, np.maximum(pred, 0.1), "-o", color=colour, markersize=2.5, linewidth=1.2, label=organ)
            if labelled:
                ax.plot(weeks, np.maximum(_series(rows, patient, organ, "true_ml")[1], 0.1), "--", color=colour,
                        linewidth=1)
        ax.set_title(patient, fontsize=8, pad=2)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(patients):]:
        ax.set_axis_off()
    axes[0, 0].yaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))  # 10, 30, 100, 300 ml: shared by every panel
    axes[0, 0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes[0, 0].yaxis.set_minor_formatter(NullFormatter())
    fig.supxlabel("week", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    more = f"; {hidden} more patients in weekly.csv" if hidden else ""
    fig.suptitle(f"Volume (ml, log scale) per week and patient: predicted solid"
                 f"{', true dashed' if labelled else ''}{more}", fontsize=10)
    return fig
