"""utils: RNG state round trip, atomic writes, checkpoint loading errors, AMP choice, CPU allocator, progress plot."""

import math
import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils


def test_rng_state_round_trip_reproduces_every_generator():
    utils.seed_everything(123)
    state = utils.get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.seed_everything(999)
    utils.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_rng_state_survives_weights_only_load(tmp_path):
    utils.seed_everything(5)
    utils.atomic_torch_save({"rng": utils.get_rng_state()}, tmp_path / "s.pt")
    expected = torch.rand(3)
    utils.seed_everything(6)
    utils.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_rng_state_from_a_run_with_other_gpus_restores_on_a_cpu_machine():
    """Checkpoints hold the current GPU's state (`cuda_device`); older ones a list per visible GPU (`cuda`). Neither
    may stop a resume on a machine with fewer GPUs, or none."""
    utils.seed_everything(7)
    state = utils.get_rng_state()
    expected = torch.rand(2)
    fake_gpu_state = torch.zeros(16, dtype=torch.uint8)
    for extra in ({"cuda": [fake_gpu_state, fake_gpu_state]}, {"cuda_device": fake_gpu_state}):
        utils.seed_everything(8)
        utils.set_rng_state({**state, **extra})
        assert torch.equal(torch.rand(2), expected)


def test_amp_uses_bf16_only_on_gpus_with_native_bf16(monkeypatch):
    """torch.cuda.is_bf16_supported() is also true on V100/T4, where bf16 is emulated: fp16 + GradScaler there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda", 0)
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert utils.amp_dtype_for(gpu) is expected, capability
    assert utils.amp_dtype_for(gpu, enabled=False) is None


def test_atomic_write_leaves_no_temp_files_and_replaces(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    utils.atomic_write_text(target, "one")
    utils.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_atomic_write_gives_the_modes_of_an_ordinary_file(tmp_path):
    """mkstemp makes its file 0600: a run or a mask would be unreadable to the user's group on a shared cluster."""
    umask = os.umask(0o022)
    try:
        utils.atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    utils.atomic_torch_save({"model": {}, "config": {}}, target)
    before = target.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        utils.atomic_torch_save({"x": Unpicklable()}, target)
    assert target.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_load_checkpoint_errors_name_the_file(tmp_path, content):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(utils.CheckpointError, match="best.pt"):
        utils.load_checkpoint(path)


def test_load_checkpoint_refuses_foreign_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "obj": object()}, path)
    with pytest.raises(utils.CheckpointError, match="evil.pt"):
        utils.load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(utils.CheckpointError, match="not a hipmri-seg checkpoint"):
        utils.load_checkpoint(path)


def test_amp_dtype_choice():
    cpu = torch.device("cpu")
    assert utils.amp_dtype_for(cpu, enabled=False) is None
    expected = torch.bfloat16 if utils.cpu_has_native_bf16() else None
    assert utils.amp_dtype_for(cpu, enabled=True) is expected
    with utils.autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with utils.autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


ALLOCATOR_PROBE = """
import ctypes, sys, torch, utils

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
keep = sys.argv[1] == "keep" and utils.keep_freed_memory(torch.device("cpu"))
x = torch.ones(2**24)  # 64 MB, over glibc's largest mmap threshold
mapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
del x
print(keep, mapped >> 20, libc.mallinfo2().arena >> 20, utils.keep_freed_memory(torch.device("cuda")))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them():
    """glibc's default maps a 64 MB block on its own and unmaps it on free, so the next one is faulted in
    (and zeroed by the kernel) page by page; kept memory comes from the heap and stays there for reuse. The
    speed this buys is measured by bench.py, not here."""
    runs = {}
    for mode in ("keep", "system"):
        out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        runs[mode] = {"kept": out[0] == "True", "mapped_mb": int(out[1]), "heap_mb": int(out[2]),
                      "cuda": out[3] == "True"}
    assert runs["keep"]["kept"] and not runs["system"]["kept"]
    assert runs["system"]["mapped_mb"] >= 64 and runs["keep"]["mapped_mb"] < 64, runs
    assert runs["keep"]["heap_mb"] >= 64, runs  # freed, but still the process's for the next block
    assert not runs["keep"]["cuda"]  # CUDA memory never goes through malloc: nothing to do there


def test_plot_progress_writes_png(tmp_path):
    history = []
    for epoch in range(1, 5):
        row = {"epoch": epoch, "train_loss": 1 / epoch, "val_loss": math.nan if epoch % 2 else 1.2 / epoch,
               "lr": 1e-3 * epoch}
        for name in utils.CLASS_NAMES[1:]:
            row[f"dice_{name}"] = math.nan if epoch % 2 else 0.2 * epoch
        row["dice_mean_fg"] = math.nan if epoch % 2 else 0.2 * epoch
        history.append(row)
    utils.plot_progress(history, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_cuda_gets_the_index_set_device_needs(monkeypatch):
    """torch.cuda.set_device(torch.device("cuda")) raises: "--device cuda" must come back as cuda:N."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert utils.choose_device("cuda") == torch.device("cuda", 0)
    assert utils.choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SystemExit, match="--device gpu: not a device"):
        utils.choose_device("gpu")
