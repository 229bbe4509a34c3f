"""dataset.geometry_mismatch: image/label pairs that overlay voxel for voxel pass; any other geometry is named."""

import nibabel as nib
import numpy as np
import pytest

import dataset

LPS = np.diag([-1.68, -1.68, 1.56, 1.0])  # nibabel's affine maps to RAS+: negative x and y columns read L and P


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
