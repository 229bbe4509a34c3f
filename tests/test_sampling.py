"""Where DeviceBatchSource keeps a split (device or host memory) and that the batches do not depend on it; that
augmentation and sampling take the GPU's sync-free paths with the same results. The CPU tests stand in for the
GPU with a stubbed memory query and by forcing the GPU's code paths; the `cuda` tests run them for real."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import augment
import cache as cache_module
import sampling
from augment import AugmentConfig, augment_batch

GB = 10**9
ALL_ON = AugmentConfig(flip_axes=(0, 1), rotate_prob=1, scale_prob=1, gamma_prob=1, bias_prob=1, contrast_prob=1,
                       brightness_prob=1, noise_prob=1)
ALL_OFF = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, gamma_prob=0, bias_prob=0, contrast_prob=0,
                        brightness_prob=0, noise_prob=0)


def caseset(spatial_dims: int, n: int = 3, seed: int = 0) -> cache_module.CaseSet:
    """n labelled scans of random float16 images and uint8 labels: 2D stacks of 6 slices of 16x8, 3D volumes of
    16x16x8 (one of 12x16x6, padded to 16x16x8 patches)."""
    rng = np.random.default_rng(seed)
    shapes = [(6, 16, 8)] * n if spatial_dims == 2 else [(16, 16, 8)] * (n - 1) + [(12, 16, 6)]
    images = [rng.standard_normal(s).astype(np.float16) for s in shapes]
    labels = [rng.integers(0, 6, s, dtype=np.uint8) for s in shapes]
    return cache_module.CaseSet(spatial_dims, [f"c{i}" for i in range(n)], images, labels, [(1.0, 1.0, 1.0)] * n,
                                shapes, [[] for _ in range(n)])


def source(spatial_dims: int, device="cpu", **kwargs) -> sampling.DeviceBatchSource:
    patch = (16, 16, 8) if spatial_dims == 3 else None
    return sampling.DeviceBatchSource(caseset(spatial_dims), batch_size=2, device=device, patch_size=patch, seed=3,
                                      steps_per_epoch=4, **kwargs)


def batches(src: sampling.DeviceBatchSource, epochs=(0, 1), start_batch: int = 0) -> list[torch.Tensor]:
    return [t.cpu() for e in epochs for pair in src.epoch(e, start_batch) for t in pair]


# ---------------------------------------------------------------- where the split lives


@pytest.mark.parametrize("placement, free, expected", [
    ("auto", None, "device"),  # CPU: no device memory to run out of
    ("auto", 10 * GB, "device"),  # 4 + 6 fits in 10 exactly
    ("auto", 10 * GB - 1, "host"),
    ("auto", 2 * GB, "host"),
    ("device", 2 * GB, "device"),  # the caller decides
    ("host", 100 * GB, "host"),
])
def test_choose_placement(placement, free, expected):
    chosen, why = sampling.choose_placement(placement, needed=4 * GB, free=free, reserve=6 * GB)
    assert chosen == expected
    if placement == "auto" and free is not None:  # the log line says what was compared
        assert "4.00 GB" in why and "6.00 GB" in why and f"{free / GB:.2f} GB free" in why


def test_choose_placement_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="placement must be one of"):
        sampling.choose_placement("gpu", 1, None, 0)


def test_default_reserve_scales_with_the_batch():
    assert sampling.working_memory_bytes(3, 2, (128, 128, 64)) == 2 * 950 * 2 * 128 * 128 * 64 + 2**30  # 5.1 GB
    assert sampling.working_memory_bytes(2, 8, (256, 128)) == 2 * 1400 * 8 * 256 * 128 + 2**30  # 1.8 GB
    assert sampling.working_memory_bytes(3, 4, (128, 128, 64), width=32) == 4 * (
        sampling.working_memory_bytes(3, 2, (128, 128, 64)) - 2**30) + 2**30


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_auto_placement_uses_the_memory_query_and_the_default_reserve(spatial_dims, monkeypatch, caplog):
    cases = caseset(spatial_dims)
    # Bytes of scans: 2D 3 x 6x16x8, 3D 2 x 16x16x8 + one padded to 16x16x8; float16 image + uint8 label.
    needed = (3 * 6 * 16 * 8 if spatial_dims == 2 else 3 * 16 * 16 * 8) * 3
    item_shape = (16, 8) if spatial_dims == 2 else (16, 16, 8)
    reserve = sampling.working_memory_bytes(spatial_dims, 2, item_shape)
    asked = []
    for free, expected in ((needed + reserve, "device"), (needed + reserve - 1, "host")):
        monkeypatch.setattr(sampling, "free_device_memory", lambda device, free=free: asked.append(device) or free)
        with caplog.at_level(logging.INFO, logger="hipmri.sampling"):
            src = sampling.DeviceBatchSource(cases, batch_size=2, patch_size=(16, 16, 8) if spatial_dims == 3 else None)
        assert src.placement == expected
        assert f"{free / GB:.2f} GB free" in caplog.records[-1].getMessage()
        assert ("host memory" in caplog.records[-1].getMessage()) == (expected == "host")
    assert asked == [torch.device("cpu")] * 2
    monkeypatch.setattr(sampling, "free_device_memory", lambda device: pytest.fail("forced placements ask nothing"))
    assert source(spatial_dims, placement="host").placement == "host"


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("augment_cfg", [None, AugmentConfig(), ALL_ON])
def test_host_placement_gives_the_same_batches(spatial_dims, augment_cfg):
    on_device = source(spatial_dims, placement="device", augment=augment_cfg)
    on_host = source(spatial_dims, placement="host", augment=augment_cfg)
    assert on_device.placement == "device" and on_host.placement == "host"
    expected = batches(on_device)
    got = batches(on_host)
    assert len(got) == len(expected) == 16
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected))
    assert [t.dtype for t in got[:2]] == [torch.float32, torch.int64]
    assert all(torch.equal(a, b) for a, b in zip(batches(on_host, (1,), 2), expected[12:]))  # resume mid-epoch


# ---------------------------------------------------------------- no reading back on a GPU


@pytest.fixture
def gpu_paths(monkeypatch):
    """Run augment's GPU code paths on the CPU: no value is read back to the host."""
    monkeypatch.setattr(augment, "_flags_readable", lambda device: False)


