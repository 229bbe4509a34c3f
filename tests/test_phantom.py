"""phantom.py, phantom_plan.py and phantom_anatomy.py: the real layouts and names, headers as the real files'
(LPS, per-scan spacing, dtypes, units), weeks with gaps, cluster letters, quirks as a minority, class shares,
splits, determinism, bad input.

The shared fixtures (conftest.py) hold 4 patients x 1 week in 2D and 3 full-size volumes in 3D; the other
data sets here use few volumes, or smaller volumes through write_dataset's test-only `shape`; plan-level facts
(spacing statistics, weeks, quirk rates) are checked on phantom_plan.plan_scans, which writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest

import phantom
import phantom_plan
from phantom_anatomy import MEDIAN_SPACING, make_patient, make_volume, scaled_spacing

LPS = ("L", "P", "S")


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


def scans_by_key(root) -> dict[str, dict]:
    """The summary's per-scan records (phantom.json) by key."""
    return {s["key"]: s for s in json.loads((root / phantom.COMPLETE_MARKER).read_text())["scans"]}


def test_3d_anon_layout_orientation_dtypes_headers_and_shares(phantom_3d_dir):
    root = phantom_3d_dir
    assert sorted(p.name for p in root.iterdir()) == ["phantom.json", "semantic_MRs_anon", "semantic_labels_anon"]
    images = sorted(p.name for p in (root / "semantic_MRs_anon").iterdir())
    assert images == [f"Case_{c}_Week0_LFOV.nii.gz" for c in ("004", "005", "006")]
    scans, shapes = scans_by_key(root), {}
    for name in images:
        image = nib.load(root / "semantic_MRs_anon" / name)
        label = nib.load(root / "semantic_labels_anon" / name.replace("_LFOV", "_SEMANTIC_LFOV"))
        scan = scans[name.removesuffix("_LFOV.nii.gz")]
        # The real files: float32 images, uint8 masks (the fixture's 3 scans hold no dtype quirk), both LPS with
        # one affine, the scan's own spacing, masks with xyzt units unknown.
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(label.affine) == LPS
        np.testing.assert_array_equal(label.affine, image.affine)
        np.testing.assert_allclose(image.header.get_zooms()[:3], scan["spacing_mm"], rtol=1e-6)
        assert image.header.get_xyzt_units()[0] == "mm" and label.header.get_xyzt_units() == ("unknown", "unknown")
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        values = np.asarray(label.dataobj).squeeze(-1) if label.ndim == 4 else np.asarray(label.dataobj)
        counts = np.bincount(values.ravel(), minlength=6)
        assert len(counts) == 6 and (counts > 0).all(), f"{name}: a class is missing: {counts}"
        shares = counts / counts.sum()
        # Real study: background ~60 %, prostate ~0.1 % of a volume. The phantom's spread over 150 full-size
        # volumes (seed 0, 75 patients x 2 weeks) was background 0.55-0.67 (mean 0.62) and prostate
        # 0.00055-0.0022 (mean 0.0011; glands of 21-78 ml, median 40 ml); the bounds leave room for other seeds.
        assert 0.45 < shares[0] < 0.75 and 0.0002 < shares[5] < 0.005, shares
        pixels = np.asarray(image.dataobj)
        assert pixels.min() >= 0 and 800 < np.percentile(pixels.reshape(values.shape)[values == 3], 50) < 3000
        shapes[name] = image.shape
    assert shapes == {"Case_004_Week0_LFOV.nii.gz": (256, 256, 128), "Case_005_Week0_LFOV.nii.gz": (256, 256, 144),
                      "Case_006_Week0_LFOV.nii.gz": (256, 256, 128, 1)}  # the odd volume; a trailing singleton
    summary = json.loads((root / phantom.COMPLETE_MARKER).read_text())
    assert summary["odd_volume"] == "Case_005_Week0" and summary["volumes"] == 3
    assert summary["singleton_volumes"] == ["Case_006_Week0"]
    assert summary["wide_volume"] == "Case_006_Week0" and scans["Case_006_Week0"]["spacing_mm"][:2] == [1.88, 1.88]


