"""The decoded-data cache: each split read once through dataset.py's preprocessing into .npy files, then
memory-mapped as a `CaseSet` (one entry per scan).

`load_split(data_dir, split)` is the one entry point. A cache folder is keyed by the files' names, sizes and
mtimes and by the DataConfig, built in parallel in a hidden folder and renamed into place (a killed build
never looks valid), reused while valid, and pruned when its files change. It never lives inside the data folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dataset import (
    DataConfig,
    default_workers,
    parallel_map,
    preprocess_image,
    read_pair,
    resize_slices,
    split_keys,
    voxel_spacing,
)
from layouts import LISTED, SPLITS, DataError, Pair, check_split_folders_disjoint, find_pairs, resolve_layout
from utils import NUM_CLASSES

log = logging.getLogger("hipmri.cache")

# 4: image/label geometry (orientation, spacing, origin) checked before a case is cached.
CACHE_VERSION = 5  # bump whenever the code changes what a cache holds: old caches are then rebuilt


def default_cache_dir() -> Path:
    """$HIPMRI_CACHE, else $XDG_CACHE_HOME/hipmri-seg, else ~/.cache/hipmri-seg."""
    if os.environ.get("HIPMRI_CACHE"):
        return Path(os.environ["HIPMRI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hipmri-seg"


def default_phantom(cache_dir: str | Path | None = None, layout: str = "2d", seed: int = 0) -> Path:
    """The default data set when no data folder is given: a phantom (12 patients x 2 weeks) in the cache
    folder, generated there on first use and reused afterwards."""
    import phantom

    folder = Path(cache_dir or default_cache_dir()) / f"phantom-v{phantom.PHANTOM_VERSION}-{layout}-seed{seed}"
    if not (folder / phantom.COMPLETE_MARKER).exists():
        log.info("no data folder given: generating the default %s phantom in %s (once)", layout, folder)
        phantom.write_dataset(folder, layout=layout, seed=seed)
    return folder


def _group_cases(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs grouped by scan, scans sorted, 2D slices in slice order."""
    cases: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        cases[pair.case_key].append(pair)
    return [sorted(cases[k], key=lambda p: p.slice_index or 0) for k in sorted(cases)]


