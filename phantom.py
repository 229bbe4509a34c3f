"""Synthetic HipMRI-like pelvic MR data in the real study's file layouts (the default data set).

The volumes come from phantom_anatomy.make_volume (geometry, anatomy and intensities are described there);
this module names, splits and writes them. The 2D layout's slices are vol[:, y, :] (axial, 256 x 128) from a
central band of 60 rows. Every volume is seeded on its own, so equal arguments give byte-identical files.
See `write_dataset` for the files written.
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

from phantom_anatomy import BLADDER, BODY, PROSTATE, VOLUME_SHAPE, default_spacing, make_patient, make_volume

log = logging.getLogger("hipmri.phantom")

ODD_EXTRA_Z = 16  # the one odd volume has 144 = 128 + 16 slices along z (same spacing, wider field of view)
SLICES_PER_VOLUME = 60
FIRST_CASE_ID = 4  # case ids are 3-digit, 004, 005, ... as in the real study
MAX_WEEKS = 8  # Week0..Week7
# Bump when the anatomy or appearance changes: cached default phantoms are named after it and regenerate.
PHANTOM_VERSION = 2
COMPLETE_MARKER = "phantom.json"  # written last, holds the arguments and the summary

# ---------------------------------------------------------------- files and layouts

SPLITS = ("train", "validate", "test")


def case_id(patient: int) -> str:
    """3-digit case id of patient index `patient` (0 -> "004")."""
    return f"{FIRST_CASE_ID + patient:03d}"


def odd_volume(patients: int, weeks: int) -> tuple[int, int] | None:
    """(patient index, week) of the one 144-slice volume: the second patient's Week1 when both exist (the real
    study's odd one is Case_019_Week1), else the second patient's Week0 or the only patient's Week1; None for 1."""
    return (min(1, patients - 1), min(1, weeks - 1)) if patients * weeks > 1 else None


def split_patients(patients: int, seed: int) -> dict[str, list[int]]:
    """2D layout: patient indices into train/validate/test ~80/10/10 by a seeded shuffle, each split non-empty."""
    order = np.random.default_rng([seed, 2]).permutation(patients).tolist()
    hold = max(1, round(0.1 * patients))
    return {"train": sorted(order[2 * hold:]), "validate": sorted(order[hold:2 * hold]), "test": sorted(order[:hold])}


def volume_paths(root: Path, naming: str, patient: int, week: int) -> tuple[Path, Path]:
    """3D (image, label) paths in the anonymised ("anon") or B-numbered ("b") naming of the real study."""
    cid = case_id(patient)
    if naming == "anon":
        return (root / "semantic_MRs_anon" / f"Case_{cid}_Week{week}_LFOV.nii.gz",
                root / "semantic_labels_anon" / f"Case_{cid}_Week{week}_SEMANTIC_LFOV.nii.gz")
    return (root / "semantic_MRs" / f"B{cid}_Week{week}_LFOV.nii.gz",
            root / "semantic_labels_only" / f"B{cid}_Week{week}_SEMANTIC.nii.gz")


def slice_paths(root: Path, split: str, patient: int, week: int, index: int) -> tuple[Path, Path]:
    """2D (image, label) paths of one slice, e.g. keras_slices_train/case_004_week_0_slice_0.nii.gz."""
    cid = case_id(patient)
    return (root / f"keras_slices_{split}" / f"case_{cid}_week_{week}_slice_{index}.nii.gz",
            root / f"keras_slices_seg_{split}" / f"seg_{cid}_week_{week}_slice_{index}.nii.gz")


