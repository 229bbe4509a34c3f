"""Export a HipMRI data set as an nnU-Net v2 raw data set with patient-grouped folds (`python dataset.py
export-nnunet`).

    OUT/Dataset{NNN}_HipMRI2D/ (or _HipMRI3D/)
        imagesTr/CASE_0000.nii.gz  labelsTr/CASE.nii.gz   training cases (float32 T2 image, uint8 label 0..5)
        imagesTs/CASE_0000.nii.gz  labelsTs/CASE.nii.gz   the test split
        dataset.json                                      channel T2, our six classes, ".nii.gz", numTraining
        splits_final.json                                 folds grouped by patient, for nnUNet_preprocessed/
        split.json                                        3D only: the patient split drawn (as RUN/split.json)

CASE is the scan key `Pair.case_key`: "case_004_week_0" (2D layout), the volume key such as "Case_004_Week0" or
"B006_Week0" (3D). A 3D case is the volume as stored, with the image's affine. A 2D case is one scan's slice
files stacked into a volume of shape (H, n_slices, W) in nibabel's axis order (`dataset.scan_volume`), where
(H, W) is the slice files' shape: vol[:, j, :] is slice file j (slice_j), as the slices were cut from the study's
volumes. Its affine (`dataset.stack_affine`) maps voxel (a, j, b) to where slice file j puts pixel (a, b): columns
(slice axis 0, step between slice origins, slice axis 1), origin that of slice 0. The label takes the image's
affine once `dataset.geometry_mismatch` finds them in agreement, since nnU-Net's integrity check demands equal
geometry to float precision. nnU-Net's predictions come back in this geometry, and `predict.py --score` reads
them as they are.

Splits: 2D, the train and validate folders are the training cases (fold 0 = train vs validate as given) and the
test folder is imagesTs. 3D, `dataset.split_by_patient(pairs, seed, DataConfig().split_ratios)` draws the same
split as `train.py --seed S` would; its test patients are imagesTs, its train vs validate is fold 0. With
`folds=K`, the training patients are dealt into K folds balanced by scan count instead.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

import dataset
from dataset import DataConfig, DataError, Pair
from utils import CLASS_NAMES, write_json

__all__ = ["ExportResult", "add_parser", "assign_folds", "dataset_folder_name", "export_nnunet", "next_steps",
           "run"]

log = logging.getLogger("hipmri.nnunet_export")

FILE_ENDING = ".nii.gz"
CHANNEL = "0000"  # the one input channel, T2
# nnU-Net finds a case's images as CASE_XXXX.nii.gz; a case name that itself ends in _XXXX would be ambiguous.
_CHANNEL_LIKE = re.compile(r".*_\d{4}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REFERENCE = "Dowling & Greer (2021), Labelled weekly MR images of the male pelvis, CSIRO, doi:10.25919/45t8-p065"


@dataclass(frozen=True)
class ExportResult:
    """What `export_nnunet` wrote."""

    folder: Path  # OUT/DatasetNNN_HipMRI2D
    dataset_id: int
    dims: int
    training: list[str]  # case names in imagesTr
    test: list[str]  # case names in imagesTs
    folds: list[dict[str, list[str]]]  # splits_final.json


def dataset_folder_name(dataset_id: int, dims: int) -> str:
    """"Dataset007_HipMRI2D": nnU-Net's folder name for a data set id (1..999) and our layout."""
    return f"Dataset{dataset_id:03d}_HipMRI{dims}D"


# ---------------------------------------------------------------- cases and splits


def _check_case_names(scans: dict[str, list[Pair]]) -> None:
    bad = [f"{key} ({scans[key][0].image})" for key in scans
           if _CHANNEL_LIKE.fullmatch(key) or not _SAFE_NAME.fullmatch(key)]
    if bad:
        raise DataError(f"scan name(s) not usable as nnU-Net case names (they end in _NNNN like a channel suffix, "
                        f"or hold characters other than letters, digits, '_', '.', '-'): {dataset.listing(bad)}; "
                        f"rename these files")


