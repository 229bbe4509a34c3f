"""train.py end to end on a tiny phantom: outputs, reload, exact resume after SIGKILL, torchrun, budget, NaN."""

import csv
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dataset
import inference
import losses
import train
import utils
from config import parse_config
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
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--session-minutes", 0)) == 0
    assert len(read_metrics(run)) == 1  # the session budget stopped it after the first epoch
    with pytest.raises(SystemExit, match="--lr 0.5 \\(run has 0.003\\)"):
        train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume", "--lr", 0.5))
    with pytest.raises(SystemExit, match="--resume"):
        train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2))  # existing run without --resume
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume")) == 0
    assert len(read_metrics(run)) == 2


def test_a_finished_run_is_not_trained_on_at_the_final_lr(phantom_2d_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1)) == 0
    # A longer --epochs would continue at the schedule's final lr (~1e-8): refused, with what to do instead.
    with pytest.raises(SystemExit, match="--init-from .*best.pt --out NEW_RUN"):
        train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--resume"))
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1, "--resume")) == 0
    assert "nothing to resume" in capsys.readouterr().err and len(read_metrics(run)) == 1
    # --init-from: a new run (new schedule, warm-up from lr/25) that starts from those weights.
    longer = tmp_path / "longer"
    assert train.main(tiny_args(phantom_2d_dir, longer, "--epochs", 2, "--init-from", run / "best.pt")) == 0
    rows = read_metrics(longer)
    assert len(rows) == 2 and float(rows[0]["lr"]) > 1e-5
    assert utils.load_checkpoint(longer / "last.pt")["config"]["init_from"] == str(run / "best.pt")
    with pytest.raises(SystemExit, match="--features 8 16 .*checkpoint has \\(4, 8, 16\\)"):
        train.main(tiny_args(phantom_2d_dir, tmp_path / "other", "--init-from", run / "best.pt", "--features", 8, 16))


def test_a_copied_or_moved_run_lives_where_it_is_now(phantom_2d_dir, tmp_path, monkeypatch):
    original = tmp_path / "A"
    assert train.main(tiny_args(phantom_2d_dir, original, "--epochs", 2, "--session-minutes", 0)) == 0
    untouched = (original / "last.pt").read_bytes()
    copy = tmp_path / "elsewhere" / "B"
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy.parent)  # a relative --out is relative to where the user stands now
    assert train.main(["--out", "B", "--resume", "--epochs", "2"]) == 0
    assert len(read_metrics(copy)) == 2 and len(read_metrics(original)) == 1
    assert (original / "last.pt").read_bytes() == untouched
    moved = tmp_path / "C"
    original.rename(moved)
    assert train.main(["--out", str(moved), "--resume", "--epochs", "2"]) == 0
    assert len(read_metrics(moved)) == 2 and not original.exists()


def test_resume_on_moved_data_checks_the_files_not_the_path(phantom_2d_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom_2d_dir, data)
    run = tmp_path / "run"
    assert train.main(tiny_args(data, run, "--epochs", 2, "--session-minutes", 0)) == 0
    moved = tmp_path / "other_disk" / "data"
    shutil.copytree(data, moved)  # new mtimes, same names and sizes
    shutil.rmtree(data)
    assert train.main(["--out", str(run), "--resume", "--epochs", "2"]) == 2  # the saved path is gone
    assert "--data-dir" in capsys.readouterr().err
    changed = next((moved / "keras_slices_seg_train").iterdir())
    original = changed.read_bytes()
    changed.write_bytes(original[:4] + b"\1\2\3\4" + original[8:])  # gzip's mtime field: same name and size
    assert train.main(["--out", str(run), "--resume", "--data-dir", str(moved), "--epochs", "2"]) == 2
    assert "does not hold the files" in capsys.readouterr().err
    changed.write_bytes(original)
    assert train.main(["--out", str(run), "--resume", "--data-dir", str(moved), "--epochs", "2"]) == 0
    assert utils.load_checkpoint(run / "last.pt")["config"]["data_dir"] == str(moved)


