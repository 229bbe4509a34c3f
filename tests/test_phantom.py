"""phantom.py and phantom_anatomy.py: the real layouts and names, shapes, dtypes, headers, class shares, splits,
determinism, bad input.

The shared fixtures (conftest.py) hold 4 patients x 1 week in 2D and 3 full-size volumes in 3D; the other
data sets here use few volumes, or smaller volumes through write_dataset's test-only `shape`.
"""

from __future__ import annotations

import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest

import phantom
from phantom_anatomy import make_patient, make_volume

SPACING = (1.5625, 1.5625, 2.5)


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def stacked_2d(root, split, case, week):
    """Image and label slices of one case+week, ordered by slice index; also the first slice's NIfTI."""
    images = sorted((root / f"keras_slices_{split}").glob(f"case_{case}_week_{week}_slice_*.nii.gz"),
                    key=lambda p: int(re.search(r"slice_(\d+)", p.name).group(1)))
    labels = [root / f"keras_slices_seg_{split}" / p.name.replace("case_", "seg_", 1) for p in images]
    return images, labels


def test_3d_anon_layout_shapes_dtypes_headers_and_shares(phantom_3d_dir):
    root = phantom_3d_dir
    assert sorted(p.name for p in root.iterdir()) == ["phantom.json", "semantic_MRs_anon", "semantic_labels_anon"]
    images = sorted(p.name for p in (root / "semantic_MRs_anon").iterdir())
    assert images == [f"Case_{c}_Week0_LFOV.nii.gz" for c in ("004", "005", "006")]
    shapes = {}
    for name in images:
        image = nib.load(root / "semantic_MRs_anon" / name)
        label = nib.load(root / "semantic_labels_anon" / name.replace("_LFOV", "_SEMANTIC_LFOV"))
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), SPACING)
        np.testing.assert_allclose(label.affine, image.affine)
        assert nib.aff2axcodes(image.affine) == ("L", "S", "A")
        assert image.header.get_xyzt_units()[0] == "mm"
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        values = np.asarray(label.dataobj)
        counts = np.bincount(values.ravel(), minlength=6)
        assert len(counts) == 6 and (counts > 0).all(), f"{name}: a class is missing: {counts}"
        shares = counts / counts.sum()
        # Real study: background ~60 %, prostate ~0.1 % of a volume. The phantom's spread over 150 volumes
        # was background 0.55-0.67 and prostate 0.00055-0.0021 (glands of 28-107 ml, median 51 ml); the bounds
        # leave room for other seeds (the smallest glands the parameters allow are ~20 ml, 0.0004).
        assert 0.45 < shares[0] < 0.75 and 0.0003 < shares[5] < 0.005, shares
        pixels = np.asarray(image.dataobj)
        assert pixels.min() >= 0 and 800 < np.percentile(pixels[values == 3], 50) < 3000  # bright urine
        shapes[name] = image.shape
    assert shapes.pop("Case_005_Week0_LFOV.nii.gz") == (256, 256, 144)
    assert set(shapes.values()) == {(256, 256, 128)}
    summary = json.loads((root / phantom.COMPLETE_MARKER).read_text())
    assert summary["odd_volume"] == "Case_005_Week0" and summary["volumes"] == 3


def test_3d_b_naming_and_odd_volume(tmp_path):
    out = tmp_path / "b"
    summary = phantom.write_dataset(out, layout="3d", patients=2, weeks=2, naming="b", shape=(64, 64, 32), workers=1)
    images = sorted(p.name for p in (out / "semantic_MRs").iterdir())
    labels = sorted(p.name for p in (out / "semantic_labels_only").iterdir())
    assert images == ["B004_Week0_LFOV.nii.gz", "B004_Week1_LFOV.nii.gz", "B005_Week0_LFOV.nii.gz",
                      "B005_Week1_LFOV.nii.gz"]
    assert labels == [n.replace("_LFOV", "_SEMANTIC") for n in images]
    shapes = {n: nib.load(out / "semantic_MRs" / n).shape for n in images}
    assert shapes.pop("B005_Week1_LFOV.nii.gz") == (64, 64, 36)  # 144/128 of the base depth
    assert set(shapes.values()) == {(64, 64, 32)}
    assert summary["odd_volume"] == "B005_Week1" and summary["naming"] == "b"
    np.testing.assert_allclose(nib.load(out / "semantic_MRs" / images[0]).header.get_zooms(), (6.25, 6.25, 10))


def test_2d_layout_names_shapes_quirks_and_splits(phantom_2d_dir):
    root = phantom_2d_dir
    folders = {f"keras_slices_{s}" for s in phantom.SPLITS} | {f"keras_slices_seg_{s}" for s in phantom.SPLITS}
    assert {p.name for p in root.iterdir()} == folders | {"phantom.json"}
    patients = {}
    for split in phantom.SPLITS:
        names = [p.name for p in (root / f"keras_slices_{split}").iterdir()]
        assert all(re.fullmatch(r"case_\d{3}_week_\d_slice_\d+\.nii\.gz", n) for n in names)
        patients[split] = {n.split("_")[1] for n in names}
        assert patients[split], f"{split} is empty"
        seg = sorted(p.name for p in (root / f"keras_slices_seg_{split}").iterdir())
        assert seg == sorted(n.replace("case_", "seg_", 1) for n in names)
    assert sum(len(v) for v in patients.values()) == len(set.union(*patients.values())) == 4  # disjoint
    assert sorted(set.union(*patients.values())) == ["004", "005", "006", "007"]
    summary = json.loads((root / phantom.COMPLETE_MARKER).read_text())
    assert {k: set(v) for k, v in summary["splits"].items()} == patients
    assert summary["odd_volume"] == "case_005_week_0" and summary["singleton_volumes"] == ["case_006_week_0"]


