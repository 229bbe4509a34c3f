"""predict.py: known-answer evaluation with oracle models, NIfTI geometry, original sizes, unlabelled input."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import cache
import inference
import predict
import train
import utils

TINY = ["--features", "4", "8", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def run_2d(phantom_2d_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run2d"
    assert train.main(["--data-dir", str(phantom_2d_dir), "--out", str(run), "--cache-dir", str(run.parent / "c"),
                       *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def run_3d(phantom_3d_small_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run3d"
    assert train.main(["--data-dir", str(phantom_3d_small_dir), "--out", str(run), "--cache-dir",
                       str(run.parent / "c"), *TINY, "--patch-size", "32", "32", "16"]) == 0
    return run


def _oracle(monkeypatch, data_dir, split, cache_dir, make_probs):
    """Replace the network by a function of the case's own label, found by matching the image."""
    cases = cache.load_split(data_dir, split, cache_dir=cache_dir)
    by_image = {np.asarray(image).tobytes(): np.asarray(label) for image, label in zip(cases.images, cases.labels)}

    def fake_predict_case(model, image, spatial_dims, **kwargs):
        label = torch.from_numpy(by_image[np.asarray(image).tobytes()].astype(np.int64))
        return make_probs(label)

    monkeypatch.setattr(inference, "predict_case", fake_predict_case)


def _one_hot(label):
    return torch.nn.functional.one_hot(label, utils.NUM_CLASSES).movedim(-1, 0).float()


def test_oracle_scores_dice_one_and_hd95_zero(run_2d, phantom_2d_dir, tmp_path, monkeypatch):
    _oracle(monkeypatch, phantom_2d_dir, "test", tmp_path / "c", _one_hot)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--data-dir", str(phantom_2d_dir),
                         "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 1
    assert set(summary["dice_mean"]) == set(utils.CLASS_NAMES)
    assert all(summary["dice_mean"][name] == 1.0 for name in utils.CLASS_NAMES)
    assert all(summary["hd95_mean"][name] == 0.0 for name in utils.CLASS_NAMES)
    assert summary["mean_foreground_dice"] == 1.0
    for name in ("metrics.csv", "summary.md", "dice_boxplot.png", "montage.png", "overlay_prostate.png"):
        assert (out / name).is_file(), name


def test_all_background_scores_zero_and_counts_nan(run_2d, phantom_2d_dir, tmp_path, monkeypatch):
    _oracle(monkeypatch, phantom_2d_dir, "test", tmp_path / "c", lambda label: _one_hot(torch.zeros_like(label)))
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--data-dir", str(phantom_2d_dir),
                         "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["dice_mean"][name] == 0.0 for name in utils.CLASS_NAMES[1:])
    assert summary["mean_foreground_dice"] == 0.0
    assert all(summary["hd95_n_nan"][name] == 1 for name in utils.CLASS_NAMES[1:])  # empty prediction
    assert "n/a" in (out / "summary.md").read_text()


def test_2d_masks_keep_input_geometry_and_original_size(run_2d, phantom_2d_dir, tmp_path):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--data-dir", str(phantom_2d_dir), "--split",
                         "validate", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--tta"]) == 0
    labels = sorted((phantom_2d_dir / "keras_slices_seg_validate").iterdir())
    assert len(list((out / "predictions").iterdir())) == len(labels) == 60
    for label_path in labels[:5]:
        image = nib.load(phantom_2d_dir / "keras_slices_validate" / label_path.name.replace("seg_", "case_"))
        mask = nib.load(out / "predictions" / label_path.name)
        assert mask.shape == image.shape == (256, 144)  # the odd volume's slices come back at 256x144
        assert np.allclose(mask.affine, image.affine)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= set(range(6))


def test_3d_evaluation_uses_the_run_split_and_writes_volumes(run_3d, phantom_3d_small_dir, tmp_path):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_3d / "best.pt"), "--data-dir", str(phantom_3d_small_dir),
                         "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--save-probs"]) == 0
    test_keys = json.loads((run_3d / "split.json").read_text())["splits"]["test"]
    written = sorted(p.name for p in (out / "predictions").iterdir() if "_probs" not in p.name)
    assert [name.replace("_SEMANTIC_LFOV.nii.gz", "") for name in written] == sorted(test_keys)
    for name in written:
        image = nib.load(phantom_3d_small_dir / "semantic_MRs_anon" / name.replace("_SEMANTIC", ""))
        mask = nib.load(out / "predictions" / name)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        probs = nib.load(out / "predictions" / name.replace(".nii", "_probs.nii")).get_fdata()
        assert probs.shape == (*image.shape, 6) and np.allclose(probs.sum(-1), 1, atol=1e-3)


def test_3d_refuses_without_split_file(run_3d, phantom_3d_small_dir, tmp_path, capsys):
    checkpoint = tmp_path / "elsewhere" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(run_3d / "best.pt", checkpoint)
    assert predict.main(["--checkpoint", str(checkpoint), "--data-dir", str(phantom_3d_small_dir),
                         "--out", str(tmp_path / "out")]) == 2
    assert "split.json" in capsys.readouterr().err


