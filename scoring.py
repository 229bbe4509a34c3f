"""Judging a split's predictions, whoever made them.

`evaluate_case` is the one path from a scan's prediction to `report.Evaluation` (metrics at the label files' own
resolution and spacing), for predict.py's own predictions and for `predict.py --score`. For --score, `load_masks`
finds the mask files of a split's scans by name (`accepted_names` is the naming rule) and checks each against its
label file(s) (shape, geometry, class values), listing every problem at once:

    2D, per slice   seg_004_week_0_slice_7.nii.gz or case_004_week_0_slice_7.nii.gz (the label or image name)
    2D, per scan    case_004_week_0.nii.gz: (H, n_slices, W), slice j = vol[:, j, :], the slices' stacked affine
    3D, per scan    Case_004_Week0_SEMANTIC_LFOV.nii.gz, Case_004_Week0_LFOV.nii.gz or Case_004_Week0.nii.gz
                    (the label name, the image name or the case; likewise B006_Week0_SEMANTIC.nii.gz, ...)

Names match case-insensitively, .nii or .nii.gz. A 2D scan's volume is `dataset.scan_volume` of its slices, with
the affine `dataset.stack_affine` builds from its label files' affines, as `python dataset.py export-nnunet` writes
each 2D scan: nnU-Net's predictions on that export score as they are.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import cache
import dataset
import report
from layouts import is_nifti, nifti_stem

log = logging.getLogger("hipmri.scoring")

LISTED = 20  # problems of one kind listed before "... and N more"


# What predict.py may write beside a mask (--save-probs, --save-uncertainty): never a mask to score.
SIDE_FILES = {"probs": "probabilities (--save-probs)", "entropy": "uncertainty (--save-uncertainty)"}


def side_name(name: str, kind: str) -> str:
    """Where predict.py writes the `kind` (a SIDE_FILES key) of the mask `name`: seg_..._slice_7_probs.nii.gz."""
    stem = nifti_stem(name)
    return f"{stem}_{kind}{name[len(stem):]}"


# ---------------------------------------------------------------- one path to the reports


def evaluate_case(evaluation: report.Evaluation, cases: cache.CaseSet, index: int, pred: np.ndarray
                  ) -> tuple[float, ...]:
    """Add one scan's prediction (uint8, the shape of its label files stacked: 2D (n_slices, H, W), 3D (X, Y, Z))
    to `evaluation`, at the label files' own resolution and spacing (returned: mm per axis of `pred`). Every
    evaluation goes through here."""
    gt = original_labels(cases, index)
    if pred.shape != gt.shape:
        raise ValueError(f"{cases.keys[index]}: prediction shape {pred.shape} differs from the label's {gt.shape}")
    # The cache's 2D spacings describe resized arrays; scaled back to the files' pixels, then rounded to the
    # headers' 1e-6 mm (dataset.voxel_spacing) so that the same split scores bit-identically whatever the
    # preprocessing was (a checkpoint's DataConfig or --score's default).
    spacing = tuple(round(s * n / n0, 6) for s, n, n0 in zip(cases.spacings[index], cases.images[index].shape,
                                                             gt.shape))
    evaluation.add(cases.keys[index], pred, gt, spacing, display_image(cases, index))
    return spacing


def original_labels(cases: cache.CaseSet, index: int) -> np.ndarray:
    """The case's labels at the resolution of its files (2D slices resized for training are read again)."""
    label = cases.labels[index]
    if label is not None and tuple(label.shape) == tuple(cases.original_shapes[index]):
        return np.asarray(label)
    return np.stack([dataset.read_label(pair.label, cases.spatial_dims) for pair in cases.sources[index]])


def display_image(cases: cache.CaseSet, index: int) -> np.ndarray:
    """The normalised image at the original resolution, for overlays."""
    image = np.asarray(cases.images[index], dtype=np.float32)
    shape = tuple(cases.original_shapes[index])
    if image.shape != shape:
        image = dataset.resize_slices(image, shape[1:], is_label=False)
    return image


