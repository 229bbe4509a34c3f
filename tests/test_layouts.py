"""layouts.py: the namings table, choosing a layout by dims, and the rule that no NIfTI file in a layout folder is
left out silently (find_pairs raises, `dataset.py check` lists, both naming the file and the naming expected).

Inputs are tiny generated layouts (test_dataset's make_2d / make_3d); no test reads more than a few 16x8 slices.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_dataset import SMALL, make_2d, make_3d, write_nifti

import cache as cache_module
import dataset
import layouts
from layouts import DataError


def check(root: Path, capsys, *options: str) -> tuple[int, str]:
    code = dataset.main(["check", str(root), "--workers", "1", *options])
    return code, capsys.readouterr().out


# ---------------------------------------------------------------- the table


def test_every_naming_parses_its_own_example_names():
    names = {"2d-train": ("case_004_week_0_slice_7.nii.gz", "seg_004_week_0_slice_7.nii", "case_004_week_0_slice_7"),
             "anon": ("Case_019_Week1_LFOV.nii.gz", "Case_019_Week1_SEMANTIC_LFOV.nii.gz", "Case_019_Week1"),
             "cluster": ("K019_Week1_LFOV.nii.gz", "K019_Week1_SEMANTIC.nii.gz", "K019_Week1")}
    for name, (image, label, key) in names.items():
        naming = layouts.NAMINGS[name]
        parsed = naming.parse(image)
        assert parsed is not None and naming.key(parsed) == key
        assert naming.parse(label, label=True).pairing_key == parsed.pairing_key
        assert naming.parse(label) is None and naming.parse(image, label=True) is None
    assert layouts.NAMINGS["cluster"].parse("K019_Week1_LFOV.nii.gz").patient == "019"
    assert {layout.name for layout in layouts.LAYOUTS} == {"2d", "3d-anon", "3d-cluster"}


def test_datacheck_uses_no_private_name_of_dataset():
    source = (Path(__file__).resolve().parents[1] / "datacheck.py").read_text()
    assert "dataset._" not in source and "from dataset import" not in source


# ---------------------------------------------------------------- cluster naming: any letter, the number is the patient


def test_cluster_letters_are_accepted_and_grouped_by_number(tmp_path):
    root = make_3d(tmp_path, "cluster", patients=("K005", "S007", "B004", "k008"), weeks=(0, 1), shape=(2, 2, 2))
    pairs = dataset.find_pairs(root)
    assert [p.key for p in pairs[::2]] == ["B004_Week0", "K005_Week0", "S007_Week0", "k008_Week0"]
    assert [p.case_id for p in pairs[::2]] == ["004", "005", "007", "008"]
    assert all(p.label.name == p.key + "_SEMANTIC.nii.gz" for p in pairs)
    split = dataset.split_by_patient(pairs, seed=0)
    owners = {name: {key[1:4] for key in keys} for name, keys in split.items()}
    assert sum(len(o) for o in owners.values()) == 4 and sum(len(keys) for keys in split.values()) == 8
    for keys in split.values():  # both weeks of a patient in the same split
        assert all(f"{key[:4]}_Week1" in keys for key in keys if key.endswith("Week0"))


def test_one_number_under_two_letters_is_refused_naming_both_files(tmp_path, capsys):
    root = make_3d(tmp_path, "cluster", patients=("K005", "B004"), weeks=(0,), shape=(2, 2, 2))
    make_3d(tmp_path, "cluster", patients=("S005",), weeks=(1,), shape=(2, 2, 2))
    with pytest.raises(DataError) as err:
        dataset.find_pairs(root)
    for text in ("ambiguous patient number", "patient 005 under letters K, S", "K005_Week0_LFOV.nii.gz",
                 "S005_Week1_LFOV.nii.gz"):
        assert text in str(err.value), text
    code, out = check(root, capsys)
    assert code == 1 and "patient 005 under letters K, S" in out


def test_an_image_and_a_label_with_different_letters_do_not_pair(tmp_path):
    root = make_3d(tmp_path, "cluster", patients=("K005",), weeks=(0,), shape=(2, 2, 2))
    label = root / "semantic_labels_only" / "K005_Week0_SEMANTIC.nii.gz"
    label.rename(label.with_name("S005_Week0_SEMANTIC.nii.gz"))
    with pytest.raises(DataError, match="image without label.*K005_Week0_LFOV.*label without image.*S005_Week0"):
        dataset.find_pairs(root)


# ---------------------------------------------------------------- no NIfTI file is left out silently


@pytest.mark.parametrize("layout,folder,name,expected", [
    ("2d", "keras_slices_train", "case_004_week_0_slice_0 (1).nii.gz", "case_<patient>_week_<n>_slice_<k>.nii.gz"),
    ("2d", "keras_slices_seg_train", "seg_4_wk_0_slice_0.nii", "seg_<patient>_week_<n>_slice_<k>.nii.gz"),
    ("anon", "semantic_MRs_anon", "Case_004_Week0.nii.gz", "Case_<patient>_Week<n>_LFOV.nii.gz"),
    ("cluster", "semantic_MRs", "BK004_Week0_LFOV.nii.gz", "<letter><patient>_Week<n>_LFOV.nii.gz"),
    ("cluster", "semantic_labels_only", "B004_Week0_SEMANTIC_LFOV.NII.GZ", "<letter><patient>_Week<n>_SEMANTIC.nii"),
])
def test_an_unrecognised_nifti_name_is_refused_and_listed(tmp_path, capsys, layout, folder, name, expected):
    root = make_2d(tmp_path) if layout == "2d" else make_3d(tmp_path, layout, shape=(4, 4, 2))
    write_nifti(root / folder / name, np.ones((16, 8) if layout == "2d" else (4, 4, 2)))
    with pytest.raises(DataError) as err:
        dataset.find_pairs(root, "train" if layout == "2d" else None)
    assert "unrecognised file name (1)" in str(err.value) and name in str(err.value)
    assert f"expected {expected}" in str(err.value)
    code, out = check(root, capsys)
    assert code == 1 and "problems: 1\n" in out and f"unrecognised file name: {root / folder / name}" in out


@pytest.mark.parametrize("folder,name,hint", [
    ("keras_slices_seg_train", "case_004_week_0_slice_9.nii.gz", "this is an image name, whose folder is "
                                                                  "keras_slices_train/"),
    ("keras_slices_train", "seg_004_week_0_slice_9.nii.gz", "this is a label name, whose folder is "
                                                             "keras_slices_seg_train/"),
    ("keras_slices_test", "B004_Week0_LFOV.nii.gz", "follows the cluster naming, whose folder is semantic_MRs/"),
])
def test_a_nifti_in_the_wrong_folder_says_where_it_belongs(tmp_path, folder, name, hint):
    root = make_2d(tmp_path)
    write_nifti(root / folder / name, np.ones((16, 8)))
    with pytest.raises(DataError, match="unrecognised file name") as err:
        dataset.find_pairs(root, folder.rsplit("_", 1)[1])
    assert hint in str(err.value)


def test_non_nifti_and_hidden_files_are_ignored_and_uppercase_suffixes_read(tmp_path, capsys):
    root = make_2d(tmp_path)
    train = root / "keras_slices_train"
    (train / "README.txt").write_text("slices of the training patients")
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "._case_004_week_0_slice_0.nii.gz").write_bytes(b"\0\5\26\7 AppleDouble resource fork")
    (train / ".ipynb_checkpoints").mkdir()
    (train / "case_004_week_0_slice_0.nii.gz.md5").write_text("d41d8cd98f00b204e9800998ecf8427e")
    (root / "keras_slices_seg_train" / "notes").mkdir()  # a sub-folder without NIfTI files
    upper = train / "case_004_week_0_slice_1.nii.gz"
    upper.rename(upper.with_name("CASE_004_WEEK_0_SLICE_1.NII.GZ"))
    pairs = dataset.find_pairs(root, "train")
    assert len(pairs) == 9 and pairs[1].image.name == "CASE_004_WEEK_0_SLICE_1.NII.GZ"
    code, out = check(root, capsys)
    assert code == 0 and "problems: 0" in out, out


def test_nifti_files_in_a_sub_folder_are_refused(tmp_path, capsys):
    root = make_2d(tmp_path)
    write_nifti(root / "keras_slices_train" / "extra" / "case_009_week_0_slice_0.nii.gz", np.ones((16, 8)))
    with pytest.raises(DataError, match=r"sub-folder.*keras_slices_train/extra holds 1 \(e.g. case_009"):
        dataset.find_pairs(root, "train")
    code, out = check(root, capsys)
    assert code == 1 and "NIfTI files in a sub-folder, not read" in out


def test_missing_2d_splits_are_named(tmp_path, capsys):
    root = make_2d(tmp_path)
    shutil.rmtree(root / "keras_slices_test")  # the test labels are left without their images
    shutil.rmtree(root / "keras_slices_validate")
    shutil.rmtree(root / "keras_slices_seg_validate")
    with pytest.raises(DataError) as err:
        dataset.find_pairs(root, "test")
    assert f"missing folder (1): {root / 'keras_slices_test'} (found 2d in {root} (" in str(err.value)
    assert "label without image (3)" in str(err.value) and "seg_007_week_0_slice_0.nii.gz" in str(err.value)
    assert len(dataset.find_pairs(root, "train")) == 9  # the splits that are whole still load
    code, out = check(root, capsys)
    assert code == 1 and "missing split: neither" in out and "keras_slices_validate" in out
    assert "label without image: " in out and "missing folder: " in out


# ---------------------------------------------------------------- choosing a layout


def cluster_root(root: Path) -> Path:
    """The cluster copy as found: 3D folders in ROOT, the 2D slices one level down in ROOT/keras_slices_data."""
    make_3d(root, "cluster", patients=("K004", "S005", "B006"), weeks=(0,), shape=(4, 4, 2))
    make_2d(root / "keras_slices_data")
    return root


def test_the_cluster_root_gives_2d_or_3d_by_dims(tmp_path, capsys, caplog):
    root = cluster_root(tmp_path / "root")
    found = dataset.resolve_layout(root, 2)
    assert found.root == root / "keras_slices_data" and found.layout.name == "2d"
    assert dataset.detect_layout(root, 3) == "3d" and dataset.resolve_layout(root, 3).root == root
    assert len(dataset.find_pairs(root, "train", spatial_dims=2)) == 9
    assert [p.key for p in dataset.find_pairs(root, spatial_dims=3)] == ["K004_Week0", "S005_Week0", "B006_Week0"]
    with pytest.raises(DataError) as err:
        dataset.find_pairs(root, "train")
    message = str(err.value)
    assert "several layouts" in message and "pass --dims 2 or --dims 3" in message
    assert f"2d in {root / 'keras_slices_data'} (keras_slices_train/, keras_slices_seg_train/" in message
    assert f"3d-cluster in {root} (semantic_MRs/, semantic_labels_only/)" in message
    caplog.set_level(logging.INFO, logger="hipmri.cache")
    cases = cache_module.load_split(root, "train", SMALL, cache_dir=tmp_path / "cache", workers=1, spatial_dims=2)
    assert cases.spatial_dims == 2 and len(cases) == 3
    assert f"2d layout in {root / 'keras_slices_data'}, train split" in caplog.text
    code, out = check(root, capsys)  # without --dims: every layout found
    assert code == 0 and out.count("layout: ") == 2 and "[all scans] 3 files" in out, out
    code, out = check(root, capsys, "--dims", "3")
    assert code == 0 and out.count("layout: ") == 1 and "layout: 3D (3d-cluster)" in out


def test_layout_errors_list_what_was_found(tmp_path, capsys):
    both_3d = make_3d(make_3d(tmp_path / "both", "anon", shape=(2, 2, 2)), "cluster", shape=(2, 2, 2))
    with pytest.raises(DataError, match="several 3D layouts: 3d-anon in .*; 3d-cluster in .*point --data-dir"):
        dataset.resolve_layout(both_3d)
    code, out = check(both_3d, capsys)
    assert code == 1 and "several 3D layouts" in out
    only_2d = make_2d(tmp_path / "only2d")
    with pytest.raises(DataError, match=r"no 3D layout found, only 2d in .*only2d \(keras_slices_train/.*--dims 2"):
        dataset.find_pairs(only_2d, spatial_dims=3)
    make_2d(make_2d(tmp_path / "two2d") / "keras_slices_data")
    with pytest.raises(DataError, match="several 2D layouts: 2d in .*two2d .*; 2d in .*keras_slices_data"):
        dataset.resolve_layout(tmp_path / "two2d", 2)
    with pytest.raises(DataError, match="keras_slices_data/keras_slices_train/"):
        dataset.resolve_layout(tmp_path)  # nothing there: says where it looked


def test_the_phantoms_cluster_copy_loads_every_scan_and_splits_by_number(tmp_path, capsys):
    """The phantom writes the cluster naming with several letters, weeks with gaps, the odd volume and the quirky
    files: the loader and the check take every scan, and a patient's weeks stay in one split."""
    import phantom

    root = tmp_path / "cluster"
    summary = phantom.write_dataset(root, layout="3d", patients=4, weeks=3, naming="cluster", shape=(32, 32, 16),
                                    workers=1)
    code, report = check(root, capsys)
    assert code == 0 and "problems: 0" in report
    pairs = dataset.find_pairs(root)
    assert sorted(p.key for p in pairs) == sorted(scan["key"] for scan in summary["scans"])
    assert len({p.key[0] for p in pairs}) > 1  # several letters
    splits = dataset.split_by_patient(pairs, seed=0)
    patient_of = {p.key: p.case_id for p in pairs}
    for name, keys in splits.items():
        others = {patient_of[k] for other, ks in splits.items() if other != name for k in ks}
        assert not {patient_of[k] for k in keys} & others


