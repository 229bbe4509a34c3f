"""The data integrity report behind `python dataset.py check DATA_DIR`: read every file, never stop at the first
bad one, and list what is wrong (unreadable or corrupt files, bad label values, unpaired or duplicate names,
missing slices, mismatched shapes, patients in several splits) with a summary of shapes, dtypes, spacings and
class shares per split.

dataset.py's `main` imports this module when it runs: this module imports dataset, so dataset cannot import it
at its top.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

import dataset
from dataset import DataError, Pair
from utils import CLASS_NAMES, NUM_CLASSES

__all__ = ["check_data", "print_report"]


def _verify_gzip(path: Path) -> None:
    """DataError unless a .gz file decompresses to its end with a matching checksum. nibabel stops reading at
    the last voxel and so never sees the checksum: damage inside a stored (incompressible) block goes unnoticed."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({type(exc).__name__}: {exc}); re-copy or re-download it") \
            from exc


def _inspect_pair(task: tuple[Pair, int]) -> dict:
    """Worker for `check`: read one pair, never raise; collect shape, dtypes, spacing, label counts, problems."""
    pair, spatial_dims = task
    info: dict = {"problems": [], "shape": None, "disk_shape": None, "dtype": None, "label_dtype": None,
                  "spacing": None, "assumed_spacing": False, "counts": None}
    try:
        _verify_gzip(pair.image)
        image, img = dataset.read_image(pair.image, spatial_dims)
        info.update(shape=image.shape, disk_shape=img.shape, dtype=str(img.get_data_dtype()))
        info["spacing"], info["assumed_spacing"] = dataset.voxel_spacing(img)
    except DataError as exc:
        info["problems"].append(str(exc))
        image = None
    if pair.label is None:
        return info
    try:
        _verify_gzip(pair.label)
        label = dataset.read_label(pair.label, spatial_dims)
        info["label_dtype"] = str(nib.load(str(pair.label)).get_data_dtype())
        info["counts"] = np.bincount(label.ravel(), minlength=NUM_CLASSES)
        if image is not None and label.shape != image.shape:
            info["problems"].append(f"shape mismatch: image {pair.image} is {image.shape}, "
                                    f"label {pair.label} is {label.shape}")
    except DataError as exc:
        info["problems"].append(str(exc))
    return info


def _check_groups(data_dir: Path) -> tuple[int, dict[str, dataset._Naming]]:
    layout = dataset.detect_layout(data_dir)
    if layout == "3d":
        return 3, {"all scans": dataset._naming_3d(data_dir)}
    namings = {split: dataset._naming_2d(split) for split in dataset.SPLITS}
    return 2, {split: naming for split, naming in namings.items() if (data_dir / naming.image_dir).is_dir()}


def _slice_problems(pairs: list[Pair], infos: list[dict]) -> list[str]:
    """2D: every scan should hold slices 0..n-1 of one in-plane shape."""
    problems, by_case = [], defaultdict(list)
    for pair, info in zip(pairs, infos):
        by_case[pair.case_key].append((pair.slice_index, info["shape"]))
    for case, slices in sorted(by_case.items()):
        indices = sorted(s for s, _ in slices)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(max(indices) + 1)) - set(indices))
            problems.append(f"{case}: slice indices are not 0..{len(indices) - 1} "
                            f"(missing {dataset._listing(missing, 8)})")
        shapes = {shape for _, shape in slices if shape is not None}
        if len(shapes) > 1:
            problems.append(f"{case}: slices differ in shape {sorted(shapes)}")
    return problems


def _group_report(name: str, pairs: list[Pair], infos: list[dict]) -> list[str]:
    counts = sum((i["counts"] for i in infos if i["counts"] is not None), np.zeros(NUM_CLASSES, dtype=np.int64))
    shares = counts / max(int(counts.sum()), 1)
    patients = sorted({p.case_id for p in pairs})
    lines = [f"[{name}] {len(pairs)} files, {len({p.case_key for p in pairs})} scans, {len(patients)} patients"]
    for title, values in (("image shapes on disk", [i["disk_shape"] for i in infos]),
                          ("image dtypes", [i["dtype"] for i in infos]),
                          ("label dtypes", [i["label_dtype"] for i in infos]),
                          ("voxel spacings (mm, file x, y, z)",
                           [tuple(round(s, 4) for s in i["spacing"]) for i in infos if i["spacing"]])):
        seen = Counter(v for v in values if v is not None)
        lines.append(f"  {title}: " + (", ".join(f"{v} x{n}" for v, n in seen.most_common()) or "none readable"))
    assumed = sum(i["assumed_spacing"] for i in infos)
    if assumed:
        lines.append(f"  note: {assumed} file(s) give no slice spacing; 1.0 mm is assumed for them")
    lines.append(f"  label values: {[v for v in range(NUM_CLASSES) if counts[v]]}; class shares: "
                 + ", ".join(f"{CLASS_NAMES[c]} {100 * shares[c]:.2f}%" for c in range(NUM_CLASSES)))
    lines.append(f"  patients: {dataset._listing(patients, 40)}")
    return lines


def check_data(data_dir: str | Path, workers: int | None = None) -> tuple[list[str], list[str]]:
    """Read every file under `data_dir` and return (report lines, problems); DataError if no layout is found."""
    data_dir = Path(data_dir)
    spatial_dims, groups = _check_groups(data_dir)
    report = [f"layout: {spatial_dims}D ({', '.join(sorted({n.image_dir for n in groups.values()}))}) in {data_dir}"]
    problems: list[str] = []
    scanned = {}
    for name, naming in groups.items():
        pairs, found = dataset._scan(data_dir, naming, require_labels=True)
        scanned[name] = pairs
        problems += [f"{kind}: {item}" for kind, items in found.items() for item in items]
    tasks = [(pair, spatial_dims) for pairs in scanned.values() for pair in pairs]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    infos = iter(list(dataset.parallel_map(_inspect_pair, tasks, workers, "reading", "file")))
    patients = {}
    for name, pairs in scanned.items():
        group_infos = [next(infos) for _ in pairs]
        problems += [p for info in group_infos for p in info["problems"]]
        if spatial_dims == 2:
            problems += _slice_problems(pairs, group_infos)
        report += _group_report(name, pairs, group_infos)
        patients[name] = {p.case_id for p in pairs}
    if spatial_dims == 2:
        shared = sorted(p for p in set().union(*patients.values()) if sum(p in s for s in patients.values()) > 1)
        report.append(f"patients in more than one split: {dataset._listing(shared, 40) if shared else 'none'}")
        problems += [f"patient {p} is in several splits: " + ", ".join(n for n, s in patients.items() if p in s)
                     for p in shared]
    return report, problems


def print_report(data_dir: str | Path, workers: int | None = None) -> int:
    """Print `check_data`'s report, then its problems (no layout found counts as one); 1 if any, else 0.

    DataError is caught here rather than in dataset.main: run as a script, dataset.py is `__main__`, whose
    DataError is another class than the `dataset.DataError` raised by the functions this module calls.
    """
    try:
        report, problems = check_data(data_dir, workers)
    except DataError as exc:
        report, problems = [], [str(exc)]
    print("\n".join(report))
    print(f"problems: {len(problems)}" + "".join(f"\n  - {p}" for p in problems))
    return 1 if problems else 0