def test_sessions_stop_between_epochs_and_do_not_come_back_on_resume(phantom_2d_dir, tmp_path):
    """A --session-minutes stop ends an epoch (none of its batches is lost: the weights equal an uninterrupted
    run's), and --session-minutes applies to that invocation only."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert train.main(tiny_args(phantom_2d_dir, straight, "--epochs", 3, "--no-amp")) == 0
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--no-amp", "--session-minutes", 0)) == 0
    assert len(read_metrics(run)) == 1
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--no-amp", "--resume")) == 0  # no budget now
    assert len(read_metrics(run)) == 3
    expected, resumed = _final_weights(straight), _final_weights(run)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_a_run_folder_is_trained_by_one_process_at_a_time(phantom_2d_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as other:  # another train.py holding the run
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="is being trained by another process"):
            train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1))
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 1)) == 0


def test_bad_out_device_and_damaged_last_pt_get_messages(phantom_2d_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        train.main(tiny_args(phantom_2d_dir, a_file))
    with pytest.raises(SystemExit, match="--device gpu: not a device"):
        train.main(tiny_args(phantom_2d_dir, tmp_path / "run", "--device", "gpu"))
    run = tmp_path / "damaged"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--session-minutes", 0)) == 0
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume")) == 2
    assert f"--init-from {run / 'best.pt'}" in capsys.readouterr().err


def test_init_from_keeps_the_patient_split_of_the_source_run(phantom_3d_small_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--epochs", 1, "--patch-size", 16, 16, 16, "--steps-per-epoch", 1]
    assert train.main(tiny_args(phantom_3d_small_dir, first, *small)) == 0
    assert train.main(tiny_args(phantom_3d_small_dir, second, *small, "--init-from", first / "best.pt",
                                "--seed", 7)) == 0
    assert dataset.load_split_file(second / "split.json") == dataset.load_split_file(first / "split.json")


def test_budget_after_resume_starts_at_the_schedules_lr_not_zero(phantom_2d_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    budget = ["--epochs", 1000, "--max-minutes", 10]
    assert train.main(tiny_args(phantom_2d_dir, run, *budget, "--session-minutes", 0)) == 0
    seen = []
    monkeypatch.setattr(train, "fit", lambda r: seen.append((r.progress, r.optimizer.param_groups[0]["lr"])) or "")
    assert train.main(tiny_args(phantom_2d_dir, run, *budget, "--resume")) == 0
    progress, lr = seen[0]
    trained = utils.load_checkpoint(run / "last.pt")["counters"]["train_seconds"]
    assert progress == pytest.approx(trained / 600) and progress < 0.05
    assert lr == pytest.approx(3e-3 * train.lr_factor(progress, "onecycle")) and lr > 1e-4


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
    assert "non-finite loss or gradient, step skipped 1 time(s)" in capsys.readouterr().err
    weights = utils.load_checkpoint(run / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    counters = utils.load_checkpoint(run / "last.pt")["counters"]
    assert counters["step"] == 3 and counters["skipped_steps"] == 1  # 3 batches, one skipped on the device


def test_repeated_nan_stops_and_keeps_last_good_checkpoint(phantom_2d_dir, tmp_path, monkeypatch):
    run = tmp_path / "nans"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--no-amp", "--session-minutes", 0)) == 0
    good = _final_weights(run)
    _nan_on_calls(monkeypatch, bad_calls=set(range(1, 100)))
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 3, "--resume", "--no-amp", "--max-bad-steps", 2)) == 1
    assert all(torch.equal(good[k], w) for k, w in _final_weights(run).items())


def test_torchrun_two_cpu_processes_with_a_time_budget(phantom_2d_dir, tmp_path):
    """Ranks follow one agreed clock: with a budget the learning rates (and so the weights) stay identical."""
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *tiny_args(phantom_2d_dir, run, "--epochs", 1000, "--max-minutes", 0.3,
                                                  "--steps-per-epoch", 20, "--accumulate", 2)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on 2 ranks" in result.stderr
    assert "time budget of 0.3 minutes spent" in result.stderr
    rows = read_metrics(run)
    assert len(rows) >= 2 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_device_cuda_under_torchrun_without_cuda_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, _ = parse_config(["--device", "cuda"])
    with pytest.raises(SystemExit, match="CUDA is not available to this process"):
        train.init_distributed(cfg)


def test_restore_reads_the_checkpoint_to_the_cpu(phantom_2d_dir, tmp_path, monkeypatch):
    """The RNG states must come back as CPU tensors whatever device the run trains on (CUDA: test_cuda.py)."""
    run = tmp_path / "run"
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--session-minutes", 0)) == 0
    load = utils.load_checkpoint
    locations = []
    monkeypatch.setattr(utils, "load_checkpoint", lambda path, map_location="cpu": locations.append(
        (Path(path).name, map_location)) or load(path, map_location))
    assert train.main(tiny_args(phantom_2d_dir, run, "--epochs", 2, "--resume")) == 0
    assert ("last.pt", "cpu") in locations and all(where == "cpu" for _, where in locations)


def test_scaler_state_follows_the_kind_of_loss_scaling(tmp_path):
    """A bf16 run resumed where only fp16 works (or the reverse) gets a fresh scaler, not a crash or a wrong scale."""
    cpu = torch.device("cpu")
    fp16 = train.make_scaler(cpu, torch.float16)
    saved_bf16 = train.make_scaler(cpu, torch.bfloat16).state_dict()
    run = SimpleNamespace(scaler=fp16, amp_dtype=torch.float16)
    train.load_scaler_state(run, {"scaler": saved_bf16, "amp_dtype": "bfloat16"})
    assert fp16.get_scale() == 2.0**16
    train.load_scaler_state(run, {"scaler": {}})  # a checkpoint from before amp_dtype was saved, with bf16
    assert fp16.get_scale() == 2.0**16
    bf16 = train.make_scaler(cpu, torch.bfloat16)
    train.load_scaler_state(SimpleNamespace(scaler=bf16, amp_dtype=torch.bfloat16),
                            {"scaler": {**fp16.state_dict(), "scale": 1024.0}, "amp_dtype": "float16"})
    assert bf16.get_scale() == 1.0
    fp16_again = train.make_scaler(cpu, torch.float16)
    train.load_scaler_state(SimpleNamespace(scaler=fp16_again, amp_dtype=torch.float16),
                            {"scaler": {**fp16.state_dict(), "scale": 1024.0}, "amp_dtype": "float16"})
    assert fp16_again.get_scale() == 1024.0


def test_too_few_patients_warns_at_the_start(tmp_path, capsys):
    import phantom

    data = tmp_path / "two_patients"
    phantom.write_dataset(data, layout="3d", patients=2, weeks=1, seed=0, workers=1, shape=(32, 32, 16))
    assert train.main(tiny_args(data, tmp_path / "run", "--epochs", 1, "--patch-size", 16, 16, 16,
                                "--steps-per-epoch", 1)) == 0
    err = capsys.readouterr().err
    assert "the test split is empty" in err and "test 0" in err


def test_bad_data_or_missing_run_exit_2_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main(["--data-dir", str(empty), "--out", str(tmp_path / "run")]) == 2
    assert str(empty) in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "never-trained"), "--resume"]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
