"""The review list: which predicted scans to check first, ranked by signals that need no labels.

predict.py hands every predicted scan to a `Review` (`add` per scan of a labelled split, `add_file` per --input
file, grouped into scans and patients by weekly.py's reading of the file names) and calls `Review.write` at the
end, which writes into OUT:

- review.csv: every scan, highest review score first, with the reasons and every signal;
- weekly.csv, weekly.png and summary.md's "Weekly volumes" section (weekly.py);
- summary.md's "Review list" section: how the score is made, the head of the list, and on a labelled split how
  well the list finds the worst scans there (`usefulness`).

Signals per scan and organ (bladder, rectum, prostate), all from the prediction alone:
- consistency over weeks: the log ratio of the predicted volume to the median of the same patient's other weeks,
  as a robust z-score against the same statistic of the training labels (weekly.UsualVariation);
- anatomy: the organ missing (predicted volume under MISSING_SHARE of the smallest training volume), or in
  pieces (the share of it outside its largest connected component);
- confidence: one minus the Dice the model's own probabilities expect, the soft Dice of the organ's probability
  and its argmax mask. With --tta the probabilities are the mean over mirrored copies, so their disagreement
  lowers it too. `entropy_map` is the per-voxel normalised entropy (predict.py --save-uncertainty writes it).
An organ's score is its expected-Dice gap plus the gross-error checks past their flag levels (`organ_reasons`); a
scan's score is its largest organ score. README "Weekly scans and the review list" has what was measured on a
labelled phantom split, and the signals dropped for not helping (position relative to the bone, entropy near
the organ).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

import dataset
import layouts
import metrics
import utils
import weekly
from weekly import ORGANS, ScanRef, UsualVariation

log = logging.getLogger("hipmri.review")

Z_FLAG = 3.0  # a robust z-score (median / 1.4826 MAD) beyond this is unusual: ~3 SD of a normal distribution
MISSING_SHARE = 0.1  # an organ predicted under this share of its smallest training volume counts as missing
MISSING_SEVERITY = 10.0  # the score of a missing organ: above any other reason seen on the phantom
FRAGMENT_FLAG = 0.1  # share of an organ's predicted volume outside its largest component that is a reason
UNCERTAIN_FLAG = 0.1  # 1 - expected Dice above this is a reason


# ---------------------------------------------------------------- per scan, without labels


def entropy_map(probs: torch.Tensor) -> np.ndarray:
    """Per-voxel entropy of the softmax (C, *S) divided by log(C): float32 (*S) in 0..1 (0: certain)."""
    total = torch.zeros(probs.shape[1:], dtype=torch.float32, device=probs.device)
    for p in probs:  # one class at a time: no (C, *S) temporary
        total -= p * torch.log(p.clamp_min(1e-12))
    return (total / math.log(probs.shape[0])).cpu().numpy()


def probability_sums(pred: np.ndarray, probs: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (sum of its probability over its argmax mask, sum of its probability), float64 (C,); NaN without
    probabilities (masks from another tool). Sums over slices add up: 2D slice files give their scan's sums."""
    if probs is None:
        return np.full(utils.NUM_CLASSES, np.nan), np.full(utils.NUM_CLASSES, np.nan)
    mask = torch.from_numpy(np.ascontiguousarray(pred)).to(probs.device)
    inside = torch.stack([(p * (mask == c)).sum(dtype=torch.float64) for c, p in enumerate(probs)])
    return inside.cpu().numpy(), probs.sum(dim=tuple(range(1, probs.ndim)), dtype=torch.float64).cpu().numpy()


def largest_component_share(mask: np.ndarray) -> float:
    """Share of a non-empty mask's voxels in its largest (face-connected) component; 1.0 for an empty mask."""
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return 1.0
    components, count = ndi.label(mask[found[0]])
    if count <= 1:
        return 1.0
    sizes = np.bincount(components.ravel())[1:]
    return float(sizes.max() / sizes.sum())


@dataclass
class ScanSignals:
    """What one predicted scan says about itself, per organ."""

    scan: ScanRef
    pred_ml: dict[str, float]
    outside_largest: dict[str, float]  # share of the predicted organ outside its largest component
    expected_dice: dict[str, float]  # soft Dice of the organ's probability with its argmax mask (NaN: both empty)
    volume_z: dict[str, float] = field(default_factory=dict)  # filled by Review.finish (needs the other weeks)


