"""Evaluation metrics on hard label maps (numpy + scipy; no torch): Dice, HD95, ASSD, volumes, aggregation.

Definitions (DESIGN.md, "Metrics, defined once"):
- Dice per case and class is hard: 2|P & G| / (|P| + |G|) on label maps (argmax predictions).
  Both empty: NaN (undefined; left out of that class's mean and counted). One empty: 0.
- HD95 and ASSD in mm, on surface voxels (voxels of the mask with a face neighbour outside the mask
  or outside the image), using the voxel spacing. They follow MONAI's definitions exactly:
  HD95 = max(95th percentile of pred->gt distances, 95th percentile of gt->pred distances), each
  percentile linearly interpolated (HausdorffDistanceMetric(percentile=95)); ASSD = mean of both
  directed distance sets pooled (SurfaceDistanceMetric(symmetric=True)).
  Empty masks: NaN when either side is empty. MONAI agrees for HD95 (its distances to an empty
  surface are inf, and the interpolated percentile of infs is NaN) and when both are empty, but its
  ASSD is inf when exactly one side is empty; we report NaN and count it, so one missed organ does
  not turn a mean into inf. Dice: MONAI's DiceMetric (ignore_empty=True) gives NaN whenever the
  label is empty, even against a false-positive prediction, where we give 0.
Label maps are integer arrays of one case, any number of axes (2D slice or 3D volume), values 0..C-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.spatial import cKDTree

# Surface-distance queries are first bounded to this many (largest) voxel sizes; see _directed_distances.
NEAR_VOXELS = 4


def _check_labels(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
    for name, arr in (("prediction", pred), ("label", gt)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must be an integer label map (argmax of the logits), got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} values must lie in 0..{num_classes - 1}, got {arr.min()}..{arr.max()}")
    return pred, gt


def _joint_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 confusion counts: [p, g] = voxels predicted p with label g."""
    pred, gt = _check_labels(pred, gt, num_classes)
    flat = pred.ravel().astype(np.int64) * num_classes + gt.ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _dice_from_counts(joint: np.ndarray) -> np.ndarray:
    intersection = np.diag(joint).astype(np.float64)
    sizes = joint.sum(axis=1) + joint.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # 0/0 -> NaN where both are empty; a non-empty side with no overlap gives 0.
        return 2.0 * intersection / sizes


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int = 6) -> np.ndarray:
    """Hard Dice per class of one case: pred, gt integer label maps of equal shape -> (C,) float64.

    NaN where the class is absent from both, 0 where it is absent from exactly one.
    """
    return _dice_from_counts(_joint_counts(pred, gt, num_classes))


def pooled_dice(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray], num_classes: int = 6) -> np.ndarray:
    """Global Dice per class with overlaps and sizes summed over all cases -> (C,) float64.

    Large cases dominate it: report it beside the per-case mean, never as the headline.
    """
    joint = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        joint += _joint_counts(pred, gt, num_classes)
    return _dice_from_counts(joint)


def volumes_ml(label: np.ndarray, spacing: Sequence[float], num_classes: int = 6) -> np.ndarray:
    """Volume of each class in ml of an integer label map with voxel spacing in mm per axis -> (C,) float64.

    In 2D the spacing has two entries and the result is an area in cm^2 (mm^2 / 100).
    """
    label = np.asarray(label)
    _check_spacing(spacing, label.ndim)
    counts = np.bincount(label.ravel().astype(np.int64), minlength=num_classes)
    if counts.size > num_classes:
        raise ValueError(f"label values must lie in 0..{num_classes - 1}, got up to {counts.size - 1}")
    return counts * float(np.prod(spacing)) / 1000.0


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.size != ndim or not np.all(spacing > 0):
        raise ValueError(f"spacing needs {ndim} positive values in mm (one per array axis), got {spacing.tolist()}")
    return spacing


def label_surfaces(label: np.ndarray) -> np.ndarray:
    """Bool map of voxels on the surface of their own class: a face neighbour has another label, or
    the voxel lies on the image border. For class c, `surfaces & (label == c)` equals
    `mask & ~binary_erosion(mask)` with mask = label == c (cross structure, border outside the mask).
    """
    surface = np.zeros(label.shape, dtype=bool)
    for axis in range(label.ndim):
        lower = [slice(None)] * label.ndim
        upper = [slice(None)] * label.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        differs = label[tuple(lower)] != label[tuple(upper)]
        surface[tuple(lower)] |= differs
        surface[tuple(upper)] |= differs
        lower[axis], upper[axis] = 0, -1
        surface[tuple(lower)] = True
        surface[tuple(upper)] = True
    return surface


