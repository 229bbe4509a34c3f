"""metrics: hand-computed cases, and Dice / HD95 / ASSD against MONAI on random and structured 2D/3D label maps."""

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from scipy import ndimage

import metrics
import report

C = 6
NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")


def one_hot(label):
    return torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)), C).movedim(-1, 0)[None].float()


def monai_reference(pred, gt, spacing):
    """MONAI's per-class Dice (both empty policies), HD95 and symmetric ASSD, background included."""
    p, g = one_hot(pred), one_hot(gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about every empty class
        dice = DiceMetric(include_background=True)(p, g)[0].numpy()
        dice_not_ignored = DiceMetric(include_background=True, ignore_empty=False)(p, g)[0].numpy()
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)(p, g, spacing=spacing)[0].numpy()
        assd = SurfaceDistanceMetric(include_background=True, symmetric=True)(p, g, spacing=spacing)[0].numpy()
    return dice, dice_not_ignored, hd95, assd


def remove_classes(pred, gt, rng):
    """Make one class missing from the prediction only, one from the label only, one from both."""
    pred_only, gt_only, both = rng.permutation(np.arange(1, C))[:3]
    pred[(pred == pred_only) | (pred == both)] = 0
    gt[(gt == gt_only) | (gt == both)] = 0
    return pred, gt


def random_blobs(seed, shape, sigma=2.0):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((C, *shape)), sigma=(0, *[sigma] * len(shape)))
    gt = noise.argmax(0).astype(np.uint8)
    disturbance = ndimage.gaussian_filter(rng.standard_normal((C, *shape)), sigma=(0, *[1.0] * len(shape)))
    pred = (noise + 0.6 * noise.std() / disturbance.std() * disturbance).argmax(0).astype(np.uint8)
    return remove_classes(pred, gt, rng)


def ball(grid, centre, radius):
    """Bool mask of the voxels of `grid` (D, *shape) within `radius` voxels of `centre` (D,)."""
    return np.linalg.norm(grid - np.reshape(centre, (-1,) + (1,) * (grid.ndim - 1)), axis=0) <= radius