def test_3d_cluster_naming_letters_weeks_and_odd_volume(tmp_path):
    out = tmp_path / "cluster"
    summary = phantom.write_dataset(out, layout="3d", patients=4, weeks=3, naming="cluster", shape=(32, 32, 16),
                                    workers=1)
    images = sorted(p.name for p in (out / "semantic_MRs").iterdir())
    labels = sorted(p.name for p in (out / "semantic_labels_only").iterdir())
    assert all(re.fullmatch(r"[BKS]\d{3}_Week[0-7]_LFOV\.nii\.gz", n) for n in images), images
    assert labels == [n.replace("_LFOV", "_SEMANTIC") for n in images]
    letters = {}
    for name in images:
        letters.setdefault(name[1:4], set()).add(name[0])
    assert sorted(letters) == ["004", "005", "006", "007"] and all(len(v) == 1 for v in letters.values())
    assert len(set.union(*letters.values())) >= 2  # several letters, one per patient
    weeks = {case: sorted(int(n[9]) for n in images if n[1:4] == case) for case in letters}
    assert weeks == summary["weeks_per_patient"] and all(w[0] == 0 and len(w) <= 3 for w in weeks.values())
    assert weeks == {"004": [0, 1, 2], "005": [0, 2, 3], "006": [0, 1, 3], "007": [0, 3]}  # gaps, seed 0
    shapes = {n: nib.load(out / "semantic_MRs" / n).shape for n in images}
    odd = summary["odd_volume"]
    assert odd == f"{letters['005'].pop()}005_Week2" and shapes.pop(f"{odd}_LFOV.nii.gz") == (32, 32, 18)
    assert set(shapes.values()) == {(32, 32, 16), (32, 32, 16, 1)} and summary["naming"] == "cluster"
    for scan in summary["scans"]:  # 8x coarser voxels than the full-size volume, same field of view
        zooms = nib.load(out / "semantic_MRs" / f"{scan['key']}_LFOV.nii.gz").header.get_zooms()[:3]
        np.testing.assert_allclose(zooms, scan["spacing_mm"], rtol=1e-6)
        assert 8 * 1.6 < zooms[0] == zooms[1] < 8 * 1.9 and 8 * 1.5 < zooms[2] < 8 * 1.62


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
    assert summary["int16_volumes"] == ["case_007_week_0"] and summary["wide_volume"] == "case_007_week_0"


@pytest.mark.parametrize("case", ["004", "005", "006", "007"])
def test_2d_volume_slices(phantom_2d_dir, case):
    split = next(s for s in phantom.SPLITS if list((phantom_2d_dir / f"keras_slices_{s}").glob(f"case_{case}_*")))
    images, labels = stacked_2d(phantom_2d_dir, split, case, 0)
    scan = scans_by_key(phantom_2d_dir)[f"case_{case}_week_0"]
    assert [int(re.search(r"slice_(\d+)", p.name).group(1)) for p in images] == list(range(60))
    expected = {"005": (256, 144), "006": (256, 128, 1)}.get(case, (256, 128))
    first = nib.load(images[0])
    assert all(nib.load(p).shape == expected for p in images + labels) and scan["shape"] == list(expected)
    assert first.get_data_dtype() == ("int16" if case == "007" else "float32") == scan["image_dtype"]
    assert nib.load(labels[0]).get_data_dtype() == np.float32
    label = np.stack([np.asarray(nib.load(p).dataobj) for p in labels])
    assert set(np.unique(label)) == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}  # floats 0.0..5.0, every class present
    image = np.stack([nib.load(p).get_fdata() for p in images])
    assert image.min() >= 0 and 300 < image.max() < 4000  # raw MR units, not standardised
    # Each slice vol[:, j, :] keeps the LPS volume's geometry: columns x (L) and z (S), then the step along y (P);
    # origins one y step apart; image and label share the affine.
    assert nib.aff2axcodes(first.affine) == ("L", "S", "P")
    sx, sy, sz = scan["spacing_mm"]
    np.testing.assert_allclose(np.linalg.norm(first.affine[:3, :3], axis=0), (sx, sz, sy), rtol=1e-6)
    step = nib.load(images[1]).affine[:3, 3] - first.affine[:3, 3]
    np.testing.assert_allclose(step, first.affine[:3, 2], atol=1e-4)  # float32 header origins
    np.testing.assert_array_equal(nib.load(labels[5]).affine, nib.load(images[5]).affine)


def test_2d_slices_are_coronal_planes_of_the_lps_volume(phantom_2d_dir):
    """The 2D files of a scan are vol[:, j, :] of the very volume (labels and affines) the 3D layout would hold."""
    images, labels = stacked_2d(phantom_2d_dir, "train", "004", 0)
    spacing = scans_by_key(phantom_2d_dir)["case_004_week_0"]["spacing_mm"]
    seed = int(np.random.SeedSequence([0, 0, 0]).generate_state(1)[0])
    _, volume, affine = make_volume(make_patient(np.random.default_rng([0, 0])), 0, seed, spacing=spacing)
    start, stop = phantom.slice_band(256)
    assert nib.aff2axcodes(affine) == LPS and stop - start == len(labels) == 60
    np.testing.assert_array_equal(np.stack([np.asarray(nib.load(p).dataobj) for p in labels], axis=1),
                                  volume[:, start:stop])
    for k in (0, 59):  # slice k's voxel (17, 40) is the volume's voxel (17, start + k, 40), in world mm too
        np.testing.assert_allclose(nib.load(images[k]).affine @ (17, 40, 0, 1), affine @ (17, start + k, 40, 1),
                                   atol=1e-4)