@pytest.mark.parametrize("case", ["004", "005", "006", "007"])
def test_2d_volume_slices(phantom_2d_dir, case):
    split = next(s for s in phantom.SPLITS if list((phantom_2d_dir / f"keras_slices_{s}").glob(f"case_{case}_*")))
    images, labels = stacked_2d(phantom_2d_dir, split, case, 0)
    assert [int(re.search(r"slice_(\d+)", p.name).group(1)) for p in images] == list(range(60))
    expected = {"005": (256, 144), "006": (256, 128, 1)}.get(case, (256, 128))
    first = nib.load(images[0])
    assert all(nib.load(p).shape == expected for p in images + labels)
    assert first.get_data_dtype() == np.float32 and nib.load(labels[0]).get_data_dtype() == np.float32
    label = np.stack([np.asarray(nib.load(p).dataobj) for p in labels])
    assert set(np.unique(label)) == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}  # floats 0.0..5.0, every class present
    image = np.stack([np.asarray(nib.load(p).dataobj) for p in images])
    assert image.min() >= 0 and 300 < image.max() < 4000  # raw MR units, not standardised
    # Each slice keeps the 3D geometry: columns x, z, then the slice normal y; origins one y step apart.
    np.testing.assert_allclose(np.linalg.norm(first.affine[:3, :3], axis=0), (SPACING[0], SPACING[2], SPACING[1]))
    step = nib.load(images[1]).affine[:3, 3] - first.affine[:3, 3]
    np.testing.assert_allclose(step, first.affine[:3, 2])


@pytest.mark.parametrize("layout, shape", [("2d", None), ("3d", (64, 64, 32))])
def test_same_arguments_give_byte_identical_files(tmp_path, layout, shape):
    """Also with a different number of worker processes: every volume is seeded on its own."""
    kwargs = dict(layout=layout, patients=3, weeks=1, seed=5, shape=shape)
    phantom.write_dataset(tmp_path / "a", workers=1, **kwargs)
    phantom.write_dataset(tmp_path / "b", workers=2, **kwargs)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) > 3 and a == b
    if layout == "3d":  # a different seed changes every volume (checked on the cheap small volumes only)
        phantom.write_dataset(tmp_path / "c", workers=1, **{**kwargs, "seed": 6})
        c = tree_digest(tmp_path / "c")
        assert all(c[k] != a[k] for k in a if k.endswith(".nii.gz"))


def test_make_volume_contract_and_band():
    anatomy = make_patient(np.random.default_rng(1))
    image, label, affine = make_volume(anatomy, week=1, seed=3, shape=(64, 64, 32), spacing=(6.25, 6.25, 10))
    assert image.shape == label.shape == (64, 64, 32) and image.dtype == np.float32 and label.dtype == np.uint8
    assert label.max() == 5 and affine.shape == (4, 4)
    band, band_label, band_affine = make_volume(anatomy, 1, 3, (64, 64, 32), (6.25, 6.25, 10), rows=(20, 40))
    assert band.shape == (64, 20, 32)
    np.testing.assert_array_equal(band_label, label[:, 20:40])  # the band is the same anatomy
    np.testing.assert_allclose(band_affine[:3, 3], affine[:3, :3] @ (0, 20, 0) + affine[:3, 3])


def test_odd_volume_rule():
    assert phantom.odd_volume(1, 1) is None
    assert phantom.odd_volume(12, 2) == (1, 1) and phantom.odd_volume(5, 1) == (1, 0)
    assert phantom.odd_volume(1, 3) == (0, 1)


def test_cli_writes_data_preview_and_prints_shares(tmp_path, capsys):
    png = tmp_path / "preview.png"
    assert phantom.main([str(tmp_path / "out"), "--layout", "2d", "--patients", "3", "--weeks", "1",
                         "--workers", "1", "--preview", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "class shares:" in printed and "prostate" in printed
    assert (tmp_path / "out" / phantom.COMPLETE_MARKER).exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 400_000


@pytest.mark.parametrize("args, message", [
    (["--patients", "0"], "patients"),
    (["--weeks", "9"], "weeks"),
    (["--weeks", "0"], "weeks"),
    (["--seed", "-1"], "seed"),
    (["--layout", "2d", "--patients", "2"], "3 or more"),
    (["--layout", "2d", "--naming", "b"], "3D layout only"),
    (["--layout", "4d"], "invalid choice"),
    (["--patients", "many"], "invalid int"),
])
def test_bad_counts_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert phantom.main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a hidden staging folder


def test_bad_output_folders_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("other data")
    (tmp_path / "file").write_text("x")
    for out, message in [("full", "not empty"), ("file", "not a folder"), ("file/sub", "cannot write")]:
        assert phantom.main([str(tmp_path / out), "--layout", "3d", "--patients", "1", "--weeks", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_failure_midway_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def fail_on_second(task):
        calls.append(task)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return [1] * 6

    monkeypatch.setattr(phantom, "_write_case", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        phantom.write_dataset(tmp_path / "out", layout="3d", patients=3, weeks=1, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_empty_existing_folder_is_accepted(tmp_path):
    (tmp_path / "out").mkdir()
    phantom.write_dataset(tmp_path / "out", layout="3d", patients=1, weeks=1, shape=(32, 32, 16), workers=1)
    assert (tmp_path / "out" / phantom.COMPLETE_MARKER).exists()
    assert (tmp_path / "out" / "semantic_MRs_anon" / "Case_004_Week0_LFOV.nii.gz").stat().st_size > 0
