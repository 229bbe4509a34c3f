"""Shared fixtures: small phantom data sets in the real layouts, generated once per test session; tests marked
`cuda` are skipped, with the reason, where torch sees no CUDA device."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU; torch {torch.__version__} sees none (CUDA build: {torch.version.cuda or 'no'}). "
              "On a GPU node `make gpu-check` runs these")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def phantom_2d_dir(tmp_path_factory):
    """2D layout: 4 patients x Week0 (train/validate/test = 2/1/1 patients), 60 coronal slices vol[:, j, :] per
    LPS volume (affine columns x, z, y: codes L, S, P), spacing per scan around 1.68 x 1.68 x 1.56 mm (see each
    scan in phantom.json); case_005_week_0 is the 256x144 volume, case_006_week_0 has the trailing-singleton
    (256, 128, 1) files, case_007_week_0 has int16 images with scl_slope and 1.88 mm in-plane spacing; images
    float32 otherwise, labels float32 0.0..5.0."""
    import phantom

    out = tmp_path_factory.mktemp("phantom") / "phantom_2d"
    phantom.write_dataset(out, layout="2d", patients=4, weeks=1, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def phantom_3d_dir(tmp_path_factory):
    """3D layout, anonymised naming: 3 patients x Week0 of full-size LPS volumes (256x256x128, float32 images,
    uint8 masks), spacing per scan around 1.68 x 1.68 x 1.56 mm (see phantom.json); Case_005_Week0 is the
    256x256x144 volume, Case_006_Week0 is stored (256, 256, 128, 1) with 1.88 mm in-plane spacing."""
    import phantom

    out = tmp_path_factory.mktemp("phantom") / "phantom_3d"
    phantom.write_dataset(out, layout="3d", patients=3, weeks=1, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def phantom_3d_small_dir(tmp_path_factory):
    """3D layout at a quarter of the resolution (64x64x32 voxels, same field of view: spacing ~6.7 x 6.7 x 6.2 mm,
    per scan), 3 patients x Week0, otherwise as phantom_3d_dir (Case_005_Week0 is 64x64x36, Case_006_Week0 is
    (64, 64, 32, 1)): for training and sliding-window tests that would take minutes at full size on a CPU."""
    import phantom

    out = tmp_path_factory.mktemp("phantom") / "phantom_3d_small"
    phantom.write_dataset(out, layout="3d", patients=3, weeks=1, seed=0, workers=1, shape=(64, 64, 32))
    return out


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test models gain nothing from threads, and on a loaded 2-core machine OpenMP's waits made the
    model tests ~10x slower; subprocess tests set OMP_NUM_THREADS=1 themselves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _glibc_allocator_left_alone(monkeypatch):
    """train.py's, predict.py's and bench.py's main() run inside the pytest process in some tests, and
    utils.keep_freed_memory would change the allocator of the whole process for good: keep it a no-op here.
    test_utils checks the real one in subprocesses."""
    import utils

    monkeypatch.setattr(utils, "keep_freed_memory", lambda device: False)
