"""HipMRI data: read and check NIfTI files, preprocess them, split 3D scans by patient; `python dataset.py check`.

Layouts, namings and pairing files by name live in layouts.py (`resolve_layout`, `find_pairs`, `Pair`,
`DataError`), re-exported here. A *case* is one scan (patient + week). In 2D its slices are stacked in slice
order into (n_slices, H, W), and written as one volume they are (H, n_slices, W) (`scan_volume`, `stack_affine`);
in 3D it is the (X, Y, Z) volume in nibabel's axis order. `read_pair` reads an image and its label and checks
that they overlay (shape, orientation, spacing, origin). `preprocess_image` is the one preprocessing of an image,
for training and prediction alike; cache.py decodes a split once through it into a memory-mapped cache
(`cache.load_split`). Batches come from sampling.py; `python dataset.py check DATA_DIR` prints the integrity report
of datacheck.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from tqdm import tqdm

from layouts import (  # the find-and-pair API lives in layouts.py; it is re-exported here for its users
    SPLITS,
    DataError,
    Pair,
    detect_layout,
    find_pairs,
    listing,
    nifti_stem,
    resolve_layout,
    scan_naming,
)
from utils import NUM_CLASSES, setup_logging, write_json

__all__ = ["SCAN_VOLUME_AXES", "SPLITS", "DataConfig", "DataError", "Pair", "default_workers", "detect_layout",
           "find_pairs", "geometry_mismatch", "listing", "load_split_file", "main", "normalise", "pair_mismatch",
           "preprocess_image", "read_image", "read_label", "read_pair", "resize_slices", "resolve_layout",
           "save_split", "scan_naming", "scan_slices", "scan_volume", "split_by_patient", "stack_affine",
           "voxel_spacing"]

log = logging.getLogger("hipmri.dataset")

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI2_HEADER_BYTES = 540


# ---------------------------------------------------------------- read and preprocess


def _misnamed_compression(path: Path) -> str:
    """Why a file nibabel could not read may be fine after a rename: a .nii.gz name on plain NIfTI bytes, or a
    .nii name on gzip bytes (told apart by the first bytes); "" when neither."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_NIFTI2_HEADER_BYTES)
    except OSError:
        return ""
    gzipped, named_gz = head.startswith(_GZIP_MAGIC), path.name.lower().endswith(".gz")
    if named_gz and not gzipped and _is_nifti_header(head):
        return (f"{path}: an uncompressed NIfTI file with a .gz name; rename it to {nifti_stem(path.name)}.nii "
                f"(or gzip it)")
    if gzipped and not named_gz:
        return f"{path}: gzip-compressed bytes with a .nii name; rename it to {path.name}.gz"
    return ""


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (348-byte header, magic "n+1"/"ni1" at byte 344) or NIfTI-2 (540 bytes, "n+2"/"ni2" at byte 4),
    either byte order."""
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    return (348 in sizes and head[344:347] in (b"n+1", b"ni1")) or (540 in sizes and head[4:7] in (b"n+2", b"ni2"))


def _load(path: Path, spatial_dims: int | None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decoded voxels (scl_slope/inter applied, trailing singleton axes dropped) as float32, and the image."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as exc:
        raise DataError(_misnamed_compression(path) or f"{path}: unreadable or corrupt NIfTI "
                        f"({type(exc).__name__}: {exc}); re-copy or re-download it") from exc
    keep = spatial_dims or 2
    while data.ndim > keep and data.shape[-1] == 1:
        data = data[..., 0]
    if spatial_dims is not None and data.ndim != spatial_dims:
        raise DataError(f"{path}: shape {data.shape} is not {spatial_dims}D")
    return data, img


def read_image(path: str | Path, spatial_dims: int | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Image voxels float32 in the file's axis order (x, y[, z]) with trailing singleton axes dropped, and the
    nibabel image (for header/affine). DataError naming the file if it is unreadable or holds NaN/Inf."""
    data, img = _load(Path(path), spatial_dims)
    bad = data.size - int(np.isfinite(data).sum())
    if bad:
        raise DataError(f"{path}: {bad} NaN/Inf voxel(s) in the image; fix or remove this file")
    return data, img


def read_label(path: str | Path, spatial_dims: int | None = None) -> np.ndarray:
    """Label voxels as uint8 0..NUM_CLASSES-1 (floats such as 5.0 are rounded); DataError naming the file and
    the values found if any value is not an integer class."""
    return _classes(Path(path), _load(Path(path), spatial_dims)[0])