def slice_band(ny: int) -> tuple[int, int]:
    """Rows (start, stop) along y of the 60 central axial slices the 2D layout keeps."""
    start = max(0, ny // 2 - SLICES_PER_VOLUME // 2)
    return start, min(ny, start + SLICES_PER_VOLUME)


def _nifti_gz(data: np.ndarray, affine: np.ndarray) -> bytes:
    """NIfTI-1 bytes with qform/sform (code 1, scanner) and mm units, gzipped with mtime 0 so equal inputs give
    byte-identical files. Run-length deflate: ~2x faster than gzip level 1 and only ~5% larger on noisy images."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
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
    patient: int
    week: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    split: str | None
    singleton: bool  # 2D: store the slices as (H, W, 1), a quirk of some real files


def _write_case(task: _Task) -> list[int]:
    """Generate one volume, write its file(s) and return its label voxel counts per class."""
    anatomy = make_patient(np.random.default_rng([task.seed, task.patient]))
    seed = int(np.random.SeedSequence([task.seed, task.patient, task.week]).generate_state(1)[0])
    rows = slice_band(task.shape[1]) if task.layout == "2d" else None
    image, label, affine = make_volume(anatomy, task.week, seed, task.shape, task.spacing, rows)
    image = np.rint(image)
    if task.layout == "3d":
        image_path, label_path = volume_paths(task.root, task.naming, task.patient, task.week)
        image_path.write_bytes(_nifti_gz(np.clip(image, 0, 32767).astype(np.int16), affine))
        label_path.write_bytes(_nifti_gz(label, affine))
    else:
        image, label_float = image.astype(np.float32), label.astype(np.float32)
        for k in range(image.shape[1]):
            # A slice keeps the volume's 3D geometry: axes (x, z, y), origin moved to its row.
            slice_affine = affine[:, [0, 2, 1, 3]]
            slice_affine[:3, 3] += k * affine[:3, 1]
            pair = (image[:, k, :], label_float[:, k, :])
            for path, data in zip(slice_paths(task.root, task.split, task.patient, task.week, k), pair):
                path.write_bytes(_nifti_gz(data[..., None] if task.singleton else data, slice_affine))
    return np.bincount(label.ravel(), minlength=6).tolist()


def _check_arguments(layout, patients, weeks, seed, naming, workers, shape) -> None:
    """Raise ValueError with a one-line message for arguments that cannot make a data set."""
    problems = [
        (layout not in ("2d", "3d"), f"layout must be '2d' or '3d', not {layout!r}"),
        (naming not in ("anon", "b"), f"naming must be 'anon' or 'b', not {naming!r}"),
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


def _plan(root: Path, layout: str, naming: str, patients: int, weeks: int, seed: int, shape) -> list[_Task]:
    splits = split_patients(patients, seed) if layout == "2d" else {}
    split_of = {p: name for name, members in splits.items() for p in members}
    odd = odd_volume(patients, weeks)
    odd_shape = (*shape[:2], shape[2] + round(shape[2] * ODD_EXTRA_Z / VOLUME_SHAPE[2]))
    spacing = default_spacing(shape)
    # Every 10th volume, from the third on, has the trailing-singleton quirk (2D only).
    return [_Task(root, layout, naming, seed, p, w, odd_shape if (p, w) == odd else tuple(shape), spacing,
                  split_of.get(p), layout == "2d" and (p * weeks + w) % 10 == 2)
            for p in range(patients) for w in range(weeks)]


def _case_key(task: _Task) -> str:
    cid = case_id(task.patient)
    if task.layout == "2d":
        return f"case_{cid}_week_{task.week}"
    return f"Case_{cid}_Week{task.week}" if task.naming == "anon" else f"B{cid}_Week{task.week}"


def _summary(tasks: list[_Task], counts: np.ndarray, **arguments) -> dict:
    from utils import CLASS_NAMES  # utils imports torch: only here, never in the workers

    total = counts.sum(0)
    splits = {s: sorted({case_id(t.patient) for t in tasks if t.split == s}) for s in SPLITS}
    return {**arguments, "volumes": len(tasks),
            "files": 2 * len(tasks) * (SLICES_PER_VOLUME if arguments["layout"] == "2d" else 1),
            "spacing_mm": list(tasks[0].spacing),
            "odd_volume": next((_case_key(t) for t in tasks if t.shape != tasks[0].shape), None),
            "singleton_volumes": [_case_key(t) for t in tasks if t.singleton],
            "splits": splits if arguments["layout"] == "2d" else None,
            "class_voxels": {n: int(c) for n, c in zip(CLASS_NAMES, total)},
            "class_shares": {n: round(float(c / total.sum()), 6) for n, c in zip(CLASS_NAMES, total)}}


def write_dataset(out: Path, layout: str = "2d", patients: int = 12, weeks: int = 2, seed: int = 0,
                  naming: str = "anon", workers: int | None = None, shape: tuple[int, int, int] | None = None) -> dict:
    """Write a phantom data set into the new folder `out` and return its summary (also saved as COMPLETE_MARKER).

    3D: semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz (int16) + semantic_labels_anon/..._SEMANTIC_LFOV.nii.gz
    (uint8), or with naming "b" semantic_MRs/B004_Week0_LFOV.nii.gz + semantic_labels_only/B004_Week0_SEMANTIC.nii.gz.
    2D: keras_slices_{train,validate,test}/case_004_week_0_slice_K.nii.gz (float32, (256, 128) or (256, 128, 1))
    + keras_slices_seg_*/seg_004_week_0_slice_K.nii.gz (float32 0.0..5.0), split by patient.
    `shape` (tests only) makes smaller volumes of the same field of view (coarser voxels). Everything is written
    into a hidden sibling folder that is renamed to `out` when complete. Raises ValueError for bad arguments and
    OSError for an unusable `out`.
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
        tasks = _plan(staging, layout, naming, patients, weeks, seed, shape)
        for folder in {p.parent for t in tasks for p in _first_paths(t)}:
            folder.mkdir(parents=True, exist_ok=True)
        counts = np.array(_run(tasks, workers or min(2, os.cpu_count() or 1)), dtype=np.int64)
        summary = _summary(tasks, counts, layout=layout, naming=naming if layout == "3d" else None,
                           patients=patients, weeks=weeks, seed=seed, shape=list(shape))
        (staging / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _first_paths(task: _Task) -> tuple[Path, Path]:
    if task.layout == "3d":
        return volume_paths(task.root, task.naming, task.patient, task.week)
    return slice_paths(task.root, task.split, task.patient, task.week, 0)


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
    """(title, image 2D, label 2D, aspect) for imshow(origin="lower"): axial at the bladder and the prostate,
    coronal and mid-sagittal through the prostate. Axial/coronal show the patient's right on the left."""
    sx, sy, sz = spacing
    centre = [int(np.mean(i)) for i in np.nonzero(label == PROSTATE)]
    bladder_y = int(np.mean(np.nonzero(label == BLADDER)[1]))
    views = [(f"axial y={y}", image[:, y, :].T, label[:, y, :].T, sz / sx) for y in (bladder_y, centre[1])]
    views.append((f"coronal z={centre[2]}", image[:, :, centre[2]].T, label[:, :, centre[2]].T, sy / sx))
    views.append((f"sagittal x={centre[0]} (anterior left)", image[centre[0], :, ::-1], label[centre[0], :, ::-1],
                  sy / sz))
    return views


def write_preview(path: Path, seed: int = 0) -> None:
    """PNG montage of the first patient's Week0 volume (as `write_dataset` makes it for `seed`): axial, coronal
    and sagittal views in grey-scale (top row) and with the label overlay and a legend (bottom row)."""
    anatomy = make_patient(np.random.default_rng([seed, 0]))
    volume_seed = int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0])
    image, label, _ = make_volume(anatomy, 0, volume_seed)
    sx, sy, sz = default_spacing()
    title = f"phantom case {case_id(0)} Week0 (seed {seed}): T2-like, {VOLUME_SHAPE} voxels of {sx} x {sy} x {sz} mm"
    _draw_preview(Path(path), image, label, (sx, sy, sz), title)


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
                        help="2d: keras_slices_* folders of axial slices; 3d: semantic_MRs* volumes (default 2d)")
    parser.add_argument("--patients", type=int, default=12, help="number of patients (2D: at least 3)")
    parser.add_argument("--weeks", type=int, default=2, help=f"weekly scans per patient, 1..{MAX_WEEKS}")
    parser.add_argument("--seed", type=int, default=0, help="same arguments and seed give byte-identical files")
    parser.add_argument("--naming", choices=("anon", "b"), default="anon",
                        help="3D file naming: Case_004_Week0_LFOV (anon) or B004_Week0_LFOV (b)")
    parser.add_argument("--preview", type=Path, help="also write a PNG montage of the first volume with labels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default min(2, CPUs))")
    return parser


def _report(out: Path, summary: dict, seconds: float) -> None:
    print(f"wrote {summary['layout']} phantom to {out}: {summary['patients']} patients x {summary['weeks']} weeks = "
          f"{summary['volumes']} volumes, {summary['files']} files in {seconds:.1f} s")
    print(f"voxel size {' x '.join(f'{s:g}' for s in summary['spacing_mm'])} mm; odd 144-slice volume: "
          f"{summary['odd_volume']}")
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