def slice_axis(spatial_dims: int) -> int:
    """Pictures' slicing axis: the stacked slice files in 2D, the axial axis (y) in 3D."""
    return 0 if spatial_dims == 2 else 1


# ---------------------------------------------------------------- masks made by anything (--score)


@dataclass(frozen=True)
class MaskSlot:
    """Where a mask file fits: a scan of the split (index into the CaseSet) and, for a 2D slice file, its
    position in the scan's stack (None: a volume for the whole scan)."""
    case: int
    position: int | None


def accepted_names(cases: cache.CaseSet) -> dict[str, MaskSlot]:
    """Lower-case file name stems a mask may have -> the slot it fills (the naming rule of --score)."""
    names = {}
    for index, pairs in enumerate(cases.sources):
        names[pairs[0].case_key.lower()] = MaskSlot(index, None)
        for position, pair in enumerate(pairs):
            slot = MaskSlot(index, position if cases.spatial_dims == 2 else None)
            for path in (pair.label, pair.image):
                names[nifti_stem(path.name).lower()] = slot
    return names


def index_masks(pred_dir: Path, names: dict[str, MaskSlot], problems: dict[str, list[str]]) -> dict[MaskSlot, Path]:
    """Mask files by slot; files matching no scan of the split, and two files for one slot, go to `problems`."""
    found: dict[MaskSlot, Path] = {}
    for path in sorted(p for p in pred_dir.iterdir() if p.is_file() and is_nifti(p.name)):
        stem = nifti_stem(path.name).lower()
        slot = names.get(stem)
        side = next((kind for kind in SIDE_FILES if stem.endswith(f"_{kind}")), None)
        if slot is None and side is not None and stem.removesuffix(f"_{side}") in names:
            log.info("%s: %s of a mask, not a mask; not scored", path, SIDE_FILES[side])
        elif slot is None:
            problems["extra mask (matches no scan of the split)"].append(str(path))
        elif slot in found:
            problems["two masks for one file"].append(f"{found[slot].name} and {path.name} in {pred_dir}")
        else:
            found[slot] = path
    return found


def expected_names(cases: cache.CaseSet, index: int) -> str:
    """How a scan's mask may be named, for a "missing mask" message."""
    pairs = cases.sources[index]
    if cases.spatial_dims == 3:
        return f"{pairs[0].label.name} (or {pairs[0].image.name}, {pairs[0].case_key}.nii.gz)"
    return f"{pairs[0].case_key}.nii.gz (a volume), or {pairs[0].label.name} .. {pairs[-1].label.name}"


def case_mask_files(cases: cache.CaseSet, index: int, found: dict[MaskSlot, Path],
                    problems: dict[str, list[str]]) -> tuple[list[tuple[Path, int | None]], bool]:
    """The scan's mask files as (mask, its slot's position: a 2D slice's place in the scan, None for a volume),
    and whether they make the whole scan (a volume, or every slice); what is missing goes to `problems`."""
    pairs = cases.sources[index]
    volume = found.get(MaskSlot(index, None))
    files = [(found[MaskSlot(index, k)], k) for k in range(len(pairs)) if MaskSlot(index, k) in found]
    slices = len(files)
    if volume is not None:
        files.insert(0, (volume, None))
    if volume is not None and slices:
        problems["a volume and slice masks for one scan"].append(f"{volume} and {slices} slice file(s)")
    elif not files:
        problems["missing mask"].append(f"{cases.keys[index]}: expected {expected_names(cases, index)}")
    elif volume is None and slices < len(pairs):
        have = {k for _, k in files}
        missing = [pairs[k].label.name for k in range(len(pairs)) if k not in have]
        problems["missing mask"].append(f"{cases.keys[index]}: {len(missing)} of {len(pairs)} slices have none "
                                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    else:
        return files, True
    return files, False


def mask_reference(cases: cache.CaseSet, index: int, position: int | None
                   ) -> tuple[tuple[int, ...], nib.spatialimages.SpatialImage, str]:
    """What a mask of scan `index` is checked against: the shape it needs, an image with the geometry it needs
    (headers only), and how a message names that reference. `position`: a 2D slice file's place in the scan (its
    label file), or None for the whole scan: 3D the label file; 2D the label slices as one volume (H, n_slices,
    W), vol[:, j, :] = slice j (`dataset.scan_volume`), with their `dataset.stack_affine`. DataError naming a
    label file when a 2D scan's label slices do not stack into one volume."""
    pairs, gt_shape = cases.sources[index], tuple(cases.original_shapes[index])
    if position is not None or cases.spatial_dims == 3:
        label = pairs[position or 0].label
        return gt_shape if position is None else gt_shape[1:], nib.load(str(label)), f"its label {label}"
    labels = [pair.label for pair in pairs]
    affine = dataset.stack_affine([nib.load(str(path)).affine for path in labels], labels)
    shape = tuple(gt_shape[axis] for axis in dataset.SCAN_VOLUME_AXES)
    what = (f"the volume of the {len(labels)} label slices of {cases.keys[index]} in {labels[0].parent} (a 2D "
            f"scan's volume is (H, n_slices, W), vol[:, j, :] = slice j)")
    return shape, nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine), what  # geometry only: no voxels read


