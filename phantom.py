"""Synthetic HipMRI-like pelvic MR data in the real study's file layouts (the default data set).

The volumes come from phantom_anatomy.make_volume (geometry, anatomy and intensities are described there) and
the list of scans with their header facts from phantom_plan.plan_scans; this module names and writes them. As in
the public audit of the real files (DESIGN.md): image and label LPS with one affine, voxel spacing varying per scan
around 1.68 x 1.68 x 1.56 mm, float32 images, uint8 masks with xyzt units unknown, weeks with gaps; the quirks
(int16 images with scl_slope, float64 labels, trailing singleton axes) are a documented minority. The 2D layout's
slices are vol[:, j, :] (coronal, 256 x 128) from a central band of 60 rows of the LPS array. Every volume is
seeded on its own, so equal arguments give byte-identical files. See `write_dataset`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from phantom_anatomy import BLADDER, BODY, PROSTATE, VOLUME_SHAPE, make_patient, make_volume
from phantom_plan import (
    CLUSTER_LETTERS,
    MAX_WEEKS,
    MISSED_WEEK,
    SPLITS,
    WIDE_IN_PLANE_MM,
    Scan,
    plan_scans,
    scan_spacing,
)

log = logging.getLogger("hipmri.phantom")

SLICES_PER_VOLUME = 60
FIRST_CASE_ID = 4  # case ids are 3-digit, 004, 005, ... as in the real study
NAMINGS_3D = ("anon", "cluster")
# Bump when the anatomy, appearance or headers change: cached default phantoms are named after it and regenerate.
PHANTOM_VERSION = 3
COMPLETE_MARKER = "phantom.json"  # written last, holds the arguments and the summary

# ---------------------------------------------------------------- files and layouts


def case_id(patient: int) -> str:
    """3-digit case id of patient index `patient` (0 -> "004")."""
    return f"{FIRST_CASE_ID + patient:03d}"


def volume_paths(root: Path, naming: str, patient: int, week: int, letter: str = "B") -> tuple[Path, Path]:
    """3D (image, label) paths in the anonymised ("anon") or the cluster copy's ("cluster", patient prefix
    `letter`) naming of the real study."""
    cid = case_id(patient)
    if naming == "anon":
        return (root / "semantic_MRs_anon" / f"Case_{cid}_Week{week}_LFOV.nii.gz",
                root / "semantic_labels_anon" / f"Case_{cid}_Week{week}_SEMANTIC_LFOV.nii.gz")
    return (root / "semantic_MRs" / f"{letter}{cid}_Week{week}_LFOV.nii.gz",
            root / "semantic_labels_only" / f"{letter}{cid}_Week{week}_SEMANTIC.nii.gz")


def slice_paths(root: Path, split: str, patient: int, week: int, index: int) -> tuple[Path, Path]:
    """2D (image, label) paths of one slice, e.g. keras_slices_train/case_004_week_0_slice_0.nii.gz."""
    cid = case_id(patient)
    return (root / f"keras_slices_{split}" / f"case_{cid}_week_{week}_slice_{index}.nii.gz",
            root / f"keras_slices_seg_{split}" / f"seg_{cid}_week_{week}_slice_{index}.nii.gz")


def slice_band(ny: int) -> tuple[int, int]:
    """Rows (start, stop) along y (anterior -> posterior) of the 60 central coronal slices the 2D layout keeps."""
    start = max(0, ny // 2 - SLICES_PER_VOLUME // 2)
    return start, min(ny, start + SLICES_PER_VOLUME)


def _nifti_gz(data: np.ndarray, affine: np.ndarray, units: bool = True, slope: float | None = None) -> bytes:
    """NIfTI-1 bytes with qform/sform (code 1, scanner), xyzt units mm/s (unknown without `units`, as the real
    masks) and scl_slope `slope` for integer data, gzipped with mtime 0 so equal inputs give byte-identical files.
    Run-length deflate: ~2x faster than gzip level 1 and only ~5% larger on noisy images."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units(*(("mm", "sec") if units else ("unknown", "unknown")))
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)  # wbits 31: gzip container, header mtime 0
    return deflate.compress(image.to_bytes()) + deflate.flush()


