"""Shared helpers: class names, seeding and RNG state, device and AMP choice, atomic writes,
checkpoint I/O, logging set-up and the training-progress plot.

Nothing here runs at import time; matplotlib is imported inside the plotting function so that
importing utils stays cheap for workers.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
NUM_CLASSES = len(CLASS_NAMES)
# Overlay colours per foreground label (matplotlib colour strings), one spelling for every picture we draw.
CLASS_COLOURS = {1: "#e9c46a", 2: "#f4f1de", 3: "#2a9d8f", 4: "#e76f51", 5: "#d62dc4"}

log = logging.getLogger("hipmri")

# One row per epoch in RUN/metrics.csv (train.py and tools/peer_recipe.py write the same columns).
METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", *(f"dice_{name}" for name in CLASS_NAMES[1:]), "dice_mean_fg",
                  "lr", "seconds", "data_wait", "samples_per_s"]


class CheckpointError(Exception):
    """A checkpoint file that cannot be read as one of ours; the message names the file."""


# ---------------------------------------------------------------- seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All global RNG states, as CPU tensors and plain types so `torch.load(weights_only=True)` can read them.

    CUDA: only the current device's generator (the one this process trains on), so a run saved on 4 GPUs resumes
    on 1 (torch.cuda.get_rng_state_all would tie the checkpoint to the number of visible GPUs).
    """
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], cuda: bool = True) -> None:
    """Restore what `get_rng_state` returned, wherever its tensors were loaded to (the generators need CPU
    tensors: a checkpoint loaded with map_location="cuda" would otherwise fail here).

    The CUDA state goes to the current device when `cuda` (the run trains on a GPU) and CUDA is available; a CPU
    run on a GPU node leaves CUDA alone (restoring would create a context on GPU 0 in every process).
    Checkpoints from before this format held `cuda`, one state per visible GPU: the first one is used, so a
    run saved with another number of GPUs still resumes.
    """
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", _cpu(np_state["keys"]).numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    torch.set_rng_state(_cpu(state["torch"]))
    cuda_state = state.get("cuda_device")
    if cuda_state is None and state.get("cuda"):
        cuda_state = state["cuda"][0]
    if cuda and cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_cpu(cuda_state))


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy (generator states must be CPU ByteTensors; numpy needs CPU memory)."""
    return tensor.detach().to("cpu")


# ---------------------------------------------------------------- device and mixed precision


def parse_device(name: str) -> torch.device:
    """torch.device(name), or SystemExit saying what a device is ("gpu" is not one)."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device; use cpu, cuda or cuda:N (or leave it out)") from None


