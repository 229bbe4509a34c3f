"""predict.py --score: masks made by anything, judged with the metrics and reports of evaluating a split."""

import csv
import gzip
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import test_predict
import torch

import dataset
import predict
import scoring
import train

TINY = ["--features", "4", "8", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("score_cache")


def imperfect(label):
    """A rater that is off by two voxels along the last axis and never finds the prostate (fast to score: the
    surfaces stay close; a two-step model's scattered masks took HD95 ~20 s for one scan on this loaded CPU)."""
    pred = torch.roll(label, shifts=2, dims=-1)
    pred[pred == 5] = 1
    return test_predict._one_hot(pred)


@pytest.fixture(scope="module")
def evaluated_2d(phantom_2d_dir, cache_dir, tmp_path_factory):
    """A 2D evaluation of the validate (256x144 slices) and test ((256, 128, 1) files) splits with the network
    replaced by `imperfect`: {split: OUT}."""
    root = tmp_path_factory.mktemp("score2d")
    assert train.main(["--data-dir", str(phantom_2d_dir), "--out", str(root / "run"), "--cache-dir", str(cache_dir),
                       *TINY]) == 0
    outs = {}
    for split in ("validate", "test"):
        outs[split] = root / split
        with pytest.MonkeyPatch.context() as monkeypatch:
            test_predict._oracle(monkeypatch, phantom_2d_dir, split, cache_dir, imperfect)
            assert predict.main(["--checkpoint", str(root / "run" / "best.pt"), "--data-dir", str(phantom_2d_dir),
                                 "--split", split, "--out", str(outs[split]), "--cache-dir", str(cache_dir)]) == 0
    return outs


@pytest.fixture(scope="module")
def evaluated_3d(phantom_3d_small_dir, cache_dir, tmp_path_factory):
    """A tiny 3D run and its evaluation of the test split: (RUN, OUT)."""
    root = tmp_path_factory.mktemp("score3d")
    run = root / "run"
    assert train.main(["--data-dir", str(phantom_3d_small_dir), "--out", str(run), "--cache-dir", str(cache_dir),
                       *TINY, "--patch-size", "32", "32", "16"]) == 0
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--data-dir", str(phantom_3d_small_dir),
                         "--out", str(root / "out"), "--cache-dir", str(cache_dir)]) == 0
    return run, root / "out"


def score(pred_dir, data_dir, out, cache_dir, *extra):
    return predict.main(["--score", str(pred_dir), "--data-dir", str(data_dir), "--out", str(out),
                         "--cache-dir", str(cache_dir), *extra])


def label_masks(data_dir, split, folder):
    """The split's own label files copied as masks: a perfect rater."""
    shutil.copytree(data_dir / f"keras_slices_seg_{split}", folder)
    return folder


def stack_scan(slice_files, path):
    """One 2D scan's slice masks as one volume (H, n_slices, W), slice j = vol[:, j, :], the slices' stacked
    affine: as nnunet_export writes a scan."""
    slices = [nib.load(f) for f in slice_files]
    stack = np.stack([np.asarray(s.dataobj).reshape(slices[0].shape[:2]) for s in slices])
    affine = dataset.stack_affine([s.affine for s in slices], slice_files)
    nib.save(nib.Nifti1Image(dataset.scan_volume(stack).astype(np.uint8), affine), path)


def slice_files(folder, prefix):
    return sorted(folder.glob(f"{prefix}_slice_*.nii.gz"), key=lambda p: int(p.name.split("_slice_")[1][:-7]))


@pytest.mark.parametrize("split", ["validate", "test"])
def test_our_masks_rescored_give_identical_reports(evaluated_2d, phantom_2d_dir, cache_dir, tmp_path, split):
    out = evaluated_2d[split]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missed"]["prostate"] == summary["truth_present"]["prostate"] == 1  # a real test of the counts
    assert 0 < summary["hd95_mean"]["bladder"] < 10
    assert score(out, phantom_2d_dir, tmp_path / "scored", cache_dir, "--split", split) == 0  # finds predictions/
    for name in ("summary.json", "metrics.csv"):
        assert (tmp_path / "scored" / name).read_text() == (out / name).read_text(), name
    for name in ("summary.md", "dice_boxplot.png", "montage.png", "overlay_body.png"):
        assert (tmp_path / "scored" / name).is_file(), name


