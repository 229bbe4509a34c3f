"""HipMRI data: find and pair files, read and check them, preprocess them, split 3D scans by patient.

Layouts (see DESIGN.md "The data"); `detect_layout` tells them apart and `find_pairs` pairs files by
the case/week/slice parsed from their names, never by sorted position:

    2D  ROOT/keras_slices_{train,validate,test}/case_004_week_0_slice_7.nii.gz
        ROOT/keras_slices_seg_{train,validate,test}/seg_004_week_0_slice_7.nii.gz
    3D  ROOT/semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz
        ROOT/semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz
    or  ROOT/semantic_MRs/B006_Week0_LFOV.nii.gz
        ROOT/semantic_labels_only/B006_Week0_SEMANTIC.nii.gz

A *case* is one scan (patient + week). In 2D its slices are stacked in slice order into (n_slices, H, W);
in 3D it is the (X, Y, Z) volume in nibabel's axis order. `preprocess_image` is the one preprocessing of an
image, for training and prediction alike; cache.py decodes a split once through it into a memory-mapped
cache (`cache.load_split`). Batches come from sampling.py; `python dataset.py check DATA_DIR` prints the
integrity report of datacheck.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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

from utils import NUM_CLASSES, setup_logging, write_json

__all__ = ["DataConfig", "DataError", "Pair", "detect_layout", "find_pairs", "geometry_mismatch", "load_split_file",
           "main", "normalise", "preprocess_image", "read_image", "read_label", "resize_slices", "save_split",
           "split_by_patient", "voxel_spacing"]

log = logging.getLogger("hipmri.dataset")

SPLITS = ("train", "validate", "test")
LISTED = 5  # offending files named in an error message before "... and N more"
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


class DataError(Exception):
    """Bad or missing input data; the message names the file(s) and the problem."""


# ---------------------------------------------------------------- find and pair


@dataclass(frozen=True)
class Pair:
    """One image file and its label file (None for unlabelled input)."""

    key: str  # "case_004_week_0_slice_7" (2D) or "Case_004_Week0" / "B006_Week0" (3D); unique within a split
    case_id: str  # patient id as written in the name, e.g. "004"
    week: int
    slice_index: int | None  # 2D only
    image: Path
    label: Path | None

    @property
    def case_key(self) -> str:
        """The scan this file belongs to: "case_004_week_0" (2D) or the 3D key."""
        return self.key if self.slice_index is None else self.key.rsplit("_slice_", 1)[0]


@dataclass(frozen=True)
class _Naming:
    """Where one layout keeps images and labels, how their names parse, and how keys are written."""

    image_dir: str
    label_dir: str
    image_re: re.Pattern
    label_re: re.Pattern
    key_format: str  # str.format with case, week (and slice)


_NII = r"\.nii(?:\.gz)?$"
_NAMINGS_3D = {
    "anon": _Naming("semantic_MRs_anon", "semantic_labels_anon", re.compile(r"Case_(\d+)_Week(\d+)_LFOV" + _NII, re.I),
                    re.compile(r"Case_(\d+)_Week(\d+)_SEMANTIC_LFOV" + _NII, re.I), "Case_{case}_Week{week}"),
    "b": _Naming("semantic_MRs", "semantic_labels_only", re.compile(r"B(\d+)_Week(\d+)_LFOV" + _NII, re.I),
                 re.compile(r"B(\d+)_Week(\d+)_SEMANTIC" + _NII, re.I), "B{case}_Week{week}"),
}


def _naming_2d(split: str) -> _Naming:
    return _Naming(f"keras_slices_{split}", f"keras_slices_seg_{split}",
                   re.compile(r"case_(\d+)_week_(\d+)_slice_(\d+)" + _NII, re.I),
                   re.compile(r"seg_(\d+)_week_(\d+)_slice_(\d+)" + _NII, re.I),
                   "case_{case}_week_{week}_slice_{slice}")


def _listing(paths: Sequence[str | Path], limit: int = LISTED) -> str:
    """'a, b, c' or 'a, b, c, ... and 7 more' for error messages."""
    names = [str(p) for p in paths]
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _layouts_present(data_dir: Path) -> dict[str, _Naming | None]:
    found: dict[str, _Naming | None] = {}
    if any((data_dir / _naming_2d(s).image_dir).is_dir() for s in SPLITS):
        found["2d"] = None
    for name, naming in _NAMINGS_3D.items():
        if (data_dir / naming.image_dir).is_dir():
            found[f"3d-{name}"] = naming
    return found


def detect_layout(data_dir: str | Path) -> str:
    """"2d" or "3d" from the folders under `data_dir`; DataError if none (or more than one) is found."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder (pass the HipMRI root with --data-dir)")
    found = _layouts_present(data_dir)
    if not found:
        wanted = ["keras_slices_train/", *(n.image_dir + "/" for n in _NAMINGS_3D.values())]
        raise DataError(f"{data_dir}: no HipMRI layout found (looked for {', '.join(wanted)}); "
                        f"pass the folder that holds them")
    if len(found) > 1:
        raise DataError(f"{data_dir}: holds several layouts ({', '.join(found)}); point --data-dir at a folder "
                        f"with only one of them")
    layout = next(iter(found))
    return layout.split("-")[0]


