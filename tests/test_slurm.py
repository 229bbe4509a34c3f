"""The sbatch scripts, run by bash with stand-ins for Slurm, torchrun and the Python commands: the run folder comes
from the job name (a resubmission resumes it), the budget from the job's time left, GPUs are counted by torchrun
(never nvidia-smi), a job without a usable GPU stops before training, and the test split is predicted only once the
run is complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the sbatch scripts are bash")

# Stand-in for torchrun: logs its arguments and "trains" by writing what train.py would (last.pt, config.json and
# one metrics.csv row per epoch, FAKE_EPOCHS_PER_SESSION more each time).
TORCHRUN = '''
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("torchrun " + " ".join(args) + "\\n")
out = Path(args[args.index("--out") + 1])
epochs = int(args[args.index("--epochs") + 1]) if "--epochs" in args else 40
done = 0
if "--resume" in args:
    done = len((out / "metrics.csv").read_text().splitlines()) - 1
out.mkdir(parents=True, exist_ok=True)
(out / "last.pt").write_text("weights")
(out / "config.json").write_text(json.dumps({"epochs": epochs}))
done = min(epochs, done + int(os.environ["FAKE_EPOCHS_PER_SESSION"]))
(out / "metrics.csv").write_text("epoch,loss\\n" + "".join(f"{e},0.5\\n" for e in range(1, done + 1)))
'''
# Stand-in for .venv's python: `-c` is the GPU check (FAKE_GPU), `-` runs the real interpreter on stdin, scripts
# (train.py, dataset.py, predict.py) are logged only.
PYTHON = '''
import os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("python " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-c":
    sys.exit(0 if os.environ["FAKE_GPU"] == "1" else 1)
if sys.argv[1] == "-":
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
'''


@pytest.fixture
def job(tmp_path):
    """A submit folder holding slurm/ and a .venv whose activate script puts the stand-ins first on PATH."""
    (tmp_path / "slurm").mkdir()
    for script in (REPO / "slurm").iterdir():
        shutil.copy(script, tmp_path / "slurm" / script.name)
    bin_dir = tmp_path / "stand-ins"
    bin_dir.mkdir()
    stand_ins = {"torchrun": TORCHRUN, "python": PYTHON,
                 "squeue": 'import os\nprint(os.environ.get("FAKE_TIME_LEFT", ""))',
                 "nvidia-smi": 'raise SystemExit("nvidia-smi sees GPUs outside the allocation: do not count with it")',
                 "srun": 'import os, sys\nos.execvp(sys.argv[1], sys.argv[1:])',
                 "scontrol": 'print("node001")'}
    for name, code in stand_ins.items():
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def submit(folder: Path, script: str, *args: str, gpu: bool = True, time_left: str = "7:59:40",
           epochs_per_session: int = 3) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = folder / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_GPU": "1" if gpu else "0", "FAKE_TIME_LEFT": time_left,
           "FAKE_EPOCHS_PER_SESSION": str(epochs_per_session), "SLURM_JOB_NAME": "pelvis", "SLURM_JOB_ID": "1234",
           "SLURM_CPUS_PER_TASK": "12", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[001-002]"}
    result = subprocess.run(["bash", f"slurm/{script}", *args], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def called(calls: list[str], program: str) -> list[str]:
    return [c for c in calls if c.startswith(program + " ")]


def test_resubmissions_resume_one_run_folder_until_it_is_done(job):
    result, calls = submit(job, "train_1node.sbatch", "/data/HipMRI", "3", "", "5")
    assert result.returncode == 0, result.stderr
    [train] = called(calls, "torchrun")
    assert "--nproc_per_node=gpu" in train and "--standalone" in train
    assert ("train.py --data-dir /data/HipMRI --dims 3 --out runs/pelvis-3d --device cuda --session-minutes 459 "
            "--workers 12 --epochs 5") in train and "--resume" not in train
    assert "python dataset.py check /data/HipMRI --workers 12" in calls
    assert not called(calls, "python predict.py") and "not finished" in result.stdout

    result, calls = submit(job, "train_1node.sbatch", "/data/HipMRI", "3", "", "5", time_left="1-00:30:00")
    assert result.returncode == 0, result.stderr
    [train] = called(calls, "torchrun")
    assert "--out runs/pelvis-3d" in train and train.endswith("--resume") and "--session-minutes 1450" in train
    assert not called(calls, "python dataset.py")  # checked when the run began
    assert called(calls, "python predict.py") == [
        "python predict.py --checkpoint runs/pelvis-3d/best.pt --data-dir /data/HipMRI --split test "
        "--out runs/pelvis-3d/test"]
    assert json.loads((job / "runs" / "pelvis-3d" / "config.json").read_text()) == {"epochs": 5}


def test_an_explicit_run_folder_and_no_time_limit(job):
    result, calls = submit(job, "train_1node.sbatch", "/data/HipMRI", "2", "runs/mine", time_left="UNLIMITED")
    assert result.returncode == 0, result.stderr
    [train] = called(calls, "torchrun")
    assert "--dims 2 --out runs/mine" in train and "--session-minutes 460" in train and "--epochs" not in train


@pytest.mark.parametrize("script", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_no_usable_gpu_stops_before_training(job, script):
    result, calls = submit(job, script, "/data/HipMRI", "3", gpu=False)
    assert result.returncode == 1 and "no usable GPU" in result.stderr and "--gres=gpu" in result.stderr
    assert not called(calls, "torchrun") and not called(calls, "python dataset.py")


def test_too_little_time_left_is_refused(job):
    result, calls = submit(job, "train_1node.sbatch", "/data/HipMRI", "3", time_left="20:00")
    assert result.returncode == 1 and "minutes left" in result.stderr and not called(calls, "torchrun")


def test_multinode_resumes_by_job_name_too(job):
    for resume in (False, True):
        result, calls = submit(job, "train_multinode.sbatch", "/data/HipMRI")
        assert result.returncode == 0, result.stderr
        [train] = called(calls, "torchrun")
        assert "--nnodes=2 --nproc_per_node=gpu" in train and "--rdzv_endpoint=node001:29500" in train
        assert "--out runs/pelvis-3d --device cuda --session-minutes 464 --workers 12" in train
        assert train.endswith("--resume") == resume