def _classes(path: Path, data: np.ndarray) -> np.ndarray:
    rounded = np.round(data)
    off = ~np.isfinite(data) | (np.abs(data - rounded) > 1e-3) | (rounded < 0) | (rounded >= NUM_CLASSES)
    if off.any():
        values = np.unique(data[off])
        raise DataError(f"{path}: label values outside the classes 0..{NUM_CLASSES - 1}: "
                        f"{listing([f'{v:g}' for v in values], 8)} ({int(off.sum())} voxels); "
                        f"this is not a HipMRI label file or it was resampled with interpolation")
    return rounded.astype(np.uint8)


def read_pair(pair: Pair, spatial_dims: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """`read_image` of pair.image, `read_label` of pair.label (None when it has none) and the image's nibabel
    image; DataError naming both files when the label does not overlay the image (`pair_mismatch`)."""
    image, img = read_image(pair.image, spatial_dims)
    if pair.label is None:
        return image, None, img
    data, label_img = _load(pair.label, spatial_dims)
    label = _classes(pair.label, data)
    mismatch = pair_mismatch(pair, image.shape, img, label.shape, label_img)
    if mismatch:
        raise DataError(mismatch)
    return image, label, img


def pair_mismatch(pair: Pair, image_shape: tuple[int, ...], image_img: nib.spatialimages.SpatialImage,
                  label_shape: tuple[int, ...], label_img: nib.spatialimages.SpatialImage) -> str:
    """"" when a label overlays its image voxel for voxel: same array shape (trailing singleton axes dropped)
    and same geometry (`geometry_mismatch`: orientation, spacing, origin); else a message naming both files and
    what differs. The one comparison of a pair, for the check, the cache build and anything that reads pairs."""
    if tuple(label_shape) != tuple(image_shape):
        return f"shape mismatch: image {pair.image} is {tuple(image_shape)}, label {pair.label} is {tuple(label_shape)}"
    differs = geometry_mismatch(image_img, label_img)
    if not differs:
        return ""
    unknown = [str(path) for path, img in ((pair.image, image_img), (pair.label, label_img)) if _no_geometry(img)]
    verb = "stores" if len(unknown) == 1 else "store"
    note = f"; {' and '.join(unknown)} {verb} no orientation (qform and sform codes 0)" if unknown else ""
    return (f"geometry mismatch: {differs} (image {pair.image}, label {pair.label}){note}; the label does not lie "
            f"on the image's voxels, so training or scoring with it would use the wrong ones: re-export it on the "
            f"image's voxel grid and affine")


def _no_geometry(img: nib.spatialimages.SpatialImage) -> bool:
    header = img.header
    codes = [int(header[name]) for name in ("qform_code", "sform_code") if name in header]
    return bool(codes) and not any(codes)


def voxel_spacing(img: nib.Nifti1Image) -> tuple[tuple[float, float, float], bool]:
    """(sx, sy, sz) in mm along the file's x, y, z axes, and whether sz had to be assumed.

    A 2D slice file stores only two zooms; its slice spacing comes from the affine when the header has one
    (sform/qform code > 0), else 1.0 mm is assumed (flagged by the second return value).
    """
    zooms = [round(float(z), 6) for z in img.header.get_zooms()[:3]]  # float32 in the header: drop its noise
    if len(zooms) >= 3:
        return (zooms[0], zooms[1], zooms[2]), False
    header = img.header
    if max(int(header["sform_code"]), int(header["qform_code"])) > 0:
        third = round(float(np.linalg.norm(img.affine[:3, 2])), 6)
        return (zooms[0], zooms[1], third if third > 0 else 1.0), third <= 0
    return (zooms[0], zooms[1], 1.0), True


# Tolerances for `geometry_mismatch`, in mm (the real pairs agree exactly; float32 headers carry ~1e-5 noise).
SPACING_TOLERANCE_MM = 1e-3
ORIGIN_TOLERANCE_MM = 1e-2


def geometry_mismatch(image: nib.spatialimages.SpatialImage, label: nib.spatialimages.SpatialImage,
                      names: tuple[str, str] = ("image", "label")) -> str:
    """How a label file's geometry differs from its image's, or "" when they overlay voxel for voxel.

    Compares, from the two affines (nibabel's voxel -> world mm): orientation codes (`nib.aff2axcodes`, e.g. LPS),
    voxel spacing (column norms, within SPACING_TOLERANCE_MM) and origin (within ORIGIN_TOLERANCE_MM), as
    nnU-Net's dataset integrity check compares origin, spacing and direction. The array shapes are compared
    elsewhere (after trailing singleton axes are dropped). Example: a label re-exported mirrored along x with
    its affine adjusted overlays in a viewer but trains mirrored; it gives "label orientation RPS, image LPS; ...".
    `names` words the two roles otherwise, e.g. ("label", "mask") when a mask is judged against its label.
    """
    image_name, label_name = names
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
    problems = []
    codes_a, codes_b = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
    if codes_a != codes_b:
        problems.append(f"{label_name} orientation {codes_b}, {image_name} {codes_a}")
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(spacing_a, spacing_b, rtol=0, atol=SPACING_TOLERANCE_MM):
        problems.append(f"{label_name} spacing {' x '.join(f'{s:.4g}' for s in spacing_b)} mm, {image_name} "
                        f"{' x '.join(f'{s:.4g}' for s in spacing_a)} mm")
    if not np.allclose(a[:3, 3], b[:3, 3], rtol=0, atol=ORIGIN_TOLERANCE_MM):
        problems.append(f"{label_name} origin ({', '.join(f'{v:.2f}' for v in b[:3, 3])}) mm, {image_name} "
                        f"({', '.join(f'{v:.2f}' for v in a[:3, 3])}) mm")
    if not problems and not np.allclose(a[:3, :3] / spacing_a, b[:3, :3] / spacing_b, rtol=0, atol=1e-4):
        problems.append(f"{label_name} and {image_name} axes point in different directions (same orientation codes, "
                        f"oblique)")
    return "; ".join(problems)


# A 2D scan as one volume: its slice files stacked on axis 1 in slice order, (H, n_slices, W) with
# vol[:, j, :] = slice file j, as the slices were cut from the study's volumes. The (n, H, W) stack <-> (H, n, W)
# volume swap is its own inverse. nnunet_export writes scans so; predict.py --score reads them so.
SCAN_VOLUME_AXES = (1, 0, 2)


def scan_volume(stack: np.ndarray) -> np.ndarray:
    """A 2D scan's slices stacked (n_slices, H, W) -> its volume (H, n_slices, W), vol[:, j, :] = slice j (a view)."""
    return stack.transpose(SCAN_VOLUME_AXES)


def scan_slices(volume: np.ndarray) -> np.ndarray:
    """A 2D scan's volume (H, n_slices, W) -> its slices stacked (n_slices, H, W) (a view); undoes `scan_volume`."""
    return volume.transpose(SCAN_VOLUME_AXES)


def stack_affine(affines: Sequence[np.ndarray], files: Sequence[Path | str]) -> np.ndarray:
    """Affine (4, 4) of the volume vol[:, j, :] = slice j (`scan_volume`), from the slices' affines (4, 4) in slice
    order.

    Columns: slice axis 0, the step between consecutive slice origins, slice axis 1; origin: slice 0's. When every
    slice has the same origin (headers without the through-plane position), the step is the slices' own third
    column (as `voxel_spacing` assumes) and a warning says so. DataError naming the file when the slices do not
    form one volume: other in-plane axes, origins off an evenly spaced line, or a step in the slice plane.
    """
    stack = np.stack([np.asarray(a, dtype=np.float64) for a in affines])
    in_plane = stack[:, :3][:, :, [0, 1]]
    off_axes = np.flatnonzero(np.abs(in_plane - in_plane[0]).max(axis=(1, 2)) > SPACING_TOLERANCE_MM)
    if off_axes.size:
        raise DataError(f"{files[off_axes[0]]}: in-plane axes differ from those of {files[0]}; these slices are "
                        f"not cut from one volume")
    origins = stack[:, :3, 3]
    if np.linalg.norm(origins - origins[0], axis=1).max() <= ORIGIN_TOLERANCE_MM:
        step = stack[0, :3, 2]
        log.warning("%s: all slices share one origin; stacking them %.4g mm apart along the header's third axis",
                    files[0], np.linalg.norm(step))
    else:
        step = (origins[-1] - origins[0]) / (len(origins) - 1)
        off_line = np.linalg.norm(origins - (origins[0] + np.arange(len(origins))[:, None] * step), axis=1)
        if off_line.max() > ORIGIN_TOLERANCE_MM:
            worst = int(off_line.argmax())
            raise DataError(f"{files[worst]}: its origin lies {off_line[worst]:.3g} mm off the evenly spaced line of "
                            f"the scan's other slices (from {files[0]}); slices missing, duplicated or out of order")
        header_step = np.linalg.norm(stack[0, :3, 2])
        if abs(np.linalg.norm(step) - header_step) > SPACING_TOLERANCE_MM:  # what voxel_spacing reads
            log.warning("%s: the slices lie %.4g mm apart but their headers' third axis is %.4g mm; the volume "
                        "uses their positions", files[0], np.linalg.norm(step), header_step)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = in_plane[0, :, 0], step, in_plane[0, :, 1], origins[0]
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(f"{files[0]}: the slices step along their own plane; they do not form a volume")
    return affine


def normalise(image: np.ndarray, clip_percentiles: tuple[float, float] | None = (0.5, 99.5),
              eps: float = 1e-6, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Z-score float32 of any shape: optional percentile clipping, then (x - mean) / max(std, eps).

    Statistics over `axes`: None, the whole image; (1, 2), each slice of an (n, H, W) stack on its own, as if
    normalised one by one. The epsilon keeps an all-constant image (or slice) finite: it becomes all zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    if clip_percentiles is not None:
        low, high = np.percentile(image, clip_percentiles, axis=axes, keepdims=True)
        image = np.clip(image, low, high)
    mean, std = image.mean(axis=axes, keepdims=True), image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.maximum(std, eps)).astype(np.float32)


def _resize_axis(array: np.ndarray, size: int, axis: int, nearest: bool) -> np.ndarray:
    """Resample one axis with pixel-centre alignment, as torch interpolate(align_corners=False) does."""
    old = array.shape[axis]
    if old == size:
        return array
    centres = (np.arange(size) + 0.5) * old / size - 0.5
    if nearest:  # torch's "nearest-exact"
        return np.take(array, np.clip(np.floor(centres + 0.5), 0, old - 1).astype(np.int64), axis=axis)
    centres = np.clip(centres, 0, old - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, old - 1)
    weight = (centres - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight


def resize_slices(stack: np.ndarray, size: tuple[int, int], is_label: bool) -> np.ndarray:
    """(n, H, W) -> (n, *size): images bilinear, labels nearest; matches torch F.interpolate(mode="bilinear" /
    "nearest-exact", align_corners=False), so predictions can be mapped back with torch the same way."""
    out = stack
    for axis, length in ((1, size[0]), (2, size[1])):
        out = _resize_axis(out, length, axis, nearest=is_label)
    return out.astype(stack.dtype, copy=False)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing settings; every field is part of the cache key."""

    target_size_2d: tuple[int, int] | None = (256, 128)  # (H, W) every 2D slice is resized to; None: keep native
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)  # clip intensities before z-scoring; None: no clip
    cache_dtype: str = "float16"  # cached image dtype, "float16" or "float32"; labels are always uint8
    eps: float = 1e-6  # z-score denominator floor
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # 3D patient shares of train/validate/test


def preprocess_image(image: np.ndarray, spatial_dims: int, cfg: DataConfig) -> np.ndarray:
    """What the cache stores for an image, as `cfg.cache_dtype`; prediction calls it too, so it sees what
    training saw.

    2D: an (n, H, W) stack of slices (one file is a stack of one) -> (n, *cfg.target_size_2d), resized
    bilinearly, then each slice z-scored on its own: a slice file preprocessed alone equals its slice in a
    cached stack. 3D: an (X, Y, Z) volume -> z-scored as a whole, native size.
    """
    if image.ndim != 3:
        raise ValueError(f"preprocess_image takes an (n, H, W) stack of 2D slices or an (X, Y, Z) volume, "
                         f"not shape {image.shape}")
    if spatial_dims == 2 and cfg.target_size_2d is not None:
        image = resize_slices(image, cfg.target_size_2d, is_label=False)
    axes = (1, 2) if spatial_dims == 2 else None
    return normalise(image, cfg.clip_percentiles, cfg.eps, axes).astype(cfg.cache_dtype)


MAX_DEFAULT_WORKERS = 8  # beyond this, decoding NIfTI is bound by the disk, and each worker holds a volume


def default_workers() -> int:
    """Reading processes by default: the cores this process may run on (its CPU affinity, e.g. a Slurm
    allocation, not the whole node), at most MAX_DEFAULT_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def parallel_map(function: Callable, tasks: list, workers: int, desc: str, unit: str) -> Iterator:
    """function(task) for each task in order, in `workers` processes (in this one when workers <= 1)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from tqdm(map(function, tasks), total=len(tasks), desc=desc, unit=unit, disable=None, leave=False)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(16, len(tasks) // (4 * workers)))
        yield from tqdm(pool.map(function, tasks, chunksize=chunk), total=len(tasks), desc=desc, unit=unit,
                        disable=None, leave=False)


# ---------------------------------------------------------------- splits (3D)


def split_by_patient(pairs: Iterable[Pair], seed: int, ratios: Sequence[float] = (0.8, 0.1, 0.1)
                     ) -> dict[str, list[str]]:
    """{"train": [case keys], "validate": [...], "test": [...]}: every week of a patient in one split.

    Deterministic from `seed` (patients sorted, then permuted). Each split with a non-zero ratio gets at least
    one patient when there are enough patients; the rest go to train.
    """
    weeks: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        weeks[pair.case_id].add(pair.case_key)
    patients = sorted(weeks)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    total = sum(ratios)
    counts = {}
    for name, ratio in zip(SPLITS[1:], ratios[1:]):
        counts[name] = max(1, round(ratio / total * len(patients))) if ratio > 0 else 0
    while sum(counts.values()) >= len(patients) and sum(counts.values()) > 0:  # too few patients: train first
        largest = max(reversed(SPLITS[1:]), key=lambda n: counts[n])
        counts[largest] -= 1
    chosen = {"validate": order[:counts["validate"]],
              "test": order[counts["validate"]:counts["validate"] + counts["test"]]}
    chosen["train"] = order[counts["validate"] + counts["test"]:]
    return {name: sorted(key for p in chosen[name] for key in weeks[p]) for name in SPLITS}


def save_split(path: str | Path, splits: dict[str, list[str]], seed: int, ratios: Sequence[float]) -> None:
    """Write split.json atomically: {"seed", "ratios", "splits": {name: [case keys]}}."""
    write_json(path, {"seed": seed, "ratios": list(ratios), "splits": splits})


def load_split_file(path: str | Path) -> dict[str, list[str]]:
    """Read what `save_split` wrote; DataError naming the file if it is not such a file."""
    try:
        splits = json.loads(Path(path).read_text())["splits"]
        return {name: list(splits[name]) for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a split file written by dataset.save_split ({exc}); "
                        f"delete it to draw a new split") from exc


def split_keys(data_dir: Path, pairs: list[Pair], split_file: Path | None, seed: int,
               ratios: Sequence[float]) -> dict[str, list[str]]:
    if split_file is not None and Path(split_file).exists():
        splits = load_split_file(split_file)
        log.info("using the patient split saved in %s", split_file)
    else:
        splits = split_by_patient(pairs, seed, ratios)
        if split_file is not None:
            save_split(split_file, splits, seed, ratios)
            log.info("drew a patient split (seed %d) and saved it to %s", seed, split_file)
    known = {p.case_key for p in pairs}
    missing = [k for keys in splits.values() for k in keys if k not in known]
    if missing:
        raise DataError(f"{split_file}: lists scans not found in {data_dir}: {listing(missing)}; "
                        f"is this the data the split was drawn from?")
    unused = known - {k for keys in splits.values() for k in keys}
    if unused:
        log.warning("%d scan(s) in %s are in no split of %s: %s", len(unused), data_dir, split_file,
                    listing(sorted(unused)))
    return splits


# ---------------------------------------------------------------- check CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`python dataset.py check DATA_DIR [--dims 2|3]`: exit 0 when clean, 1 when problems were found, 2 on bad
    usage; `python dataset.py export-nnunet ...`: see nnunet_export.run."""
    parser = argparse.ArgumentParser(prog="dataset.py", description="HipMRI data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read every file and print an integrity report")
    check.add_argument("data_dir", type=Path, help="HipMRI root (2D keras_slices_* or a 3D layout, or both)")
    check.add_argument("--dims", type=int, choices=(2, 3), default=None,
                       help="check only the 2D or the 3D layout (default: every layout found)")
    check.add_argument("--workers", type=int, default=None,
                       help=f"reading processes (default: the usable cores, at most {MAX_DEFAULT_WORKERS})")
    import nnunet_export  # here, not at the top: nnunet_export imports this module

    nnunet_export.add_parser(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 for --help; main returns the code instead
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging()
    if args.command == "export-nnunet":
        return nnunet_export.run(args)
    if not args.data_dir.is_dir():
        print(f"dataset.py check: {args.data_dir} is not a folder", file=sys.stderr)
        return 2
    import datacheck  # here, not at the top: datacheck reads files through this module

    return datacheck.print_report(args.data_dir, args.workers, args.dims)


if __name__ == "__main__":
    sys.exit(main())