def _surface_points(label: np.ndarray, num_classes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Flat indices of the surface voxels of each class (a list of C int arrays), and the flat surface map."""
    surface = label_surfaces(label).ravel()
    flat = np.flatnonzero(surface)
    classes = label.ravel()[flat]
    order = np.argsort(classes, kind="stable")
    starts = np.searchsorted(classes[order], np.arange(num_classes + 1))
    return [flat[order[starts[c]:starts[c + 1]]] for c in range(num_classes)], surface


def _directed_distances(
    points: np.ndarray, on_target: np.ndarray, target: np.ndarray, near_mm: float, workers: int = 1
) -> np.ndarray:
    """Distance from each of `points` (n, D) mm to the nearest of `target` (m, D) mm -> (n,) float64.

    on_target: (n,) bool, points that are themselves target points (distance 0, not queried).
    Exact Euclidean by a k-d tree over the sparse surface points: much cheaper than a dense distance
    transform of the bounding box (a full 256x256x128 EDT alone takes ~2 s here). Queries are first
    bounded by near_mm, which prunes the search for the many points close to the other surface; the
    few left over are queried without bound.
    """
    distances = np.zeros(len(points), dtype=np.float64)
    query = points[~on_target]
    if len(query):
        tree = cKDTree(target, balanced_tree=False, compact_nodes=False)
        found = tree.query(query, distance_upper_bound=near_mm, workers=workers)[0]
        far = np.isinf(found)
        if far.any():
            found[far] = tree.query(query[far], workers=workers)[0]
        distances[~on_target] = found
    return distances


def surface_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], num_classes: int = 6, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and ASSD per class in mm of one case -> (hd95 (C,), assd (C,)) float64.

    pred, gt: integer label maps of equal shape; spacing: voxel size in mm per array axis.
    workers: threads for the nearest-surface queries (-1: all cores; 1 suits shared machines).
    NaN for a class absent from the prediction or from the label (MONAI's ASSD: inf if exactly one is).
    """
    pred, gt = _check_labels(pred, gt, num_classes)
    spacing = _check_spacing(spacing, pred.ndim)
    near_mm = NEAR_VOXELS * float(spacing.max())
    hd95 = np.full(num_classes, np.nan)
    assd = np.full(num_classes, np.nan)
    points_pred, surface_pred = _surface_points(pred, num_classes)
    points_gt, surface_gt = _surface_points(gt, num_classes)
    pred_flat, gt_flat = pred.ravel(), gt.ravel()
    for c in range(num_classes):
        # Every non-empty mask has surface voxels, so no surface points means an empty class.
        flat_pred, flat_gt = points_pred[c], points_gt[c]
        if not len(flat_pred) or not len(flat_gt):
            continue
        pred_on_gt = surface_gt[flat_pred] & (gt_flat[flat_pred] == c)
        gt_on_pred = surface_pred[flat_gt] & (pred_flat[flat_gt] == c)
        mm_pred = np.column_stack(np.unravel_index(flat_pred, pred.shape)) * spacing
        mm_gt = np.column_stack(np.unravel_index(flat_gt, gt.shape)) * spacing
        pred_to_gt = _directed_distances(mm_pred, pred_on_gt, mm_gt, near_mm, workers)
        gt_to_pred = _directed_distances(mm_gt, gt_on_pred, mm_pred, near_mm, workers)
        hd95[c] = max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95))
        assd[c] = (pred_to_gt.sum() + gt_to_pred.sum()) / (pred_to_gt.size + gt_to_pred.size)
    return hd95, assd


def summarise(per_case: np.ndarray, class_names: Sequence[str]) -> dict:
    """Aggregate a per-case metric table (N cases, C classes; NaN = undefined) over cases.

    Returns {"n_cases": N, "mean": {class: float}, "std": {class: float}, "n_nan": {class: int},
    "mean_foreground": float}: mean and (population, ddof=0) std ignore NaN; a class with no defined
    value has mean and std NaN. mean_foreground is the mean over classes 1.. of the per-class means
    (background excluded; classes with an undefined mean skipped).
    """
    table = np.asarray(per_case, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(class_names):
        raise ValueError(f"per_case must be (N cases, {len(class_names)} classes), got shape {table.shape}")
    defined = ~np.isnan(table)
    n_defined = defined.sum(axis=0)
    filled = np.where(defined, table, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n_defined
        std = np.sqrt(np.where(defined, (table - mean) ** 2, 0.0).sum(axis=0) / n_defined)
    foreground = mean[1:][~np.isnan(mean[1:])]
    return {
        "n_cases": int(table.shape[0]),
        "mean": {name: float(m) for name, m in zip(class_names, mean)},
        "std": {name: float(s) for name, s in zip(class_names, std)},
        "n_nan": {name: int(table.shape[0] - n) for name, n in zip(class_names, n_defined)},
        "mean_foreground": float(foreground.mean()) if foreground.size else float("nan"),
    }