def _scans_2d(data_dir: Path) -> tuple[dict[str, list[Pair]], dict[str, list[str]]]:
    """Slices grouped by scan, and {split folder: scan keys}; DataError if a scan or a patient is in two folders."""
    scans: dict[str, list[Pair]] = {}
    splits: dict[str, list[str]] = {}
    folders_of: dict[str, set[str]] = defaultdict(set)
    for split in dataset.SPLITS:
        grouped: dict[str, list[Pair]] = defaultdict(list)
        for pair in dataset.find_pairs(data_dir, split):
            grouped[pair.case_key].append(pair)
            folders_of[pair.case_id].add(split)
        clash = sorted(grouped.keys() & scans.keys())
        if clash:
            raise DataError(f"{data_dir}: scan(s) {dataset.listing(clash)} have slices in two split folders "
                            f"(keras_slices_{split} and another); keep each scan in one split")
        scans.update(grouped)
        splits[split] = sorted(grouped)
    shared = sorted(f"{p} ({', '.join(sorted(s))})" for p, s in folders_of.items() if len(s) > 1)
    if shared:
        raise DataError(f"{data_dir}: patient(s) in more than one split folder: {dataset.listing(shared)}; "
                        f"the splits must be by patient, move all of a patient's scans into one split")
    return scans, splits


def _scans_3d(data_dir: Path, seed: int) -> tuple[dict[str, list[Pair]], dict[str, list[str]]]:
    pairs = dataset.find_pairs(data_dir, None)
    return {p.case_key: [p] for p in pairs}, dataset.split_by_patient(pairs, seed, DataConfig().split_ratios)


def assign_folds(scans_of_patient: dict[str, Sequence[str]], folds: int, seed: int) -> list[list[str]]:
    """Patients dealt into `folds` groups, all of a patient's scans in one: [[scan keys of fold 0], ...].

    Deterministic from `seed`: patients in a seeded random order, then by scan count, largest first, each to the
    fold with the fewest scans so far (lowest index on ties). ValueError if there are fewer patients than folds.
    """
    patients = sorted(scans_of_patient)
    if not 2 <= folds <= len(patients):
        raise ValueError(f"--folds {folds}: need 2..{len(patients)} (one fold per patient at most; "
                         f"{len(patients)} training patients)")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    order.sort(key=lambda p: -len(scans_of_patient[p]))  # stable: the seeded order breaks ties
    members: list[list[str]] = [[] for _ in range(folds)]
    for patient in order:
        smallest = min(range(folds), key=lambda f: len(members[f]))
        members[smallest] += scans_of_patient[patient]
    return [sorted(m) for m in members]


def _folds(scans: dict[str, list[Pair]], splits: dict[str, list[str]], folds: int | None,
           seed: int) -> list[dict[str, list[str]]]:
    """splits_final.json: [{"train": [...], "val": [...]}, ...], never a patient in both halves of a fold.
    ValueError when a fold would be empty (too few patients)."""
    if folds is None:
        if not splits["train"] or not splits["validate"]:
            raise ValueError(f"too few patients for a train and a validate split ({len(splits['train'])} and "
                             f"{len(splits['validate'])} scans); nnU-Net needs both")
        return [{"train": splits["train"], "val": splits["validate"]}]
    training = splits["train"] + splits["validate"]
    scans_of_patient: dict[str, list[str]] = defaultdict(list)
    for key in training:
        scans_of_patient[scans[key][0].case_id].append(key)
    groups = assign_folds(scans_of_patient, folds, seed)
    return [{"train": sorted(k for g, m in enumerate(groups) if g != f for k in m), "val": groups[f]}
            for f in range(folds)]


# ---------------------------------------------------------------- geometry and files


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, source: nib.Nifti1Header | None) -> bytes:
    """Gzipped NIfTI-1 with qform = sform = `affine`, the source's coordinate code and units (mm if none)."""
    image = nib.Nifti1Image(data, affine)
    code = 1
    if source is not None and "sform_code" in source:
        code = int(source["sform_code"]) or int(source["qform_code"]) or 1
        image.header.set_xyzt_units(*(d if u == "unknown" else u for u, d in zip(source.get_xyzt_units(),
                                                                                    ("mm", "sec"))))
    else:
        image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _check_pair_geometry(pair: Pair, image: nib.spatialimages.SpatialImage, image_shape: tuple, label: np.ndarray
                         ) -> None:
    if label.shape != image_shape:
        raise DataError(f"{pair.label}: label shape {label.shape} differs from its image's {image_shape} "
                        f"({pair.image})")
    mismatch = dataset.geometry_mismatch(image, nib.load(str(pair.label)))
    if mismatch:
        raise DataError(f"{pair.label}: geometry differs from its image {pair.image}: {mismatch}")


