"""nnunet_export: the nnU-Net v2 raw data set, its patient-grouped folds and the geometry of the exported cases."""

import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dataset
import nnunet_export
from utils import CLASS_NAMES


def export(data_dir: Path, out: Path, *extra: str, dataset_id: int = 7) -> int:
    return dataset.main(["export-nnunet", str(data_dir), str(out), "--dataset-id", str(dataset_id), *extra])


def cases_in(folder: Path, channel: bool) -> list[str]:
    suffix = "_0000.nii.gz" if channel else ".nii.gz"
    return sorted(p.name[:-len(suffix)] for p in folder.glob("*" + suffix))


def patient_of(data_dir: Path) -> dict[str, str]:
    """Scan key -> patient, from the loader (never from parsing names here)."""
    layout = dataset.detect_layout(data_dir)
    splits = dataset.SPLITS if layout == "2d" else (None,)
    return {p.case_key: p.case_id for s in splits for p in dataset.find_pairs(data_dir, s)}


def check_grouped(folds: list[dict], patients: dict[str, str], training: list[str]) -> None:
    """No patient on both sides of a fold, and no patient in the validation half of two folds."""
    fold_of_patient = defaultdict(set)
    for index, fold in enumerate(folds):
        train = {patients[k] for k in fold["train"]}
        val = {patients[k] for k in fold["val"]}
        assert not train & val, f"fold {index} has patients {train & val} in train and val"
        assert sorted(fold["train"] + fold["val"]) == sorted(training)
        for patient in val:
            fold_of_patient[patient].add(index)
    assert all(len(f) == 1 for f in fold_of_patient.values())


# ---------------------------------------------------------------- tiny hand-made 2D data