def _cache_key(pairs: list[Pair], cfg: DataConfig, spatial_dims: int) -> str:
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "dims": spatial_dims, "cfg": asdict(cfg)}).encode())
    for pair in pairs:
        for path in (pair.image, pair.label):
            if path is not None:  # folder/name: the names, not where the data folder happens to be
                stat = os.stat(path)
                digest.update(f"{path.parent.name}/{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_case(pairs: list[Pair], spatial_dims: int, cfg: DataConfig):
    """One scan read and preprocessed: image (cfg.cache_dtype), label uint8 or None, spacing, original shape,
    warnings. 2D: slices stacked to (n, H, W) and resized; spacing ordered as the stacked axes. DataError naming
    both files when a label does not overlay its image (shape, orientation, spacing, origin: dataset.read_pair)."""
    images, labels, warnings = [], [], []
    for pair in pairs:
        image, label, img = read_pair(pair, spatial_dims)
        images.append(image)
        labels.append(label)
    spacing, assumed = voxel_spacing(img)
    if spatial_dims == 3:
        image, label = images[0], labels[0]
    else:
        shapes = sorted({im.shape for im in images})
        if len(shapes) > 1:
            raise DataError(f"slices of {pairs[0].case_key} differ in shape {shapes}: {pairs[0].image.parent}")
        if assumed:
            warnings.append(f"{pairs[0].image}: no slice spacing in the header; assuming 1.0 mm")
        if [p.slice_index for p in pairs] != list(range(len(pairs))):
            warnings.append(f"{pairs[0].case_key}: slice indices are not 0..{len(pairs) - 1}; stacked as found")
        spacing = (spacing[2], spacing[0], spacing[1])
        image, label = np.stack(images), (np.stack(labels) if labels[0] is not None else None)
    original_shape = image.shape
    image = preprocess_image(image, spatial_dims, cfg)
    if spatial_dims == 2 and cfg.target_size_2d is not None:
        label = resize_slices(label, cfg.target_size_2d, is_label=True) if label is not None else None
        # Resizing changes the pixel size: spacings describe the arrays as cached (metrics run on them).
        spacing = tuple(s * old / new for s, old, new in zip(spacing, original_shape, image.shape))
    return image, label, spacing, original_shape, warnings


def _content_digest(pairs: list[Pair]) -> str:
    """sha256 over the bytes of a scan's image and label files (2D: every slice, in order): what the files hold,
    wherever they are. Read once more from the page cache right after decoding: cheap beside the decoding."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in (pair.image, pair.label):
            if path is not None:
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _build_case(task: tuple) -> dict:
    """Worker: read one scan and write image_NNNNN.npy / label_NNNNN.npy into the build folder."""
    index, pairs, spatial_dims, cfg, folder = task
    try:
        image, label, spacing, original_shape, warnings = _read_case(pairs, spatial_dims, cfg)
    except DataError as exc:
        return {"error": str(exc)}
    entry = {"key": pairs[0].case_key, "image": f"image_{index:05d}.npy", "label": None, "spacing": spacing,
             "original_shape": list(original_shape), "warnings": warnings, "error": None,
             "class_counts": [0] * NUM_CLASSES, "content_digest": _content_digest(pairs)}
    np.save(Path(folder) / entry["image"], image)
    if label is not None:
        entry["label"] = f"label_{index:05d}.npy"
        np.save(Path(folder) / entry["label"], label)
        entry["class_counts"] = np.bincount(label.ravel(), minlength=NUM_CLASSES).tolist()
    return entry


def _valid_cache(folder: Path, key: str) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("version") != CACHE_VERSION:
        return None
    files = [c[name] for c in manifest["cases"] for name in ("image", "label") if c[name]]
    return manifest if all((folder / f).is_file() for f in files) else None


def _build_cache(folder: Path, key: str, cases: list[list[Pair]], spatial_dims: int, cfg: DataConfig,
                 data_dir: Path, workers: int) -> dict:
    """Build in a hidden temporary folder, write manifest.json last, then rename into place: a killed build
    leaves only a `.tmp-*` folder, never one that looks valid."""
    building = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building.mkdir(parents=True)
    try:
        tasks = [(i, pairs, spatial_dims, cfg, str(building)) for i, pairs in enumerate(cases)]
        entries = list(parallel_map(_build_case, tasks, workers, f"caching {folder.name}", "scan"))
        errors = [e["error"] for e in entries if e["error"]]
        if errors:
            raise DataError(f"{len(errors)} scan(s) could not be read: " + " | ".join(errors[:LISTED])
                            + (f" | ... and {len(errors) - LISTED} more" if len(errors) > LISTED else ""))
        for entry in entries:
            for text in entry.pop("warnings"):
                log.warning("%s", text)
        manifest = {"version": CACHE_VERSION, "key": key, "data_dir": str(data_dir.resolve()),
                    "spatial_dims": spatial_dims, "config": asdict(cfg), "cases": entries}
        (building / "manifest.json").write_text(json.dumps(manifest))
        finished_elsewhere = _valid_cache(folder, key)  # by another process (a DDP rank, a second run)
        if finished_elsewhere is not None:
            shutil.rmtree(building)
            return finished_elsewhere
        if folder.exists():
            shutil.rmtree(folder)  # same key but no valid manifest: a damaged cache
        try:
            os.replace(building, folder)
        except OSError:  # the other process won the race between the check above and the rename
            if (finished_elsewhere := _valid_cache(folder, key)) is None:
                raise
            shutil.rmtree(building)
            return finished_elsewhere
        return manifest
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _prune_stale(root: Path, keep: Path, manifest: dict) -> None:
    """Remove day-old unfinished builds, and caches of the same data folder, scans and settings as `manifest`:
    those were built from files that have changed since. Caches of other splits or settings stay."""
    prefix = keep.name.rsplit("-", 1)[0] + "-"
    same = ("data_dir", "config", "spatial_dims")
    for folder in root.iterdir():
        if folder == keep or not folder.is_dir():
            continue
        if folder.name.startswith(".tmp-") and time.time() - folder.stat().st_mtime > 86400:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(prefix):
            try:
                other = json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            if all(json.dumps(other.get(k)) == json.dumps(manifest[k]) for k in same) and (
                    _case_keys(other) == _case_keys(manifest)):
                log.info("removing the outdated cache %s", folder)
                shutil.rmtree(folder, ignore_errors=True)


def _case_keys(manifest: dict) -> list[str]:
    return [case.get("key") for case in manifest.get("cases", [])]


# ---------------------------------------------------------------- a split in memory


@dataclass
class CaseSet:
    """A split decoded into (memory-mapped) arrays, one entry per scan."""

    spatial_dims: int
    keys: list[str]  # "case_004_week_0" (2D) / "Case_004_Week0" (3D)
    images: list[np.ndarray]  # preprocess_image's: 2D (n_slices, H, W) resized, each slice z-scored; 3D (X, Y, Z)
    labels: list[np.ndarray | None]  # same shapes, uint8 0..5
    # mm per axis of the arrays above (2D: slice, in-plane H, in-plane W), after resizing; the files' own
    # spacing is spacing * shape / original_shape per axis.
    spacings: list[tuple[float, float, float]]
    original_shapes: list[tuple[int, ...]]  # shape before resizing: 2D (n_slices, H0, W0); 3D (X, Y, Z)
    sources: list[list[Pair]]  # the files of each scan (2D in slice order), e.g. for headers when writing NIfTI
    class_counts: list[np.ndarray] = field(default_factory=list)  # int64 (NUM_CLASSES,) voxels per class
    content_digests: list[str] = field(default_factory=list)  # sha256 of each scan's files' bytes
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.keys)


def load_split(data_dir: str | Path, split: str, cfg: DataConfig | None = None, cache_dir: str | Path | None = None,
               split_file: str | Path | None = None, seed: int = 0, workers: int | None = None,
               spatial_dims: int | None = None) -> CaseSet:
    """Decode `split` ("train", "validate", "test") through the cache and return it memory-mapped
    (copy-on-write: arrays are writable, but writes stay in this process).

    The layout is `layouts.resolve_layout(data_dir, spatial_dims)`: of those dims when given (a cluster ROOT holds
    both), else the only one there. 2D: the split folders. 3D: the patients listed in `split_file` if it exists,
    else a split drawn with `seed` and `cfg.split_ratios` (and saved to `split_file` when given). The cache lives
    in `cache_dir` (default `default_cache_dir()`, never inside `data_dir`), one folder per split keyed by the
    files' names, sizes and mtimes and by `cfg`; it is reused when valid and rebuilt (with `workers` processes,
    default `dataset.default_workers()`) when anything changed. Every pair's label is checked against its image
    (shape and geometry) when the cache is built. Under DDP let rank 0 call this first.
    """
    data_dir, cfg = Path(data_dir), cfg or DataConfig()
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if cfg.cache_dtype not in ("float16", "float32"):
        raise ValueError(f"DataConfig.cache_dtype must be float16 or float32, not {cfg.cache_dtype!r}")
    found = resolve_layout(data_dir, spatial_dims)
    spatial_dims, layout = found.spatial_dims, found.layout.name
    if spatial_dims == 2:
        pairs = find_pairs(data_dir, split, spatial_dims=2)
        check_split_folders_disjoint(found)
    else:
        pairs = find_pairs(data_dir, None, spatial_dims=3)
        chosen = set(split_keys(data_dir, pairs, split_file, seed, cfg.split_ratios)[split])
        pairs = [p for p in pairs if p.key in chosen]
        if not pairs:
            raise DataError(f"{data_dir}: the {split} split is empty (split file {split_file}); too few patients?")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root.resolve().is_relative_to(data_dir.resolve()):
        raise DataError(f"cache folder {root} is inside the data folder {data_dir}; choose another --cache-dir")
    key = _cache_key(pairs, cfg, spatial_dims)
    folder = root / f"{layout}-{split}-{key[:16]}"
    cases = _group_cases(pairs)
    manifest = _valid_cache(folder, key)
    if manifest is not None:
        log.info("%s layout in %s, %s split: reusing the cache %s (%d scans)", layout, found.root, split, folder,
                 len(cases))
    else:
        started = time.perf_counter()
        workers = workers if workers is not None else default_workers()
        log.info("%s layout in %s, %s split: decoding %d files into the cache %s (%d processes)", layout, found.root,
                 split, len(pairs), folder, workers)
        manifest = _build_cache(folder, key, cases, spatial_dims, cfg, data_dir, workers)
        log.info("%s split: cache built in %.1f s", split, time.perf_counter() - started)
        _prune_stale(root, folder, manifest)
    return _open_cache(folder, manifest, cases, spatial_dims)


def _open_cache(folder: Path, manifest: dict, cases: list[list[Pair]], spatial_dims: int) -> CaseSet:
    entries = manifest["cases"]
    return CaseSet(
        spatial_dims=spatial_dims,
        keys=[e["key"] for e in entries],
        # Copy-on-write maps: writable for torch.from_numpy, yet a write never reaches the cache files.
        images=[np.load(folder / e["image"], mmap_mode="c") for e in entries],
        labels=[np.load(folder / e["label"], mmap_mode="c") if e["label"] else None for e in entries],
        spacings=[tuple(e["spacing"]) for e in entries],
        original_shapes=[tuple(e["original_shape"]) for e in entries],
        sources=cases,
        class_counts=[np.asarray(e["class_counts"], dtype=np.int64) for e in entries],
        content_digests=[e["content_digest"] for e in entries],
        cache_path=folder,
    )