def _read_scan_2d(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray, np.ndarray, nib.Nifti1Header]:
    """One scan's slices -> image (H, n, W) float32, label (H, n, W) uint8, affine, the first slice's header."""
    pairs = sorted(pairs, key=lambda p: p.slice_index)
    indices = [p.slice_index for p in pairs]
    if indices != list(range(len(pairs))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise DataError(f"{pairs[0].image.parent}: scan {pairs[0].case_key} has slices {indices[0]}..{indices[-1]}"
                        f" with slice(s) {dataset.listing(missing)} missing; a scan needs slices 0..N-1 to be stacked")
    images, labels, affines = [], [], []
    for pair in pairs:
        data, img = dataset.read_image(pair.image, spatial_dims=2)
        label = dataset.read_label(pair.label, spatial_dims=2)
        _check_pair_geometry(pair, img, data.shape, label)
        if images and data.shape != images[0].shape:
            raise DataError(f"{pair.image}: shape {data.shape} differs from {pairs[0].image}'s {images[0].shape}; "
                            f"the slices of one scan must have one size")
        if not images:
            header = img.header
        images.append(data)
        labels.append(label)
        affines.append(img.affine)
    affine = dataset.stack_affine(affines, [p.image for p in pairs])
    return dataset.scan_volume(np.stack(images)), dataset.scan_volume(np.stack(labels)), affine, header


def _read_scan_3d(pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray, nib.Nifti1Header]:
    data, img = dataset.read_image(pair.image, spatial_dims=3)
    label = dataset.read_label(pair.label, spatial_dims=3)
    _check_pair_geometry(pair, img, data.shape, label)
    return data, label, np.asarray(img.affine, dtype=np.float64), img.header


def _write_case(task: tuple[list[Pair], Path, Path]) -> tuple[str, tuple[int, ...]]:
    """Read one scan and write its image and label NIfTI files; returns (case name, shape)."""
    pairs, image_path, label_path = task
    if pairs[0].slice_index is None:
        image, label, affine, header = _read_scan_3d(pairs[0])
    else:
        image, label, affine, header = _read_scan_2d(pairs)
    image_path.write_bytes(_nifti_bytes(image.astype(np.float32, copy=False), affine, header))
    label_path.write_bytes(_nifti_bytes(label.astype(np.uint8, copy=False), affine, header))
    return pairs[0].case_key, image.shape


# ---------------------------------------------------------------- the export


def _check_target(out: Path, name: str) -> Path:
    """OUT/name, refusing anything nnU-Net would confuse with it: another Dataset with this id, or a non-empty
    folder of this name (never overwritten, never mixed)."""
    target = out / name
    prefix = name.split("_", 1)[0] + "_"
    taken = sorted(p for p in out.glob(prefix + "*") if p != target or not p.is_dir() or any(p.iterdir()))
    if taken:
        raise FileExistsError(f"{taken[0]} exists (nnU-Net finds a data set by its id, {prefix[7:-1]}); remove it "
                              f"or choose another --dataset-id")
    return target


def _dataset_json(dims: int, training: int, test: int, data_dir: Path) -> dict:
    return {
        "name": f"HipMRI{dims}D",
        "description": (f"HipMRI pelvic MR exported from {data_dir} by hipmri-seg (python dataset.py export-nnunet); "
                        + ("2D layout: each scan's slice files stacked into a volume, slice j = vol[:, j, :]"
                           if dims == 2 else "3D layout: one volume per scan")),
        "reference": REFERENCE,
        "channel_names": {"0": "T2"},
        "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
        "numTraining": training,
        "numTest": test,
        "file_ending": FILE_ENDING,
    }


def export_nnunet(data_dir: str | Path, out: str | Path, dataset_id: int, dims: int | None = None,
                  folds: int | None = None, seed: int = 0, workers: int | None = None) -> ExportResult:
    """Write OUT/Dataset{id:03d}_HipMRI{dims}D (see the module docstring) and return what was written.

    Everything is written into a hidden folder in OUT that is renamed into place when complete. Raises DataError
    for bad data (naming the file), ValueError for bad arguments, FileExistsError when the data set exists.
    """
    data_dir, out = Path(data_dir), Path(out)
    layout_dims = 2 if dataset.detect_layout(data_dir) == "2d" else 3
    if dims is not None and dims != layout_dims:
        raise ValueError(f"--dims {dims}: {data_dir} holds the {layout_dims}D layout; omit --dims or pass "
                         f"--dims {layout_dims}")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"--dataset-id {dataset_id}: nnU-Net data set ids are 1..999")
    scans, splits = _scans_2d(data_dir) if layout_dims == 2 else _scans_3d(data_dir, seed)
    _check_case_names(scans)
    fold_list = _folds(scans, splits, folds, seed)
    out.mkdir(parents=True, exist_ok=True)
    target = _check_target(out, dataset_folder_name(dataset_id, layout_dims))
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=out))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the data set should be readable like any folder
        _write_cases(staging, scans, splits, workers)
        training = splits["train"] + splits["validate"]
        write_json(staging / "dataset.json", _dataset_json(layout_dims, len(training), len(splits["test"]), data_dir))
        write_json(staging / "splits_final.json", fold_list)
        if layout_dims == 3:  # the drawn patient split, in the format train.py reads from RUN/split.json
            dataset.save_split(staging / "split.json", splits, seed, DataConfig().split_ratios)
        for written in staging.glob("*.json"):
            written.chmod(0o644)  # the atomic writer's temporary files are private; these are for everyone
        if target.is_dir():  # an empty folder of this name (checked above)
            target.rmdir()
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %d training and %d test cases, %d fold(s)", target, len(training), len(splits["test"]),
             len(fold_list))
    return ExportResult(target, dataset_id, layout_dims, sorted(training), splits["test"], fold_list)