def scan_signals(scan: ScanRef, pred: np.ndarray, inside: np.ndarray, prob_sum: np.ndarray,
                 spacing: Sequence[float]) -> ScanSignals:
    """Signals of one scan from its label map `pred` (uint8, spacing mm per axis) and `probability_sums`."""
    volumes = metrics.volumes_ml(pred, spacing, utils.NUM_CLASSES)
    counts = np.bincount(pred.ravel(), minlength=utils.NUM_CLASSES)
    signals = ScanSignals(scan, {}, {}, {})
    for organ in ORGANS:
        c = utils.CLASS_NAMES.index(organ)
        signals.pred_ml[organ] = float(volumes[c])
        signals.outside_largest[organ] = 1.0 - largest_component_share(pred == c)
        total = prob_sum[c] + counts[c]
        signals.expected_dice[organ] = float(2 * inside[c] / total) if total > 0 else float("nan")
    return signals


def organ_reasons(signals: ScanSignals, organ: str, usual: UsualVariation | None) -> tuple[float, list[str]]:
    """(score, reasons) of one organ of one scan. The score is (1 - expected Dice) / UNCERTAIN_FLAG, plus each
    gross-error check past its flag level (volume |z| / Z_FLAG, share in pieces / FRAGMENT_FLAG), or
    MISSING_SEVERITY for a missing organ. Checks below their flag level add nothing: on the phantom, counting
    their usual-sized values made the ranking worse (README). The reasons name the terms of 1 or more."""
    volume = signals.pred_ml[organ]
    if volume <= (MISSING_SHARE * usual.min_ml[organ] if usual is not None else 0.0):
        return MISSING_SEVERITY, [f"{organ} missing ({volume:.1f} ml predicted)"]
    z, share = signals.volume_z.get(organ, float("nan")), signals.outside_largest[organ]
    gap = 1.0 - signals.expected_dice[organ]
    terms = [(abs(z) / Z_FLAG, f"{organ} volume {volume:.1f} ml, {z:+.1f} robust SD from the patient's other weeks"),
             (share / FRAGMENT_FLAG, f"{organ} in pieces ({share:.0%} outside the largest)")]
    terms = [(severity, text) for severity, text in terms if severity >= 1.0]  # NaN (no other week) is not >= 1
    if not math.isnan(gap):
        terms.append((gap / UNCERTAIN_FLAG, f"{organ} uncertain (expected Dice {1 - gap:.2f})"))
    return sum(severity for severity, _ in terms), [text for severity, text in terms if severity >= 1.0]


# ---------------------------------------------------------------- the review of a prediction run


