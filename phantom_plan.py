"""Which scans a phantom data set holds and their header facts, decided before anything is generated.

Follows the public audit of the real files (DESIGN.md) where it says something: 1-8 weekly scans per patient with
gaps, one 144-slice volume, voxel spacing varying per scan around 1.68 x 1.68 x 1.56 mm with one scan ~1.88 mm
in-plane, float32 images and uint8 masks with a minority of quirks, letter prefixes in the cluster copy's names.
The rules for the rest (how often a week is missed, the spacing spread, which scan gets which quirk) are stated
here; the README lists which is which. Everything is a function of the arguments and the seed. phantom.py
generates and writes the scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom_anatomy import MEDIAN_SPACING, VOLUME_SHAPE, scaled_spacing

SPLITS = ("train", "validate", "test")
MAX_WEEKS = 8  # Week0..Week7
ODD_EXTRA_Z = 16  # the one odd volume has 144 = 128 + 16 slices along z (same spacing, longer field of view)
MISSED_WEEK = 0.35  # chance that a patient misses one of Week1..; at 8 weeks ~5.5 scans per patient (real: 211 / 38)
WIDE_IN_PLANE_MM = 1.88  # the one scan with a larger in-plane field of view (real: one scan ~1.88 mm in-plane)
SPACING_SPREAD = (0.015, 0.01)  # log-normal spread of the per-scan in-plane and slice spacing (an assumption)
CLUSTER_LETTERS = ("B", "K", "S")  # the cluster copy's patient prefixes seen in the real file lists
# Quirks, by a scan's position in the plan modulo QUIRK_CYCLE: 3 scans in 10 have one, the rest are the majority
# (float32 image, uint8 3D mask / float32 2D label, no singleton axis).
QUIRK_CYCLE, SINGLETON_AT, INT16_AT, FLOAT64_LABEL_AT = 10, 2, 3, 7


@dataclass(frozen=True)
class Scan:
    """One scan of the plan: patient index, week, array shape (x, y, z), voxel spacing (mm) and how it is stored."""

    patient: int
    week: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    split: str | None  # 2D layout: train/validate/test; None in 3D (split by the user's seed at training)
    letter: str  # the cluster naming's patient prefix
    image_dtype: str  # "float32", or "int16" stored with scl_slope (a quirk)
    label_dtype: str  # "uint8" (3D) / "float32" (2D), or "float64" (a quirk)
    singleton: bool  # stored (X, Y, Z, 1) / (H, W, 1), a quirk of some real files
    wide: bool  # the one scan with WIDE_IN_PLANE_MM in-plane spacing


def patient_weeks(patients: int, weeks: int, seed: int) -> list[list[int]]:
    """Week numbers of each patient's scans, ascending, at most `weeks` each.

    Every patient has Week0; each of Week1..Week{weeks-1} is missed with probability MISSED_WEEK, and a patient
    who missed one has Week{weeks} instead when weeks < MAX_WEEKS (weeks=7: e.g. weeks 0-5 and 7). With
    weeks=MAX_WEEKS nothing replaces a missed week, so counts vary 1..8 as in the real study. weeks=1: Week0 only.
    """
    plan = []
    for patient in range(patients):
        kept = np.random.default_rng([seed, 3, patient]).uniform(size=MAX_WEEKS - 1) >= MISSED_WEEK
        scans = [0] + [w for w in range(1, weeks) if kept[w - 1]]
        if len(scans) < weeks < MAX_WEEKS:
            scans.append(weeks)
        plan.append(scans)
    return plan


def odd_volume(weeks_of: list[list[int]]) -> tuple[int, int] | None:
    """(patient index, week) of the one 144-slice volume: the second patient's second scan (the real study's odd
    one is Case_019_Week1), or its only scan; with one patient, its second scan; None for a single scan."""
    patient = min(1, len(weeks_of) - 1)
    scans = weeks_of[patient]
    if len(weeks_of) == 1 and len(scans) == 1:
        return None
    return patient, scans[min(1, len(scans) - 1)]


def cluster_letter(patient: int, seed: int) -> str:
    """The cluster naming's letter of a patient (one letter per patient): CLUSTER_LETTERS in a seeded order,
    cycled over the patients, so any two or three consecutive patients have different letters."""
    order = np.random.default_rng([seed, 4]).permutation(len(CLUSTER_LETTERS))
    return CLUSTER_LETTERS[int(order[patient % len(CLUSTER_LETTERS)])]


def scan_spacing(seed: int, patient: int, week: int, wide: bool = False, shape=VOLUME_SHAPE) -> tuple[float, ...]:
    """Voxel size (mm, x, y, z) of one scan: MEDIAN_SPACING times a small per-scan factor (SPACING_SPREAD; x = y,
    square in-plane pixels), WIDE_IN_PLANE_MM in-plane for the `wide` scan; scaled to `shape` (same field of view)."""
    rng = np.random.default_rng([seed, patient, week, 1])
    factors = np.exp(np.asarray(SPACING_SPREAD) * np.clip(rng.standard_normal(2), -2, 2))
    in_plane = WIDE_IN_PLANE_MM if wide else round(float(MEDIAN_SPACING[0] * factors[0]), 3)
    return scaled_spacing((in_plane, in_plane, round(float(MEDIAN_SPACING[2] * factors[1]), 3)), shape)


def scan_quirks(index: int, layout: str) -> tuple[str, str, bool]:
    """(image dtype, label dtype, trailing singleton axis) of the scan at `index` in plan order: majority float32
    images and uint8 3D masks (float32 2D labels, 0.0..5.0); at positions INT16_AT, FLOAT64_LABEL_AT and
    SINGLETON_AT modulo QUIRK_CYCLE an int16 image with scl_slope != 1, a float64 label, or files stored
    (X, Y, Z, 1) / (H, W, 1)."""
    position = index % QUIRK_CYCLE
    label = "float64" if position == FLOAT64_LABEL_AT else ("uint8" if layout == "3d" else "float32")
    return ("int16" if position == INT16_AT else "float32"), label, position == SINGLETON_AT


def split_patients(patients: int, seed: int) -> dict[str, list[int]]:
    """2D layout: patient indices into train/validate/test ~80/10/10 by a seeded shuffle, each split non-empty."""
    order = np.random.default_rng([seed, 2]).permutation(patients).tolist()
    hold = max(1, round(0.1 * patients))
    return {"train": sorted(order[2 * hold:]), "validate": sorted(order[hold:2 * hold]), "test": sorted(order[:hold])}


def plan_scans(layout: str, patients: int, weeks: int, seed: int, shape=VOLUME_SHAPE) -> list[Scan]:
    """Every scan of a data set, in order (patient, then week): weeks (`patient_weeks`), the odd 144-slice volume
    (`odd_volume`), the wide one (the last scan, unless it is the odd one or the plan has under 3 scans), spacings
    (`scan_spacing`), quirks (`scan_quirks`), splits (2D, `split_patients`) and letters (`cluster_letter`)."""
    shape = tuple(shape)
    splits = split_patients(patients, seed) if layout == "2d" else {}
    split_of = {p: name for name, members in splits.items() for p in members}
    weeks_of = patient_weeks(patients, weeks, seed)
    scans = [(p, w) for p, weeks_of_p in enumerate(weeks_of) for w in weeks_of_p]
    odd = odd_volume(weeks_of)
    wide = scans[-1] if len(scans) >= 3 and scans[-1] != odd else None
    odd_shape = (*shape[:2], shape[2] + round(shape[2] * ODD_EXTRA_Z / VOLUME_SHAPE[2]))
    return [Scan(p, w, odd_shape if (p, w) == odd else shape, scan_spacing(seed, p, w, (p, w) == wide, shape),
                 split_of.get(p), cluster_letter(p, seed), *scan_quirks(i, layout), (p, w) == wide)
            for i, (p, w) in enumerate(scans)]
