# Shared by the sbatch scripts, sourced from the repository root (where sbatch starts a job submitted from there).
#   RUN folder: from the script's argument or the job name, never the job id, so that resubmitting the same
#   command (or `sbatch --dependency=singleton`, which runs same-named jobs one after another) resumes it.

# require_gpu: stop the job with a clear message unless torch in .venv sees a CUDA GPU.
require_gpu() {
    if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "error: no usable GPU in this job (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): ask Slurm for" \
             "GPUs (#SBATCH --gres=gpu:N) and install a CUDA build of torch into .venv (README, 'On a GPU" \
             "cluster'); python -c 'import torch; print(torch.version.cuda)' prints None for a CPU build." >&2
        exit 1
    fi
}

# minutes_left DEFAULT: whole minutes until this job's time limit (squeue's %L: [D-]HH:MM:SS or MM:SS), or
# DEFAULT when Slurm cannot say (no limit, not in a job).
minutes_left() {
    local left days=0 parts
    left=$(squeue -h -j "${SLURM_JOB_ID:-none}" -o %L 2>/dev/null || true)
    if [[ $left == *-* ]]; then days=${left%%-*}; left=${left#*-}; fi
    IFS=: read -r -a parts <<< "$left"
    if [[ ${#parts[@]} -eq 3 && $left =~ ^[0-9:]+$ ]]; then
        echo $(( (10#$days * 24 + 10#${parts[0]}) * 60 + 10#${parts[1]} ))
    elif [[ ${#parts[@]} -eq 2 && $left =~ ^[0-9:]+$ ]]; then
        echo $(( 10#${parts[0]} ))
    else
        echo "$1"
    fi
}

# session_minutes MARGIN: this submission's training budget (train.py --session-minutes): the minutes left in the
# job less MARGIN for writing checkpoints and what follows training; 460 when Slurm gives no limit.
session_minutes() {
    local minutes=$(( $(minutes_left $(( 460 + $1 ))) - $1 ))
    if (( minutes < 5 )); then
        echo "error: only $minutes minutes left for training in this job; ask for more (#SBATCH --time)" >&2
        exit 1
    fi
    echo "$minutes"
}

# run_finished RUN: true when RUN has trained all its epochs (metrics.csv's last epoch is config.json's epochs).
run_finished() {
    python - "$1" <<'PY'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
if not (run / "metrics.csv").exists() or not (run / "config.json").exists():
    sys.exit(1)
with open(run / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
sys.exit(0 if rows and int(float(rows[-1]["epoch"])) >= json.loads((run / "config.json").read_text())["epochs"] else 1)
PY
}