def test_probabilities_and_uncertainty_beside_the_masks_are_not_scored(evaluated_2d, phantom_2d_dir, cache_dir,
                                                                        tmp_path):
    """--save-probs and --save-uncertainty write float maps into predictions/: --score leaves them out."""
    pred_dir = tmp_path / "predictions"
    shutil.copytree(evaluated_2d["test"] / "predictions", pred_dir)
    first = sorted(pred_dir.iterdir())[0]
    for kind in scoring.SIDE_FILES:
        shutil.copy(first, pred_dir / scoring.side_name(first.name, kind))
    assert score(pred_dir, phantom_2d_dir, tmp_path / "scored", cache_dir, "--split", "test") == 0
    assert (tmp_path / "scored" / "summary.json").read_text() == (evaluated_2d["test"] / "summary.json").read_text()


def test_per_scan_volumes_for_2d_are_accepted(evaluated_2d, phantom_2d_dir, cache_dir, tmp_path):
    out = evaluated_2d["validate"]
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    stack_scan(slice_files(out / "predictions", "seg_005_week_0"), volumes / "case_005_week_0.nii.gz")
    assert score(volumes, phantom_2d_dir, tmp_path / "scored", cache_dir, "--split", "validate") == 0
    assert (tmp_path / "scored" / "summary.json").read_text() == (out / "summary.json").read_text()


@pytest.mark.parametrize("axis", [0, -1], ids=["slices first", "slices last (H, W, n)"])
def test_a_2d_volume_in_another_axis_order_is_refused(phantom_2d_dir, cache_dir, tmp_path, capsys, axis):
    files = slice_files(phantom_2d_dir / "keras_slices_seg_validate", "seg_005_week_0")
    volume = np.stack([np.asarray(nib.load(f).dataobj) for f in files], axis=axis)  # not (256, 60, 144)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    nib.save(nib.Nifti1Image(volume.astype(np.uint8), nib.load(files[0]).affine), volumes / "case_005_week_0.nii.gz")
    assert score(volumes, phantom_2d_dir, tmp_path / "scored", cache_dir, "--split", "validate") == 2
    err = capsys.readouterr().err
    assert f"case_005_week_0.nii.gz: shape {volume.shape}, but" in err and "needs (256, 60, 144)" in err
    assert "(H, n_slices, W), vol[:, j, :] = slice j" in err


def test_nnunet_predictions_on_the_export_score_as_they_are(phantom_2d_dir, cache_dir, tmp_path):
    """The export's test labels stand in for nnU-Net's predictions: volumes in the export's geometry, as nnU-Net
    writes them. Scored against the slice files, every class present has Dice 1, every absent one NaN."""
    assert dataset.main(["export-nnunet", str(phantom_2d_dir), str(tmp_path / "raw"), "--dataset-id", "9"]) == 0
    pred_dir = tmp_path / "nnunet_pred"
    shutil.copytree(tmp_path / "raw" / "Dataset009_HipMRI2D" / "labelsTs", pred_dir)
    assert [p.name for p in pred_dir.iterdir()] == ["case_006_week_0.nii.gz"]
    assert score(pred_dir, phantom_2d_dir, tmp_path / "scored", cache_dir, "--split", "test") == 0
    rows = list(csv.DictReader((tmp_path / "scored" / "metrics.csv").open()))
    assert len(rows) == 6 and sum(float(r["gt_ml"]) > 0 for r in rows) >= 5
    for row in rows:
        dice = float(row["dice"])
        assert dice == 1.0 if float(row["gt_ml"]) > 0 else math.isnan(dice), row