def choose_device(name: str | None = None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1") or the best available: CUDA, then Apple MPS, then CPU."""
    if name:
        device = parse_device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores (compute capability 8.0 and later: A100, H100, RTX 30xx+).

    Not torch.cuda.is_bf16_supported(): in torch 2.13 it is also true where bf16 is only emulated (V100, T4),
    where bf16 autocast is slower than fp16 + GradScaler.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype to use on `device`, or None for fp32.

    CUDA: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp16 (which needs a GradScaler).
    CPU: bf16 only with native bf16 instructions; elsewhere it is emulated and slower than fp32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for `dtype`, or a disabled one for fp32 (same call site either way)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU with glibc, keep freed memory in the process for reuse; returns whether it is in effect.

    glibc hands every block over 32 MB (and, by its dynamic threshold, most activation-sized blocks) to mmap and
    gives it back on free, so each training step page-faults its activations in again: the kernel then zeroes
    them page by page. Measured on the default 3D step on 2 cores: a million page faults and 1.9 s of the 3.5 s
    step in the kernel; serving all blocks from the heap took the step to 2.3 s (2D: 0.30 -> 0.26 s), for a peak
    RSS of 3.0 instead of 1.9 GB (2D: +5%). Process-wide and for good; processes forked later inherit it. CUDA
    tensors do not go through malloc, so this only runs for the CPU.
    """
    if device.type != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # One arena: the per-thread arenas hold at most 64 MB, so their larger blocks would go to mmap after all.
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all([libc.mallopt(param, value) for param, value in settings])
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators behave differently
        return False


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format for 2D (NHWC) or 3D (NDHWC) tensors."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


# ---------------------------------------------------------------- atomic writes and checkpoints


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: a reader (or a kill at
    any moment) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); a run is read by colleagues too
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which would give
    files that other threads create meanwhile the wrong mode); 0o022 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically: an interrupted run never leaves a corrupt checkpoint."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints with `weights_only=True` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (expected RUN/best.pt or RUN/last.pt from train.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files; all mean the same here
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a hipmri-seg checkpoint "
                              f"({type(exc).__name__}: {reason})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a hipmri-seg checkpoint (no 'model' and 'config' entries)")
    return ckpt


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- logging


def setup_logging(verbose: bool = False, rank: int = 0, log_file: str | os.PathLike | None = None) -> None:
    """Configure the root logger once: INFO (DEBUG with `verbose`) on rank 0, warnings only elsewhere."""
    level = logging.DEBUG if verbose else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None and rank == 0:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ---------------------------------------------------------------- run history


def write_history(history: Sequence[dict[str, Any]], out: str | os.PathLike) -> None:
    """RUN/metrics.csv (METRIC_COLUMNS) and RUN/progress.png, rewritten atomically after every epoch."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(out) / "metrics.csv", buffer.getvalue())
    plot_progress(history, Path(out) / "progress.png")


def format_epoch(row: dict[str, Any]) -> str:
    """The one log line per epoch: losses, per-class validation Dice (when validated), lr, time, throughput."""
    validated = ""
    if np.isfinite(row.get("dice_mean_fg", np.nan)):
        dice = " ".join(f"{name}={row[f'dice_{name}']:.3f}" for name in CLASS_NAMES[1:])
        validated = f"val_loss={row['val_loss']:.4f} dice[{dice}] mean_fg={row['dice_mean_fg']:.4f} "
    return (f"epoch {row['epoch']}  train_loss={row['train_loss']:.4f} {validated}lr={row['lr']:.2e}  "
            f"{row['seconds']:.0f}s  {row['samples_per_s']:.1f} samples/s  data wait {100 * row['data_wait']:.1f}%")


def best_epoch_row(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first epoch with the highest mean foreground validation Dice: the one saved as best.pt."""
    validated = [row for row in history if np.isfinite(float(row.get("dice_mean_fg", np.nan)))]
    return max(validated, key=lambda row: float(row["dice_mean_fg"])) if validated else None


# ---------------------------------------------------------------- plots


def plot_progress(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One `progress.png` with three panels: train/val loss, per-class validation Dice, learning rate.

    `history` rows are the rows of metrics.csv: `epoch`, `train_loss`, `val_loss`, `lr`,
    `dice_<class>` for each foreground class and `dice_mean_fg` (NaN where not validated).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", ms=3, label="train", color="#264653")
    val = [(row["epoch"], row["val_loss"]) for row in history if np.isfinite(row.get("val_loss", np.nan))]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation", color="#e76f51", ms=3)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss")
    ax_loss.legend()
    _plot_dice_panel(ax_dice, history)
    ax_lr.plot(epochs, [row["lr"] for row in history], "o-", ms=3, color="#2a9d8f")
    ax_lr.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_dice, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = _figure_png_bytes(fig)
    plt.close(fig)
    atomic_write_bytes(path, buffer)


def _plot_dice_panel(ax, history: Sequence[dict[str, Any]]) -> None:
    rows = [row for row in history if np.isfinite(row.get("dice_mean_fg", np.nan))]
    ax.set(title="Validation Dice (hard, per case, mean)", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    if not rows:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)
        return
    epochs = [row["epoch"] for row in rows]
    colours = dict(CLASS_COLOURS)
    colours[2] = "#8d99ae"  # bone's overlay colour is near-white; a grey reads better on a white plot
    for label, name in enumerate(CLASS_NAMES[1:], start=1):
        ax.plot(epochs, [row[f"dice_{name}"] for row in rows], "o-", ms=3, label=name, color=colours[label])
    ax.plot(epochs, [row["dice_mean_fg"] for row in rows], "k--", lw=2, label="mean foreground")
    ax.legend(fontsize=8, loc="lower right")


def _figure_png_bytes(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