@dataclass(frozen=True)
class _Task:
    """One volume to generate and write (picklable, for the process pool)."""

    root: Path
    layout: str
    naming: str
    seed: int
    scan: Scan


def _encode_image(image: np.ndarray, dtype: str) -> tuple[np.ndarray, float | None]:
    """Image (integer-valued float32) as stored: float32, or int16 with the scl_slope (3 significant digits) that
    puts its maximum near 32000, as scanner exports do; (data, slope or None)."""
    if dtype == "float32":
        return image.astype(np.float32), None
    slope = float(f"{max(float(image.max()), 1.0) / 32000:.3g}")
    return np.clip(np.rint(image / slope), 0, 32767).astype(np.int16), slope


def _write_case(task: _Task) -> list[int]:
    """Generate one volume, write its file(s) and return its label voxel counts per class."""
    scan = task.scan
    anatomy = make_patient(np.random.default_rng([task.seed, scan.patient]))
    seed = int(np.random.SeedSequence([task.seed, scan.patient, scan.week]).generate_state(1)[0])
    rows = slice_band(scan.shape[1]) if task.layout == "2d" else None
    image, label, affine = make_volume(anatomy, scan.week, seed, scan.shape, scan.spacing, rows)
    image, slope = _encode_image(np.rint(image), scan.image_dtype)
    stored_label = label.astype(scan.label_dtype)
    if task.layout == "3d":
        pair = (image, stored_label)
        if scan.singleton:
            pair = tuple(data[..., None] for data in pair)
        image_path, label_path = volume_paths(task.root, task.naming, scan.patient, scan.week, scan.letter)
        image_path.write_bytes(_nifti_gz(pair[0], affine, slope=slope))
        label_path.write_bytes(_nifti_gz(pair[1], affine, units=False))
        return np.bincount(label.ravel(), minlength=6).tolist()
    for k in range(image.shape[1]):
        # A slice vol[:, k, :] keeps the volume's 3D geometry: columns x, z, then y; origin moved to its row.
        slice_affine = affine[:, [0, 2, 1, 3]]
        slice_affine[:3, 3] += k * affine[:3, 1]
        pair = (image[:, k, :], stored_label[:, k, :])
        if scan.singleton:
            pair = tuple(data[..., None] for data in pair)
        image_path, label_path = slice_paths(task.root, scan.split, scan.patient, scan.week, k)
        image_path.write_bytes(_nifti_gz(pair[0], slice_affine, slope=slope))
        label_path.write_bytes(_nifti_gz(pair[1], slice_affine, units=False))
    return np.bincount(label.ravel(), minlength=6).tolist()


