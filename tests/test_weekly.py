"""weekly.py and review.py: scans grouped by patient and week, volume trajectories, the review list, and
predict.py's outputs."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import cache
import dataset
import phantom
import predict
import review
import train
import utils
import weekly
from review import ScanSignals
from weekly import ScanRef, UsualVariation

PROSTATE, BLADDER = utils.CLASS_NAMES.index("prostate"), utils.CLASS_NAMES.index("bladder")
TINY = ["--features", "4", "8", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def weekly_3d_dir(tmp_path_factory):
    """3 patients, up to 4 scans each, of small volumes (64x64x32), with the phantom's gaps (seed 1): 004 has
    weeks 0, 3, 4; 005 weeks 0, 2, 3, 4 (Week2 is the taller one); 006 weeks 0, 2, 4."""
    out = tmp_path_factory.mktemp("weekly") / "phantom"
    summary = phantom.write_dataset(out, layout="3d", patients=3, weeks=4, seed=1, workers=1, shape=(64, 64, 32))
    assert [scan["key"] for scan in summary["scans"]][:3] == ["Case_004_Week0", "Case_004_Week3", "Case_004_Week4"]
    return out


def _labels(folder):
    return sorted((folder / "semantic_labels_anon").iterdir())


def _one_hot(label: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)), 6).movedim(-1, 0).float()


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _usual(folder, cache_dir) -> UsualVariation:
    """Learnt from every scan of `folder` through the cache (a split file with all of them in train)."""
    keys = [p.name.replace("_SEMANTIC_LFOV.nii.gz", "") for p in _labels(folder)]
    split_file = cache_dir / "split.json"
    dataset.save_split(split_file, {"train": keys, "validate": [], "test": []}, 0, (1, 0, 0))
    return weekly.learn_usual_variation(cache.load_split(folder, "train", cache_dir=cache_dir, split_file=split_file))


# ---------------------------------------------------------------- grouping


@pytest.mark.parametrize("name, dims, expected", [
    ("case_004_week_0_slice_7.nii.gz", 2, (ScanRef(4, 0, "case_004_week_0", "004"), 7)),
    ("seg_012_week_5_slice_0.nii", 2, (ScanRef(12, 5, "case_012_week_5", "012"), 0)),
    ("Case_019_Week1_LFOV.nii.gz", 3, (ScanRef(19, 1, "Case_019_Week1", "019"), None)),
    ("K019_Week1_LFOV.nii.gz", 3, (ScanRef(19, 1, "K019_Week1", "019"), None)),
    ("B006_Week7_SEMANTIC.nii.gz", 3, (ScanRef(6, 7, "B006_Week7", "006"), None)),
    ("Case_019_Week1_LFOV.nii.gz", 2, None),  # a 3D name among 2D slices
    ("patient_scan.nii.gz", 3, None),
])
def test_file_names_give_patient_week_and_slice(name, dims, expected):
    assert weekly.parse_file(dataset.Path(name), dims) == expected


def test_scans_group_by_patient_in_week_order_with_gaps():
    scans = [ScanRef(12, 7, "Case_012_Week7", "012"), ScanRef(4, 3, "Case_004_Week3", "004"),
             ScanRef(12, 0, "Case_012_Week0", "012"), ScanRef(4, 0, "Case_004_Week0", "004"),
             ScanRef(12, 5, "Case_012_Week5", "012")]
    groups = weekly.by_patient(scans)
    assert list(groups) == ["004", "012"]
    assert [s.week for s in groups["012"]] == [0, 5, 7]


def _write_slice(path, label, spacing):
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])  # a slice file keeps its volume's 3D geometry
    nib.save(nib.Nifti1Image(label.astype(np.float32), affine), str(path))


def test_2d_slices_are_stacked_into_scans_and_their_volumes_match_by_hand(tmp_path):
    """2D --input: slice files of two weeks (0 and 3, a gap) of one patient, given out of order, and a file whose
    name follows no naming."""
    spacing = (0.5, 0.8, 2.0)  # x, y in-plane, slice spacing from the affine
    prostate_voxels = {0: [6, 10, 4], 3: [5, 5, 0]}
    files = []
    for week, per_slice in prostate_voxels.items():
        for k, n in enumerate(per_slice):
            label = np.ones((8, 6), np.uint8)
            label.flat[:n] = PROSTATE
            label[7, :3] = BLADDER
            path = tmp_path / f"seg_004_week_{week}_slice_{k}.nii.gz"
            _write_slice(path, label, spacing)
            files.append(path)
    shutil.copy(files[0], tmp_path / "unnamed.nii.gz")
    reviewer = review.Review(2, None)
    for path in [*files[::-1], tmp_path / "unnamed.nii.gz"]:
        label = dataset.read_label(path)[None]
        reviewer.add_file(path, label, _one_hot(label), nib.load(str(path)))
    reviewer.write(tmp_path / "out")
    rows = {(r["week"], r["organ"]): r for r in _read_csv(tmp_path / "out" / "weekly.csv")}
    voxel_ml = np.prod(spacing) / 1000
    assert float(rows["0", "prostate"]["pred_ml"]) == pytest.approx(20 * voxel_ml)
    assert float(rows["3", "prostate"]["pred_ml"]) == pytest.approx(10 * voxel_ml)
    assert float(rows["3", "prostate"]["pred_change_pct"]) == pytest.approx(-50.0)
    assert float(rows["3", "bladder"]["pred_ml"]) == pytest.approx(9 * voxel_ml)
    assert rows["0", "prostate"]["true_ml"] == "nan"
    assert [p.name for p, _ in reviewer.left_out] == ["unnamed.nii.gz"]
    assert "unnamed.nii.gz" in (tmp_path / "out" / "summary.md").read_text()


def test_the_144_slice_scan_stacks_with_its_own_slice_size(phantom_2d_dir, tmp_path):
    """case_005_week_0 (validate split) has 256x144 slices; its 60 files make one scan of the right volume."""
    files = sorted((phantom_2d_dir / "keras_slices_seg_validate").iterdir())
    reviewer = review.Review(2, None)
    total_ml = 0.0
    for path in files:
        label = dataset.read_label(path)[None]
        assert label.shape == (1, 256, 144)
        image = nib.load(str(path))
        total_ml += (label == BLADDER).sum() * np.prod(dataset.voxel_spacing(image)[0]) / 1000
        reviewer.add_file(path, label, _one_hot(label), image)
    reviewer.finish()
    [signals] = reviewer.signals
    assert signals.scan.key == "case_005_week_0" and len(files) == 60
    assert signals.pred_ml["bladder"] == pytest.approx(total_ml)


def test_one_scan_under_two_names_is_reported_once(weekly_3d_dir, tmp_path):
    """Case_004_Week0 and K004_Week0 are one patient's Week0 (the number is the patient): the second is left out."""
    source = _labels(weekly_3d_dir)[0]
    reviewer = review.Review(3, None)
    for name in ("Case_004_Week0_LFOV.nii.gz", "K004_Week0_LFOV.nii.gz"):
        shutil.copy(source, tmp_path / name)
        image = nib.load(str(tmp_path / name))
        label = dataset.read_label(tmp_path / name)
        reviewer.add_file(tmp_path / name, label, _one_hot(label), image)
    assert [s.scan.key for s in reviewer.signals] == ["Case_004_Week0"]
    assert reviewer.left_out == [(tmp_path / "K004_Week0_LFOV.nii.gz", "a second file of patient 004 week 0")]


