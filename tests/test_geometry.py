"""dataset.geometry_mismatch: image/label pairs that overlay voxel for voxel pass; any other geometry is named,
by `dataset.py check` and by the cache build before training or evaluation."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_dataset import SMALL, ZOOMS, make_2d

import cache
import dataset

LPS = np.diag([-1.68, -1.68, 1.56, 1.0])  # nibabel's affine maps to RAS+: negative x and y columns read L and P
LPS_AT = LPS.copy()
LPS_AT[:3, 3] = (120.0, 110.0, -40.0)  # an origin away from 0, as in the real headers


def image(affine, shape=(8, 8, 4)):
    return nib.Nifti1Image(np.zeros(shape, np.float32), affine)


def test_identical_geometry_passes():
    assert dataset.geometry_mismatch(image(LPS), image(LPS.copy())) == ""
    # float32 header noise is inside the tolerance
    assert dataset.geometry_mismatch(image(LPS), image(LPS + 1e-6)) == ""


def test_mirrored_label_names_both_orientations():
    mirrored = LPS.copy()
    mirrored[0, 0] = 1.68  # x flipped, origin moved to the other end so it still overlays in a viewer
    mirrored[0, 3] = LPS[0, 3] - 1.68 * 7
    message = dataset.geometry_mismatch(image(LPS), image(mirrored))
    assert "label orientation RPS, image LPS" in message
    assert "origin" in message


def test_spacing_and_origin_differences_are_named():
    other = LPS.copy()
    other[:3, :3] = np.diag([-1.0, -1.0, 1.56])
    assert "label spacing 1 x 1 x 1.56 mm, image 1.68 x 1.68 x 1.56 mm" in dataset.geometry_mismatch(image(LPS),
                                                                                                      image(other))
    shifted = LPS.copy()
    shifted[2, 3] = 5.0
    assert "label origin (0.00, 0.00, 5.00) mm" in dataset.geometry_mismatch(image(LPS), image(shifted))


@pytest.mark.parametrize("angle", [0.05, 0.3])
def test_oblique_direction_with_the_same_codes_is_named(angle):
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    message = dataset.geometry_mismatch(image(LPS), image(rotation @ LPS))
    assert "direction" in message or "orientation" in message


# ---------------------------------------------------------------- pairs on disk: check and the cache build refuse them


def write_3d_pair(root: Path, label_affine=LPS_AT, flip_label_x=False, image_affine=LPS_AT) -> Path:
    """One anonymised-layout pair, 8x8x4, image LPS; the label's voxels optionally mirrored along x."""
    label = np.zeros((8, 8, 4), np.uint8)
    label[1:3, 2:6, 1:3] = 3  # off-centre along x, so a mirrored copy does not coincide with it
    image = 100.0 + 50 * label.astype(np.float32) + np.arange(8)[:, None, None]
    for folder, name, data, affine in (
            ("semantic_MRs_anon", "Case_004_Week0_LFOV.nii.gz", image, image_affine),
            ("semantic_labels_anon", "Case_004_Week0_SEMANTIC_LFOV.nii.gz",
             label[::-1] if flip_label_x else label, label_affine)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(root / folder / name))
    return root


def mirrored_x(affine: np.ndarray, nx: int = 8) -> np.ndarray:
    """The affine of an array flipped along x that still lands on the same world points (overlays in a viewer)."""
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, 0] * (nx - 1)
    out[:3, 0] = -affine[:3, 0]
    return out


def check(root: Path, capsys) -> tuple[int, str]:
    code = dataset.main(["check", str(root), "--workers", "1"])
    return code, capsys.readouterr().out


def test_a_clean_pair_passes_check_and_the_cache(tmp_path, capsys):
    root = write_3d_pair(tmp_path / "data")
    code, out = check(root, capsys)
    assert code == 0 and "problems: 0" in out, out
    cases = cache.load_split(root, "train", cache_dir=tmp_path / "cache", workers=1)
    assert cases.keys == ["Case_004_Week0"] and cases.spacings[0] == pytest.approx((1.68, 1.68, 1.56))


@pytest.mark.parametrize("label_affine,flip,expected", [
    (mirrored_x(LPS_AT), True, "label orientation RPS, image LPS"),
    (np.diag([-1.0, -1.0, 1.56, 1.0]), False, "label spacing 1 x 1 x 1.56 mm, image 1.68 x 1.68 x 1.56 mm"),
])
def test_a_label_in_other_geometry_is_refused_by_check_and_the_cache(tmp_path, capsys, label_affine, flip, expected):
    root = write_3d_pair(tmp_path / "data", label_affine, flip)
    label = nib.load(root / "semantic_labels_anon" / "Case_004_Week0_SEMANTIC_LFOV.nii.gz")
    image = nib.load(root / "semantic_MRs_anon" / "Case_004_Week0_LFOV.nii.gz")
    if flip:  # the premise: in world coordinates the mirrored label overlays the image exactly
        world = nib.affines.apply_affine
        for i, j, k in np.argwhere(np.asarray(label.dataobj) == 3):
            back = np.round(world(np.linalg.inv(image.affine), world(label.affine, (i, j, k)))).astype(int)
            assert (np.asarray(image.dataobj)[tuple(back)] >= 250)
    code, out = check(root, capsys)
    assert code == 1 and "problems: 1\n" in out and expected in out, out
    assert "Case_004_Week0_LFOV.nii.gz" in out and "Case_004_Week0_SEMANTIC_LFOV.nii.gz" in out
    with pytest.raises(dataset.DataError) as err:
        cache.load_split(root, "train", cache_dir=tmp_path / "cache", workers=1)
    assert expected in str(err.value) and "Case_004_Week0_SEMANTIC_LFOV.nii.gz" in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")], "a failed build left a cache"


def test_a_label_without_stored_orientation_is_named_as_such(tmp_path, capsys):
    root = write_3d_pair(tmp_path / "data", label_affine=None)
    code, out = check(root, capsys)
    assert code == 1 and "geometry mismatch" in out and "stores no orientation (qform and sform codes 0)" in out


def test_a_2d_slice_label_with_another_origin_is_refused(tmp_path, capsys):
    root = make_2d(tmp_path / "data")
    path = root / "keras_slices_seg_train" / "seg_005_week_0_slice_1.nii.gz"
    shifted = np.diag([*ZOOMS, 1.0])
    shifted[2, 3] = ZOOMS[2]  # the next slice's position: a label filed under the wrong slice number
    nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), shifted), str(path))
    code, out = check(root, capsys)
    assert code == 1 and "label origin (0.00, 0.00, 2.50) mm, image (0.00, 0.00, 0.00) mm" in out
    with pytest.raises(dataset.DataError, match="seg_005_week_0_slice_1.nii.gz"):
        cache.load_split(root, "train", SMALL, cache_dir=tmp_path / "cache", workers=1)