def test_unlabelled_folder_gets_masks_with_the_same_names(run_2d, phantom_2d_dir, tmp_path):
    images = sorted((phantom_2d_dir / "keras_slices_test").iterdir())[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in images:
        shutil.copy(path, inputs / path.name)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(inputs), "--out", str(out)]) == 0
    for path in images:
        mask, image = nib.load(out / path.name), nib.load(path)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)


def test_unlabelled_single_slice_matches_the_evaluated_split(run_2d, phantom_2d_dir, tmp_path):
    """The same slice segmented alone (--input) and inside its case (--data-dir) gives the same mask."""
    image = sorted((phantom_2d_dir / "keras_slices_test").iterdir())[30]
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(image), "--out",
                         str(tmp_path / "single")]) == 0
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--data-dir", str(phantom_2d_dir), "--out",
                         str(tmp_path / "split"), "--cache-dir", str(tmp_path / "c")]) == 0
    alone = np.asarray(nib.load(tmp_path / "single" / image.name).dataobj)
    in_case = np.asarray(nib.load(tmp_path / "split" / "predictions" / image.name.replace("case_", "seg_")).dataobj)
    assert (alone == in_case).mean() > 0.999


def masks_and_temporaries(out):
    """The NIfTI files and hidden (temporary) files in OUT; the weekly report and review list sit beside them."""
    return sorted(p.name for p in out.iterdir() if p.name.endswith((".nii", ".nii.gz")) or p.name.startswith("."))


def test_a_batch_segments_every_good_file_and_lists_every_bad_one(run_2d, phantom_2d_dir, phantom_3d_small_dir,
                                                                   tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = sorted((phantom_2d_dir / "keras_slices_test").iterdir())[:2]
    for path in good:
        shutil.copy(path, inputs / path.name)
    (inputs / "corrupt.nii.gz").write_bytes(b"not a gzip stream")
    image = nib.load(good[0])
    with_nan = image.get_fdata(dtype=np.float32)
    with_nan[3, 4] = np.nan
    nib.save(nib.Nifti1Image(with_nan, image.affine), inputs / "with_nan.nii")
    shutil.copy(next((phantom_3d_small_dir / "semantic_MRs_anon").iterdir()), inputs / "volume.nii.gz")
    (inputs / "README.md").write_text("notes")  # not NIfTI: ignored, not a failure
    (inputs / ".DS_Store").write_bytes(b"\x00\x01")
    (inputs / "subfolder").mkdir()
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(inputs), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "segmented 2 of 5 file(s)" in captured.out and "3 failed" in captured.out
    for name, reason in [("corrupt.nii.gz", "unreadable"), ("with_nan.nii", "NaN"), ("volume.nii.gz", "3D checkpoint")]:
        assert any(f"{inputs / name}: " in line and reason in line for line in captured.err.splitlines()), name
    assert masks_and_temporaries(out) == sorted(p.name for p in good)


@pytest.mark.parametrize("bad", ["corrupt", "not_nifti_inside"])
def test_one_bad_input_file_is_refused_naming_it(run_2d, tmp_path, capsys, bad):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"\x1f\x8b truncated" if bad == "corrupt" else b"plain text, not NIfTI")
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(path), "--out",
                         str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "segmented 0 of 1 file(s)" in captured.out and f"{path}: unreadable" in captured.err


def test_a_write_failing_mid_batch_leaves_no_partial_mask(run_2d, phantom_2d_dir, tmp_path, monkeypatch, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    images = sorted((phantom_2d_dir / "keras_slices_test").iterdir())[:3]
    for path in images:
        shutil.copy(path, inputs / path.name)
    real_fsync, calls = os.fsync, []

    def full_disk_on_the_second_mask(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_on_the_second_mask)
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(inputs), "--out", str(out)]) == 2
    assert f"{inputs / images[1].name}: OSError: [Errno 28] No space left on device" in capsys.readouterr().err
    assert masks_and_temporaries(out) == [images[0].name, images[2].name]  # no temporary file left


@pytest.mark.parametrize("setup, message", [
    ("empty", "no .nii or .nii.gz files"),
    ("not_nifti", "not a NIfTI file"),
    ("same_folder", "is the input folder"),
    ("missing", "no such file or folder"),
    ("volume_into_2d", "use a 3D checkpoint"),
])
def test_bad_unlabelled_input_is_refused_clearly(run_2d, phantom_3d_small_dir, tmp_path, capsys, setup, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    target, out = inputs, tmp_path / "out"
    if setup == "not_nifti":
        target = inputs / "notes.txt"
        target.write_text("hello")
    elif setup == "same_folder":
        (inputs / "a.nii.gz").write_bytes(b"")
        out = inputs
    elif setup == "missing":
        target = tmp_path / "nope"
    elif setup == "volume_into_2d":
        volume = next((phantom_3d_small_dir / "semantic_MRs_anon").iterdir())
        shutil.copy(volume, inputs / volume.name)
    before = sorted(p.name for p in inputs.iterdir())
    assert predict.main(["--checkpoint", str(run_2d / "best.pt"), "--input", str(target), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_unreadable_checkpoint_is_refused(tmp_path, phantom_2d_dir, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x80\x04garbage")
    assert predict.main(["--checkpoint", str(bad), "--data-dir", str(phantom_2d_dir), "--out", str(tmp_path)]) == 2
    assert "best.pt" in capsys.readouterr().err