def _naming_3d(data_dir: Path) -> _Naming:
    return next(n for n in _layouts_present(data_dir).values() if n is not None)


def _index_folder(folder: Path, pattern: re.Pattern, problems: dict[str, list[str]]) -> dict[tuple, Path]:
    """Parsed (case, week[, slice]) numbers -> file; duplicates and unrecognised NIfTI names go to `problems`."""
    found: dict[tuple, list[Path]] = defaultdict(list)
    if not folder.is_dir():
        problems["missing folder"].append(str(folder))
        return {}
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found[tuple(int(g) for g in match.groups())].append(path)
        elif re.search(_NII, path.name, re.I):
            problems["unrecognised file name"].append(str(path))
    for paths in found.values():
        if len(paths) > 1:
            problems["duplicate key"].append(" and ".join(sorted(str(p) for p in paths)))
    return {k: sorted(v)[0] for k, v in found.items()}


def _scan(data_dir: Path, naming: _Naming, require_labels: bool) -> tuple[list[Pair], dict[str, list[str]]]:
    """All pairs of one layout folder pair, sorted by (patient, week, slice), and what is wrong with them."""
    problems: dict[str, list[str]] = defaultdict(list)
    images = _index_folder(data_dir / naming.image_dir, naming.image_re, problems)
    labels = _index_folder(data_dir / naming.label_dir, naming.label_re, problems) if (
        require_labels or (data_dir / naming.label_dir).is_dir()) else {}
    if require_labels:
        problems["image without label"] += [str(images[k]) for k in sorted(images.keys() - labels.keys())]
    problems["label without image"] += [str(labels[k]) for k in sorted(labels.keys() - images.keys())]
    pairs = []
    for numbers in sorted(images):
        case_id = naming.image_re.fullmatch(images[numbers].name).group(1)
        week, slice_index = numbers[1], (numbers[2] if len(numbers) > 2 else None)
        key = naming.key_format.format(case=case_id, week=week, slice=slice_index)
        pairs.append(Pair(key, case_id, week, slice_index, images[numbers], labels.get(numbers)))
    if not pairs and (data_dir / naming.image_dir).is_dir():
        problems["empty split"].append(f"{data_dir / naming.image_dir} (no file matches {naming.image_re.pattern})")
    return pairs, {k: v for k, v in problems.items() if v}


def _raise_problems(problems: dict[str, list[str]]) -> None:
    lines = [f"{kind} ({len(items)}): {_listing(items)}" for kind, items in problems.items()]
    raise DataError("; ".join(lines) + ". Fix or remove these files (run `python dataset.py check DIR` for a report)")


def find_pairs(data_dir: str | Path, split: str | None = None, require_labels: bool = True) -> list[Pair]:
    """Image/label pairs sorted by (patient, week, slice).

    2D: `split` is "train", "validate" or "test" (the folders on disk). 3D: all pairs (`split` must be None;
    use `split_by_patient`). Unrecognised NIfTI names are logged and skipped; unpaired files, duplicate keys,
    a missing folder or an empty split raise DataError listing the files.
    """
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    if layout == "2d":
        if split not in SPLITS:
            raise DataError(f"{data_dir}: 2D layout; split must be one of {', '.join(SPLITS)}, not {split!r}")
        naming = _naming_2d(split)
    elif split is not None:
        raise DataError(f"{data_dir}: 3D layout has no split folders; call find_pairs(dir, None) and split_by_patient")
    else:
        naming = _naming_3d(data_dir)
    pairs, problems = _scan(data_dir, naming, require_labels)
    skipped = problems.pop("unrecognised file name", [])
    if skipped:
        log.warning("skipping %d NIfTI file(s) whose names do not follow the layout: %s", len(skipped),
                    _listing(skipped))
    if problems:
        _raise_problems(problems)
    return pairs