def augmented(shape, cfg, seed):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 6, (4, *shape), generator=generator)
    image = torch.randn(4, 1, *shape, generator=generator)
    return augment_batch(image, label, generator, cfg)


CONFIGS = {"default": AugmentConfig(), "all on": ALL_ON, "all off": ALL_OFF,
           "rare": AugmentConfig(rotate_prob=0.05, scale_prob=0.05, bias_prob=0.05, noise_prob=0.05)}


@pytest.mark.parametrize("shape", [(24, 16), (16, 12, 8)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_paths_give_the_cpu_paths_values(shape, name, monkeypatch):
    cfg = CONFIGS[name]
    expected = [augmented(shape, cfg, seed) for seed in range(6)]
    monkeypatch.setattr(augment, "_flags_readable", lambda device: False)
    got = [augmented(shape, cfg, seed) for seed in range(6)]
    for (image, label), (want_image, want_label) in zip(got, expected):
        assert torch.equal(label, want_label) and torch.equal(image, want_image)
    if name == "all off":  # nothing drawn: the GPU path's masked work must leave the batch as it was
        generator = torch.Generator().manual_seed(0)
        assert torch.equal(got[0][1], torch.randint(0, 6, (4, *shape), generator=generator))


def _refuse(*args, **kwargs):
    raise AssertionError("a tensor's value was read on the host: a device-to-host sync on a GPU")


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("placement", ["device", "host"])
def test_gpu_paths_read_nothing_back(spatial_dims, placement, gpu_paths, monkeypatch):
    src = source(spatial_dims, placement=placement, augment=ALL_ON)
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _refuse)
    monkeypatch.setattr(torch, "nonzero", _refuse)
    images = [image for image, _ in src.epoch(0)]
    assert len(images) == 4
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="read on the host"):  # the guard works: the CPU path reads flags
        monkeypatch.setattr(torch.Tensor, "nonzero", _refuse)
        augmented((8, 8), ALL_ON, 0)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cuda_host_fallback_when_the_split_does_not_fit(spatial_dims, monkeypatch):
    on_device = source(spatial_dims, device="cuda", placement="device", augment=AugmentConfig())
    monkeypatch.setattr(sampling, "free_device_memory", lambda device: 1)  # a 1-byte GPU: nothing fits
    on_host = source(spatial_dims, device="cuda", augment=AugmentConfig())
    assert on_host.placement == "host"
    scans = on_host.images if spatial_dims == 2 else on_host.volumes[0]
    assert scans.device.type == "cpu" and not scans.is_pinned()  # batches are gathered into pinned memory
    got = [(image, label) for image, label in on_host.epoch(0)]
    assert got[0][0].device.type == "cuda" and got[0][1].dtype == torch.int64
    expected = [(image, label) for image, label in on_device.epoch(0)]
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(got, expected))


@pytest.mark.cuda
def test_cuda_free_memory_is_the_drivers():
    free = sampling.free_device_memory(torch.device("cuda"))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory


@pytest.mark.cuda
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_sampling_and_augmentation_never_sync(spatial_dims, placement):
    src = source(spatial_dims, device="cuda", placement=placement, augment=ALL_ON)  # the copy to the GPU may sync
    next(iter(src.epoch(0)))  # first use: CUDA libraries and the pinned-memory cache initialise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images = [image for epoch in (1, 2) for image, _ in src.epoch(epoch)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(images) == 8 and torch.isfinite(torch.stack(images)).all()