def _check_arguments(layout, patients, weeks, seed, naming, workers, shape) -> None:
    """Raise ValueError with a one-line message for arguments that cannot make a data set."""
    problems = [
        (layout not in ("2d", "3d"), f"layout must be '2d' or '3d', not {layout!r}"),
        (naming not in NAMINGS_3D, f"naming must be one of {', '.join(NAMINGS_3D)}, not {naming!r}"),
        (layout == "2d" and naming != "anon", "--naming applies to the 3D layout only"),
        (not 1 <= patients <= 1000 - FIRST_CASE_ID, f"patients must be 1..{1000 - FIRST_CASE_ID}, got {patients}"),
        (layout == "2d" and patients < 3, f"the 2D layout splits patients into train/validate/test: "
                                          f"use --patients 3 or more (got {patients})"),
        (not 1 <= weeks <= MAX_WEEKS, f"weeks must be 1..{MAX_WEEKS} (Week0..Week7), got {weeks}"),
        (seed < 0, f"seed must be >= 0, got {seed}"),
        (workers is not None and workers < 1, f"workers must be >= 1, got {workers}"),
        (len(shape) != 3 or min(shape) < 16, f"shape must be 3 sizes >= 16, got {shape}"),
        (layout == "2d" and shape[1] < SLICES_PER_VOLUME, f"the 2D layout needs shape[1] >= {SLICES_PER_VOLUME}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def _check_target(out: Path) -> None:
    """Refuse an existing file or a non-empty folder: the phantom never overwrites or mixes with other data."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose a new output folder")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new (or empty) output folder")


def _case_key(layout: str, naming: str, scan: Scan) -> str:
    """The scan's key as the loader names it: case_004_week_0 (2D), Case_004_Week0 or K004_Week0 (3D)."""
    cid = case_id(scan.patient)
    if layout == "2d":
        return f"case_{cid}_week_{scan.week}"
    return f"Case_{cid}_Week{scan.week}" if naming == "anon" else f"{scan.letter}{cid}_Week{scan.week}"


def _scan_record(key: str, layout: str, scan: Scan) -> dict:
    """One scan of the summary: its key, patient, week, split, shape on disk, spacing and dtypes."""
    shape = (scan.shape[0], scan.shape[2]) if layout == "2d" else scan.shape
    return {"key": key, "patient": case_id(scan.patient), "week": scan.week, "split": scan.split,
            "shape": [*shape, 1] if scan.singleton else list(shape), "spacing_mm": list(scan.spacing),
            "image_dtype": scan.image_dtype, "label_dtype": scan.label_dtype}


def _summary(scans: list[Scan], counts: np.ndarray, **arguments) -> dict:
    from utils import CLASS_NAMES  # utils imports torch: only here, never in the workers

    total = counts.sum(0)
    keys = [_case_key(arguments["layout"], arguments["naming"], s) for s in scans]
    splits = {name: sorted({case_id(s.patient) for s in scans if s.split == name}) for name in SPLITS}
    weeks = {}
    for s in scans:
        weeks.setdefault(case_id(s.patient), []).append(s.week)
    return {**arguments, "volumes": len(scans),
            "files": 2 * len(scans) * (SLICES_PER_VOLUME if arguments["layout"] == "2d" else 1),
            "weeks_per_patient": weeks,
            "spacing_mm_median": [round(float(v), 4) for v in np.median([s.spacing for s in scans], axis=0)],
            "odd_volume": next((k for k, s in zip(keys, scans) if s.shape != scans[0].shape), None),
            "wide_volume": next((k for k, s in zip(keys, scans) if s.wide), None),
            "singleton_volumes": [k for k, s in zip(keys, scans) if s.singleton],
            "int16_volumes": [k for k, s in zip(keys, scans) if s.image_dtype == "int16"],
            "float64_label_volumes": [k for k, s in zip(keys, scans) if s.label_dtype == "float64"],
            "splits": splits if arguments["layout"] == "2d" else None,
            "scans": [_scan_record(k, arguments["layout"], s) for k, s in zip(keys, scans)],
            "class_voxels": {n: int(c) for n, c in zip(CLASS_NAMES, total)},
            "class_shares": {n: round(float(c / total.sum()), 6) for n, c in zip(CLASS_NAMES, total)}}


def write_dataset(out: Path, layout: str = "2d", patients: int = 12, weeks: int = 2, seed: int = 0,
                  naming: str = "anon", workers: int | None = None, shape: tuple[int, int, int] | None = None) -> dict:
    """Write a phantom data set into the new folder `out` and return its summary (also saved as COMPLETE_MARKER).

    3D: semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz + semantic_labels_anon/..._SEMANTIC_LFOV.nii.gz, or with
    naming "cluster" semantic_MRs/K004_Week0_LFOV.nii.gz + semantic_labels_only/K004_Week0_SEMANTIC.nii.gz (one
    letter of CLUSTER_LETTERS per patient). 2D: keras_slices_{train,validate,test}/case_004_week_0_slice_K.nii.gz
    ((256, 128): slice K is vol[:, band start + K, :]) + keras_slices_seg_*/seg_004_week_0_slice_K.nii.gz
    (0.0..5.0), split by patient. Volumes are LPS; weeks (at most `weeks` per patient, with gaps), per-scan
    spacing, the odd and wide scans and the dtype quirks come from phantom_plan.plan_scans. `shape` (tests only)
    makes smaller volumes of the same field of view (coarser voxels). Everything is written into a hidden sibling
    folder that is renamed to `out` when complete. Raises ValueError for bad arguments and OSError for an
    unusable `out`.
    """
    out, shape = Path(out), tuple(shape or VOLUME_SHAPE)
    _check_arguments(layout, patients, weeks, seed, naming, workers, shape)
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the published data set should be readable like any folder
    except OSError as err:
        raise OSError(f"cannot write next to {out} ({err.strerror or err}); choose a writable output folder") from err
    try:
        scans = plan_scans(layout, patients, weeks, seed, shape)
        tasks = [_Task(staging, layout, naming, seed, scan) for scan in scans]
        for folder in {p.parent for t in tasks for p in _first_paths(t)}:
            folder.mkdir(parents=True, exist_ok=True)
        counts = np.array(_run(tasks, workers or min(2, os.cpu_count() or 1)), dtype=np.int64)
        summary = _summary(scans, counts, layout=layout, naming=naming if layout == "3d" else None,
                           patients=patients, weeks=weeks, seed=seed, shape=list(shape))
        (staging / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _first_paths(task: _Task) -> tuple[Path, Path]:
    scan = task.scan
    if task.layout == "3d":
        return volume_paths(task.root, task.naming, scan.patient, scan.week, scan.letter)
    return slice_paths(task.root, scan.split, scan.patient, scan.week, 0)


def _run(tasks: list[_Task], workers: int) -> list[list[int]]:
    """Generate the volumes, in a process pool when workers > 1 (each task is seeded on its own: same output)."""
    log.info("generating %d volumes with %d worker(s)", len(tasks), workers)
    if workers == 1 or len(tasks) == 1:
        return [_write_case(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        return list(pool.map(_write_case, tasks))


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; if a concurrent run published the same data set first, keep it."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError:
        if not (out / COMPLETE_MARKER).exists():
            raise
        log.info("%s was completed by another process meanwhile; keeping it", out)


# ---------------------------------------------------------------- preview


def _views(image: np.ndarray, label: np.ndarray, spacing) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(title, image 2D, label 2D, aspect) for imshow(origin="lower") of an LPS volume: axial at the bladder and
    the prostate (anterior up), coronal (a 2D-layout slice vol[:, y, :]) and mid-sagittal through the prostate
    (superior up). Axial/coronal show the patient's right on the left."""
    sx, sy, sz = spacing
    centre = [int(np.mean(i)) for i in np.nonzero(label == PROSTATE)]
    bladder_z = int(np.mean(np.nonzero(label == BLADDER)[2]))
    views = [(f"axial z={z}", image[:, ::-1, z].T, label[:, ::-1, z].T, sy / sx) for z in (bladder_z, centre[2])]
    views.append((f"coronal y={centre[1]}", image[:, centre[1], :].T, label[:, centre[1], :].T, sz / sx))
    views.append((f"sagittal x={centre[0]} (anterior left)", image[centre[0]].T, label[centre[0]].T, sz / sy))
    return views


def write_preview(path: Path, seed: int = 0) -> None:
    """PNG montage of the first patient's Week0 volume (as `write_dataset` makes it for `seed`): axial, coronal
    and sagittal views in grey-scale (top row) and with the label overlay and a legend (bottom row)."""
    anatomy = make_patient(np.random.default_rng([seed, 0]))
    volume_seed = int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0])
    spacing = scan_spacing(seed, 0, 0)
    image, label, _ = make_volume(anatomy, 0, volume_seed, VOLUME_SHAPE, spacing)
    title = (f"phantom case {case_id(0)} Week0 (seed {seed}): T2-like, {VOLUME_SHAPE} voxels (LPS) of "
             f"{' x '.join(f'{v:g}' for v in spacing)} mm")
    _draw_preview(Path(path), image, label, spacing, title)


def _draw_preview(path: Path, image: np.ndarray, label: np.ndarray, spacing, title: str) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: leaves the caller's backend alone
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image

    from utils import CLASS_COLOURS, CLASS_NAMES, atomic_write_bytes

    views = _views(image, label, spacing)
    vmax = float(np.percentile(image[label == BODY], 99.5))  # fat near white, urine saturated: a usual T2 window
    fig = Figure(figsize=(3.2 * len(views), 6.6), facecolor="black", dpi=76)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(views), gridspec_kw={"width_ratios": [v[1].shape[1] / (v[1].shape[0] * v[3])
                                                                     for v in views]})
    for col, (name, img, lab, aspect) in enumerate(views):
        for row in (0, 1):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, color="white", fontsize=9)
                continue
            overlay = np.zeros((*lab.shape, 4))
            for value, colour in CLASS_COLOURS.items():
                overlay[lab == value] = to_rgba(colour, 0.0 if value == BODY else 0.45)
                ax.contour(lab == value, levels=[0.5], colors=[colour], linewidths=0.6, origin="lower")
            ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
    handles = [Patch(color=CLASS_COLOURS[v], label=CLASS_NAMES[v]) for v in sorted(CLASS_COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=9)
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="png", optimize=True)  # RGB without alpha: keeps the README image under 400 KB
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- command line


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # report bad usage through main's return code, not SystemExit from deep inside
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phantom.py", description="Write a synthetic HipMRI-like pelvic MR data set (T2-like "
                     "images + 6-class labels) in the real study's folder layouts.")
    parser.add_argument("out", type=Path, help="output folder; must not exist yet or be empty")
    parser.add_argument("--layout", choices=("2d", "3d"), default="2d",
                        help="2d: keras_slices_* folders of coronal slices vol[:, j, :]; 3d: semantic_MRs* volumes "
                             "(default 2d)")
    parser.add_argument("--patients", type=int, default=12, help="number of patients (2D: at least 3)")
    parser.add_argument("--weeks", type=int, default=2,
                        help=f"most weekly scans per patient W, 1..{MAX_WEEKS} (default 2): every patient has Week0, "
                             f"misses each of Week1..Week(W-1) with probability {MISSED_WEEK:g} and then has WeekW "
                             f"instead when W < {MAX_WEEKS} (e.g. weeks 0-5 and 7), as the real study's gaps")
    parser.add_argument("--seed", type=int, default=0, help="same arguments and seed give byte-identical files")
    parser.add_argument("--naming", choices=NAMINGS_3D, default="anon",
                        help="3D file naming: Case_004_Week0_LFOV (anon) or the cluster copy's K004_Week0_LFOV with "
                             f"one letter of {'/'.join(CLUSTER_LETTERS)} per patient (cluster)")
    parser.add_argument("--preview", type=Path, help="also write a PNG montage of the first volume with labels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default min(2, CPUs))")
    return parser


def _report(out: Path, summary: dict, seconds: float) -> None:
    print(f"wrote {summary['layout']} phantom to {out}: {summary['patients']} patients x {summary['weeks']} weeks = "
          f"{summary['volumes']} volumes, {summary['files']} files in {seconds:.1f} s")
    print(f"voxel size per scan, median {' x '.join(f'{s:g}' for s in summary['spacing_mm_median'])} mm (LPS); "
          f"odd 144-slice volume: {summary['odd_volume']}; ~{WIDE_IN_PLANE_MM} mm in-plane: {summary['wide_volume']}")
    if summary["splits"]:
        print("splits (case ids): " + "; ".join(f"{k} {' '.join(v)}" for k, v in summary["splits"].items()))
    print("class shares: " + "  ".join(f"{k} {v:.4%}" for k, v in summary["class_shares"].items()))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        start = time.perf_counter()
        summary = write_dataset(args.out, args.layout, args.patients, args.weeks, args.seed, args.naming,
                                args.workers)
        seconds = time.perf_counter() - start
        if args.preview:
            write_preview(args.preview, args.seed)
    except (_UsageError, ValueError, OSError) as err:
        print(f"phantom.py: error: {err}", file=sys.stderr)
        return 2
    _report(args.out, summary, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
