"""The CUDA paths of training and prediction, run on a GPU node by `make gpu-check` (skipped without CUDA).

Each test names the GPU-readiness item it covers (issue 13): resume on CUDA (1), DDP with a time budget (2),
fp16 + GradScaler where bf16 is not native and resuming across the two (4), fewer GPUs at resume (5), --device
cuda without a usable GPU (6), the first lr after a resumed budget (7), --deterministic exact resume (8), plus
2D/3D training steps with AMP and sliding-window prediction on the GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, read_metrics, tiny_args

import predict
import train
import utils

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU node)")]


def _weights(run: Path, name: str = "last.pt") -> dict:
    return utils.load_checkpoint(run / name)["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dims", [2, 3])
def test_train_a_few_steps_with_amp_resume_and_predict(dims, phantom_2d_dir, phantom_3d_small_dir, tmp_path):
    """Items 1 and 7: --resume on CUDA restores the RNG states (CPU tensors) and the budget's lr; then prediction."""
    data = phantom_2d_dir if dims == 2 else phantom_3d_small_dir
    extra = ["--patch-size", 32, 32, 16] if dims == 3 else []
    run = tmp_path / f"run{dims}d"
    args = tiny_args(data, run, "--device", "cuda", "--epochs", 1000, "--max-minutes", 5, *extra)
    assert train.main([*args, "--session-minutes", 0]) == 0
    assert utils.load_checkpoint(run / "last.pt")["amp_dtype"] == str(utils.amp_dtype_for(
        torch.device("cuda"))).removeprefix("torch.")
    assert train.main([*args, "--resume", "--session-minutes", 0]) == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and float(rows[1]["lr"]) > 1e-4  # not the schedule's end (~1e-8)
    out = tmp_path / f"pred{dims}d"
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--data-dir", str(data), "--split", "test",
                         "--out", str(out), "--device", "cuda", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (out / "summary.json").is_file()


def test_fp16_gradscaler_path_and_resume_across_amp_kinds(phantom_2d_dir, tmp_path, monkeypatch):
    """Item 4: V100/T4 (no native bf16) train with fp16 + GradScaler; a run saved there resumes on an A100/H100
    (bf16, no loss scaling) and back."""
    run = tmp_path / "fp16"
    args = tiny_args(phantom_2d_dir, run, "--device", "cuda", "--epochs", 3)
    with monkeypatch.context() as patch:
        patch.setattr(utils, "cuda_has_native_bf16", lambda device: False)
        assert train.main([*args, "--session-minutes", 0]) == 0
    ckpt = utils.load_checkpoint(run / "last.pt")
    assert ckpt["amp_dtype"] == "float16" and ckpt["scaler"]["scale"] > 1
    native = utils.cuda_has_native_bf16(torch.device("cuda"))
    assert train.main([*args, "--resume", "--session-minutes", 0]) == 0
    assert utils.load_checkpoint(run / "last.pt")["amp_dtype"] == ("bfloat16" if native else "float16")
    with monkeypatch.context() as patch:
        patch.setattr(utils, "cuda_has_native_bf16", lambda device: False)
        assert train.main([*args, "--resume"]) == 0
    assert all(torch.isfinite(w).all() for w in _weights(run).values() if w.is_floating_point())


def test_resume_with_fewer_gpus_than_at_save_time(phantom_2d_dir, tmp_path):
    """Item 5: a checkpoint whose RNG part holds one state per GPU of a bigger node (the old format)."""
    run = tmp_path / "run"
    args = tiny_args(phantom_2d_dir, run, "--device", "cuda", "--epochs", 2)
    assert train.main([*args, "--session-minutes", 0]) == 0
    ckpt = utils.load_checkpoint(run / "last.pt")
    state = ckpt["rng"].pop("cuda_device")
    ckpt["rng"]["cuda"] = [state] * (torch.cuda.device_count() + 3)
    utils.atomic_torch_save(ckpt, run / "last.pt")
    assert train.main([*args, "--resume"]) == 0


def test_deterministic_resume_is_exact(phantom_2d_dir, tmp_path):
    """Item 8: with --deterministic, stopping and resuming gives the weights of an uninterrupted run, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--device", "cuda", "--epochs", 3, "--deterministic"]
    assert train.main(tiny_args(phantom_2d_dir, straight, *common)) == 0
    assert train.main(tiny_args(phantom_2d_dir, resumed, *common, "--session-minutes", 0)) == 0
    assert train.main(tiny_args(phantom_2d_dir, resumed, *common, "--resume")) == 0
    assert _same_weights(_weights(straight), _weights(resumed))


def _torchrun(nproc: int, args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_device_cuda_under_torchrun_without_a_visible_gpu_is_refused(phantom_2d_dir, tmp_path):
    """Item 6: never a silent CPU + gloo run when the user asked for CUDA."""
    result = _torchrun(2, tiny_args(phantom_2d_dir, tmp_path / "run", "--device", "cuda"),
                       env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0 and "CUDA is not available to this process" in result.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2 GPUs")
def test_ddp_nccl_with_a_time_budget_keeps_ranks_identical(phantom_2d_dir, tmp_path):
    """Item 2 on GPUs (the CPU test uses gloo): ranks agree on the clock, so on the learning rate."""
    run = tmp_path / "ddp"
    result = _torchrun(2, tiny_args(phantom_2d_dir, run, "--epochs", 1000, "--max-minutes", 0.3,
                                    "--steps-per-epoch", 20, "--accumulate", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on 2 ranks" in result.stderr