def test_a_patient_in_two_2d_split_folders_is_refused_by_train_and_predict_as_by_check(tmp_path, capsys):
    root = make_2d(tmp_path / "d", splits={"train": [("004", 0), ("005", 0)], "validate": [("006", 0)],
                                           "test": [("007", 0), ("4", 1)]})  # patient 4 is patient 004
    code, report = check(root, capsys)
    assert code == 1 and "patient 004 is in several splits: train, test" in report
    for split in ("train", "test"):  # what train.py and predict.py load
        with pytest.raises(DataError, match=r"patient 004 is in several split folders \(train, test\)"):
            cache_module.load_split(root, split, SMALL, cache_dir=tmp_path / "cache")


def test_a_patient_number_is_one_patient_however_it_is_padded(tmp_path):
    root = make_3d(tmp_path / "d", patients=("004", "005", "006"), weeks=(0,))
    make_3d(root, patients=("4", "0005"), weeks=(1,))  # later weeks written without (or with more) zeros
    assert {p.case_id for p in dataset.find_pairs(root)} == {"004", "005", "006"}
    splits = dataset.split_by_patient(dataset.find_pairs(root), seed=0)
    assert sorted(len(keys) for keys in splits.values()) == [1, 2, 2]  # Case_4 goes with Case_004, 0005 with 005
