"""train.py end to end on a tiny phantom: outputs, reload, exact resume after SIGKILL, torchrun, budget, NaN."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
import losses
import train
import utils
from modules import UNet

REPO = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "16", "--batch-size", "2", "--steps-per-epoch", "3", "--seed", "1"]


def tiny_args(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--cache-dir", str(Path(out).parent / "cache"), *TINY,
            *map(str, extra)]


def read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_2d_run_writes_outputs_and_best_reloads(phantom_2d_dir, tmp_path):
    run = tmp_path / "run2d"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2)) == 0
    for name in ("config.json", "last.pt", "best.pt", "metrics.csv", "progress.png", "train.log"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["dice_mean_fg"]) <= 1 for r in rows)
    ckpt = utils.load_checkpoint(run / "best.pt")
    assert ckpt["config"]["dims"] == 2 and ckpt["class_names"] == list(utils.CLASS_NAMES)
    model = UNet(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    probs = inference.predict_case(model, torch.randn(3, 256, 144).numpy(), 2)
    assert probs.shape == (6, 3, 256, 144)


def test_3d_run_writes_split_and_outputs(phantom_3d_small_dir, tmp_path):
    run = tmp_path / "run3d"
    assert train.main(tiny_args(phantom_3d_small_dir, run, "--epochs", 1, "--patch-size", 32, 32, 16)) == 0
    for name in ("config.json", "split.json", "last.pt", "best.pt", "metrics.csv", "progress.png"):
        assert (run / name).is_file(), name
    assert utils.load_checkpoint(run / "last.pt")["model_args"]["spatial_dims"] == 3


def _final_weights(run):
    return utils.load_checkpoint(run / "last.pt")["model"]


def _train_command(data_dir, run, *extra):
    return [sys.executable, str(REPO / "train.py"), *tiny_args(data_dir, run, "--epochs", 3, "--no-amp", *extra)]


def test_resume_after_sigkill_is_exact(phantom_2d_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_command(phantom_2d_dir, straight), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(phantom_2d_dir, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = utils.load_checkpoint(killed / "last.pt")["counters"]["epoch"]
    assert epochs_done < 3, "the run finished before it could be killed; make the test run longer"
    subprocess.run(_train_command(phantom_2d_dir, killed, "--resume"), check=True, env=env, capture_output=True)

    expected, resumed = _final_weights(straight), _final_weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert [r["train_loss"] for r in read_metrics(straight)] == [r["train_loss"] for r in read_metrics(killed)]


def test_resume_refuses_contradicting_options(phantom_2d_dir, tmp_path):
    run = tmp_path / "run"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1)) == 0
    with pytest.raises(SystemExit, match="--lr 0.5 \\(run has 0.003\\)"):
        train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume", "--lr", 0.5))
    with pytest.raises(SystemExit, match="--resume"):
        train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2))  # existing run without --resume
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume")) == 0
    assert len(read_metrics(run)) == 2


def test_max_minutes_stops_with_outputs(phantom_2d_dir, tmp_path):
    run = tmp_path / "budget"
    started = time.time()
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1000, "--max-minutes", 0.05)) == 0
    assert time.time() - started < 60
    rows = read_metrics(run)
    assert 1 <= len(rows) < 1000
    assert rows[-1]["dice_mean_fg"] != "nan"  # the last epoch is validated before stopping
    assert (run / "best.pt").is_file() and (run / "progress.png").is_file()


def _nan_on_calls(monkeypatch, bad_calls):
    make_loss = losses.make_loss

    def patched(*args, **kwargs):
        inner = make_loss(*args, **kwargs)
        calls = {"n": 0}

        class NaNInjecting(torch.nn.Module):
            def forward(self, logits, target):
                calls["n"] += 1
                loss = inner(logits, target)
                return loss * float("nan") if calls["n"] in bad_calls else loss

        return NaNInjecting()

    monkeypatch.setattr(losses, "make_loss", patched)


def test_nan_loss_step_is_skipped(phantom_2d_dir, tmp_path, monkeypatch, capsys):
    _nan_on_calls(monkeypatch, bad_calls={2})
    run = tmp_path / "nan"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1, "--no-amp")) == 0
    assert "non-finite loss or gradient, step skipped" in capsys.readouterr().err
    weights = utils.load_checkpoint(run / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert utils.load_checkpoint(run / "last.pt")["counters"]["step"] == 2  # 3 batches, one skipped


def test_repeated_nan_stops_and_keeps_last_good_checkpoint(phantom_2d_dir, tmp_path, monkeypatch):
    run = tmp_path / "nans"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1, "--no-amp")) == 0
    good = _final_weights(run)
    _nan_on_calls(monkeypatch, bad_calls=set(range(1, 100)))
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--resume", "--no-amp", "--max-bad-steps", 2)) == 1
    assert all(torch.equal(good[k], w) for k, w in _final_weights(run).items())


def test_torchrun_two_cpu_processes(phantom_2d_dir, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *tiny_args(phantom_2d_dir, run, "--epochs", 3, "--steps-per-epoch", 4)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on 2 ranks" in result.stderr
    rows = read_metrics(run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_bad_data_or_missing_run_exit_2_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main(["--data-dir", str(empty), "--out", str(tmp_path / "run")]) == 2
    assert str(empty) in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "never-trained"), "--resume"]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