# ---------------------------------------------------------------- read and preprocess


def _load(path: Path, spatial_dims: int | None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decoded voxels (scl_slope/inter applied, trailing singleton axes dropped) as float32, and the image."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: unreadable or corrupt NIfTI ({type(exc).__name__}: {exc}); "
                        f"re-copy or re-download it") from exc
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
    data, _ = _load(Path(path), spatial_dims)
    rounded = np.round(data)
    off = ~np.isfinite(data) | (np.abs(data - rounded) > 1e-3) | (rounded < 0) | (rounded >= NUM_CLASSES)
    if off.any():
        values = np.unique(data[off])
        raise DataError(f"{path}: label values outside the classes 0..{NUM_CLASSES - 1}: "
                        f"{_listing([f'{v:g}' for v in values], 8)} ({int(off.sum())} voxels); "
                        f"this is not a HipMRI label file or it was resampled with interpolation")
    return rounded.astype(np.uint8)


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


def geometry_mismatch(image: nib.spatialimages.SpatialImage, label: nib.spatialimages.SpatialImage) -> str:
    """How a label file's geometry differs from its image's, or "" when they overlay voxel for voxel.

    Compares, from the two affines (nibabel's voxel -> world mm): orientation codes (`nib.aff2axcodes`, e.g. LPS),
    voxel spacing (column norms, within SPACING_TOLERANCE_MM) and origin (within ORIGIN_TOLERANCE_MM), as
    nnU-Net's dataset integrity check compares origin, spacing and direction. The array shapes are compared
    elsewhere (after trailing singleton axes are dropped). Example: a label re-exported mirrored along x with
    its affine adjusted overlays in a viewer but trains mirrored; it gives "label orientation RPS, image LPS; ...".
    """
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
    problems = []
    codes_a, codes_b = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
    if codes_a != codes_b:
        problems.append(f"label orientation {codes_b}, image {codes_a}")
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(spacing_a, spacing_b, rtol=0, atol=SPACING_TOLERANCE_MM):
        problems.append(f"label spacing {' x '.join(f'{s:.4g}' for s in spacing_b)} mm, image "
                        f"{' x '.join(f'{s:.4g}' for s in spacing_a)} mm")
    if not np.allclose(a[:3, 3], b[:3, 3], rtol=0, atol=ORIGIN_TOLERANCE_MM):
        problems.append(f"label origin ({', '.join(f'{v:.2f}' for v in b[:3, 3])}) mm, image "
                        f"({', '.join(f'{v:.2f}' for v in a[:3, 3])}) mm")
    if not problems and not np.allclose(a[:3, :3] / spacing_a, b[:3, :3] / spacing_b, rtol=0, atol=1e-4):
        problems.append("label and image axes point in different directions (same orientation codes, oblique)")
    return "; ".join(problems)


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
        raise DataError(f"{split_file}: lists scans not found in {data_dir}: {_listing(missing)}; "
                        f"is this the data the split was drawn from?")
    unused = known - {k for keys in splits.values() for k in keys}
    if unused:
        log.warning("%d scan(s) in %s are in no split of %s: %s", len(unused), data_dir, split_file,
                    _listing(sorted(unused)))
    return splits


# ---------------------------------------------------------------- check CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`python dataset.py check DATA_DIR`: exit 0 when clean, 1 when problems were found, 2 on bad usage;
    `python dataset.py export-nnunet ...`: see nnunet_export.run."""
    parser = argparse.ArgumentParser(prog="dataset.py", description="HipMRI data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read every file and print an integrity report")
    check.add_argument("data_dir", type=Path, help="HipMRI root (2D keras_slices_* or a 3D layout)")
    check.add_argument("--workers", type=int, default=None, help="reading processes (default: min(2, cores))")
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
    import datacheck  # here, not at the top: datacheck imports this module

    return datacheck.print_report(args.data_dir, args.workers)


if __name__ == "__main__":
    sys.exit(main())