def test_masks_named_like_the_images_and_a_perfect_rater(phantom_2d_dir, cache_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in (phantom_2d_dir / "keras_slices_seg_test").iterdir():
        shutil.copy(path, masks / path.name.replace("seg_", "case_"))
    (masks / "README.txt").write_text("made by hand")  # not NIfTI: ignored
    shutil.copy(masks / "case_006_week_0_slice_0.nii.gz", masks / "case_006_week_0_slice_0_probs.nii.gz")  # skipped
    assert score(masks, phantom_2d_dir, tmp_path / "scored", cache_dir) == 0
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["mean_foreground_dice"] == 1.0
    assert all(summary["hd95_mean"][name] == 0.0 for name in summary["hd95_mean"])
    assert sum(summary["missed"].values()) == sum(summary["spurious"].values()) == 0


def _move_origin(path):
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 3] += (5.0, 0.0, 0.0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), path)


def _mirror_x(path):
    """Re-exported mirrored along x with the affine adjusted: overlays in a viewer, but voxel (i, j) moved."""
    img = nib.load(path)
    affine = img.affine.copy()
    affine[:3, 3] += (img.shape[0] - 1) * affine[:3, 0]
    affine[:3, 0] *= -1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), affine), path)


@pytest.mark.parametrize("damage, message", [(_move_origin, "mask origin"), (_mirror_x, "mask orientation")])
def test_a_shifted_or_mirrored_mask_is_refused_naming_it(phantom_2d_dir, cache_dir, tmp_path, capsys, damage,
                                                         message):
    masks = label_masks(phantom_2d_dir, "test", tmp_path / "masks")
    damage(masks / "seg_006_week_0_slice_7.nii.gz")
    assert score(masks, phantom_2d_dir, tmp_path / "scored", cache_dir) == 2
    err = capsys.readouterr().err
    assert f"{masks / 'seg_006_week_0_slice_7.nii.gz'}: does not overlay its label" in err and message in err
    assert not (tmp_path / "scored" / "summary.json").exists()


