"""dataset.py, datacheck.py, sampling.py and augment.py: pairing, reading, preprocessing, splits, cache, the
`check` CLI and report, batches, augmentation.

Most tests write tiny NIfTI files in the real layouts (a few 16x8 slices or 16x16x8 volumes) so the whole
file runs in seconds; the last ones use phantom.py when it is there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import cache as cache_module  # `cache` is this file's cache-folder fixture
import dataset
import sampling
from augment import AugmentConfig, augment_batch
from dataset import DataConfig, DataError

REPO = Path(__file__).resolve().parents[1]

ZOOMS = (0.9, 0.8, 2.5)  # distinct per axis so a mixed-up spacing order shows
SMALL = DataConfig(target_size_2d=(16, 8))
NAMINGS_3D = {
    "anon": ("semantic_MRs_anon", "semantic_labels_anon", "Case_{c}_Week{w}_LFOV", "Case_{c}_Week{w}_SEMANTIC_LFOV"),
    "cluster": ("semantic_MRs", "semantic_labels_only", "{c}_Week{w}_LFOV", "{c}_Week{w}_SEMANTIC"),
}


def write_nifti(path: Path, data, dtype=np.float32, zooms=ZOOMS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), np.diag([*zooms, 1.0])), str(path))
    return path


def random_pair(rng, shape):
    """A raw-MR-like image and a float label (as the real files hold) of `shape`."""
    return rng.random(shape, dtype=np.float32) * 800 + 100, rng.integers(0, 6, shape).astype(np.float32)


def make_2d(root: Path, splits=None, n_slices=3, shape=(16, 8), ext=".nii.gz", seed=0) -> Path:
    """keras_slices_* folders; `splits` maps split -> [(patient, week)], files written in random order."""
    splits = splits or {"train": [("004", 0), ("004", 1), ("005", 0)], "validate": [("006", 0)], "test": [("007", 0)]}
    rng = np.random.default_rng(seed)
    jobs = [(split, c, w, s) for split, cases in splits.items() for c, w in cases for s in range(n_slices)]
    random.Random(seed).shuffle(jobs)
    for split, c, w, s in jobs:
        image, label = random_pair(rng, shape)
        write_nifti(root / f"keras_slices_{split}" / f"case_{c}_week_{w}_slice_{s}{ext}", image)
        write_nifti(root / f"keras_slices_seg_{split}" / f"seg_{c}_week_{w}_slice_{s}{ext}", label)
    return root


def make_3d(root: Path, naming="anon", patients=("004", "005", "006"), weeks=(0, 1), shape=(16, 16, 8), seed=0):
    """A 3D layout; in the cluster naming a patient is written with its letter ("K019"), "B" when given none."""
    image_dir, label_dir, image_name, label_name = NAMINGS_3D[naming]
    rng = np.random.default_rng(seed)
    for c in patients:
        c = "B" + c if naming == "cluster" and c[0].isdigit() else c
        for w in weeks:
            image, label = random_pair(rng, shape)
            write_nifti(root / image_dir / (image_name.format(c=c, w=w) + ".nii.gz"), image)
            write_nifti(root / label_dir / (label_name.format(c=c, w=w) + ".nii.gz"), label)
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ---------------------------------------------------------------- find and pair


def test_pairs_by_name_whatever_the_listing_order(tmp_path, monkeypatch):
    root = make_2d(tmp_path / "data")
    listing = Path.iterdir

    def shuffled(self):
        entries = list(listing(self))
        random.Random(len(entries)).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    pairs = dataset.find_pairs(root, "train")
    assert dataset.detect_layout(root) == "2d"
    assert len(pairs) == 9
    for pair in pairs:
        assert pair.image.name.replace("case_", "seg_") == pair.label.name
        assert pair.key == pair.image.name.split(".")[0]
    assert [(p.case_id, p.week, p.slice_index) for p in pairs] == sorted((p.case_id, p.week, p.slice_index)
                                                                         for p in pairs)
    assert pairs[0].case_key == "case_004_week_0"


@pytest.mark.parametrize("naming,key", [("anon", "Case_004_Week1"), ("cluster", "B004_Week1")])
def test_both_3d_namings(tmp_path, naming, key):
    root = make_3d(tmp_path, naming)
    pairs = dataset.find_pairs(root)
    assert dataset.detect_layout(root) == "3d"
    assert len(pairs) == 6 and pairs[1].key == key and pairs[1].case_id == "004" and pairs[1].week == 1
    assert pairs[1].label.name.startswith(key + "_SEMANTIC")


def test_nii_and_nii_gz_mixed(tmp_path):
    root = make_2d(tmp_path, ext=".nii")
    write_nifti(root / "keras_slices_train" / "case_004_week_0_slice_3.nii.gz", np.ones((16, 8)))
    write_nifti(root / "keras_slices_seg_train" / "seg_004_week_0_slice_3.nii", np.zeros((16, 8)))
    pairs = dataset.find_pairs(root, "train")
    assert len(pairs) == 10
    assert pairs[3].image.name.endswith(".nii.gz") and pairs[3].label.name.endswith(".nii")


def test_unpaired_and_duplicate_files_are_named(tmp_path):
    root = make_2d(tmp_path)
    (root / "keras_slices_seg_train" / "seg_005_week_0_slice_2.nii.gz").unlink()
    write_nifti(root / "keras_slices_train" / "case_004_week_0_slice_0.nii", np.ones((16, 8)))
    with pytest.raises(DataError) as err:
        dataset.find_pairs(root, "train")
    assert "image without label (1): " in str(err.value) and "case_005_week_0_slice_2.nii.gz" in str(err.value)
    assert "duplicate key" in str(err.value) and "case_004_week_0_slice_0.nii " in str(err.value)


def test_empty_split_and_missing_layout(tmp_path):
    root = make_2d(tmp_path / "data")
    for path in (root / "keras_slices_test").iterdir():
        path.unlink()
    for path in (root / "keras_slices_seg_test").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="empty split"):
        dataset.find_pairs(root, "test")
    with pytest.raises(DataError, match="no HipMRI layout found"):
        dataset.detect_layout(tmp_path)


# ---------------------------------------------------------------- read


def test_read_drops_trailing_singleton_and_rounds_float_labels(tmp_path):
    image = write_nifti(tmp_path / "i.nii.gz", np.arange(128).reshape(16, 8, 1))
    label = write_nifti(tmp_path / "l.nii.gz", np.full((16, 8, 1), 4.9999999), dtype=np.float64)
    data, img = dataset.read_image(image)
    assert data.shape == (16, 8) and data.dtype == np.float32 and img.shape == (16, 8, 1)
    read = dataset.read_label(label, spatial_dims=2)
    assert read.dtype == np.uint8 and read.shape == (16, 8) and (read == 5).all()


def test_read_honours_scl_slope(tmp_path):
    img = nib.Nifti1Image(np.full((4, 4, 2), 7, dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    assert (dataset.read_image(tmp_path / "s.nii.gz")[0] == 15).all()


@pytest.mark.parametrize("bad,shown", [(7, "7"), (2.5, "2.5"), (-1, "-1")])
def test_bad_label_values_are_named(tmp_path, bad, shown):
    values = np.zeros((16, 8))
    values[3, 3] = bad
    path = write_nifti(tmp_path / "seg_004_week_0_slice_0.nii.gz", values)
    with pytest.raises(DataError) as err:
        dataset.read_label(path)
    assert "seg_004_week_0_slice_0.nii.gz" in str(err.value) and shown in str(err.value)


def test_nan_image_and_corrupt_file_are_named(tmp_path):
    values = np.ones((16, 8))
    values[0, 0] = np.nan
    with pytest.raises(DataError, match="nan.nii.gz: 1 NaN/Inf"):
        dataset.read_image(write_nifti(tmp_path / "nan.nii.gz", values))
    corrupt = write_nifti(tmp_path / "corrupt.nii.gz", np.random.default_rng(0).random((64, 64)))
    truncate(corrupt)
    with pytest.raises(DataError, match="corrupt.nii.gz: unreadable or corrupt"):
        dataset.read_image(corrupt)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="junk.nii.gz"):
        dataset.read_label(tmp_path / "junk.nii.gz")


def test_a_misnamed_compression_says_rename_and_real_damage_says_re_copy(tmp_path, capsys):
    """A .nii.gz holding plain NIfTI bytes (or a .nii holding gzip bytes) is told by its first bytes: rename it.
    Only a file that is neither says re-copy."""
    root = make_2d(tmp_path / "data")
    plain = root / "keras_slices_train" / "case_004_week_0_slice_1.nii.gz"
    nib.save(nib.load(plain), str(tmp_path / "plain.nii"))
    plain.write_bytes((tmp_path / "plain.nii").read_bytes())
    gzipped = root / "keras_slices_seg_train" / "seg_005_week_0_slice_0.nii"
    (root / "keras_slices_seg_train" / "seg_005_week_0_slice_0.nii.gz").rename(gzipped)
    with pytest.raises(DataError, match=r"case_004_week_0_slice_1.nii.gz: an uncompressed NIfTI file with a .gz "
                                        r"name; rename it to case_004_week_0_slice_1.nii "):
        dataset.read_image(plain)
    with pytest.raises(DataError, match=r"seg_005_week_0_slice_0.nii: gzip-compressed bytes with a .nii name; "
                                        r"rename it to seg_005_week_0_slice_0.nii.gz"):
        dataset.read_label(gzipped)
    assert dataset.main(["check", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "problems: 2\n" in out and "uncompressed NIfTI file with a .gz name" in out and "corrupt" not in out
    assert "gzip-compressed bytes with a .nii name" in out
    truncated = write_nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).random((64, 64)))
    truncate(truncated)
    (tmp_path / "noise.nii.gz").write_bytes(bytes(range(256)) * 4)
    for damaged in (truncated, tmp_path / "noise.nii.gz"):
        with pytest.raises(DataError, match="unreadable or corrupt NIfTI .*re-copy or re-download it"):
            dataset.read_image(damaged)


def test_default_workers_follow_the_usable_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert dataset.default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert dataset.default_workers() == dataset.MAX_DEFAULT_WORKERS == 8


def test_load_split_reports_shape_mismatch_with_both_files(tmp_path, cache):
    root = make_2d(tmp_path / "data")
    write_nifti(root / "keras_slices_seg_train" / "seg_005_week_0_slice_1.nii.gz", np.zeros((16, 9)))
    with pytest.raises(DataError) as err:
        cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    assert "case_005_week_0_slice_1.nii.gz" in str(err.value) and "seg_005_week_0_slice_1.nii.gz" in str(err.value)
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")], "a failed build left a cache"


def test_load_split_lists_every_bad_file(tmp_path, cache):
    root = make_2d(tmp_path / "data")
    truncate(root / "keras_slices_train" / "case_004_week_1_slice_2.nii.gz")
    nan = np.ones((16, 8))
    nan[1, 1] = np.inf
    write_nifti(root / "keras_slices_train" / "case_005_week_0_slice_0.nii.gz", nan)
    with pytest.raises(DataError) as err:
        cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=2)
    assert "2 scan(s)" in str(err.value)
    assert "case_004_week_1_slice_2.nii.gz" in str(err.value) and "case_005_week_0_slice_0.nii.gz" in str(err.value)


# ---------------------------------------------------------------- preprocess and load


def test_normalise_is_finite_for_a_constant_image():
    assert (dataset.normalise(np.zeros((8, 8))) == 0).all()
    out = dataset.normalise(np.random.default_rng(0).random((32, 32)) * 500, clip_percentiles=None)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4


def test_2d_load_split_stacks_slices_resizes_and_keeps_geometry(tmp_path, cache):
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for s in range(2):  # one regular scan and the odd 256x144 one, as in the real data
        for case, shape in (("004", (256, 128)), ("019", (256, 144))):
            image, label = random_pair(rng, shape)
            write_nifti(root / "keras_slices_train" / f"case_{case}_week_1_slice_{s}.nii.gz", image)
            write_nifti(root / "keras_slices_seg_train" / f"seg_{case}_week_1_slice_{s}.nii.gz", label)
    cases = cache_module.load_split(root, "train", DataConfig(), cache_dir=cache, workers=1)
    assert cases.keys == ["case_004_week_1", "case_019_week_1"]
    assert [im.shape for im in cases.images] == [(2, 256, 128)] * 2
    assert cases.original_shapes == [(2, 256, 128), (2, 256, 144)]
    assert cases.spacings[0] == (2.5, 0.9, 0.8)  # (slice spacing, H, W): the stacked array's axes
    assert cases.spacings[1] == pytest.approx((2.5, 0.9, 0.8 * 144 / 128))  # resized: wider pixels
    assert cases.images[1].dtype == np.float16 and cases.labels[1].dtype == np.uint8
    assert abs(float(np.asarray(cases.images[0], np.float32).mean())) < 0.05
    assert [p.slice_index for p in cases.sources[1]] == [0, 1]
    assert cases.class_counts[1].sum() == 2 * 256 * 128
    raw_label = dataset.read_label(cases.sources[1][1].label)
    expected = F.interpolate(torch.from_numpy(raw_label)[None, None].float(), size=(256, 128), mode="nearest-exact")
    np.testing.assert_array_equal(cases.labels[1][1], expected[0, 0].numpy())


def write_uneven_slices(root: Path, rng) -> None:
    """One 2D scan of 3 slices, 20x12 (resized to SMALL's 16x8), each 4x brighter than the one before: z-scoring
    the stack as a whole would leave the slices on different scales."""
    for s in range(3):
        image, label = random_pair(rng, (20, 12))
        write_nifti(root / "keras_slices_train" / f"case_004_week_0_slice_{s}.nii.gz", image * 4**s)
        write_nifti(root / "keras_slices_seg_train" / f"seg_004_week_0_slice_{s}.nii.gz", label)


def test_2d_slices_are_z_scored_one_by_one(tmp_path, cache):
    write_uneven_slices(tmp_path / "data", np.random.default_rng(3))
    cases = cache_module.load_split(tmp_path / "data", "train", SMALL, cache_dir=cache, workers=1)
    cached = np.asarray(cases.images[0], np.float32)
    assert cached.shape == (3, 16, 8)
    np.testing.assert_allclose(cached.mean(axis=(1, 2)), 0, atol=2e-3)
    np.testing.assert_allclose(cached.std(axis=(1, 2)), 1, atol=2e-3)
    raw = np.stack([dataset.read_image(p.image, 2)[0] for p in cases.sources[0]])
    as_one = dataset.normalise(dataset.resize_slices(raw, (16, 8), is_label=False))
    assert np.abs(as_one - cached).max() > 0.5, "z-scoring the stack as one gives the same: the test cannot fail"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_file_preprocessed_alone_equals_its_cached_image(tmp_path, cache, spatial_dims):
    """predict.py preprocesses one file at a time, training reads the cache: the model must see the same input."""
    root = tmp_path / "data"
    if spatial_dims == 2:
        write_uneven_slices(root, np.random.default_rng(4))
        cases = cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    else:
        cases = cache_module.load_split(make_3d(root), "train", SMALL, cache_dir=cache, workers=1)
    for image, pairs in zip(cases.images, cases.sources):
        for index, pair in enumerate(pairs):
            alone = dataset.read_image(pair.image, spatial_dims)[0]
            alone = dataset.preprocess_image(alone[None] if spatial_dims == 2 else alone, spatial_dims, SMALL)
            assert alone.dtype == image.dtype == np.float16
            np.testing.assert_array_equal(alone[0] if spatial_dims == 2 else alone,
                                          image[index] if spatial_dims == 2 else image)


def test_resize_matches_torch_bilinear():
    stack = np.random.default_rng(2).random((3, 20, 18), dtype=np.float32)
    ours = dataset.resize_slices(stack, (16, 8), is_label=False)
    theirs = F.interpolate(torch.from_numpy(stack)[:, None], size=(16, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, theirs[:, 0].numpy(), atol=1e-5)


def test_cache_reused_then_rebuilt_when_a_file_changes(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO, logger="hipmri.cache")
    root = make_2d(tmp_path / "data")
    first = cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    again = cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    assert again.cache_path == first.cache_path and "reusing the cache" in caplog.text
    np.testing.assert_array_equal(again.images[2], first.images[2])
    changed = root / "keras_slices_train" / "case_005_week_0_slice_1.nii.gz"
    stat = changed.stat()
    write_nifti(changed, np.full((16, 8), 5.0))
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    assert rebuilt.cache_path != first.cache_path and not first.cache_path.exists()
    assert np.ptp(rebuilt.images[2][1]) == 0 and np.ptp(first.images[2][1]) > 0  # the new slice is constant
    other = cache_module.load_split(root, "train", DataConfig(target_size_2d=(16, 8), cache_dtype="float32"),
                                    cache_dir=cache, workers=1)
    assert other.cache_path != rebuilt.cache_path and other.images[0].dtype == np.float32
    assert rebuilt.cache_path.exists(), "a cache with other settings is not outdated and must stay"


def test_killed_build_leaves_nothing_that_looks_valid(tmp_path, cache, monkeypatch):
    root = make_2d(tmp_path / "data")
    real = cache_module._build_case
    calls = []

    def dies_on_second(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(cache_module, "_build_case", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(cache_module, "_build_case", real)
    assert len(cache_module.load_split(root, "train", SMALL, cache_dir=cache, workers=1)) == 3


def test_cache_never_inside_the_data_folder(tmp_path):
    root = make_2d(tmp_path)
    with pytest.raises(DataError, match="inside the data folder"):
        cache_module.load_split(root, "train", SMALL, cache_dir=root / "cache", workers=1)


# ---------------------------------------------------------------- 3D split


def test_patient_split_is_disjoint_stable_and_seeded(tmp_path):
    patients = [f"{i:03d}" for i in range(4, 16)]
    root = make_3d(tmp_path, "cluster", patients=patients, weeks=(0, 1, 2), shape=(2, 2, 2))
    pairs = dataset.find_pairs(root)
    split = dataset.split_by_patient(pairs, seed=0)
    assert split == dataset.split_by_patient(list(reversed(pairs)), seed=0)
    assert split["validate"] == ["B013_Week0", "B013_Week1", "B013_Week2"]  # fixed forever: runs depend on it
    assert split["test"] == ["B006_Week0", "B006_Week1", "B006_Week2"]
    owners = {name: {key[1:4] for key in keys} for name, keys in split.items()}
    assert all(owners.values()) and sum(len(o) for o in owners.values()) == 12
    assert not (owners["train"] & owners["validate"] or owners["train"] & owners["test"])
    assert sum(len(k) for k in split.values()) == 36
    assert dataset.split_by_patient(pairs, seed=1) != split
    few = dataset.split_by_patient([p for p in pairs if p.case_id in ("004", "005", "006")], seed=0)
    assert all(len(keys) == 3 for keys in few.values())


def test_3d_load_split_saves_and_reuses_split_file(tmp_path, cache):
    root = make_3d(tmp_path / "data", patients=("004", "005", "006", "007"))
    split_file = tmp_path / "run" / "split.json"
    train = cache_module.load_split(root, "train", cache_dir=cache, split_file=split_file, seed=3, workers=1)
    saved = dataset.load_split_file(split_file)
    assert train.keys == saved["train"] and train.spatial_dims == 3
    assert train.images[0].shape == (16, 16, 8) and train.spacings[0] == ZOOMS
    test = cache_module.load_split(root, "test", cache_dir=cache, split_file=split_file, seed=99, workers=1)
    assert test.keys == saved["test"]  # the saved split wins over a new seed
    assert not {k[5:8] for k in test.keys} & {k[5:8] for k in train.keys}


# ---------------------------------------------------------------- batches


def hand_caseset(images, labels, spatial_dims) -> cache_module.CaseSet:
    n = len(images)
    return cache_module.CaseSet(spatial_dims, [f"c{i}" for i in range(n)], images, labels, [(1.0, 1.0, 1.0)] * n,
                           [im.shape for im in images], [[] for _ in range(n)])


def numbered_slices(n_cases=3, n_slices=5):
    """2D scans whose every slice is filled with its own global index, to see which slices a rank got."""
    images = [np.broadcast_to(np.arange(c * n_slices, (c + 1) * n_slices, dtype=np.float16)[:, None, None],
                              (n_slices, 8, 4)).copy() for c in range(n_cases)]
    labels = [np.zeros((n_slices, 8, 4), np.uint8) for _ in range(n_cases)]
    return hand_caseset(images, labels, 2)


def seen(source, epoch):
    return [int(v) for image, _ in source.epoch(epoch) for v in image[:, 0, 0, 0]]


def test_ranks_see_disjoint_slices_and_epochs_are_reproducible():
    cases = numbered_slices()
    ranks = [sampling.DeviceBatchSource(cases, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 3  # 15 slices // 2 ranks // batch of 2
    first, second = seen(ranks[0], 0), seen(ranks[1], 0)
    assert len(first) == len(second) == 6 and not set(first) & set(second)
    assert len(set(first)) == 6
    assert seen(ranks[0], 0) == first and seen(ranks[0], 1) != first
    again = sampling.DeviceBatchSource(cases, batch_size=2, seed=5, rank=0, world_size=2)
    assert seen(again, 0) == first
    tail = [int(v) for image, _ in again.epoch(0, start_batch=1) for v in image[:, 0, 0, 0]]
    assert tail == first[2:]


def test_2d_batches_with_augmentation_have_training_shapes():
    cases = numbered_slices()
    source = sampling.DeviceBatchSource(cases, batch_size=4, seed=0, augment=AugmentConfig())
    image, label = next(iter(source.epoch(0)))
    assert image.shape == (4, 1, 8, 4) and image.dtype == torch.float32
    assert label.shape == (4, 8, 4) and label.dtype == torch.int64
    again = next(iter(sampling.DeviceBatchSource(cases, batch_size=4, seed=0, augment=AugmentConfig()).epoch(0)))
    assert torch.equal(again[0], image)


def tiny_prostate_volume(with_body: bool):
    label = np.zeros((64, 64, 32), np.uint8)
    if with_body:
        label[8:56, 8:56, 4:28] = 1
    label[40:42, 12:14, 20:22] = 5  # 8 voxels of prostate in 131k
    return label


@pytest.mark.parametrize("with_body,low,high", [(False, 1 / 3, 0.40), (True, 0.12, 0.26)])
def test_foreground_oversampling_finds_a_tiny_prostate(with_body, low, high):
    label = tiny_prostate_volume(with_body)
    cases = hand_caseset([label.astype(np.float16)], [label], 3)
    source = sampling.DeviceBatchSource(cases, batch_size=4, patch_size=(16, 16, 8), seed=0, steps_per_epoch=150)
    hits = [bool((patch == 5).flatten(1).any(1)[i]) for _, patch in source.epoch(0) for i in range(len(patch))]
    share = sum(hits) / len(hits)  # 1/3 of patches are centred on a present foreground class, drawn uniformly
    assert len(hits) == 600 and low <= share <= high, share


def test_small_volumes_are_padded_to_the_patch():
    label = np.ones((10, 12, 4), np.uint8)
    image = np.full((10, 12, 4), 3.0, np.float16)
    image[0, 0, 0] = -2.0
    source = sampling.DeviceBatchSource(hand_caseset([image], [label], 3), batch_size=2, patch_size=(16, 16, 8),
                                        steps_per_epoch=2)
    patch, patch_label = next(iter(source.epoch(0)))
    assert patch.shape == (2, 1, 16, 16, 8) and patch_label.shape == (2, 16, 16, 8)
    assert patch[0, 0, 12, 12, 6] == -2.0 and patch_label[0, 12, 12, 6] == 0 and patch_label[0, 5, 5, 2] == 1


def test_slice_dataset_serves_slices():
    data = sampling.SliceDataset(numbered_slices())
    image, label = data[7]
    assert len(data) == 15 and image.shape == (1, 8, 4) and image[0, 0, 0] == 7 and label.dtype == torch.int64


# ---------------------------------------------------------------- augmentation


def checkerboard(shape, block=6):
    grids = np.meshgrid(*[np.arange(s) // block for s in shape], indexing="ij")
    return torch.from_numpy((sum(grids) % 6).astype(np.int64))  # 0 included: padding is the image minimum


SPATIAL_ONLY = AugmentConfig(flip_axes=(0, 1), flip_prob=0.5, rotate_prob=1.0, max_rotate_degrees=15, scale_prob=1.0,
                             gamma_prob=0, bias_prob=0, contrast_prob=0, brightness_prob=0, noise_prob=0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 20, 12)])
def test_augmentation_moves_label_with_image(shape):
    label = checkerboard(shape).expand(4, *shape).clone()
    image = label.float().unsqueeze(1)  # image = label: where the label is uniform, round(image) must equal it
    generator = torch.Generator().manual_seed(0)
    moved_image, moved_label = augment_batch(image, label, generator, SPATIAL_ONLY)
    assert moved_image.shape == image.shape and moved_label.shape == label.shape
    assert (moved_label != label).float().mean() > 0.2, "the transform did nothing: the test could not fail"
    numpy_label = moved_label.numpy()
    size = (1,) + (3,) * len(shape)  # pixels whose whole 3x3(x3) neighbourhood, inside the array, has one class
    interior = (ndimage.maximum_filter(numpy_label, size, mode="constant", cval=99)
                == ndimage.minimum_filter(numpy_label, size, mode="constant", cval=-1))
    agree = torch.round(moved_image[:, 0]).long().numpy() == numpy_label
    assert interior.mean() > 0.15 and agree[interior].all()
    assert set(np.unique(numpy_label)) <= set(range(6))


@pytest.mark.parametrize("axis", [0, 1])
def test_flips_are_exact_and_paired(axis):
    label = checkerboard((12, 10), block=3).expand(8, 12, 10).clone()
    cfg = AugmentConfig(flip_axes=(axis,), flip_prob=0.5, rotate_prob=0, scale_prob=0, gamma_prob=0, bias_prob=0,
                        contrast_prob=0, brightness_prob=0, noise_prob=0)
    image, moved = augment_batch(label.float().unsqueeze(1), label, torch.Generator().manual_seed(1), cfg)
    assert torch.equal(image[:, 0].long(), moved)
    flipped = [bool(torch.equal(moved[i], label[i].flip(axis))) for i in range(8)]
    assert any(flipped) and not all(flipped)
    assert all(f or torch.equal(moved[i], label[i]) for i, f in enumerate(flipped))


def test_intensity_augmentation_changes_image_only_and_is_seeded():
    label = checkerboard((2, 16, 8, 8))[:, :, :, :]
    image = torch.randn(2, 1, 16, 8, 8)
    cfg = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, gamma_prob=1, bias_prob=1, contrast_prob=1,
                        brightness_prob=1, noise_prob=1)
    out, out_label = augment_batch(image, label, torch.Generator().manual_seed(3), cfg)
    again, _ = augment_batch(image, label, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(out_label, label) and torch.equal(out, again) and not torch.allclose(out, image)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- check CLI


def test_check_clean_folder_exits_0(tmp_path, capsys):
    assert dataset.main(["check", str(make_2d(tmp_path)), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "layout: 2D" in out and "[train] 9 files, 3 scans, 2 patients" in out and "problems: 0" in out
    assert "(0.9, 0.8, 2.5) x9" in out and "prostate" in out


def test_check_reports_problems_and_survives_a_truncated_file(tmp_path, capsys):
    root = make_2d(tmp_path)
    truncate(root / "keras_slices_train" / "case_004_week_0_slice_1.nii.gz")
    write_nifti(root / "keras_slices_seg_validate" / "seg_006_week_0_slice_2.nii.gz", np.full((16, 8), 9.0))
    write_nifti(root / "keras_slices_test" / "case_005_week_3_slice_0.nii.gz", np.ones((16, 8)))
    (root / "keras_slices_train" / "notes.nii.gz").write_bytes(b"")
    damaged = root / "keras_slices_seg_train" / "seg_005_week_0_slice_0.nii.gz"  # random floats: stored blocks,
    data = bytearray(damaged.read_bytes())  # so only the gzip checksum can tell
    data[-6] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert dataset.main(["check", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "problems: 6" in out
    for text in ("case_004_week_0_slice_1.nii.gz: corrupt gzip", "seg_006_week_0_slice_2.nii.gz: label values",
                 "seg_005_week_0_slice_0.nii.gz: corrupt gzip stream",
                 "image without label: ", "patient 005 is in several splits: train, test",
                 "unrecognised file name"):
        assert text in out, text


def test_check_runs_as_a_script(tmp_path):
    """As a script dataset.py is `__main__`, a second copy beside the `dataset` datacheck imports: a missing
    layout must still come out as a reported problem, and the reading processes must start."""
    command = [sys.executable, "dataset.py", "check"]
    clean = subprocess.run([*command, str(make_2d(tmp_path / "data")), "--workers", "2"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and "problems: 0" in clean.stdout, clean.stderr
    empty = subprocess.run([*command, str(tmp_path / "data" / "keras_slices_train")], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert empty.returncode == 1 and "no HipMRI layout found" in empty.stdout, empty.stderr


def test_check_bad_usage_exits_2(tmp_path, capsys):
    assert dataset.main(["check", str(tmp_path / "nowhere")]) == 2
    assert dataset.main([]) == 2
    assert dataset.main(["check", str(tmp_path)]) == 1  # a folder without any HipMRI layout: a data problem
    assert "no HipMRI layout found" in capsys.readouterr().out


# ---------------------------------------------------------------- on phantom data (real sizes, layouts and quirks)


def phantom_spacing(root: Path, key: str) -> list[float]:
    """A phantom scan's voxel spacing (mm, file x, y, z) from its summary: it varies per scan."""
    scans = json.loads((root / "phantom.json").read_text())["scans"]
    return next(s["spacing_mm"] for s in scans if s["key"] == key)


def test_phantom_2d_loads_with_its_quirks(phantom_2d_dir, tmp_path, capsys):
    assert dataset.main(["check", str(phantom_2d_dir), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "(256, 128, 1) x60" in out and "(256, 144) x60" in out  # both quirks seen and accepted
    splits = {s: cache_module.load_split(phantom_2d_dir, s, cache_dir=tmp_path, workers=2) for s in dataset.SPLITS}
    assert {s: len(c) for s, c in splits.items()} == {"train": 2, "validate": 1, "test": 1}
    found = {key: (cases, i) for cases in splits.values() for i, key in enumerate(cases.keys)}
    odd, i = found["case_005_week_0"]
    assert odd.images[i].shape == (60, 256, 128) and odd.original_shapes[i] == (60, 256, 144)
    singleton, j = found["case_006_week_0"]
    assert singleton.images[j].shape == (60, 256, 128) and singleton.original_shapes[j] == (60, 256, 128)
    sx, sy, sz = phantom_spacing(phantom_2d_dir, "case_006_week_0")  # per scan, as in the real study
    assert singleton.spacings[j] == (sy, sx, sz)  # (between slices, in-plane x, in-plane z) in mm
    sx, sy, sz = phantom_spacing(phantom_2d_dir, "case_005_week_0")
    assert odd.spacings[i] == pytest.approx((sy, sx, sz * 144 / 128))  # of the resized array: pixels got wider
    assert set(np.unique(splits["train"].labels[0])) == set(range(6))
    source = sampling.DeviceBatchSource(splits["train"], batch_size=8, augment=AugmentConfig())
    image, label = next(iter(source.epoch(0)))
    assert len(source) == 15 and image.shape == (8, 1, 256, 128) and torch.isfinite(image).all()


def test_phantom_3d_split_patches_and_check(phantom_3d_dir, tmp_path):
    assert dataset.main(["check", str(phantom_3d_dir), "--workers", "2"]) == 0
    train = cache_module.load_split(phantom_3d_dir, "train", cache_dir=tmp_path / "cache",
                                    split_file=tmp_path / "split.json", workers=2)
    assert len(train) == 1 and train.spacings[0] == tuple(phantom_spacing(phantom_3d_dir, train.keys[0]))
    source = sampling.DeviceBatchSource(train, batch_size=2, patch_size=(128, 128, 64), steps_per_epoch=30, seed=1)
    labels = torch.cat([label for _, label in source.epoch(0)])
    assert labels.shape == (60, 128, 128, 64) and int(labels.max()) <= 5
    assert (labels == 5).flatten(1).any(1).float().mean() >= 1 / 15  # >= 1/3 foreground x 1/5 prostate


def test_measure_read_speed_reports_both_ways(tmp_path, cache):
    speed = sampling.measure_read_speed(make_2d(tmp_path / "data"), cache_dir=cache, max_files=4, workers=1)
    assert speed["items"] == 9 and speed["nibabel_seconds"] > 0 and speed["epoch_seconds"] > 0
    assert {"speedup_epoch", "speedup_slice_dataset", "speedup_open_and_epoch"} <= speed.keys()
