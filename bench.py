"""Speed and memory benchmark: training and inference against the hardware limit and a peer, in one process.

    python bench.py [--device cpu|cuda] [--quick] [--out bench.json] [--data-dir DIR] [--cache-dir DIR]

Prints a Markdown table and writes JSON. Sections, one log line each:
- matmul_flops: dense matrix-multiply FLOP/s per dtype, the limit (CUDA: 8192^2; fp32 with TF32 off, and "tf32"
  with it on, on GPUs that have it);
- train_2d, train_3d: train.py's step (autocast forward, Dice+CE, backward, clipping, AdamW) of the default UNet,
  (a) fp32 contiguous, (b) the TrainConfig defaults (AMP, channels-last); FLOPs from torch.utils.flop_counter
  over a same-dtype matmul timed between the steps; MONAI's BasicUNet of equal widths under (b) beside ours;
  CUDA also: (b) with the other memory format, and the peak memory of a step;
- data: warm cache vs per-file nibabel reading; share of a training step spent sampling a batch on the device;
- epoch: seconds per epoch, a student-style pipeline (nibabel per file, DataLoader, fp32, contiguous) vs ours;
- sampling_3d (CUDA): share of a 3D step spent sampling a batch with the scans on the GPU and in host memory;
- infer_2d: slices/s; infer_3d: seconds per volume by sliding window, ours vs MONAI's sliding_window_inference.
On shared machines only ratios from one run mean anything: timings are medians after warm-up, and ours and the
peer alternate so that a change in load hits both. --quick shrinks repeats and (on a CPU) 3D sizes (JSON:
settings.reduced_from_full). Targets: TARGETS on a CPU, GPU_TARGETS on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import itertools
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import phantom
from augment import AugmentConfig
from cache import CaseSet, default_cache_dir, load_split
from config import TrainConfig, dims_defaults, model_args
from dataset import DataConfig, detect_layout, find_pairs, preprocess_image
from inference import predict_case, window_starts
from losses import make_loss
from modules import UNet
from sampling import DeviceBatchSource, measure_read_speed, working_memory_bytes
from train import make_optimizer, make_scaler
from utils import (
    NUM_CLASSES,
    amp_dtype_for,
    autocast,
    channels_last_format,
    choose_device,
    keep_freed_memory,
    setup_logging,
    write_json,
)

log = logging.getLogger("hipmri.bench")

PREDICT_BATCH = 4  # predict.py's default slices (2D) or windows (3D) per forward pass
STUDENT_WORKERS = 0  # student DataLoader workers: on 2 cores, workers only take cores away from the model
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGETS = {  # issue 7's targets on the 2-core CPU: JSON path -> (comparison, bound)
    "train_2d.fraction_of_matmul": (">=", 0.70), "train_2d.speedup_vs_fp32": (">=", 2.5),
    "train_2d.ratio_vs_monai": (">=", 1.0), "train_3d.ratio_vs_monai": (">=", 1.0),
    "infer_3d.ratio_vs_monai": (">=", 1.0), "data.cache_speedup": (">=", 50.0),
    "data.sampling_share_of_step": ("<", 0.05), "epoch_speedup_vs_student": (">=", 4.0),
}
GPU_TARGETS = {  # issue 13's targets on a GPU (bench.py --device cuda): JSON path -> (comparison, bound)
    "train_2d.ratio_vs_monai": (">=", 1.0), "train_3d.ratio_vs_monai": (">=", 1.0),
    "infer_3d.ratio_vs_monai": (">=", 1.0), "epoch_speedup_vs_student": (">=", 4.0),
    # A GPU step takes milliseconds: sampling a batch, from scans on the GPU or in host memory, must stay small.
    "data.sampling_share_of_step": ("<", 0.05), "sampling_3d.device_share_of_step": ("<", 0.05),
    "sampling_3d.host_share_of_step": ("<", 0.05),
    # A step fits in what sampling.working_memory_bytes keeps free beside a split on the GPU.
    "train_2d.peak_share_of_reserve": ("<", 1.0), "train_3d.peak_share_of_reserve": ("<", 1.0),
}


@dataclass(frozen=True)
class Plan:
    """How much to measure; the full run uses the default model, batches and 3D sizes throughout."""

    name: str = "full"
    matmul_size: int = 2048  # square matrices large enough to reach these cores' dense-matmul rate
    matmul_repeats: int = 5
    warmup: int = 1  # untimed steps per variant; the first also counts the FLOPs
    repeats_2d: int = 5  # timed steps (median) of the default setting and of the peer
    repeats_2d_fp32: int = 2
    repeats_3d: int = 2
    repeats_3d_fp32: int = 1  # an fp32 3D step takes 12-60 s here
    features: tuple[int, ...] | None = None  # None: TrainConfig.features
    batch_2d: int | None = None  # None: TrainConfig's default batch size
    batch_3d: int | None = None
    patch_3d: tuple[int, int, int] | None = None  # None: TrainConfig.patch_size
    volume_3d: tuple[int, int, int] = (256, 256, 128)  # sliding-window volume (x, y, z)
    phantom: tuple[int, int] = (12, 2)  # patients, weeks of the generated 2D phantom
    epoch_batches: int = 8  # batches timed per pipeline, extrapolated to an epoch
    read_files: int = 240  # slices read file by file with nibabel; the rate is extrapolated to the split
    sample_batches: int = 20
    infer_slices: int = 32
    infer_repeats: int = 2
    infer_repeats_3d: int = 2  # a full-size volume takes 15-50 s per run here


PLANS = {
    "full": Plan(),
    "quick": Plan("quick", repeats_2d=3, repeats_2d_fp32=1, patch_3d=(64, 64, 32), volume_3d=(96, 96, 48),
                  phantom=(4, 1), epoch_batches=2, read_files=60, sample_batches=10, infer_slices=8),
    "smoke": Plan("smoke", matmul_size=256, matmul_repeats=1, repeats_2d=1, repeats_2d_fp32=1, repeats_3d=1,
                  features=(4, 8, 16, 32, 64), batch_2d=2, batch_3d=1, patch_3d=(32, 32, 16), volume_3d=(48, 48, 24),
                  phantom=(4, 1), epoch_batches=1, read_files=4, sample_batches=2, infer_slices=2, infer_repeats=1,
                  infer_repeats_3d=1),
}
CUDA_PLAN_CHANGES = {  # a GPU step takes milliseconds: a matmul big enough to reach the GPU's rate, full-size 3D,
    # a second warm-up step (cuDNN's autotuning, the allocator's first growth), more repeats
    "full": {"matmul_size": 8192, "matmul_repeats": 10, "warmup": 2, "repeats_2d": 20, "repeats_2d_fp32": 10,
             "repeats_3d": 10, "repeats_3d_fp32": 5, "sample_batches": 50, "infer_repeats": 5, "infer_repeats_3d": 3},
    "quick": {"matmul_size": 8192, "warmup": 2, "repeats_2d": 10, "repeats_2d_fp32": 5, "repeats_3d": 5,
              "repeats_3d_fp32": 3, "patch_3d": None, "volume_3d": (256, 256, 128)},
}


def plan_for(name: str, device: torch.device) -> Plan:
    """PLANS[name], with CUDA_PLAN_CHANGES on a GPU."""
    return replace(PLANS[name], **CUDA_PLAN_CHANGES.get(name, {})) if device.type == "cuda" else PLANS[name]


@contextlib.contextmanager
def cublas_tf32(enabled: bool) -> Iterator[None]:
    """fp32 matrix multiplies on CUDA as TF32 (enabled) or in full fp32 inside the block, restored after. Through
    torch's fp32_precision flag where it exists (2.9+), as reading the old allow_tf32 flag after the new one was
    set raises there."""
    matmul = torch.backends.cuda.matmul
    flag, value = ("fp32_precision", "tf32" if enabled else "ieee") if hasattr(matmul, "fp32_precision") else (
        "allow_tf32", enabled)
    before = getattr(matmul, flag)
    setattr(matmul, flag, value)
    try:
        yield
    finally:
        setattr(matmul, flag, before)


def tf32_in_use() -> dict[str, bool]:
    """Whether CUDA runs fp32 matmuls (cuBLAS) and convolutions (cuDNN) as TF32 now (torch's defaults: no, yes)."""
    try:
        return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn_conv": bool(torch.backends.cudnn.allow_tf32)}
    except RuntimeError:  # torch >= 2.9 after someone set the new flags: read those
        return {"matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
                "cudnn_conv": torch.backends.cudnn.conv.fp32_precision == "tf32"}


def matmul_precisions(device: torch.device) -> list[tuple[str, torch.dtype, bool | None]]:
    """(name, dtype, TF32 on/off or None: leave as is) for the matmul reference: fp32 and bf16 on a CPU; on a GPU
    fp32 without TF32, fp32 with TF32 ("tf32") and bf16 where the GPU has them natively (compute capability 8.0+:
    torch emulates bf16 on older GPUs), and fp16."""
    if device.type != "cuda":
        return [("fp32", torch.float32, None), ("bf16", torch.bfloat16, None)]
    ampere = torch.cuda.get_device_capability(device) >= (8, 0)
    return [("fp32", torch.float32, False), *([("tf32", torch.float32, True)] if ampere else []),
            *([("bf16", torch.bfloat16, None)] if ampere else []), ("fp16", torch.float16, None)]


@dataclass(frozen=True)
class Setting:
    """How a model runs: autocast dtype (None: fp32), channels-last memory format, torch.compile."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class Bench:
    """What every section needs: the plan, the training config, the device, the data; builds the models."""

    plan: Plan
    cfg: TrainConfig
    device: torch.device
    data_dir: Path
    cache_dir: Path | None

    @property
    def default(self) -> Setting:
        return Setting(amp_dtype_for(self.device, self.cfg.amp), self.cfg.channels_last, self.cfg.compile)

    def features(self) -> tuple[int, ...]:
        return tuple(self.plan.features or self.cfg.features)

    def config(self, spatial_dims: int) -> TrainConfig:
        """The training config train.py resolves for these dims, with the plan's model and batch sizes."""
        batch = (self.plan.batch_2d if spatial_dims == 2 else self.plan.batch_3d) or self.cfg.batch_size
        return dims_defaults(replace(self.cfg, dims=spatial_dims, features=self.features(), batch_size=batch))

    def norm(self, spatial_dims: int) -> str:
        return self.config(spatial_dims).norm

    def batch(self, spatial_dims: int) -> int:
        return self.config(spatial_dims).batch_size

    def ours(self, spatial_dims: int) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return UNet(**model_args(self.config(spatial_dims))).to(self.device)

    def peer(self, spatial_dims: int) -> nn.Module | None:
        """MONAI's BasicUNet of our widths and norm (None without MONAI), the closest MONAI net to ours: two 3x3
        conv + norm + act per stage, max-pool down, transposed conv up. Its sixth width is the last decoder
        stage's (our features[0]); no conv bias, as in ours, since a norm follows every conv."""
        try:
            from monai.networks.nets import BasicUNet
        except ImportError:
            return None
        if len(self.features()) != 5:
            log.warning("MONAI's BasicUNet has 5 levels, features %s have %d: no peer", self.features(),
                        len(self.features()))
            return None
        torch.manual_seed(self.cfg.seed)
        features, norm = self.features(), (self.norm(spatial_dims), {"affine": True})
        return BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=NUM_CLASSES, features=(*features,
                         features[0]), act=("relu", {"inplace": True}), norm=norm, bias=False, upsample="deconv"
                         ).to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        """(wall seconds, fn()), synchronised on CUDA so that queued kernels are counted."""
        self.sync()
        started = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - started, result

    def seconds(self, fn: Callable[[], object]) -> float:
        return self.timed(fn)[0]