def test_missing_extra_and_bad_masks_are_all_listed_at_once(phantom_2d_dir, cache_dir, tmp_path, capsys):
    masks = label_masks(phantom_2d_dir, "test", tmp_path / "masks")
    (masks / "seg_006_week_0_slice_3.nii.gz").unlink()
    shutil.copy(masks / "seg_006_week_0_slice_0.nii.gz", masks / "seg_099_week_0_slice_0.nii.gz")  # no such scan
    shutil.copy(masks / "seg_006_week_0_slice_0.nii.gz", masks / "notes.nii.gz")  # no naming at all
    shutil.copy(masks / "seg_006_week_0_slice_1.nii.gz", masks / "case_006_week_0_slice_1.nii.gz")  # twice
    reference = nib.load(masks / "seg_006_week_0_slice_2.nii.gz")
    values = np.asarray(reference.dataobj).copy()
    values[0, 0] = 7
    nib.save(nib.Nifti1Image(values, reference.affine, reference.header), masks / "seg_006_week_0_slice_2.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((128, 128), np.uint8), reference.affine), masks / "seg_006_week_0_slice_4.nii")
    (masks / "seg_006_week_0_slice_4.nii.gz").unlink()
    assert score(masks, phantom_2d_dir, tmp_path / "scored", cache_dir) == 2
    err = capsys.readouterr().err
    assert "case_006_week_0: 1 of 60 slices have none (seg_006_week_0_slice_3.nii.gz)" in err
    assert str(masks / "seg_099_week_0_slice_0.nii.gz") in err and str(masks / "notes.nii.gz") in err
    assert "case_006_week_0_slice_1.nii.gz and seg_006_week_0_slice_1.nii.gz" in err
    assert f"{masks / 'seg_006_week_0_slice_2.nii.gz'}: label values outside the classes" in err
    assert f"{masks / 'seg_006_week_0_slice_4.nii'}: shape (128, 128)" in err
    assert not (tmp_path / "scored").exists()


def test_a_scan_without_any_mask_is_refused(phantom_2d_dir, cache_dir, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "case_006_week_0.txt").write_text("not a mask")
    assert score(masks, phantom_2d_dir, tmp_path / "scored", cache_dir) == 2
    assert "case_006_week_0: expected case_006_week_0.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("naming", ["_SEMANTIC_LFOV.nii.gz", "_LFOV.nii.gz", ".nii.gz", ".NII"])
def test_3d_volumes_named_like_the_label_image_or_case_rescore_identically(evaluated_3d, phantom_3d_small_dir,
                                                                           cache_dir, tmp_path, naming):
    run, out = evaluated_3d
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in (out / "predictions").iterdir():
        data = gzip.decompress(path.read_bytes()) if naming == ".NII" else path.read_bytes()
        (masks / path.name.replace("_SEMANTIC_LFOV.nii.gz", naming)).write_bytes(data)
    assert score(masks, phantom_3d_small_dir, tmp_path / "scored", cache_dir, "--split-file",
                 str(run / "split.json")) == 0
    for name in ("summary.json", "metrics.csv"):
        assert (tmp_path / "scored" / name).read_text() == (out / name).read_text(), name


def test_3d_needs_the_run_split_file(evaluated_3d, phantom_3d_small_dir, cache_dir, tmp_path, capsys):
    assert score(evaluated_3d[1], phantom_3d_small_dir, tmp_path / "scored", cache_dir) == 2
    assert "needs --split-file RUN/split.json" in capsys.readouterr().err
    assert score(evaluated_3d[1], phantom_3d_small_dir, tmp_path / "scored", cache_dir, "--split-file",
                 str(tmp_path / "split.json")) == 2
    assert "no split file" in capsys.readouterr().err
    assert not (tmp_path / "split.json").exists()  # never drawn and saved there


def test_3d_mask_of_another_shape_is_refused(evaluated_3d, phantom_3d_small_dir, cache_dir, tmp_path, capsys):
    run, out = evaluated_3d
    masks = tmp_path / "masks"
    shutil.copytree(out / "predictions", masks)
    path = next(masks.iterdir())
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1].copy(), img.affine, img.header), path)
    assert score(masks, phantom_3d_small_dir, tmp_path / "scored", cache_dir, "--split-file",
                 str(run / "split.json")) == 2
    assert f"{path}: shape (64, 64, 31)" in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [("missing", "no such folder"), ("same", "is the --score folder")])
def test_score_folder_must_exist_and_differ_from_out(phantom_2d_dir, cache_dir, tmp_path, capsys, where, message):
    pred_dir = tmp_path / "masks"
    if where == "same":
        label_masks(phantom_2d_dir, "test", pred_dir)
    out = pred_dir if where == "same" else tmp_path / "out"
    assert score(pred_dir, phantom_2d_dir, out, cache_dir) == 2
    assert message in capsys.readouterr().err
    assert not (pred_dir / "summary.json").exists()


@pytest.mark.parametrize("argv", [
    ["--score", "p", "--checkpoint", "c", "--data-dir", "d", "--out", "o"],
    ["--score", "p", "--data-dir", "d", "--out", "o", "--tta"],
    ["--score", "p", "--input", "i", "--out", "o"],
])
def test_score_is_its_own_mode(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        predict.main(argv)
    assert exited.value.code == 2
    assert "--score" in capsys.readouterr().err


def test_help_names_the_three_modes(capsys):
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    for mode in ("evaluate a split", "unlabelled images", "score masks", "(H, n_slices, W)", "--split-file"):
        assert mode in text


def test_side_files_keep_the_masks_suffix_in_any_case():
    """An uppercase .NII.GZ must not turn the entropy map's name into the mask's own name (it overwrote it)."""
    assert scoring.side_name("CASE_006_WEEK1_LFOV.NII.GZ", "entropy") == "CASE_006_WEEK1_LFOV_entropy.NII.GZ"
    assert scoring.side_name("seg_004_week_0_slice_7.nii", "probs") == "seg_004_week_0_slice_7_probs.nii"