# ---------------------------------------------------------------- trajectories and what is usual


def test_volume_trajectory_equals_label_volumes_by_hand(weekly_3d_dir, tmp_path):
    reviewer = review.Review(3, None)
    by_hand = {}
    for path in _labels(weekly_3d_dir):
        image = nib.load(str(path))
        label = dataset.read_label(path)
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
        by_hand[path.name.split("_SEMANTIC")[0]] = {o: float((label == utils.CLASS_NAMES.index(o)).sum()) * voxel_ml
                                                    for o in weekly.ORGANS}
        reviewer.add_file(path, label, _one_hot(label), image)
    reviewer.write(tmp_path)
    rows = _read_csv(tmp_path / "weekly.csv")
    assert list(rows[0]) == weekly.WEEKLY_FIELDS
    assert len(rows) == 10 * 3
    patient_004 = [r for r in rows if r["patient"] == "004" and r["organ"] == "bladder"]
    assert [int(r["week"]) for r in patient_004] == [0, 3, 4]
    for row in rows:
        assert float(row["pred_ml"]) == pytest.approx(by_hand[row["scan"]][row["organ"]], rel=1e-5, abs=1e-5)
        first = by_hand[f"Case_{row['patient']}_Week0"][row["organ"]]
        change = by_hand[row["scan"]][row["organ"]] - first
        assert float(row["pred_change_ml"]) == pytest.approx(change, rel=1e-5, abs=1e-5)
    assert (tmp_path / "weekly.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Weekly volumes" in (tmp_path / "summary.md").read_text()


def test_usual_variation_is_learnt_from_cached_label_volumes(weekly_3d_dir, tmp_path):
    usual = _usual(weekly_3d_dir, tmp_path)
    prostate = []
    for path in _labels(weekly_3d_dir):
        image = nib.load(str(path))
        count = (dataset.read_label(path) == PROSTATE).sum()
        prostate.append(count * float(np.prod(image.header.get_zooms()[:3])) / 1000)
    assert usual.n_scans == 10 and usual.n_patients == 3
    assert usual.median_ml["prostate"] == pytest.approx(np.median(prostate), rel=1e-4)
    assert usual.min_ml["prostate"] == pytest.approx(min(prostate), rel=1e-4)
    # The bladder fills and empties from week to week; the prostate barely changes.
    assert usual.change_scale["bladder"] > 2 * usual.change_scale["prostate"]
    usual.save(tmp_path / weekly.USUAL_FILE)
    assert weekly.UsualVariation.load(tmp_path / weekly.USUAL_FILE) == usual


# ---------------------------------------------------------------- the review list


def _signals(patient: int, week: int, prostate_ml: float) -> ScanSignals:
    scan = ScanRef(patient, week, f"Case_{patient:03d}_Week{week}", f"{patient:03d}")
    organs = weekly.ORGANS
    return ScanSignals(scan, {"bladder": 200.0, "rectum": 50.0, "prostate": prostate_ml}, dict.fromkeys(organs, 0.0),
                       dict.fromkeys(organs, 0.95))


def test_a_volume_off_the_patients_other_weeks_ranks_first():
    usual = UsualVariation(10, 5, {"bladder": 200.0, "rectum": 50.0, "prostate": 30.0},
                           {"bladder": 50.0, "rectum": 20.0, "prostate": 20.0}, dict.fromkeys(weekly.ORGANS, 0.0),
                           {"bladder": 0.3, "rectum": 0.2, "prostate": 0.03})
    reviewer = review.Review(3, usual)
    reviewer.signals = [_signals(4, w, v) for w, v in enumerate([30.0, 30.5, 29.5, 22.0])]
    reviewer.signals += [_signals(5, w, v) for w, v in enumerate([40.0, 41.0])]
    rows = reviewer.finish()
    assert rows[0]["scan"] == "Case_004_Week3"
    assert rows[0]["prostate_volume_z"] == pytest.approx(np.log(22.3 / 30.3) / 0.03, rel=1e-3)
    assert "prostate volume 22.0 ml, -10.2 robust SD from the patient's other weeks" in rows[0]["reasons"]
    assert rows[1]["score"] < 1 and rows[1]["reasons"] == ""


def test_corrupted_predictions_rise_to_the_top_of_the_review_list(weekly_3d_dir, tmp_path):
    """Labels as predictions, except one scan with the prostate erased and one with a bladder blob added."""
    reviewer = review.Review(3, _usual(weekly_3d_dir, tmp_path / "cache"))
    for path in _labels(weekly_3d_dir):
        image = nib.load(str(path))
        label = dataset.read_label(path)
        if path.name.startswith("Case_005_Week2"):
            label[label == PROSTATE] = 1
        if path.name.startswith("Case_006_Week0"):
            label[4:12, 40:48, 4:10] = BLADDER  # a blob of 384 voxels away from the bladder
        reviewer.add_file(path, label, _one_hot(label), image)
    reviewer.write(tmp_path)
    rows = _read_csv(tmp_path / "review.csv")
    assert list(rows[0]) == review.review_fields()
    top = {r["scan"]: r["reasons"] for r in rows[:2]}
    assert set(top) == {"Case_005_Week2", "Case_006_Week0"}
    assert "prostate missing" in top["Case_005_Week2"]
    assert "bladder in pieces" in top["Case_006_Week0"]
    # Clean scans may still be flagged (three patients teach a narrow "usual" change), but below the corrupted two.
    assert min(float(r["score"]) for r in rows[:2]) > max(float(r["score"]) for r in rows[2:])
    assert [int(r["rank"]) for r in rows] == list(range(1, 11))
    assert "Case_005_Week2" in (tmp_path / "summary.md").read_text()


def test_masks_without_probabilities_are_reviewed_by_the_other_signals(weekly_3d_dir):
    """Masks from another tool (no softmax): no expected Dice, but a missing organ still tops the list."""
    reviewer = review.Review(3, None)
    for path in _labels(weekly_3d_dir)[:3]:
        image = nib.load(str(path))
        label = dataset.read_label(path)
        if "Week3" in path.name:
            label[label == PROSTATE] = 1
        pair = dataset.Pair(path.name.split("_SEMANTIC")[0], "004", int(path.name[13]), None, path, path)
        reviewer.add(pair, label, None, image.header.get_zooms()[:3])
    rows = reviewer.finish()
    assert rows[0]["scan"] == "Case_004_Week3" and rows[0]["reasons"] == "prostate missing (0.0 ml predicted)"
    assert all(np.isnan(r["bladder_expected_dice"]) for r in rows)


def test_many_patients_are_drawn_as_small_multiples(tmp_path):
    rows = []
    for patient in range(45):
        signals = [_signals(patient, w, 30.0 + w) for w in (0, 1, 3)]
        rows += weekly.weekly_rows({s.scan: s.pred_ml for s in signals})
    weekly.plot_weekly(rows, [], tmp_path / "weekly.png")
    assert (tmp_path / "weekly.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- through predict.py


@pytest.fixture(scope="module")
def weekly_run(weekly_3d_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("weekly_run") / "run"
    assert train.main(["--data-dir", str(weekly_3d_dir), "--out", str(run), "--cache-dir", str(run.parent / "c"),
                       *TINY, "--patch-size", "32", "32", "16"]) == 0
    return run


def test_predict_on_a_labelled_split_writes_the_weekly_report(weekly_run, weekly_3d_dir, tmp_path):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(weekly_run / "best.pt"), "--data-dir", str(weekly_3d_dir), "--split",
                         "train", "--out", str(out), "--cache-dir", str(weekly_run.parent / "c")]) == 0
    rows = _read_csv(out / "weekly.csv")
    metric_rows = {(r["case"], r["class"]): r for r in _read_csv(out / "metrics.csv")}
    train_keys = json.loads((weekly_run / "split.json").read_text())["splits"]["train"]
    assert sorted({r["scan"] for r in rows}) == sorted(train_keys)
    for row in rows:
        assert float(row["true_ml"]) == pytest.approx(float(metric_rows[row["scan"], row["organ"]]["gt_ml"]))
    summary = (out / "summary.md").read_text()
    assert "## Weekly volumes" in summary and "## Review list" in summary and "Spearman" in summary
    assert len(_read_csv(out / "review.csv")) == len(train_keys)


def test_predict_input_groups_named_files_and_writes_uncertainty(weekly_run, weekly_3d_dir, tmp_path):
    """With the run's weekly_usual.json (train.py's weekly.save_usual_variation) the --input scans get volume
    z-scores too; a file named after no naming gets its mask but no weekly row."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(weekly_run / "best.pt", run / "best.pt")
    train_cases = cache.load_split(weekly_3d_dir, "train", cache_dir=weekly_run.parent / "c",
                                   split_file=weekly_run / "split.json")
    weekly.save_usual_variation(train_cases, run)
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = sorted((weekly_3d_dir / "semantic_MRs_anon").iterdir())[:4]
    for path in images:
        shutil.copy(path, inputs / path.name)
    shutil.copy(images[0], inputs / "scan.nii.gz")
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(inputs), "--out", str(out),
                         "--save-uncertainty"]) == 0
    ranked = _read_csv(out / "review.csv")
    assert sorted(r["scan"] for r in ranked) == sorted(p.name.replace("_LFOV.nii.gz", "") for p in images)
    assert [r["week"] for r in _read_csv(out / "weekly.csv") if r["organ"] == "rectum"] == ["0", "3", "4", "0"]
    z = {r["scan"]: r["prostate_volume_z"] for r in ranked}
    assert z["Case_005_Week0"] == "nan" and all(np.isfinite(float(z[f"Case_004_Week{w}"])) for w in (0, 3, 4))
    assert (out / "scan.nii.gz").is_file() and (out / "weekly_usual.json").is_file()
    assert "scan.nii.gz: its name follows no HipMRI naming" in (out / "summary.md").read_text()
    entropy = nib.load(out / images[0].name.replace(".nii", "_entropy.nii"))
    assert entropy.shape == nib.load(images[0]).shape and entropy.get_data_dtype() == np.float32
    values = entropy.get_fdata()
    assert values.min() >= 0 and values.max() <= 1


def test_an_incomplete_2d_scan_is_left_out_not_reported_as_a_shrunk_organ(phantom_2d_dir):
    """--input given all 60 slices of one scan but only slices 10..20 of another: the second is named, not used."""
    reviewer = review.Review(2, None)
    complete = sorted((phantom_2d_dir / "keras_slices_seg_validate").iterdir())
    partial = [p for p in (phantom_2d_dir / "keras_slices_seg_test").iterdir()
               if 10 <= int(p.name.split("_slice_")[1].split(".")[0]) <= 20]
    for path in complete + partial:
        label = dataset.read_label(path)[None]
        reviewer.add_file(path, label, _one_hot(label), nib.load(str(path)))
    reviewer.finish()
    assert [s.scan.key for s in reviewer.signals] == ["case_005_week_0"]
    assert len(reviewer.left_out) == 11 and "not all of 0..59" in reviewer.left_out[0][1]