def _write_cases(folder: Path, scans: dict[str, list[Pair]], splits: dict[str, list[str]],
                 workers: int | None) -> None:
    tasks = []
    for split, keys in splits.items():
        suffix = "Ts" if split == "test" else "Tr"
        for sub in ("images", "labels"):
            (folder / f"{sub}{suffix}").mkdir(exist_ok=True)
        tasks += [(scans[key], folder / f"images{suffix}" / f"{key}_{CHANNEL}{FILE_ENDING}",
                   folder / f"labels{suffix}" / f"{key}{FILE_ENDING}") for key in keys]
    workers = workers or dataset.default_workers()
    for key, shape in dataset.parallel_map(_write_case, tasks, workers, "exporting", "scan"):
        log.debug("%s: %s", key, shape)


# ---------------------------------------------------------------- the command line


def next_steps(result: ExportResult, data_dir: str | Path) -> str:
    """The shell commands that take the export through nnU-Net and score its test predictions with our metrics."""
    raw, name, n = result.folder.parent.resolve(), result.folder.name, result.dataset_id
    config = "2d" if result.dims == 2 else "3d_fullres"
    folds = " ".join(str(f) for f in range(len(result.folds)))
    lines = [
        f"export nnUNet_raw={raw} nnUNet_preprocessed={raw.parent}/nnUNet_preprocessed "
        f"nnUNet_results={raw.parent}/nnUNet_results",
        f"nnUNetv2_plan_and_preprocess -d {n} -c {config} --verify_dataset_integrity",
        f"cp {result.folder.resolve()}/splits_final.json $nnUNet_preprocessed/{name}/splits_final.json",
        f"for fold in {folds}; do nnUNetv2_train {n} {config} $fold; done",
        f"nnUNetv2_predict -i $nnUNet_raw/{name}/imagesTs -o nnunet_pred -d {n} -c {config} -f {folds}",
        f"python predict.py --score nnunet_pred --data-dir {data_dir} --dims {result.dims} --split test "
        f"--out nnunet_scores" + (f" --split-file {result.folder.resolve()}/split.json" if result.dims == 3 else ""),
    ]
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `export-nnunet` on dataset.py's subcommands."""
    parser = commands.add_parser("export-nnunet", help="write an nnU-Net v2 raw data set with patient-grouped folds")
    parser.add_argument("data_dir", type=Path, help="HipMRI root (2D keras_slices_* or a 3D layout)")
    parser.add_argument("out", type=Path, help="nnUNet_raw folder to write Dataset{NNN}_HipMRI{2,3}D into")
    parser.add_argument("--dataset-id", type=int, required=True, help="nnU-Net data set id, 1..999")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help="2 or 3 (default: from the layout)")
    parser.add_argument("--folds", type=int, default=None,
                        help="K patient-grouped folds of the training patients (default: one fold, train vs "
                             "validate: the 2D split folders, or the 3D patient split of --seed)")
    parser.add_argument("--seed", type=int, default=0, help="3D patient split (as train.py --seed) and fold draw")
    parser.add_argument("--workers", type=int, default=None, help="reading processes (default: min(2, cores))")


def run(args: argparse.Namespace) -> int:
    """`python dataset.py export-nnunet ...`: 0 when written, 1 on bad data, 2 on bad arguments or existing output."""
    try:
        result = export_nnunet(args.data_dir, args.out, args.dataset_id, args.dims, args.folds, args.seed,
                               args.workers)
    except DataError as err:
        print(f"dataset.py export-nnunet: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"dataset.py export-nnunet: {err}", file=sys.stderr)
        return 2
    test_note = "the 2D test folder" if result.dims == 2 else \
        f"the test patients of the patient split that train.py --seed {args.seed} draws"
    print(f"{result.folder}: {len(result.training)} training cases in {len(result.folds)} patient-grouped fold(s), "
          f"{len(result.test)} test cases in imagesTs/ ({test_note}).\nNext:\n{next_steps(result, args.data_dir)}")
    return 0