def read_mask(path: Path, shape: tuple[int, ...], reference: nib.spatialimages.SpatialImage, what: str
              ) -> np.ndarray:
    """A mask as uint8 of `shape`, checked against `reference` (`mask_reference`, named by `what`); DataError
    naming the file for an unreadable file, values that are not classes 0..5, another shape, or another
    geometry."""
    mask = dataset.read_label(path, len(shape))
    if mask.shape != shape:
        raise dataset.DataError(f"{path}: shape {mask.shape}, but {what} needs {shape}")
    mismatch = dataset.geometry_mismatch(reference, nib.load(str(path)), names=("label", "mask"))
    if mismatch:
        raise dataset.DataError(f"{path}: does not overlay {what}: {mismatch}")
    return mask


def read_case_mask(cases: cache.CaseSet, index: int, found: dict[MaskSlot, Path],
                   problems: dict[str, list[str]]) -> np.ndarray | None:
    """One scan's prediction stacked like its labels (2D (n_slices, H, W), 3D (X, Y, Z)), or None when a problem
    was found. Every mask file of the scan is checked, even when the scan is incomplete."""
    files, complete = case_mask_files(cases, index, found, problems)
    masks = []
    for path, position in files:
        try:
            reference = mask_reference(cases, index, position)
        except dataset.DataError as exc:
            problems["labels that do not stack into a volume"].append(str(exc))
            continue
        try:
            masks.append(read_mask(path, *reference))
        except dataset.DataError as exc:
            problems["bad mask"].append(str(exc))
    if not complete or len(masks) < len(files):
        return None
    if cases.spatial_dims == 3:
        return masks[0]
    return dataset.scan_slices(masks[0]) if files[0][1] is None else np.stack(masks)  # a 2D scan's volume, or slices


def load_masks(pred_dir: Path, cases: cache.CaseSet) -> list[np.ndarray]:
    """The prediction of every scan of `cases` from the masks in `pred_dir`, stacked like its labels (uint8).

    Every mask is checked first; DataError listing all problems, by kind: a mask missing for a scan (or for
    some of its slices), an extra mask (matching no scan of the split: another split's, or a name that follows
    no naming), two masks for one file, a volume beside slice masks, and each bad mask (unreadable, values not
    classes 0..5, another shape, another geometry). Files named like `side_name` of a mask are skipped.
    """
    problems: dict[str, list[str]] = defaultdict(list)
    found = index_masks(pred_dir, accepted_names(cases), problems)
    preds = []
    for index in tqdm(range(len(cases)), desc="read masks", unit="scan", disable=None):
        preds.append(read_case_mask(cases, index, found, problems))
    if problems:
        lines = []
        for kind, items in problems.items():
            lines += [f"{kind} ({len(items)}):", *(f"  {item}" for item in items[:LISTED])]
            lines += [f"  ... and {len(items) - LISTED} more"] if len(items) > LISTED else []
        raise dataset.DataError(f"--score {pred_dir}: nothing scored; fix these masks and run again:\n"
                                + "\n".join(lines))
    return preds