@dataclass
class Review:
    """Collects the predicted scans of one run, then writes the weekly report and the review list (`write`)."""

    spatial_dims: int
    usual: UsualVariation | None
    signals: list[ScanSignals] = field(default_factory=list)
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # --input files not in the weekly report, why
    _slices: dict[ScanRef, list] = field(default_factory=lambda: defaultdict(list), init=False, repr=False)

    def add(self, pair: layouts.Pair, pred: np.ndarray, probs: torch.Tensor | None, spacing: Sequence[float]
            ) -> None:
        """One whole predicted scan: `pred` uint8 label map, `probs` its softmax (C, *pred.shape) or None (a mask
        from another tool: no confidence signal), `spacing` mm per axis of `pred` (2D: slice, H, W); `pair` any of
        its files."""
        self.signals.append(scan_signals(weekly.scan_ref(pair), pred, *probability_sums(pred, probs), spacing))

    def add_file(self, path: Path, pred: np.ndarray, probs: torch.Tensor, image) -> None:
        """One --input file: a 3D scan, or (2D) one slice of a scan, grouped by the name's patient and week.
        `pred` is the file's label map as a stack ((1, H, W) in 2D), `image` its nibabel image (spacing)."""
        found = weekly.parse_file(Path(path), self.spatial_dims)
        if found is None:
            self.left_out.append((Path(path), "its name follows no HipMRI naming (layouts.NAMINGS)"))
            return
        scan, slice_index = found
        spacing, _ = dataset.voxel_spacing(image)
        sums = probability_sums(pred, probs)
        if self.spatial_dims == 3:
            if any((s.scan.patient, s.scan.week) == (scan.patient, scan.week) for s in self.signals):  # other naming
                self.left_out.append((Path(path), f"a second file of patient {scan.patient} week {scan.week}"))
                return
            self.signals.append(scan_signals(scan, pred, *sums, spacing))
        else:  # the stacked scan's axes are (slice, H, W), as cache.py stacks a 2D scan
            self._slices[scan].append((slice_index, Path(path), pred[0], sums, (spacing[2], spacing[0], spacing[1])))

    def _stack_slices(self) -> None:
        """2D --input: each scan's slices stacked in slice order into one scan. A scan whose slices are not all of
        0..n-1, n the most common count among the scans given (60 in HipMRI), is left out, named: an incomplete
        scan's volumes would read as a shrinking organ."""
        counts = Counter(len({s[0] for s in slices}) for slices in self._slices.values())
        usual_count = counts.most_common(1)[0][0] if counts else 0
        for scan, slices in sorted(self._slices.items()):
            slices.sort(key=lambda s: s[0])
            indices = [s[0] for s in slices]
            shapes = {s[2].shape for s in slices}
            why = ""
            if len(set(indices)) < len(indices):
                why = "two files of one slice"
            elif len(shapes) > 1:
                why = f"slice shapes {shapes}"
            elif indices != list(range(len(indices))) or len(indices) < usual_count:
                why = (f"slices {indices[0]}..{indices[-1]} ({len(indices)} files), not all of 0..{usual_count - 1}: "
                       f"its volumes would be a part's")
            if why:
                self.left_out += [(s[1], f"scan {scan.key} has {why}") for s in slices]
                continue
            inside = sum(s[3][0] for s in slices)
            prob_sum = sum(s[3][1] for s in slices)
            self.signals.append(scan_signals(scan, np.stack([s[2] for s in slices]), inside, prob_sum, slices[0][4]))
        self._slices.clear()

    def finish(self) -> list[dict]:
        """Volume z-scores against each patient's other weeks, then the review rows, highest score first."""
        self._stack_slices()
        self.signals.sort(key=lambda s: s.scan)
        if self.usual is not None:
            for organ in ORGANS:
                volumes = {s.scan: s.pred_ml[organ] for s in self.signals}
                ratios = weekly.log_volume_ratios(volumes, self.usual.floor_ml(organ))
                for s in self.signals:
                    if s.scan in ratios:
                        s.volume_z[organ] = ((ratios[s.scan] - self.usual.change_median[organ])
                                             / self.usual.change_scale[organ])
        rows = [review_row(s, self.usual) for s in self.signals]
        rows.sort(key=lambda r: -r["score"])
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        return rows

    def write(self, out: Path, metric_rows: list[dict] | None = None) -> None:
        """weekly.csv, weekly.png, review.csv and the summary.md sections (appended to the summary.md that
        report.write_reports wrote when `metric_rows` are given, the labelled split's; else a new summary.md)."""
        out = Path(out)
        ranked = self.finish()
        for path, why in self.left_out:
            log.warning("%s: left out of the weekly report: %s", path, why)
        if not self.signals:
            log.warning("no scan to report week by week (%d file(s) left out)", len(self.left_out))
            return
        series = weekly.weekly_rows({s.scan: s.pred_ml for s in self.signals}, metric_rows)
        weekly.write_csv(out / "weekly.csv", series, weekly.WEEKLY_FIELDS)
        weekly.write_csv(out / "review.csv", ranked, review_fields())
        weekly.plot_weekly(series, [r["scan"] for r in ranked], out / "weekly.png")
        sections = (weekly.weekly_markdown(series)
                    + review_markdown(ranked, series if metric_rows is not None else None, self.usual))
        if self.left_out:
            sections += weekly.left_out_markdown(self.left_out)
        if metric_rows is not None:
            sections = (out / "summary.md").read_text() + "\n" + sections
        else:
            sections = "# Weekly report of the --input scans\n\n" + sections
        utils.atomic_write_text(out / "summary.md", sections)
        if self.usual is not None:  # what the volume z-scores were measured against
            self.usual.save(out / weekly.USUAL_FILE)
        log.info("wrote weekly.csv, weekly.png and review.csv (%d scans of %d patients) to %s", len(self.signals),
                 len(weekly.by_patient([s.scan for s in self.signals])), out)