def volume_affine(spacing=(1.5, 2.0, 3.0), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def write_slices(root: Path, split: str, case: str, week: int, n_slices: int = 3, shape=(8, 6),
                 affine: np.ndarray | None = None, label_shift: float = 0.0) -> None:
    """Slice files as the study cut them: slice j = vol[:, j, :] with axes (x, z, y) and its origin moved to row j."""
    affine = volume_affine() if affine is None else affine
    rng = np.random.default_rng(int(case) * 10 + week)
    for sub in (f"keras_slices_{split}", f"keras_slices_seg_{split}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for j in range(n_slices):
        slice_affine = affine[:, [0, 2, 1, 3]].copy()
        slice_affine[:3, 3] += j * affine[:3, 1]
        image = rng.normal(100, 20, shape).astype(np.float32)
        label = rng.integers(0, len(CLASS_NAMES), shape).astype(np.float32)
        name = f"{case}_week_{week}_slice_{j}.nii.gz"
        nib.save(nib.Nifti1Image(image, slice_affine), root / f"keras_slices_{split}" / f"case_{name}")
        label_affine = slice_affine.copy()
        label_affine[0, 3] += label_shift
        nib.save(nib.Nifti1Image(label, label_affine), root / f"keras_slices_seg_{split}" / f"seg_{name}")


@pytest.fixture(scope="module")
def tiny_2d(tmp_path_factory) -> Path:
    """Training patients with 1-4 weekly scans each, one validation and one test patient."""
    root = tmp_path_factory.mktemp("tiny_2d")
    weeks = {"010": [0, 1, 2], "011": [0], "012": [0, 1], "013": [0, 1, 2, 3], "014": [1], "015": [0, 2]}
    for case in weeks:
        for week in weeks[case]:
            write_slices(root, "train", case, week)
    for week in (0, 1):
        write_slices(root, "validate", "020", week)
    write_slices(root, "test", "030", 0)
    return root


# ---------------------------------------------------------------- 2D phantom export


@pytest.fixture(scope="module")
def exported_2d(phantom_2d_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnunet_raw")
    assert export(phantom_2d_dir, out) == 0
    return out / "Dataset007_HipMRI2D"


def test_2d_export_structure_and_dataset_json(exported_2d, phantom_2d_dir):
    scans = {s: sorted({p.case_key for p in dataset.find_pairs(phantom_2d_dir, s)}) for s in dataset.SPLITS}
    training = sorted(scans["train"] + scans["validate"])
    assert cases_in(exported_2d / "imagesTr", channel=True) == training
    assert cases_in(exported_2d / "labelsTr", channel=False) == training
    assert cases_in(exported_2d / "imagesTs", channel=True) == scans["test"]
    assert cases_in(exported_2d / "labelsTs", channel=False) == scans["test"]
    info = json.loads((exported_2d / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "T2"}
    assert info["labels"] == {"background": 0, "body": 1, "bone": 2, "bladder": 3, "rectum": 4, "prostate": 5}
    assert info["file_ending"] == ".nii.gz" and info["numTraining"] == len(training)
    folds = json.loads((exported_2d / "splits_final.json").read_text())
    assert folds == [{"train": scans["train"], "val": scans["validate"]}]
    check_grouped(folds, patient_of(phantom_2d_dir), training)
    assert [p.name for p in exported_2d.parent.iterdir()] == [exported_2d.name]  # no staging folder left


def test_2d_export_prints_the_nnunet_commands(phantom_2d_dir, tmp_path, capsys):
    assert export(phantom_2d_dir, tmp_path, dataset_id=12) == 0
    printed = capsys.readouterr().out
    for step in ("nnUNetv2_plan_and_preprocess -d 12 -c 2d", "nnUNetv2_train 12 2d", "nnUNetv2_predict -i",
                 "$nnUNet_preprocessed/Dataset012_HipMRI2D/splits_final.json", "python predict.py --score"):
        assert step in printed


def test_2d_volume_slices_and_affine_are_the_slice_files(exported_2d, phantom_2d_dir):
    pairs = dataset.find_pairs(phantom_2d_dir, "train")
    for key in sorted({p.case_key for p in pairs}):
        volume = nib.load(exported_2d / "imagesTr" / f"{key}_0000.nii.gz")
        label = nib.load(exported_2d / "labelsTr" / f"{key}.nii.gz")
        assert volume.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(label.affine, volume.affine)
        image_data, label_data = volume.get_fdata(dtype=np.float32), np.asarray(label.dataobj)
        scan = [p for p in pairs if p.case_key == key]
        assert image_data.shape[1] == len(scan) == 60
        for pair in (scan[0], scan[23], scan[-1]):
            j = pair.slice_index
            slice_image, slice_img = dataset.read_image(pair.image, spatial_dims=2)
            np.testing.assert_array_equal(image_data[:, j, :], slice_image)
            np.testing.assert_array_equal(label_data[:, j, :], dataset.read_label(pair.label, spatial_dims=2))
            for a, b in ((0, 0), (255, 0), (17, 101)):
                world_volume = volume.affine @ [a, j, b, 1]
                world_slice = slice_img.affine @ [a, b, 0, 1]
                np.testing.assert_allclose(world_volume, world_slice, atol=1e-3)


def test_2d_odd_sized_scan_keeps_its_size(exported_2d):
    shapes = {p.name: nib.load(p).shape for p in (exported_2d / "imagesTr").iterdir()}
    assert shapes.pop("case_005_week_0_0000.nii.gz") == (256, 60, 144)
    assert set(shapes.values()) == {(256, 60, 128)}


def test_exported_phantom_passes_nnunet_integrity_check(exported_2d, capfd):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(exported_2d), num_processes=1)  # raises on wrong shapes, spacings, labels, NaN
    printed = capfd.readouterr().out
    assert "verify_dataset_integrity Done" in printed
    assert "Warning" not in printed and "Error" not in printed, printed  # origin/direction mismatches only print


# ---------------------------------------------------------------- folds and splits


def test_2d_folds_keep_each_patient_in_one_fold(tiny_2d, tmp_path):
    assert export(tiny_2d, tmp_path, "--folds", "3", "--seed", "4") == 0
    folder = tmp_path / "Dataset007_HipMRI2D"
    folds = json.loads((folder / "splits_final.json").read_text())
    training = cases_in(folder / "imagesTr", channel=True)
    assert len(folds) == 3 and len(training) == 15
    check_grouped(folds, patient_of(tiny_2d), training)
    assert sorted(len(f["val"]) for f in folds) == [5, 5, 5]  # 4+3+2+2+2+1+1 scans dealt evenly
    assert cases_in(folder / "imagesTs", channel=True) == ["case_030_week_0"]
    again = tmp_path / "again"
    assert export(tiny_2d, again, "--folds", "3", "--seed", "4") == 0
    assert json.loads((again / "Dataset007_HipMRI2D" / "splits_final.json").read_text()) == folds


def test_assign_folds_balances_scans_and_never_splits_a_patient():
    scans = {f"{p:03d}": [f"s{p}_{w}" for w in range(1 + p % 4)] for p in range(11)}
    groups = nnunet_export.assign_folds(scans, 4, seed=1)
    assert sorted(k for g in groups for k in g) == sorted(k for ks in scans.values() for k in ks)
    for keys in scans.values():
        assert sum(set(keys) <= set(g) for g in groups) == 1
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= max(len(k) for k in scans.values())
    assert groups == nnunet_export.assign_folds(scans, 4, seed=1)
    with pytest.raises(ValueError, match="--folds 12"):
        nnunet_export.assign_folds(scans, 12, seed=1)


def test_3d_export_test_patients_folds_and_geometry(phantom_3d_small_dir, tmp_path):
    assert export(phantom_3d_small_dir, tmp_path, "--dims", "3", "--seed", "3") == 0
    folder = tmp_path / "Dataset007_HipMRI3D"
    pairs = dataset.find_pairs(phantom_3d_small_dir, None)
    split = dataset.split_by_patient(pairs, 3, dataset.DataConfig().split_ratios)
    assert cases_in(folder / "imagesTs", channel=True) == split["test"]
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": split["train"],
                                                                       "val": split["validate"]}]
    assert dataset.load_split_file(folder / "split.json") == split
    pair = next(p for p in pairs if p.case_key in split["train"])
    source_image, source = dataset.read_image(pair.image, spatial_dims=3)
    volume, label = nib.load(folder / "imagesTr" / f"{pair.case_key}_0000.nii.gz"), nib.load(
        folder / "labelsTr" / f"{pair.case_key}.nii.gz")
    np.testing.assert_allclose(volume.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.get_fdata(dtype=np.float32), source_image)
    np.testing.assert_array_equal(np.asarray(label.dataobj), dataset.read_label(pair.label, spatial_dims=3))
    assert label.get_data_dtype() == np.uint8
    assert dataset.voxel_spacing(volume)[0] == dataset.voxel_spacing(source)[0]


def test_3d_folds_over_the_patients_left_after_the_test_split(phantom_3d_small_dir, tmp_path, capsys):
    assert export(phantom_3d_small_dir, tmp_path, "--folds", "2") == 0
    folds = json.loads((tmp_path / "Dataset007_HipMRI3D" / "splits_final.json").read_text())
    training = cases_in(tmp_path / "Dataset007_HipMRI3D" / "imagesTr", channel=True)
    check_grouped(folds, patient_of(phantom_3d_small_dir), training)
    assert "test patients of the patient split that train.py --seed 0 draws" in capsys.readouterr().out
    assert export(phantom_3d_small_dir, tmp_path / "more", "--folds", "3") == 2
    assert "--folds 3" in capsys.readouterr().err


# ---------------------------------------------------------------- refusals


def test_refuses_an_existing_data_set_and_leaves_it_alone(tiny_2d, tmp_path, capsys):
    (tmp_path / "Dataset007_HipMRI2D").mkdir()  # an empty folder of the name is fine
    assert export(tiny_2d, tmp_path) == 0
    marker = tmp_path / "Dataset007_HipMRI2D" / "dataset.json"
    before = marker.read_text()
    assert export(tiny_2d, tmp_path) == 2
    assert "Dataset007_HipMRI2D exists" in capsys.readouterr().err
    assert marker.read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Dataset007_Prostate").mkdir()
    (tmp_path / "other" / "Dataset007_Prostate" / "dataset.json").write_text("{}")
    assert export(tiny_2d, tmp_path / "other") == 2  # nnU-Net would find two data sets with id 7
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["Dataset007_Prostate"]


def test_refuses_a_layout_other_than_dims(tiny_2d, tmp_path, capsys):
    assert export(tiny_2d, tmp_path, "--dims", "3") == 2
    assert "2D layout" in capsys.readouterr().err


@pytest.mark.parametrize("problem, message", [
    ("patient in two splits", "patient(s) in more than one split folder: 040"),
    ("missing slice", "slice(s) 1 missing"),
    ("label shifted", "geometry differs from its image"),
    ("channel-like name", "end in _NNNN"),
])
def test_bad_data_is_refused_naming_it(tmp_path, capsys, problem, message):
    root = tmp_path / "data"
    write_slices(root, "train", "040", 0, label_shift=5.0 if problem == "label shifted" else 0.0)
    write_slices(root, "validate", "040" if problem == "patient in two splits" else "041", 1)
    write_slices(root, "test", "042", 1000 if problem == "channel-like name" else 0)
    if problem == "missing slice":
        for sub, prefix in (("keras_slices_train", "case"), ("keras_slices_seg_train", "seg")):
            (root / sub / f"{prefix}_040_week_0_slice_1.nii.gz").unlink()
    assert export(root, tmp_path / "out") == 1
    assert message in capsys.readouterr().err
    assert not any((tmp_path / "out").glob("*Dataset007*"))


def test_stack_affine_refuses_slices_that_are_not_one_volume():
    base = volume_affine()
    slices = []
    for j in range(4):
        a = base[:, [0, 2, 1, 3]].copy()
        a[:3, 3] += j * base[:3, 1]
        slices.append(a)
    files = [f"slice_{j}.nii.gz" for j in range(4)]
    stacked = dataset.stack_affine(slices, files)
    np.testing.assert_allclose(stacked, base)
    uneven = [a.copy() for a in slices]
    uneven[2][:3, 3] += 0.5 * base[:3, 1]
    with pytest.raises(dataset.DataError, match="slice_2.nii.gz: its origin lies"):
        dataset.stack_affine(uneven, files)
    tilted = [a.copy() for a in slices]
    tilted[3][:3, 0] *= 1.1
    with pytest.raises(dataset.DataError, match="slice_3.nii.gz: in-plane axes differ"):
        dataset.stack_affine(tilted, files)


def test_stack_affine_without_through_plane_positions_uses_the_headers_third_axis(caplog):
    same_origin = [volume_affine()[:, [0, 2, 1, 3]] for _ in range(3)]
    stacked = dataset.stack_affine(same_origin, ["a", "b", "c"])
    np.testing.assert_allclose(stacked[:3, 1], same_origin[0][:3, 2])
    assert "share one origin" in caplog.text