@pytest.mark.parametrize("layout, shape, weeks", [("2d", None, 1), ("3d", (32, 32, 16), 3)])
def test_same_arguments_give_byte_identical_files(tmp_path, layout, shape, weeks):
    """Also with a different number of worker processes: every volume is seeded on its own."""
    kwargs = dict(layout=layout, patients=3, weeks=weeks, seed=5, shape=shape)
    phantom.write_dataset(tmp_path / "a", workers=1, **kwargs)
    phantom.write_dataset(tmp_path / "b", workers=2, **kwargs)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) > 3 and a == b
    if layout == "3d":  # a different seed changes every volume (checked on the cheap small volumes only)
        phantom.write_dataset(tmp_path / "c", workers=1, **{**kwargs, "seed": 6})
        c = tree_digest(tmp_path / "c")
        assert all(c[k] != a[k] for k in a if k.endswith(".nii.gz") and k in c)
        assert sum(k in c for k in a) >= 4  # Week0 of every patient at least: the comparison means something


def test_make_volume_contract_and_band():
    anatomy = make_patient(np.random.default_rng(1))
    spacing = scaled_spacing(MEDIAN_SPACING, (64, 64, 32))
    image, label, affine = make_volume(anatomy, week=1, seed=3, shape=(64, 64, 32), spacing=spacing)
    assert image.shape == label.shape == (64, 64, 32) and image.dtype == np.float32 and label.dtype == np.uint8
    assert label.max() == 5 and affine.shape == (4, 4) and nib.aff2axcodes(affine) == LPS
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (6.72, 6.72, 6.24))
    band, band_label, band_affine = make_volume(anatomy, 1, 3, (64, 64, 32), spacing, rows=(20, 40))
    assert band.shape == (64, 20, 32)
    np.testing.assert_array_equal(band_label, label[:, 20:40])  # the band is the same anatomy
    np.testing.assert_allclose(band_affine[:3, 3], affine[:3, :3] @ (0, 20, 0) + affine[:3, 3])


def test_lps_anatomy_bladder_above_prostate_rectum_behind():
    """In the LPS arrays, z grows superior and y posterior: the bladder lies above the prostate (larger z), the
    rectum behind it (larger y); the femoral heads lie on both sides (bone at small and large x)."""
    anatomy = make_patient(np.random.default_rng([0, 2]))
    _, label, _ = make_volume(anatomy, 0, 11, (64, 64, 32), scaled_spacing(MEDIAN_SPACING, (64, 64, 32)))
    centre = {c: np.argwhere(label == c).mean(0) for c in (3, 4, 5)}
    assert centre[3][2] > centre[5][2] + 2 and centre[4][1] > centre[5][1] + 1
    bone_x = np.argwhere(label[:, :, int(centre[5][2]) + 1] == 2)[:, 0]
    assert bone_x.min() < 24 and bone_x.max() > 40


def test_odd_volume_rule():
    assert phantom_plan.odd_volume([[0]]) is None
    assert phantom_plan.odd_volume([[0, 2], [0, 1, 3]]) == (1, 1) and phantom_plan.odd_volume([[0], [0, 2]]) == (1, 2)
    assert phantom_plan.odd_volume([[0, 1], [0], [0]]) == (1, 0) and phantom_plan.odd_volume([[0, 3]]) == (0, 3)


def test_weeks_have_gaps_and_respect_the_limit():
    for weeks in range(1, phantom_plan.MAX_WEEKS + 1):
        plan = phantom_plan.patient_weeks(38, weeks, seed=0)
        assert all(w[0] == 0 and w == sorted(set(w)) and len(w) <= weeks and w[-1] <= min(weeks, 7) for w in plan)
        gaps = [w for w in plan if w != list(range(len(w)))]
        assert (len(gaps) > 3) == (weeks > 1), (weeks, gaps)  # e.g. weeks 0-5 and 7
    assert phantom_plan.patient_weeks(5, 1, seed=3) == [[0]] * 5
    assert phantom_plan.patient_weeks(12, 7, seed=1) == phantom_plan.patient_weeks(12, 7, seed=1)
    assert phantom_plan.patient_weeks(12, 7, seed=1) != phantom_plan.patient_weeks(12, 7, seed=2)
    # All 8 weeks allowed: 1-8 scans per patient, ~211 scans for 38 patients as in the real study.
    totals = [sum(map(len, phantom_plan.patient_weeks(38, 8, seed))) for seed in range(10)]
    assert 0.95 * 211 < np.mean(totals) < 1.05 * 211, totals