def review_row(signals: ScanSignals, usual: UsualVariation | None) -> dict:
    """review.csv's row of one scan: the score (its largest organ score), the reasons and every signal."""
    row = {"scan": signals.scan.key, "patient": signals.scan.patient, "week": signals.scan.week}
    reasons: list[tuple[float, str]] = []
    for organ in ORGANS:
        score, why = organ_reasons(signals, organ, usual)
        row[f"{organ}_score"] = score
        row[f"{organ}_volume_z"] = signals.volume_z.get(organ, float("nan"))
        row[f"{organ}_outside_largest"] = signals.outside_largest[organ]
        row[f"{organ}_expected_dice"] = signals.expected_dice[organ]
        reasons += [(score, text) for text in why]
    row["score"] = max(row[f"{organ}_score"] for organ in ORGANS)
    row["reasons"] = "; ".join(text for _, text in sorted(reasons, key=lambda r: -r[0]))
    return row


def review_fields() -> list[str]:
    per_organ = [f"{organ}_{what}" for organ in ORGANS
                 for what in ("score", "volume_z", "outside_largest", "expected_dice")]
    return ["rank", "scan", "patient", "week", "score", "reasons", *per_organ]


# ---------------------------------------------------------------- how useful the review list is (labelled split)


def usefulness(ranked: list[dict], series: list[dict]) -> dict:
    """On a labelled split: per organ the Spearman correlation of each score column with 1 - Dice (scans whose
    Dice is defined), and how many of the worst 10% scans by mean organ Dice are in the top 20% of the list."""
    from scipy.stats import spearmanr

    dice = {(r["scan"], r["organ"]): r["dice"] for r in series}
    result: dict = {"spearman": {}}
    for organ in ORGANS:
        error = np.array([1.0 - dice[r["scan"], organ] for r in ranked])
        keep = ~np.isnan(error)
        result["spearman"][organ] = {}
        for column in ("score", "volume_z", "outside_largest", "expected_dice"):
            values = np.array([r[f"{organ}_{column}"] for r in ranked], dtype=float)
            values = -values if column == "expected_dice" else np.abs(values)
            ok = keep & ~np.isnan(values)
            rho = spearmanr(values[ok], error[ok])[0] if ok.sum() > 2 and np.ptp(values[ok]) > 0 else float("nan")
            result["spearman"][organ][column] = float(rho)
    mean_dice = np.array([np.nanmean([dice[r["scan"], o] for o in ORGANS]) for r in ranked])  # rank order
    n = len(ranked)
    worst = set(np.argsort(mean_dice, kind="stable")[:max(1, round(0.1 * n))].tolist())
    top = set(range(math.ceil(0.2 * n)))
    result.update(n_scans=n, n_worst=len(worst), n_top=len(top), worst_in_top=len(worst & top))
    return result


def review_markdown(ranked: list[dict], series: list[dict] | None, usual: UsualVariation | None) -> str:
    """summary.md section: how the score is made, the head of the list, and on a labelled split its usefulness."""
    lines = ["## Review list", "",
             f"Scans ranked by a score computed without labels (review.csv has every scan and signal). Per organ: "
             f"(1 - expected Dice) / {UNCERTAIN_FLAG:g}, plus two gross-error checks once past their flag level: "
             f"|volume z| / {Z_FLAG:g} (the volume against the patient's other weeks, in robust SD of the training "
             f"labels' week-to-week change) and the share outside the largest component / {FRAGMENT_FLAG:g}; "
             f"{MISSING_SEVERITY:g} for a missing organ. A scan's score is its largest organ score; reasons name "
             f"the terms of 1 or more.", ""]
    if usual is None:
        lines += [f"Consistency over weeks is off here: no {weekly.USUAL_FILE} (see the log).", ""]
    lines += ["| rank | scan | score | reasons |", "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['scan']} | {r['score']:.2f} | {r['reasons'] or '-'} |" for r in ranked[:10]]
    if series is not None and len(ranked) >= 3:
        found = usefulness(ranked, series)
        lines += ["", "How well the list finds wrong contours on this split (Spearman correlation with 1 - Dice):", "",
                  "| organ | review score | abs. volume z | share outside largest | 1 - expected Dice |",
                  "|---|---|---|---|---|"]
        for organ, rho in found["spearman"].items():
            lines.append(f"| {organ} | " + " | ".join(f"{rho[c]:.2f}" for c in ("score", "volume_z",
                                                                                "outside_largest", "expected_dice"))
                         + " |")
        lines += ["", f"Of the worst {found['n_worst']} of {found['n_scans']} scans by mean organ Dice (10%), the top "
                      f"{found['n_top']} of the list (20%) hold {found['worst_in_top']}."]
    return "\n".join(lines).replace("nan", "n/a") + "\n\n"


