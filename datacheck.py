"""The data integrity report behind `python dataset.py check DATA_DIR [--dims 2|3]`: read every file, never stop
at the first bad one, and list what is wrong (unreadable, corrupt or misnamed files, NIfTI files that follow no
naming or sit in the wrong folder, bad label values, unpaired or duplicate names, a patient number under two
letters, missing splits or slices, image/label shape or geometry mismatches, patients in several splits) with a
summary of shapes, dtypes, spacings and class shares per split. Without --dims it checks every layout found.

It judges pairs with the same functions that train.py and predict.py read them with (layouts.scan_naming,
dataset.read_pair's checks), so what is an error here is an error there. dataset.py's `main` imports this module
when it runs, never at import: this module reads through dataset.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

import dataset
from layouts import (
    DataError,
    FoundLayout,
    Naming,
    Pair,
    find_layouts,
    listing,
    patients_in_several_splits,
    resolve_layout,
    scan_naming,
)
from utils import CLASS_NAMES, NUM_CLASSES

__all__ = ["check_data", "print_report"]

_GZIP_MAGIC = b"\x1f\x8b"


def _verify_gzip(path: Path) -> None:
    """DataError unless a .gz file decompresses to its end with a matching checksum. nibabel stops reading at
    the last voxel and so never sees the checksum: damage inside a stored (incompressible) block goes unnoticed.
    A .gz name on bytes that are not gzip at all is left to the reader, which says what they are."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with open(path, "rb") as stream:
            if stream.read(2) != _GZIP_MAGIC:
                return
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
    image = img = None
    try:
        _verify_gzip(pair.image)
        image, img = dataset.read_image(pair.image, spatial_dims)
        info.update(shape=image.shape, disk_shape=img.shape, dtype=str(img.get_data_dtype()))
        info["spacing"], info["assumed_spacing"] = dataset.voxel_spacing(img)
    except DataError as exc:
        info["problems"].append(str(exc))
    if pair.label is None:
        return info
    try:
        _verify_gzip(pair.label)
        label = dataset.read_label(pair.label, spatial_dims)
        label_img = nib.load(str(pair.label))  # the header only: read_label has read the voxels
        info["label_dtype"] = str(label_img.get_data_dtype())
        info["counts"] = np.bincount(label.ravel(), minlength=NUM_CLASSES)
        if image is not None:
            mismatch = dataset.pair_mismatch(pair, image.shape, img, label.shape, label_img)
            info["problems"] += [mismatch] if mismatch else []
    except DataError as exc:
        info["problems"].append(str(exc))
    return info


def _layout_groups(found: FoundLayout) -> tuple[dict[str, Naming], list[str]]:
    """The groups of pairs to check ({split: naming} in 2D, {"all scans": naming} in 3D), and the 2D splits
    whose folders are missing altogether (train.py reads train and validate, predict.py test, by name)."""
    if found.spatial_dims == 3:
        return {"all scans": found.layout.naming(None)}, []
    groups, problems = {}, []
    for naming in found.layout.namings:
        if (found.root / naming.image_dir).is_dir() or (found.root / naming.label_dir).is_dir():
            groups[naming.split] = naming
        else:
            problems.append(f"missing split: neither {found.root / naming.image_dir} nor {naming.label_dir} exists "
                            f"(the 2D layout has {', '.join(n.split for n in found.layout.namings)} folders)")
    return groups, problems


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
                            f"(missing {listing(missing, 8)})")
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
    lines.append(f"  patients: {listing(patients, 40)}")
    return lines


def check_data(data_dir: str | Path, workers: int | None = None, spatial_dims: int | None = None
               ) -> tuple[list[str], list[str]]:
    """Read every file of the layout of `spatial_dims` under `data_dir` (None: of every layout found) and return
    (report lines, problems). A layout that train.py could not choose (none there, or two 3D namings side by
    side) is a problem, listing the layouts found and their folders."""
    data_dir = Path(data_dir)
    dims = [spatial_dims] if spatial_dims else sorted({f.spatial_dims for f in find_layouts(data_dir)}) or [None]
    report: list[str] = []
    problems: list[str] = []
    for each in dims:
        try:
            found = resolve_layout(data_dir, each)
        except DataError as exc:
            problems.append(str(exc))
            continue
        lines, found_problems = _check_layout(found, workers if workers is not None else dataset.default_workers())
        report += lines
        problems += found_problems
    return report, problems


def _check_layout(found: FoundLayout, workers: int) -> tuple[list[str], list[str]]:
    groups, problems = _layout_groups(found)
    report = [f"layout: {found.spatial_dims}D ({found.layout.name}) in {found.root}: "
              + ", ".join(f"{folder}/" for folder in found.present)]
    scanned = {}
    for name, naming in groups.items():
        pairs, found_problems = scan_naming(found, naming, require_labels=True)
        scanned[name] = pairs
        problems += [f"{kind}: {item}" for kind, items in found_problems.items() for item in items]
    tasks = [(pair, found.spatial_dims) for pairs in scanned.values() for pair in pairs]
    infos = iter(list(dataset.parallel_map(_inspect_pair, tasks, workers, "reading", "file")))
    patients = {}
    for name, pairs in scanned.items():
        group_infos = [next(infos) for _ in pairs]
        problems += [p for info in group_infos for p in info["problems"]]
        if found.spatial_dims == 2:
            problems += _slice_problems(pairs, group_infos)
        report += _group_report(name, pairs, group_infos)
        patients[name] = {p.case_id for p in pairs}
    if found.spatial_dims == 2 and patients:
        shared = patients_in_several_splits(patients)
        report.append(f"patients in more than one split: {listing(list(shared), 40) if shared else 'none'}")
        problems += [f"patient {p} is in several splits: " + ", ".join(names) for p, names in shared.items()]
    return report, problems


def print_report(data_dir: str | Path, workers: int | None = None, spatial_dims: int | None = None) -> int:
    """Print `check_data`'s report, then its problems (no layout found counts as one); 1 if any, else 0."""
    try:
        report, problems = check_data(data_dir, workers, spatial_dims)
    except DataError as exc:
        report, problems = [], [str(exc)]
    print("\n".join(report))
    print(f"problems: {len(problems)}" + "".join(f"\n  - {p}" for p in problems))
    return 1 if problems else 0