def make_train_step(bench: Bench, model: nn.Module, spatial_dims: int,
                    setting: Setting) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """train.py's optimiser step as a function of (image float (B, 1, *S), label int64 (B, *S)) on the device:
    autocast forward, Dice+CE, backward (train.make_scaler's GradScaler), unscale, clip, AdamW, zero_grad."""
    memory_format, cfg = channels_last_format(spatial_dims), bench.cfg
    if setting.channels_last:
        model = model.to(memory_format=memory_format)
    net = torch.compile(model) if setting.compile else model
    loss_fn = make_loss(cfg.loss, NUM_CLASSES).to(bench.device)
    optimiser = make_optimizer(model, cfg, bench.device)
    scaler = make_scaler(bench.device, setting.amp_dtype)
    model.train()

    def step(image: torch.Tensor, label: torch.Tensor) -> None:
        if setting.channels_last:
            image = image.contiguous(memory_format=memory_format)
        with autocast(bench.device, setting.amp_dtype):
            loss = loss_fn(net(image), label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimiser)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimiser)
        scaler.update()
        optimiser.zero_grad(set_to_none=True)

    return step


def _matmul(bench: Bench, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    size = bench.plan.matmul_size
    a, b = (torch.randn(size, size, device=bench.device).to(dtype) for _ in range(2))
    return functools.partial(torch.mm, a, b)


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(bench: Bench, fn: Callable[[], object]) -> tuple[object, float | None, float | None]:
    """(fn(), peak above the level at the start, absolute peak) in MB: CUDA max_memory_allocated, or on CPU the
    RSS polled every 2 ms after handing freed heap back to the OS (malloc_trim), so memory kept from earlier
    sections cannot hide this peak; None where /proc/self/statm does not exist."""
    gc.collect()
    if bench.device.type == "cuda":
        bench.sync()
        torch.cuda.reset_peak_memory_stats(bench.device)
        start = torch.cuda.memory_allocated(bench.device)
        result = fn()
        bench.sync()
        peak = torch.cuda.max_memory_allocated(bench.device)
        return result, (peak - start) / 2**20, peak / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include free heap
        pass
    start, stop, peak = _rss_bytes(), threading.Event(), [0]
    if start is None:
        return fn(), None, None

    def poll() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    peak = max(peak[0], _rss_bytes() or 0, start)
    return result, (peak - start) / 2**20, peak / 2**20


# ---------------------------------------------------------------- sections


def bench_matmul(bench: Bench, precisions: list[tuple[str, torch.dtype, bool | None]]) -> dict[str, float]:
    """Dense square matmul FLOP/s (2 n^3 per product) per matmul_precisions entry, median of repeats."""
    flops = {}
    for name, dtype, tf32 in precisions:
        run = _matmul(bench, dtype)
        with cublas_tf32(tf32) if tf32 is not None else contextlib.nullcontext():
            run()
            seconds = statistics.median(bench.seconds(run) for _ in range(bench.plan.matmul_repeats))
        flops[name] = 2 * bench.plan.matmul_size**3 / seconds
    return flops


def bench_train(bench: Bench, spatial_dims: int) -> dict:
    """Ours fp32 contiguous, ours default and the peer default on one random batch of the default size, each round
    alternating with a same-dtype matmul; FLOPs counted during the first warm-up step of ours and the peer."""
    plan, batch = bench.plan, bench.batch(spatial_dims)
    shape = DataConfig().target_size_2d if spatial_dims == 2 else (plan.patch_3d or bench.cfg.patch_size)
    image = torch.randn(batch, 1, *shape, device=bench.device)
    label = torch.randint(0, NUM_CLASSES, (batch, *shape), device=bench.device)
    cuda = bench.device.type == "cuda"
    models = {"fp32": (bench.ours(spatial_dims), Setting()), "default": (bench.ours(spatial_dims), bench.default),
              "monai": (bench.peer(spatial_dims), bench.default)}
    if cuda:  # the default with the other memory format: channels-last is not faster everywhere on a GPU
        flipped = replace(bench.default, channels_last=not bench.default.channels_last)
        models["flipped"] = (bench.ours(spatial_dims), flipped)
    steps = {name: functools.partial(make_train_step(bench, model, spatial_dims, setting), image, label)
             for name, (model, setting) in models.items() if model is not None}
    flops = {}
    for name, step in steps.items():
        # Compiled models compile on their first call and may recompile on the next (after the FLOP count).
        for k in range(plan.warmup + (2 if models[name][1].compile else 0)):
            if k == 0 and name in ("fp32", "monai"):  # the other variants do the same arithmetic as fp32
                with FlopCounterMode(display=False) as counter:
                    step()
                flops[name] = counter.get_total_flops()
            else:
                step()
    amp = DTYPE_NAMES[bench.default.amp_dtype or torch.float32]
    matmuls = {"fp32": _matmul(bench, torch.float32), amp: _matmul(bench, bench.default.amp_dtype or torch.float32)}
    # On a GPU the fp32 step's convolutions run as TF32 where cuDNN is allowed to: compare them with TF32 matmuls.
    fp32_reference = "fp32"
    if cuda and amp != "fp32" and tf32_in_use()["cudnn_conv"] and ("tf32", torch.float32, True) in matmul_precisions(
            bench.device):
        matmuls["fp32"], fp32_reference = _with_tf32(matmuls["fp32"]), "tf32"
    for run in matmuls.values():
        run()
    repeats = {"fp32": plan.repeats_2d_fp32 if spatial_dims == 2 else plan.repeats_3d_fp32,
               "default": plan.repeats_2d if spatial_dims == 2 else plan.repeats_3d}
    times = {name: [] for name in [*steps, *(f"matmul_{d}" for d in matmuls)]}
    for r in range(max(repeats.values())):
        for variant, dtype in (("fp32", "fp32"), ("default", amp)):
            if r < repeats[variant]:
                times[f"matmul_{dtype}"].append(bench.seconds(matmuls[dtype]))
                group = ["fp32"] if variant == "fp32" else ["default", "monai", "flipped"]
                for name in [name for name in group if name in steps]:
                    times[name].append(bench.seconds(steps[name]))
    figures = _train_figures(times, flops["fp32"], batch, amp, plan.matmul_size, statistics.median)
    fastest = _train_figures(times, flops["fp32"], batch, amp, plan.matmul_size, min)
    return {**figures, "flops_per_step": flops["fp32"], "matmul_dtype": amp, "monai_flops_per_step": flops.get("monai"),
            "fastest_repeats": {k: fastest[k] for k in ("fraction_of_matmul", "speedup_vs_fp32", "ratio_vs_monai")},
            "seconds": times, "batch": batch, "input_shape": list(shape), "norm": bench.norm(spatial_dims),
            "features": list(bench.features()), "fp32_matmul_reference": fp32_reference,
            **_memory_format_figures(bench, times), **_train_memory(bench, spatial_dims, models, steps, shape)}


def _with_tf32(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run_as_tf32() -> torch.Tensor:
        with cublas_tf32(True):
            return run()

    return run_as_tf32


def _memory_format_figures(bench: Bench, times: dict[str, list[float]]) -> dict:
    """CUDA: channels-last vs contiguous for the default step (AMP), from the default and flipped variants."""
    if "flipped" not in times:
        return {"channels_last_speedup": None, "faster_memory_format": None}
    seconds = {bench.default.channels_last: statistics.median(times["default"]),
               not bench.default.channels_last: statistics.median(times["flipped"])}
    speedup = seconds[False] / seconds[True]
    return {"channels_last_speedup": speedup, "faster_memory_format": "channels_last" if speedup > 1 else "contiguous"}


def _train_memory(bench: Bench, spatial_dims: int, models: dict, steps: dict, shape) -> dict:
    """CUDA: peak memory of one more default step (and the peer's): torch.cuda.max_memory_allocated above what was
    allocated before it, plus the weights and AdamW's two moments, allocated before; and that peak over the reserve
    sampling.working_memory_bytes keeps beside a split on the GPU."""
    if bench.device.type != "cuda":
        return {"peak_memory_mb": None, "monai_peak_memory_mb": None, "peak_share_of_reserve": None, "reserve_mb": None}
    peak = {}
    for name in ("default", "monai"):
        if name in steps:
            weights = sum(p.numel() * p.element_size() for p in models[name][0].parameters())
            peak[name] = peak_memory_mb(bench, steps[name])[1] + 3 * weights / 2**20
    reserve = working_memory_bytes(spatial_dims, bench.batch(spatial_dims), shape, width=bench.features()[0])
    return {"peak_memory_mb": peak["default"], "monai_peak_memory_mb": peak.get("monai"),
            "peak_share_of_reserve": peak["default"] * 2**20 / reserve, "reserve_mb": reserve / 2**20}


def _train_figures(times: dict[str, list[float]], flops: int, batch: int, amp: str, matmul_size: int,
                   statistic: Callable) -> dict:
    """Throughputs and ratios from the step and matmul times, each reduced by `statistic` (median; min gives the
    figures of the least disturbed repeats, for machines shared with other jobs)."""
    seconds = {name: statistic(t) for name, t in times.items()}
    matmul = {d: 2 * matmul_size**3 / seconds[f"matmul_{d}"] for d in {"fp32", amp}}
    rate = {name: batch / seconds[name] for name in ("fp32", "default", "monai") if name in seconds}
    achieved = {name: flops / seconds[name] for name in ("fp32", "default")}
    return {"samples_per_s": rate["default"], "fraction_of_matmul": achieved["default"] / matmul[amp],
            "speedup_vs_fp32": rate["default"] / rate["fp32"],
            "ratio_vs_monai": rate["default"] / rate["monai"] if "monai" in rate else None,
            "achieved_flops": achieved["default"], "matmul_flops_same_section": matmul,
            "fp32": {"samples_per_s": rate["fp32"], "achieved_flops": achieved["fp32"],
                     "fraction_of_matmul": achieved["fp32"] / matmul["fp32"]},
            "monai": {"samples_per_s": rate.get("monai")}}


def _endless(source: DeviceBatchSource) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return itertools.chain.from_iterable(map(source.epoch, itertools.count()))


def _batch_source(bench: Bench) -> DeviceBatchSource:
    cases = load_split(bench.data_dir, "train", cache_dir=bench.cache_dir)
    return DeviceBatchSource(cases, bench.batch(2), bench.device, seed=bench.cfg.seed,
                             augment=AugmentConfig() if bench.cfg.augment else None)


def bench_data(bench: Bench, step_seconds: float) -> dict:
    """Warm cache vs per-file nibabel (sampling.measure_read_speed); mean time to sample one (augmented) batch on
    the device over the default 2D step's median time from train_2d."""
    # The batch source reads every cached page first, so the cache is timed warm in the OS page cache too (as the
    # files nibabel reads are, after the phantom was written or the student pipeline ran).
    batches = _endless(_batch_source(bench))
    speed = measure_read_speed(bench.data_dir, "train", cache_dir=bench.cache_dir, max_files=bench.plan.read_files)
    next(batches)
    # The mean, not the median: augmentation costs more for the batches that get rotated or scaled.
    sample_seconds = statistics.mean(bench.seconds(lambda: next(batches)) for _ in range(bench.plan.sample_batches))
    cache_seconds = speed["open_seconds"] + speed["epoch_seconds"]
    return {"cache_speedup": speed["speedup_open_and_epoch"], "sampling_share_of_step": sample_seconds / step_seconds,
            "cache_slices_per_s": speed["items"] / cache_seconds,
            "nibabel_slices_per_s": speed["items"] / speed["nibabel_seconds"], "sample_seconds_mean": sample_seconds,
            "step_seconds_median": step_seconds, "augment": bench.cfg.augment, "read_speed": speed,
            "note": "cache: opening the warm cache + copying every scan out of it; nibabel: get_fdata of image and "
                    "label per slice, timed on read_files slices and extrapolated to the split"}


class StudentSlices(torch.utils.data.Dataset):
    """The earlier student projects' loader: every item opens its image and label file with nibabel (get_fdata),
    z-scores the image, and returns (float32 (1, H, W), int64 (H, W)); odd-sized slices are resized (bilinear
    image, nearest label) so that they batch."""

    def __init__(self, pairs: list, size: tuple[int, int]):
        self.pairs, self.size = pairs, tuple(size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.squeeze(nib.load(self.pairs[i].image).get_fdata()).astype(np.float32)
        label = torch.from_numpy(np.rint(np.squeeze(nib.load(self.pairs[i].label).get_fdata())).astype(np.int64))
        image = torch.from_numpy((image - image.mean()) / (image.std() + 1e-6))[None]
        if tuple(image.shape[1:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return image, label


def bench_epoch(bench: Bench) -> dict:
    """Seconds per epoch of the 2D train split, student pipeline vs ours (warm cache + DeviceBatchSource with
    augmentation + default settings, paying once for opening the cache and moving the split to the device):
    plan.epoch_batches batches each, alternating, extrapolated to the epoch (the first batch once, then the mean
    of the others)."""
    pairs = find_pairs(bench.data_dir, "train")
    loader = torch.utils.data.DataLoader(StudentSlices(pairs, DataConfig().target_size_2d), batch_size=bench.batch(2),
                                         shuffle=True, num_workers=STUDENT_WORKERS, drop_last=True)
    student_batches, student_step = iter(loader), make_train_step(bench, bench.ours(2), 2, Setting())
    started = time.perf_counter()
    source = _batch_source(bench)
    bench.sync()
    open_seconds = time.perf_counter() - started
    our_batches, our_step = _endless(source), make_train_step(bench, bench.ours(2), 2, bench.default)
    student_batch: list = []
    runs = {"student_data": lambda: student_batch.append([t.to(bench.device) for t in next(student_batches)]),
            "student_step": lambda: student_step(*student_batch.pop()), "ours": lambda: our_step(*next(our_batches))}
    times = {name: [] for name in runs}
    for _ in range(bench.plan.epoch_batches):  # no warm-up: an epoch has a first batch too (kernels are cached)
        for name, run in runs.items():
            times[name].append(bench.seconds(run))
    batches = len(pairs) // bench.batch(2)
    # The first batch of a fresh model and optimiser costs more (first-touch memory, oneDNN primitives); an epoch
    # has one first batch and batches - 1 others.
    per_epoch = {name: t[0] + statistics.mean(t[1:] or t) * (batches - 1) for name, t in times.items()}
    student = per_epoch["student_data"] + per_epoch["student_step"]
    ours = per_epoch["ours"] + open_seconds
    return {"speedup": student / ours, "student_seconds_per_epoch": student, "ours_seconds_per_epoch": ours,
            "student_reading_share": per_epoch["student_data"] / student,
            # Without the student's file reading: what AMP and channels-last buy; the rest comes from the data path.
            "speedup_without_student_reading": per_epoch["student_step"] / per_epoch["ours"],
            "ours_open_seconds": open_seconds, "slices": len(pairs), "batches_per_epoch": batches,
            "batches_timed": bench.plan.epoch_batches, "extrapolated": True,
            "student": {"reader": "nibabel get_fdata per file", "dataloader_workers": STUDENT_WORKERS,
                        "precision": "fp32", "memory_format": "contiguous", "shuffle": True}}


def bench_infer_2d(bench: Bench) -> dict:
    """predict_case (predict.py's defaults) on the first plan.infer_slices slices of a case, without and with
    mirror TTA over the training flip axes."""
    stack = load_split(bench.data_dir, "train", cache_dir=bench.cache_dir).images[0][: bench.plan.infer_slices]
    model = bench.ours(2).to(memory_format=channels_last_format(2)).eval()
    predict = functools.partial(predict_case, model, stack, 2, device=bench.device, amp_dtype=bench.default.amp_dtype,
                                batch_size=PREDICT_BATCH, memory_format=channels_last_format(2))
    tta_axes = AugmentConfig().flip_axes
    predict()
    times = {"plain": [], "tta": []}
    for _ in range(bench.plan.infer_repeats):
        times["plain"].append(bench.seconds(predict))
        times["tta"].append(bench.seconds(lambda: predict(tta_axes=tta_axes)))
    return {"slices_per_s": len(stack) / statistics.median(times["plain"]),
            "slices_per_s_tta": len(stack) / statistics.median(times["tta"]), "tta_axes": list(tta_axes),
            "slices": len(stack), "batch_size": PREDICT_BATCH, "slice_shape": list(stack.shape[1:])}


def _monai_sliding_window(bench: Bench, model: nn.Module, volume: torch.Tensor, patch) -> Callable | None:
    """MONAI's sliding_window_inference on the same model, settings and Gaussian weighting, averaging softmax."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None

    def softmax_model(windows: torch.Tensor) -> torch.Tensor:
        with autocast(bench.device, bench.default.amp_dtype):
            logits = model(windows.contiguous(memory_format=channels_last_format(3)))
        return torch.softmax(logits, dim=1, dtype=torch.float32)

    return torch.inference_mode()(functools.partial(
        sliding_window_inference, volume[None, None], patch, PREDICT_BATCH, softmax_model, overlap=0.5,
        mode="gaussian", sigma_scale=0.125))


@functools.cache
def phantom_volume(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom scan of `shape` as the cache holds it: image (preprocess_image's dtype), label uint8."""
    from phantom_anatomy import make_patient, make_volume

    image, label, _ = make_volume(make_patient(np.random.default_rng(0)), week=0, seed=0, shape=shape)
    return preprocess_image(image, 3, DataConfig()), label


def bench_sampling_3d(bench: Bench, step_seconds: float) -> dict:
    """Mean time to sample one (augmented) batch of 3D patches of the default size from two phantom scans, with the
    scans on the device and in host memory (DeviceBatchSource's placements), over the default 3D step's median."""
    plan, patch = bench.plan, tuple(bench.plan.patch_3d or bench.cfg.patch_size)
    image, label = phantom_volume(plan.volume_3d)
    cases = CaseSet(3, ["a", "b"], [image, image], [label, label], [(1.0, 1.0, 1.0)] * 2, [image.shape] * 2, [[], []])
    result = {}
    for placement in ("device", "host"):
        source = DeviceBatchSource(cases, bench.batch(3), bench.device, patch_size=patch, seed=bench.cfg.seed,
                                   augment=AugmentConfig() if bench.cfg.augment else None, placement=placement)
        batches = _endless(source)
        next(batches)
        seconds = statistics.mean(bench.seconds(functools.partial(next, batches)) for _ in range(plan.sample_batches))
        result.update({f"{placement}_seconds_mean": seconds, f"{placement}_share_of_step": seconds / step_seconds})
    return {**result, "step_seconds_median": step_seconds, "batch": bench.batch(3), "patch": list(patch),
            "augment": bench.cfg.augment, "note": "host: patches cut in host memory, copied to the device per batch"}


def bench_infer_3d(bench: Bench) -> dict:
    """A phantom volume by Gaussian-weighted sliding window (training patch, overlap 0.5, predict.py's window
    batch): ours (inference.predict_case, with its peak memory) vs MONAI's on the same model and settings."""
    plan, patch, amp_dtype = bench.plan, bench.plan.patch_3d or bench.cfg.patch_size, bench.default.amp_dtype
    volume = torch.from_numpy(phantom_volume(plan.volume_3d)[0].astype(np.float32)).to(bench.device)
    windows = int(np.prod([len(window_starts(s, p, 0.5)) for s, p in zip(volume.shape, patch)]))
    model = bench.ours(3).to(memory_format=channels_last_format(3)).eval()
    runs = {"ours": functools.partial(predict_case, model, volume, 3, patch, bench.device, amp_dtype, overlap=0.5,
                                      batch_size=PREDICT_BATCH, memory_format=channels_last_format(3)),
            "monai": _monai_sliding_window(bench, model, volume, patch)}
    with torch.inference_mode(), autocast(bench.device, amp_dtype):  # warm-up: a full window batch and the rest
        for n in {PREDICT_BATCH, windows % PREDICT_BATCH} - {0}:
            model(torch.zeros(n, 1, *patch, device=bench.device).contiguous(memory_format=channels_last_format(3)))
    one_window = volume[tuple(slice(0, p) for p in patch)]  # and each sliding-window code path once
    predict_case(model, one_window, 3, patch, bench.device, amp_dtype, memory_format=channels_last_format(3))
    if runs["monai"] is not None:
        _monai_sliding_window(bench, model, one_window, patch)()
    runs = {name: run for name, run in runs.items() if run is not None}
    times, outputs, memory = {name: [] for name in runs}, {}, {}
    for r in range(plan.infer_repeats_3d):
        for name, run in list(runs.items())[:: 1 if r % 2 == 0 else -1]:  # ABBA order cancels a drift in load
            outputs.pop(name, None)  # free the last output before the next run
            if r == 0:  # the first run of each also records its peak memory
                (seconds, outputs[name]), *memory[name] = peak_memory_mb(bench, functools.partial(bench.timed, run))
            else:
                seconds, outputs[name] = bench.timed(run)
            times[name].append(seconds)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {"seconds_per_volume": seconds["ours"], "ratio_vs_monai": seconds["monai"] / seconds["ours"]
            if "monai" in seconds else None, "peak_memory_mb": memory["ours"][0],
            "process_peak_rss_mb": memory["ours"][1], "monai_peak_memory_mb": memory.get("monai", [None])[0],
            "peak_memory": "CUDA max_memory_allocated" if bench.device.type == "cuda" else "RSS above the start",
            "monai_seconds_per_volume": seconds.get("monai"), "max_abs_diff_vs_monai":
            float((outputs["ours"] - outputs["monai"][0]).abs().max()) if "monai" in outputs else None,
            "volume_shape": list(plan.volume_3d), "patch": list(patch), "overlap": 0.5, "windows": windows,
            "window_batch": PREDICT_BATCH, "norm": bench.norm(3)}


# ---------------------------------------------------------------- report and command line


def _lookup(result: dict, path: str):
    for key in path.split("."):
        result = result.get(key) if isinstance(result, dict) else None
    return result


def check_targets(result: dict, targets: dict | None = None) -> dict:
    """Each of `targets` (default TARGETS) with the measured value and whether it is met (None: not measured)."""
    checks = {}
    for path, (comparison, bound) in (TARGETS if targets is None else targets).items():
        value = _lookup(result, path)
        met = None if value is None else bool(value >= bound if comparison == ">=" else value < bound)
        checks[path] = {"value": value, "target": f"{comparison} {bound:g}", "met": met}
    return checks


TRAIN_ROWS = (  # printed table rows (label, JSON path) for part = train_2d and train_3d
    ("{part} default: samples/s", "{part}.samples_per_s"), ("{part} default: GFLOP/s", "{part}.achieved_flops"),
    ("{part} default: fraction of {dtype} matmul", "{part}.fraction_of_matmul"),
    ("{part} fp32 contiguous: samples/s", "{part}.fp32.samples_per_s"),
    ("{part} fp32 contiguous: fraction of fp32 matmul", "{part}.fp32.fraction_of_matmul"),
    ("{part}: default / fp32", "{part}.speedup_vs_fp32"),
    ("{part} MONAI BasicUNet default: samples/s", "{part}.monai.samples_per_s"),
    ("{part}: ours / MONAI", "{part}.ratio_vs_monai"))
OTHER_ROWS = (
    ("data: warm cache slices/s", "data.cache_slices_per_s"), ("data: nibabel slices/s", "data.nibabel_slices_per_s"),
    ("data: cache / nibabel", "data.cache_speedup"),
    ("data: sampling share of a 2D step", "data.sampling_share_of_step"),
    ("epoch: student-style s/epoch", "epoch.student_seconds_per_epoch"),
    ("epoch: ours s/epoch", "epoch.ours_seconds_per_epoch"),
    ("epoch: student's share reading files", "epoch.student_reading_share"),
    ("epoch: student / ours, leaving out the student's file reading", "epoch.speedup_without_student_reading"),
    ("epoch: student / ours", "epoch_speedup_vs_student"),
    ("infer_2d: slices/s", "infer_2d.slices_per_s"), ("infer_2d: slices/s, mirror TTA", "infer_2d.slices_per_s_tta"),
    ("infer_3d: s/volume", "infer_3d.seconds_per_volume"),
    ("infer_3d: MONAI s/volume", "infer_3d.monai_seconds_per_volume"),
    ("infer_3d: ours / MONAI (speed)", "infer_3d.ratio_vs_monai"),
    ("infer_3d: peak memory MB", "infer_3d.peak_memory_mb"),
    ("infer_3d: MONAI peak memory MB", "infer_3d.monai_peak_memory_mb"))
GPU_TRAIN_ROWS = (
    ("{part} default: peak memory MB", "{part}.peak_memory_mb"),
    ("{part} MONAI BasicUNet default: peak memory MB", "{part}.monai_peak_memory_mb"),
    ("{part} default: peak memory / sampling reserve", "{part}.peak_share_of_reserve"),
    ("{part} default: channels-last / contiguous (speed)", "{part}.channels_last_speedup"))
GPU_ROWS = tuple((label.format(part=part), path.format(part=part)) for part in ("train_2d", "train_3d")
                 for label, path in GPU_TRAIN_ROWS) + (
    ("sampling_3d: share of a 3D step, scans on the device", "sampling_3d.device_share_of_step"),
    ("sampling_3d: share of a 3D step, scans in host memory", "sampling_3d.host_share_of_step"))


def markdown_table(result: dict) -> str:
    rows = [(f"matmul {d} GFLOP/s", f"matmul_flops.{d}") for d in result["matmul_flops"]]
    for part in ("train_2d", "train_3d"):
        rows += [(label.format(part=part, dtype=result[part]["matmul_dtype"]), path.format(part=part))
                 for label, path in TRAIN_ROWS]
    lines = [f"device {result['device']}, plan {result['settings']['plan']['name']}", "",
             "| measure | value | target | met |", "|---|---:|---|---|"]
    for label, path in rows + list(OTHER_ROWS) + (list(GPU_ROWS) if result["device"].startswith("cuda") else []):
        value, target = _lookup(result, path), result["targets"].get(path, {})
        value = value * 1e-9 if value is not None and "flops" in path else value
        shown = "n/a" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        met = {True: "yes", False: "**no**", None: ""}[target.get("met")]
        lines.append(f"| {label} | {shown} | {target.get('target', '')} | {met} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: the best available)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats; on a CPU also smaller 3D sizes (< 2 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny model and sizes
    parser.add_argument("--out", default="bench.json", help="JSON results (default: bench.json)")
    parser.add_argument("--data-dir", help="a 2D-layout HipMRI root (default: a phantom generated once in the cache)")
    parser.add_argument("--cache-dir", help="decoded data and the phantom (default: ~/.cache/hipmri-seg)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile ours and the peer in the default setting (off, as in TrainConfig)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="as train.py and predict.py do on a CPU (default: on); --no-keep-freed-memory measures "
                             "glibc's default allocator")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def ensure_data(args: argparse.Namespace, plan: Plan) -> Path:
    """--data-dir (must be the 2D layout), else the benchmark phantom, generated once into the cache folder."""
    if args.data_dir:
        if detect_layout(args.data_dir) != "2d":
            raise SystemExit(f"--data-dir {args.data_dir}: bench.py reads the 2D slice layout (the 3D sections use "
                             "a generated volume); point it at the folder holding keras_slices_train")
        return Path(args.data_dir)
    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    folder = root / f"bench-phantom-v{phantom.PHANTOM_VERSION}-2d-{plan.name}"
    if not (folder / phantom.COMPLETE_MARKER).exists():
        log.info("generating the benchmark phantom (%d patients x %d weeks) in %s, once", *plan.phantom, folder)
        phantom.write_dataset(folder, layout="2d", patients=plan.phantom[0], weeks=plan.phantom[1], seed=0)
    return folder


def describe(bench: Bench) -> dict:
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    plan, full = asdict(bench.plan), asdict(plan_for("full", bench.device))
    return {"plan": plan, "reduced_from_full": {k: v for k, v in plan.items() if v != full[k] and k != "name"},
            "amp_dtype": DTYPE_NAMES[bench.default.amp_dtype or torch.float32],
            "channels_last": bench.cfg.channels_last,
            "compile": bench.cfg.compile, "compile_note": "off as in TrainConfig; --compile measures it",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "monai": monai_version,
            "peer": "monai BasicUNet(features=(*ours, ours[0]), act=relu, same norm, bias=False, upsample=deconv)",
            "data_dir": str(bench.data_dir), "loss": bench.cfg.loss, "predict_batch": PREDICT_BATCH,
            "cuda": describe_cuda(bench.device) if bench.device.type == "cuda" else None}


def describe_cuda(device: torch.device) -> dict:
    """The GPU and the CUDA settings the figures depend on. fp32 convolutions may run as TF32 (cudnn_conv) while
    matmul_flops.fp32 does not; the train sections' fp32_matmul_reference says which they were compared with."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "compute_capability": list(torch.cuda.get_device_capability(device)),
            "memory_gb": props.total_memory / 1e9, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32": tf32_in_use()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = choose_device(args.device)
    plan = plan_for("smoke" if args.smoke else "quick" if args.quick else "full", device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # as train.py: every shape here is fixed, so cuDNN's autotuned choice pays off
        torch.backends.cudnn.benchmark = True
    started, load_before = time.perf_counter(), os.getloadavg()
    bench = Bench(plan, replace(TrainConfig(), compile=args.compile), device, ensure_data(args, plan),
                  Path(args.cache_dir) if args.cache_dir else None)
    keeps_memory = args.keep_freed_memory and keep_freed_memory(bench.device)
    result = {"device": str(bench.device), "settings": {**describe(bench), "keep_freed_memory": keeps_memory}}
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.1f on %d cores: other jobs share the CPU, so figures will be low and noisy "
                    "(see train_*.fastest_repeats); with a core taken, --threads 1 avoids stalls between threads",
                    load_before[0], os.cpu_count())

    def section(name: str, run: Callable[[], dict]) -> dict:
        began = time.perf_counter()
        result[name] = run()
        numbers = {k: float(f"{v:.3g}") for k, v in result[name].items() if isinstance(v, float)}
        log.info("%s (%.0f s): %s", name, time.perf_counter() - began, json.dumps(numbers)[:240])
        gc.collect()
        return result[name]

    section("matmul_flops", lambda: bench_matmul(bench, matmul_precisions(bench.device)))
    step_seconds = statistics.median(section("train_2d", lambda: bench_train(bench, 2))["seconds"]["default"])
    section("data", lambda: bench_data(bench, step_seconds))
    result["epoch_speedup_vs_student"] = section("epoch", lambda: bench_epoch(bench))["speedup"]
    section("infer_2d", lambda: bench_infer_2d(bench))
    step_seconds = statistics.median(section("train_3d", lambda: bench_train(bench, 3))["seconds"]["default"])
    if bench.device.type == "cuda":
        section("sampling_3d", lambda: bench_sampling_3d(bench, step_seconds))
    section("infer_3d", lambda: bench_infer_3d(bench))
    result["targets"] = check_targets(result, GPU_TARGETS if bench.device.type == "cuda" else TARGETS)
    result["seconds_total"] = time.perf_counter() - started
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    write_json(args.out, result)
    print(markdown_table(result))
    log.info("wrote %s in %.0f s", args.out, result["seconds_total"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