def nested_balls(seed, shape):
    """Concentric-ish balls (discs in 2D), one class each; the prediction shifts and rescales them."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for c, radius in zip(range(1, C), np.linspace(0.45, 0.12, C - 1) * min(shape)):
        centre = np.array(shape) / 2 + rng.uniform(-0.1, 0.1, len(shape)) * min(shape)
        gt[ball(grid, centre, radius)] = c
        pred[ball(grid, centre + rng.integers(-2, 3, len(shape)), radius * rng.uniform(0.8, 1.2))] = c
    return remove_classes(pred, gt, rng)


CASES = (
    [("blobs", seed, (48, 40), (0.7, 1.3)) for seed in range(8)]
    + [("blobs", seed, (20, 18, 12), (0.98, 0.98, 2.5)) for seed in range(6)]
    + [("blobs", 10, (30, 1, 25), (1.0, 2.0, 0.5))]
    + [("balls", seed, (41, 37), (1.1, 0.6)) for seed in range(4)]
    + [("balls", seed, (26, 24, 14), (0.8, 1.2, 3.0)) for seed in range(4)]
)


@pytest.mark.parametrize("kind, seed, shape, spacing", CASES)
def test_dice_hd95_assd_match_monai(kind, seed, shape, spacing):
    pred, gt = (random_blobs if kind == "blobs" else nested_balls)(seed, shape)
    dice = metrics.dice_per_class(pred, gt, C)
    hd95, assd = metrics.surface_metrics(pred, gt, spacing, C)
    ref_dice, ref_dice_not_ignored, ref_hd95, ref_assd = monai_reference(pred, gt, spacing)

    in_pred = np.array([(pred == c).any() for c in range(C)])
    in_gt = np.array([(gt == c).any() for c in range(C)])
    both, neither, only_pred, only_gt = in_pred & in_gt, ~in_pred & ~in_gt, in_pred & ~in_gt, ~in_pred & in_gt
    assert both.sum() >= 2 and neither.any() and only_pred.any() and only_gt.any()

    # Dice: identical wherever the label has the class.
    np.testing.assert_allclose(dice[in_gt], ref_dice[in_gt], atol=1e-6)
    # Policy differences, asserted: MONAI's default gives NaN whenever the label is empty, even if the
    # prediction is not (we give 0, a false positive); with ignore_empty=False it gives 1 when both are
    # empty (we give NaN, undefined).
    assert np.all(dice[only_pred] == 0) and np.all(np.isnan(ref_dice[only_pred]))
    np.testing.assert_array_equal(ref_dice_not_ignored[only_pred], 0.0)
    assert np.all(np.isnan(dice[neither])) and np.all(np.isnan(ref_dice[neither]))
    np.testing.assert_array_equal(ref_dice_not_ignored[neither], 1.0)

    # Surface distances: identical wherever both sides have the class.
    np.testing.assert_allclose(hd95[both], ref_hd95[both], atol=1e-4)
    np.testing.assert_allclose(assd[both], ref_assd[both], atol=1e-4)
    # Policy: we give NaN when either side is empty. MONAI's HD95 is NaN there too (its distances are inf
    # and the interpolated percentile of infs is NaN), but its ASSD is inf when exactly one side is empty.
    one_empty = only_pred | only_gt
    assert np.all(np.isnan(hd95[~both])) and np.all(np.isnan(assd[~both]))
    assert np.all(np.isnan(ref_hd95[~both]))
    assert np.all(np.isinf(ref_assd[one_empty])) and np.all(np.isnan(ref_assd[neither]))


def test_bar_shifted_by_one_voxel_of_2_mm():
    gt = np.zeros((6, 5), np.uint8)
    pred = np.zeros((6, 5), np.uint8)
    gt[2, 1:4] = 1
    pred[3, 1:4] = 1
    hd95, assd = metrics.surface_metrics(pred, gt, spacing=(2.0, 1.0))
    assert hd95[1] == pytest.approx(2.0) and assd[1] == pytest.approx(2.0)
    assert metrics.dice_per_class(pred, gt)[1] == 0.0


def test_hd95_interpolates_the_percentile_and_assd_pools_both_directions():
    gt = np.zeros((5, 5), np.uint8)
    gt[2, :] = 1
    pred = gt.copy()
    pred[4, 0] = 1  # one stray voxel 2 voxels (3 mm) from the bar
    hd95, assd = metrics.surface_metrics(pred, gt, spacing=(1.5, 1.0))
    # pred -> gt distances (0, 0, 0, 0, 0, 3): 95th percentile at rank 4.75 = 0.75 * 3; gt -> pred all 0.
    assert hd95[1] == pytest.approx(2.25)
    assert assd[1] == pytest.approx(3.0 / 11)
    np.testing.assert_allclose(metrics.surface_metrics(gt, pred, spacing=(1.5, 1.0))[0], hd95)


def test_identical_maps_have_zero_distance_and_unit_dice():
    gt = random_blobs(3, (16, 14, 10))[1]
    hd95, assd = metrics.surface_metrics(gt, gt, (1.0, 1.0, 2.0))
    present = np.array([(gt == c).any() for c in range(C)])
    np.testing.assert_array_equal(hd95[present], 0.0)
    np.testing.assert_array_equal(assd[present], 0.0)
    np.testing.assert_array_equal(metrics.dice_per_class(gt, gt)[present], 1.0)
    assert np.all(np.isnan(metrics.dice_per_class(gt, gt)[~present]))


def test_dice_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    pred[0, :4] = 1
    gt[0, :2] = 1
    gt[3, 3] = 2  # missed entirely
    dice = metrics.dice_per_class(pred, gt, C)
    assert dice[1] == pytest.approx(2 * 2 / (4 + 2))
    assert dice[2] == 0.0
    assert dice[0] == pytest.approx(2 * 11 / (12 + 13))
    assert np.all(np.isnan(dice[3:]))


@pytest.mark.parametrize("shape", [(9, 11), (7, 6, 5)])
def test_label_surfaces_equal_mask_minus_its_erosion(shape):
    label = random_blobs(1, shape, sigma=1.0)[1]
    surfaces = metrics.label_surfaces(label)
    for c in range(C):
        mask = label == c
        np.testing.assert_array_equal(surfaces & mask, mask & ~ndimage.binary_erosion(mask))


def test_pooled_dice_differs_from_the_mean_of_per_case_dice():
    small_gt = np.zeros((10, 10), np.uint8)
    small_gt[:1] = 1
    big_gt = np.zeros((10, 10), np.uint8)
    big_gt[:, :] = 1
    big_pred = np.zeros((10, 10), np.uint8)
    big_pred[:1] = 2
    preds, gts = [small_gt, big_pred], [small_gt, big_gt]
    per_case = np.stack([metrics.dice_per_class(p, g, C) for p, g in zip(preds, gts)])
    assert np.nanmean(per_case[:, 1]) == pytest.approx(0.5)
    pooled = metrics.pooled_dice(preds, gts, C)
    assert pooled[1] == pytest.approx(2 * 10 / (10 + 110))
    assert pooled[2] == 0.0 and np.isnan(pooled[3])


def test_volumes_in_ml():
    label = np.zeros((20, 10, 10), np.uint8)
    label[:10] = 2
    volumes = metrics.volumes_ml(label, spacing=(1.0, 2.0, 0.5), num_classes=C)
    np.testing.assert_allclose(volumes, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert metrics.volumes_ml(label[0], spacing=(1.0, 1.0))[2] == pytest.approx(0.1)


def test_summarise_ignores_and_counts_nan_and_leaves_background_out_of_the_foreground_mean():
    table = np.array([
        [0.9, 0.8, np.nan, 0.2, np.nan, 0.6],
        [0.7, 0.6, 0.5, 0.4, np.nan, 0.6],
    ])
    summary = metrics.summarise(table, NAMES)
    assert summary["n_cases"] == 2
    assert summary["mean"]["background"] == pytest.approx(0.8)
    assert summary["mean"]["body"] == pytest.approx(0.7) and summary["std"]["body"] == pytest.approx(0.1)
    assert summary["mean"]["bone"] == pytest.approx(0.5) and summary["std"]["bone"] == 0.0
    assert summary["n_nan"] == {"background": 0, "body": 0, "bone": 1, "bladder": 0, "rectum": 2, "prostate": 0}
    assert np.isnan(summary["mean"]["rectum"]) and np.isnan(summary["std"]["rectum"])
    assert summary["mean_foreground"] == pytest.approx((0.7 + 0.5 + 0.3 + 0.6) / 4)


def _cube_case(classes):
    """A 12x12x6 label map: body everywhere, and a 3x4x2 cube of each class in `classes` (3..5) at its own place."""
    label = np.ones((12, 12, 6), np.uint8)
    for c in classes:
        x = 2 + 3 * (c - 3)
        label[x:x + 3, 4:8, 2:4] = c
    return label


def test_summary_counts_missed_and_spurious_beside_the_means():
    """Three cases: found, prostate missed, prostate missed plus a bladder the label lacks. HD95's mean leaves
    the misses out (it equals a perfect model's), so the counts must show them, in summary.json and .md."""
    spacing = (1.0, 1.0, 2.0)
    cases = [(_cube_case([3, 5]), _cube_case([3, 5])),  # (prediction, label)
             (_cube_case([3]), _cube_case([3, 5])),
             (_cube_case([3, 4]), _cube_case([4, 5]))]
    rows = [row for i, (pred, gt) in enumerate(cases) for row in report.case_rows(f"case{i}", pred, gt, spacing)]
    perfect = [row for i, (_, gt) in enumerate(cases) for row in report.case_rows(f"case{i}", gt, gt, spacing)]
    summary, ideal = report.summarise_rows(rows), report.summarise_rows(perfect)
    assert summary["hd95_mean"]["prostate"] == ideal["hd95_mean"]["prostate"] == 0.0
    assert summary["truth_present"] == {"background": 0, "body": 3, "bone": 0, "bladder": 2, "rectum": 1,
                                        "prostate": 3}
    assert summary["missed"] == {"background": 0, "body": 0, "bone": 0, "bladder": 0, "rectum": 0, "prostate": 2}
    assert summary["spurious"] == {"background": 0, "body": 0, "bone": 0, "bladder": 1, "rectum": 0, "prostate": 0}
    assert sum(ideal["missed"].values()) == sum(ideal["spurious"].values()) == 0
    assert summary["hd95_n_nan"]["prostate"] == 2 and summary["dice_n_nan"]["bone"] == 3
    table = report.markdown_table(summary)
    assert "| prostate | 0.3333 ± 0.4714 | 0.00 ± 0.00 | 2 of 3 | 0 |" in table
    assert "| bladder | 0.6667 ± 0.4714 | 0.00 ± 0.00 | 0 of 2 | 1 |" in table


@pytest.mark.parametrize(
    "pred, gt, error",
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), TypeError),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), ValueError),
        (np.full((4, 4), 6, np.uint8), np.zeros((4, 4), np.uint8), ValueError),
        (np.full((4, 4), -1, np.int64), np.zeros((4, 4), np.int64), ValueError),
    ],
)
def test_bad_label_maps_raise(pred, gt, error):
    with pytest.raises(error):
        metrics.dice_per_class(pred, gt, C)
    with pytest.raises(error):
        metrics.surface_metrics(pred, gt, (1.0, 1.0), C)


def test_spacing_must_match_the_axes():
    label = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        metrics.surface_metrics(label, label, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.volumes_ml(label, (1.0, 0.0, 1.0))