def test_spacing_varies_per_scan_around_the_real_median():
    tasks = phantom_plan.plan_scans("3d", 38, 8, seed=0)
    spacing = np.array([t.spacing for t in tasks])
    np.testing.assert_allclose(np.median(spacing, axis=0), MEDIAN_SPACING, rtol=0.02)
    assert len(np.unique(spacing[:, 0])) > 10 and len(np.unique(spacing[:, 2])) > 10
    assert (spacing[:, 0] == spacing[:, 1]).all() and spacing.min() > 1.45 and spacing[:, 2].max() < 1.65
    wide = [t for t in tasks if t.wide]
    assert len(wide) == 1 and wide[0].spacing[:2] == (1.88, 1.88) and wide[0] is tasks[-1]
    assert spacing[:-1, 0].max() < 1.8  # the other scans stay near the median
    odd = [t for t in tasks if t.shape != (256, 256, 128)]
    assert len(odd) == 1 and odd[0].shape == (256, 256, 144) and (odd[0].patient, odd[0].week) == (1, 2)
    small = phantom_plan.plan_scans("3d", 38, 8, seed=0, shape=(64, 64, 32))
    np.testing.assert_allclose([t.spacing for t in small], 4 * spacing)  # same field of view, coarser voxels


def test_dtype_quirks_are_a_documented_minority():
    tasks = phantom_plan.plan_scans("3d", 38, 8, seed=0)
    majority = [t for t in tasks if (t.image_dtype, t.label_dtype, t.singleton) == ("float32", "uint8", False)]
    assert len(majority) >= 0.65 * len(tasks)
    for quirk in (lambda t: t.image_dtype == "int16", lambda t: t.label_dtype == "float64", lambda t: t.singleton):
        assert 0.05 * len(tasks) < sum(map(quirk, tasks)) < 0.15 * len(tasks)
    assert {t.label_dtype for t in phantom_plan.plan_scans("2d", 12, 2, 0)} == {"float32", "float64"}


def test_quirks_on_disk(tmp_path):
    """10 scans: one int16 image with scl_slope != 1, one float64 label, one (X, Y, Z, 1) pair; the rest float32 /
    uint8; every mask has xyzt units unknown and the image's affine; every file is LPS."""
    out = tmp_path / "q"
    summary = phantom.write_dataset(out, layout="3d", patients=5, weeks=2, shape=(32, 32, 16), workers=1)
    assert summary["volumes"] == 10 and len(summary["int16_volumes"]) == len(summary["float64_label_volumes"]) == 1
    kinds = {"image": set(), "label": set()}
    for scan in summary["scans"]:
        image = nib.load(out / "semantic_MRs_anon" / f"{scan['key']}_LFOV.nii.gz")
        label = nib.load(out / "semantic_labels_anon" / f"{scan['key']}_SEMANTIC_LFOV.nii.gz")
        kinds["image"].add(str(image.get_data_dtype()))
        kinds["label"].add(str(label.get_data_dtype()))
        assert str(image.get_data_dtype()) == scan["image_dtype"] and str(label.get_data_dtype()) == scan["label_dtype"]
        assert list(image.shape) == list(label.shape) == scan["shape"]
        assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(label.affine) == LPS
        np.testing.assert_array_equal(label.affine, image.affine)
        assert label.header.get_xyzt_units() == ("unknown", "unknown")
        values = label.get_fdata()
        assert set(np.unique(values)) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
        if scan["image_dtype"] == "int16":
            assert image.dataobj.slope not in (0, 1) and 800 < np.median(image.get_fdata()[values == 3]) < 3000
        else:
            assert image.dataobj.slope == 1
    assert kinds == {"image": {"float32", "int16"}, "label": {"uint8", "float64"}}
    assert summary["singleton_volumes"] == [summary["scans"][2]["key"]] and summary["scans"][2]["shape"][-1] == 1


def test_cluster_letters_one_per_patient_several_in_all():
    letters = [phantom_plan.cluster_letter(p, seed=0) for p in range(12)]
    assert set(letters) == set(phantom_plan.CLUSTER_LETTERS) and all(a != b for a, b in zip(letters, letters[1:]))
    assert letters == [phantom_plan.cluster_letter(p, seed=0) for p in range(12)]
    assert any([phantom_plan.cluster_letter(p, seed) for p in range(3)] != letters[:3] for seed in range(1, 6))
    tasks = phantom_plan.plan_scans("3d", 12, 4, seed=0)
    assert all(t.letter == letters[t.patient] for t in tasks)


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
    (["--layout", "2d", "--naming", "cluster"], "3D layout only"),
    (["--naming", "b"], "invalid choice"),
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
