"""Train a 2D or 3D UNet on HipMRI (or the phantom): AMP, clipping, AdamW + one-cycle, exact resume, DDP.

    python train.py --data-dir DIR --dims 2 --out runs/unet2d --max-minutes 60
    torchrun --nproc_per_node=4 train.py --data-dir DIR --dims 3 --out runs/unet3d

Outputs in RUN/: config.json, split.json (3D), metrics.csv, progress.png, last.pt, best.pt, train.log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import cache
import dataset
import inference
import losses
import sampling
import utils
import weekly
from augment import AugmentConfig
from config import (
    INVOCATION_ONLY,
    MODEL_FIELDS,
    RESUME_MAY_CHANGE,
    TrainConfig,
    dims_defaults,
    model_args,
    parse_config,
)
from modules import UNet, count_parameters

log = logging.getLogger("hipmri.train")


def resolve_config(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """The run's config: a new run's (data_dir, dims and batch size filled in, paths made absolute), or a resumed
    run's as saved, with what may change (RESUME_MAY_CHANGE) taken from the command line.

    The run lives in --out as given now (a copied or moved run folder is resumed where it is, never where it was
    trained), and a relative path is relative to where the user stands now. Raises SystemExit with what to do
    for options that contradict the saved run, DataError for a data folder that is gone.
    """
    out = str(Path(cfg.out).resolve())
    if cfg.resume:
        if cfg.init_from:
            raise SystemExit("--resume continues RUN/last.pt; --init-from starts a new run: pass one of them")
        saved = TrainConfig(**_tuples(_load_last(Path(out) / "last.pt")["config"]))
        _refuse_clashes(saved, overrides, Path(out) / "last.pt")
        # Options of one invocation never come back from the saved config: they are this command line's or default.
        resumed = replace(saved, out=out, **{k: getattr(cfg, k) for k in INVOCATION_ONLY},
                          **{k: v for k, v in overrides.items() if k in RESUME_MAY_CHANGE - INVOCATION_ONLY - {"out"}})
        return replace(resumed, data_dir=_absolute(resumed.data_dir), cache_dir=_absolute(resumed.cache_dir))
    if cfg.init_from:
        cfg = _model_from_checkpoint(cfg, overrides)
    if cfg.data_dir is None:
        cfg = replace(cfg, data_dir=str(cache.default_phantom(cfg.cache_dir, "3d" if cfg.dims == 3 else "2d",
                                                              cfg.seed)))
    try:
        layout_dims = 2 if dataset.detect_layout(cfg.data_dir, cfg.dims) == "2d" else 3
    except dataset.DataError as exc:
        if not cfg.init_from:
            raise
        raise dataset.DataError(f"--init-from {cfg.init_from} holds a {cfg.dims}D model, and {cfg.data_dir} has no "
                                f"{cfg.dims}D layout to train it on ({exc})") from None
    if cfg.dims is not None and cfg.dims != layout_dims:
        raise SystemExit(f"--dims {cfg.dims} does not match the {layout_dims}D layout found in {cfg.data_dir}")
    return dims_defaults(replace(cfg, dims=layout_dims, out=out, data_dir=_absolute(cfg.data_dir),
                                 cache_dir=_absolute(cfg.cache_dir), init_from=_absolute(cfg.init_from)))


def _load_last(path: Path) -> dict:
    """RUN/last.pt for --resume; a damaged one gets advice (best.pt is written separately and may be intact)."""
    try:
        return utils.load_checkpoint(path)
    except utils.CheckpointError as exc:
        if not path.is_file():
            raise
        raise utils.CheckpointError(f"{exc}. The run cannot continue from it; {path.parent / 'best.pt'} may still be "
                                    f"good: start a new run from its weights with --init-from "
                                    f"{path.parent / 'best.pt'} --out NEW_RUN") from None


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _refuse_clashes(saved: TrainConfig, overrides: dict, checkpoint: Path) -> None:
    """SystemExit for options that would change what a resumed run computes; the schedule gets its own advice."""
    clashes = {k: (v, getattr(saved, k)) for k, v in overrides.items()
               if k not in RESUME_MAY_CHANGE and v != getattr(saved, k)}
    if not clashes:
        return
    detail = ", ".join(f"{_as_option(k, new)} (run has {old})" for k, (new, old) in clashes.items())
    advice = "Drop them, or start a new run with another --out."
    if clashes.keys() & {"epochs", "max_minutes"}:
        advice = (f"--epochs and --max-minutes define this run's learning-rate schedule, so a resumed run keeps them. "
                  f"To train longer, start a new run from its weights: --init-from {checkpoint.parent / 'best.pt'} "
                  f"--out NEW_RUN --epochs N (a new schedule, warm-up included).")
    raise SystemExit(f"--resume: options contradict the config saved in {checkpoint}: {detail}. {advice}")


def _model_from_checkpoint(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """--init-from: the model fields (MODEL_FIELDS) come from the checkpoint; an explicit other value is an error."""
    saved = _tuples(utils.load_checkpoint(cfg.init_from)["config"])
    clashes = [f"{_as_option(k, overrides[k])} (checkpoint has {saved[k]})" for k in MODEL_FIELDS
               if k in overrides and overrides[k] != saved[k]]
    if clashes:
        raise SystemExit(f"--init-from {cfg.init_from}: the model must match the checkpoint's: {', '.join(clashes)}")
    return replace(cfg, **{k: saved[k] for k in MODEL_FIELDS})


def _as_option(name: str, value) -> str:
    """How the user typed it: --features 8 16."""
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    return f"--{name.replace('_', '-')} {shown}"


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def data_fingerprint(*case_sets: cache.CaseSet) -> str:
    """sha256 of the training and validation data's contents (each scan's key and the digest of its files' bytes,
    from the cache): equal for the same files wherever they are, so a run can be resumed on data that was moved
    or copied to another disk, and refused on data that changed."""
    digest = hashlib.sha256()
    for cases in case_sets:
        for key, content in zip(cases.keys, cases.content_digests):
            digest.update(f"{key}|{content}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- distributed set-up


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # gloo group with a long timeout, for the one wait that can take long: other ranks waiting while rank 0 builds
    # a cold cache (the 3D set takes minutes; NCCL's default timeout is 10 minutes).
    slow_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


CACHE_WAIT = timedelta(hours=2)


def init_distributed(cfg: TrainConfig) -> tuple[Ranks, torch.device]:
    """Single process, or one process of a torchrun job: NCCL on GPUs, gloo on CPU.

    --device cuda where CUDA is unusable is refused in both (never a silent fall-back to a CPU run); a process
    trains on GPU LOCAL_RANK, which must exist.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = utils.choose_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the RNG state saved with checkpoints is the current device's
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.device is not None and utils.parse_device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {cfg.device}: CUDA is not available to this process (torchrun rank {ranks.rank}); "
                         f"check the GPU allocation (nvidia-smi, CUDA_VISIBLE_DEVICES) or use --device cpu")
    wants_cuda = torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda"))
    if wants_cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"torchrun started more processes per node than the {torch.cuda.device_count()} visible "
                             f"GPU(s) (local rank {ranks.local_rank}); use --nproc_per_node=gpu")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes on one CPU share its cores; more threads than cores per process only thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return replace(ranks, slow_group=dist.new_group(backend="gloo", timeout=CACHE_WAIT)), device


def barrier(ranks: Ranks, slow: bool = False) -> None:
    """Wait for every rank; `slow` for waits that may outlast the default timeout (building the cache)."""
    if ranks.world_size > 1:
        dist.barrier(group=ranks.slow_group if slow else None)


# ---------------------------------------------------------------- model, optimiser, schedule


def lr_factor(progress: float, kind: str) -> float:
    """Multiplier of the peak lr after `progress` (0..1) of the run.

    onecycle: the shape of torch's OneCycleLR defaults (cosine warm-up over 30% from lr/25, cosine
    decay to lr/25e4), written as a function of progress so a time budget can drive it too.
    """
    progress = min(max(progress, 0.0), 1.0)
    if kind == "onecycle":
        start, end, warm = 1 / 25, 1 / 25e4, 0.3
        if progress < warm:
            return _cosine_between(start, 1.0, progress / warm)
        return _cosine_between(1.0, end, (progress - warm) / (1 - warm))
    if kind == "cosine":
        return _cosine_between(1.0, 0.0, progress)
    if kind == "poly":
        return (1 - progress) ** 0.9
    raise SystemExit(f"--scheduler {kind}: choose onecycle, cosine or poly")


def _cosine_between(first: float, last: float, fraction: float) -> float:
    return last + (first - last) * (1 + math.cos(math.pi * fraction)) / 2


def class_weights(cfg: TrainConfig, train_cases: cache.CaseSet) -> list[float]:
    """Dice class weights from --class-weights: default ([1..6]/21), inverse frequency, none (uniform), or six."""
    if cfg.class_weights == "none":
        return [1.0] * utils.NUM_CLASSES
    if cfg.class_weights == "default":
        return losses.default_class_weights(utils.NUM_CLASSES).tolist()
    if cfg.class_weights == "inverse":
        return losses.inverse_frequency_weights(sum(train_cases.class_counts)).tolist()
    try:
        weights = [float(w) for w in cfg.class_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != utils.NUM_CLASSES:
        raise SystemExit(f"--class-weights {cfg.class_weights}: give default, inverse, none or "
                         f"{utils.NUM_CLASSES} comma-separated numbers")
    return weights


# ---------------------------------------------------------------- the run's state

# Optimiser steps between the loop's host-device syncs. Everything the loop needs to know from the device (the
# loss, non-finite steps) is tallied there and read at these points, where the ranks also agree on the clock and on
# whether to stop; in between, the CPU queues work ahead of the GPU. Budgets are checked at this granularity.
SYNC_EVERY = 8


@dataclass
class Run:
    """Everything one training process holds; `counters` is what a checkpoint adds to the weights."""
    cfg: TrainConfig
    ranks: Ranks
    device: torch.device
    amp_dtype: torch.dtype | None
    model: torch.nn.Module  # the plain UNet (what checkpoints store)
    net: torch.nn.Module  # what we call: compiled and/or DDP-wrapped model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    source: sampling.DeviceBatchSource
    val_cases: cache.CaseSet
    total_steps: int
    # epoch (completed), step (optimiser steps taken or skipped), skipped_steps, bad_steps (non-finite in a row),
    # best_dice, best_epoch, history, train_seconds (training time over all invocations)
    counters: dict
    data_fingerprint: str = ""
    started: float | None = None  # perf_counter when this invocation's training started; None before
    session_base: float = 0.0  # training seconds saved before this invocation
    clock: float = 0.0  # training seconds as last agreed by all ranks: what a time-budget schedule follows
    invoked: float = field(default_factory=time.perf_counter)  # this invocation's start: --session-minutes
    unit_scale: torch.Tensor | None = None  # 1.0 on the device: the loss scale of fp32/bf16 after every step

    @property
    def progress(self) -> float:
        """Fraction of the run done: by optimiser steps, or by time when a budget is set (whichever is ahead).
        Time is the agreed `clock`, so every rank computes the same learning rate."""
        by_steps = self.counters["step"] / max(self.total_steps, 1)
        if self.cfg.max_minutes is None:
            return by_steps
        return max(by_steps, self.clock / (self.cfg.max_minutes * 60))

    @property
    def elapsed(self) -> float:
        """This rank's training seconds over all invocations (the saved ones plus this invocation's)."""
        if self.started is None:
            return self.counters["train_seconds"]
        return self.session_base + time.perf_counter() - self.started

    def set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.progress, self.cfg.scheduler)

    def finished(self) -> str:
        """Why the run has nothing left to train ("" if it has): all epochs done, or the whole budget spent."""
        if self.counters["epoch"] >= self.cfg.epochs:
            return f"{self.cfg.epochs} epochs done"
        if self.cfg.max_minutes is not None and self.counters["train_seconds"] >= self.cfg.max_minutes * 60:
            return f"time budget of {self.cfg.max_minutes} minutes spent"
        return ""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW at the schedule's first learning rate. The fused kernel steps all parameters at once (measured 4.7 ms
    vs 12-25 ms per step on the 2D default)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr * lr_factor(0, cfg.scheduler),
                             weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16: torch's dynamic loss scaling. fp32 and bf16 need no scaling: a scale of 1 (optimiser_step sets it
    back to 1 after a skipped step, which halved it). The scaler is what skips a step whose gradients are not
    finite: with the fused AdamW it hands the check to the optimiser on the device, with no host-device sync."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)


def load_scaler_state(run: Run, ckpt: dict) -> None:
    """Restore the loss scale when the saved run scaled the same way (fp16, or fp32/bf16); a run saved with bf16
    and resumed on an fp16-only GPU (or the reverse) starts a fresh scaler. Checkpoints from before `amp_dtype`
    was saved held a scaler state only for fp16."""
    saved_dtype = ckpt.get("amp_dtype", "float16" if ckpt.get("scaler") else "bfloat16 or none")
    same_kind = (saved_dtype == "float16") == (run.amp_dtype == torch.float16)
    if ckpt.get("scaler") and same_kind:
        run.scaler.load_state_dict(ckpt["scaler"])
    elif saved_dtype != _dtype_name(run.amp_dtype):
        log.info("the run was saved with amp %s and resumes with amp %s: loss scaling starts afresh", saved_dtype,
                 _dtype_name(run.amp_dtype))


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def set_algorithms(cfg: TrainConfig, device: torch.device) -> None:
    """--deterministic: deterministic cuDNN and scatter kernels (torch.use_deterministic_algorithms; ops without
    a deterministic version warn instead of failing), so a resumed GPU run continues exactly. Otherwise cuDNN
    benchmarks its algorithms once per input shape (training shapes are fixed), which is faster but picks
    algorithms with atomics: results then differ in the last bits from run to run."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_run(cfg: TrainConfig, ranks: Ranks, device: torch.device, invoked: float) -> Run:
    run_dir = Path(cfg.out)
    utils.seed_everything(cfg.seed)
    data_cfg = dataset.DataConfig()
    split_file = run_dir / "split.json" if cfg.dims == 3 else None
    if not ranks.is_main:
        barrier(ranks, slow=True)  # rank 0 builds the cache (and split.json) first; the others then read it
    elif cfg.init_from and not cfg.resume and split_file is not None and not split_file.exists():
        inherit_split(Path(cfg.init_from).parent / "split.json", split_file)
    train_cases = cache.load_split(cfg.data_dir, "train", data_cfg, cache_dir=cfg.cache_dir, split_file=split_file,
                                   seed=cfg.seed, workers=cfg.workers, spatial_dims=cfg.dims)
    val_cases = cache.load_split(cfg.data_dir, "validate", data_cfg, cache_dir=cfg.cache_dir, split_file=split_file,
                                 seed=cfg.seed, workers=cfg.workers, spatial_dims=cfg.dims)
    if ranks.is_main:
        barrier(ranks, slow=True)
        warn_if_no_test_split(cfg, split_file)
        weekly.save_usual_variation(train_cases, run_dir)  # the review list's week-to-week thresholds
    augment = AugmentConfig() if cfg.augment else None
    source = sampling.DeviceBatchSource(
        train_cases, patch_size=cfg.patch_size if cfg.dims == 3 else None, batch_size=cfg.batch_size, device=device,
        seed=cfg.seed, foreground_fraction=cfg.foreground_fraction, steps_per_epoch=cfg.steps_per_epoch,
        rank=ranks.rank, world_size=ranks.world_size, augment=augment, model_width=cfg.features[0])
    model = UNet(**model_args(cfg))
    if cfg.init_from and not cfg.resume:  # a resumed run's weights come from its own last.pt
        model.load_state_dict(utils.load_checkpoint(cfg.init_from)["model"])
        log.info("initialised the weights from %s; the optimiser and schedule start anew", cfg.init_from)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=utils.channels_last_format(cfg.dims))
    net = model
    if ranks.world_size > 1:
        if cfg.sync_bn:  # same state-dict keys as BatchNorm, so checkpoints still load into a plain UNet
            model = net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        net = torch.compile(net)
    amp_dtype = utils.amp_dtype_for(device, cfg.amp)
    optimizer = make_optimizer(model, cfg, device)
    loss_fn = losses.make_loss(cfg.loss, utils.NUM_CLASSES, class_weights(cfg, train_cases))
    if cfg.deep_supervision:
        loss_fn = losses.DeepSupervisionLoss(loss_fn)
    total_steps = cfg.epochs * math.ceil(len(source) / cfg.accumulate)
    counters = {"epoch": 0, "step": 0, "skipped_steps": 0, "bad_steps": 0, "best_dice": -1.0, "best_epoch": 0,
                "history": [], "train_seconds": 0.0}
    return Run(cfg, ranks, device, amp_dtype, model, net, optimizer, make_scaler(device, amp_dtype),
               loss_fn.to(device), source, val_cases, total_steps, counters, data_fingerprint(train_cases, val_cases),
               invoked=invoked, unit_scale=torch.ones((), device=device))


def inherit_split(source: Path, split_file: Path) -> None:
    """--init-from in 3D: the new run keeps the patient split of the run it starts from, so patients that run
    trained on never become this run's validation or test patients."""
    if source.is_file():
        dataset.load_split_file(source)  # DataError naming it if it is not a split file
        utils.atomic_write_bytes(split_file, source.read_bytes())
        log.info("using the patient split of the run the weights come from (%s)", source)
    else:
        log.warning("%s not found: drawing a new patient split, whose validation and test patients the weights may "
                    "have been trained on", source)


def lock_run(out: Path):
    """Hold RUN/.lock for this process's life (an open file with an exclusive flock): a second train.py on the same
    run folder (a requeued or doubly submitted job) stops at once instead of overwriting its checkpoints."""
    handle = open(out / ".lock", "a+")  # held open until the process ends, on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise SystemExit(f"{out} is being trained by another process ({handle.read().strip() or 'pid unknown'}); "
                         f"wait for it to end, or choose another --out") from None
    except OSError as exc:  # file systems without flock (Lustre without -o flock, some NFS): train unguarded
        log.warning("%s: cannot lock the run folder (%s); make sure no other train.py uses it", out, exc)
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def warn_if_no_test_split(cfg: TrainConfig, split_file: Path | None) -> None:
    """Say at the start, not at prediction time, that there is nothing held out to test on."""
    if split_file is not None:
        sizes = {name: len(keys) for name, keys in dataset.load_split_file(split_file).items()}
        if not sizes["test"]:
            log.warning("the test split is empty: the patient split in %s has %s scans; too few patients for "
                        "split ratios %s, so predict.py --split test will have nothing to evaluate", split_file,
                        " / ".join(f"{name} {n}" for name, n in sizes.items()), dataset.DataConfig().split_ratios)
        return
    try:
        dataset.find_pairs(cfg.data_dir, "test", spatial_dims=2)
    except dataset.DataError as exc:
        log.warning("no usable test split in %s (%s): predict.py --split test will fail", cfg.data_dir, exc)


# ---------------------------------------------------------------- one epoch, validation


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One pass of the batch source; returns the epoch's mean loss, data-wait share, throughput, stop reason."""
    cfg, model_format = run.cfg, utils.channels_last_format(run.cfg.dims)
    run.net.train()
    n_batches, seconds_waiting, samples, stop = len(run.source), 0.0, 0, ""
    # On the device, read only at sync points: loss sum and count over finite steps, non-finite steps in a row
    # (carried over from earlier epochs), non-finite steps since the last sync point.
    tally = torch.tensor([0.0, 0.0, run.counters["bad_steps"], 0.0], device=run.device)
    batches = run.source.epoch(epoch)
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not run.ranks.is_main or None)
    started = time.perf_counter()
    for index in range(n_batches):
        waited = time.perf_counter()
        image, label = next(batches)
        seconds_waiting += time.perf_counter() - waited
        if cfg.channels_last:
            image = image.contiguous(memory_format=model_format)
        steps_now = (index + 1) % cfg.accumulate == 0 or index + 1 == n_batches
        # DDP all-reduces gradients in backward; for the micro-batches of an accumulation only the last one needs to.
        with contextlib.nullcontext() if steps_now or run.ranks.world_size == 1 else run.net.no_sync():
            with utils.autocast(run.device, run.amp_dtype):
                loss = run.loss_fn(run.net(image), label)
            run.scaler.scale(loss / cfg.accumulate).backward()
        samples += image.shape[0]
        if steps_now:
            optimiser_step(run, loss.detach(), tally)
            if run.counters["step"] % SYNC_EVERY == 0 or index + 1 == n_batches:
                stop = sync_point(run, tally, bar)
        bar.update()
        if stop:
            break
    bar.close()
    seconds = time.perf_counter() - started
    loss_sum, finite_steps = tally[:2].tolist()
    return {"train_loss": loss_sum / finite_steps if finite_steps else math.nan, "data_wait": seconds_waiting / seconds,
            "samples_per_s": samples * run.ranks.world_size / seconds, "stop": stop}


def optimiser_step(run: Run, loss: torch.Tensor, tally: torch.Tensor) -> None:
    """Unscale, clip, step (skipped on the device when a gradient is not finite), schedule; no host-device sync.

    DDP averages gradients first, so every rank sees the same norm and skips the same steps. With fp16 a
    non-finite step is the scaler calibrating, not a fault: it is not counted towards --max-bad-steps.
    """
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update(None if run.amp_dtype == torch.float16 else run.unit_scale)  # fp32/bf16: back to 1, on device
    run.optimizer.zero_grad(set_to_none=True)
    finite = torch.isfinite(grad_norm)
    tally[0] += torch.where(finite, loss.float(), 0.0)
    tally[1] += finite.float()
    if run.amp_dtype != torch.float16:
        tally[2] = torch.where(finite, 0.0, tally[2] + 1)
        tally[3] += (~finite).float()
    run.counters["step"] += 1
    run.set_lr()


def sync_point(run: Run, tally: torch.Tensor, bar: tqdm) -> str:
    """Read the tally, agree with the other ranks on the clock and the budgets, and say why to stop ("" to go on).

    One all-reduce (max) of [training seconds, non-finite steps in a row]: every rank then sets the same learning
    rate and takes the same decision (ranks' own clocks drift apart by milliseconds, and rank 0 also spends time
    validating).
    """
    # [elapsed, non-finite in a row | loss sum, finite steps, skipped]: the first two are agreed on (max over ranks),
    # the rest are this rank's; one read of the device for all of them. float32: MPS has no float64, and seconds
    # to ~1e-7 of the budget are plenty.
    values = torch.cat([torch.tensor([run.elapsed], device=run.device), tally[2:3], tally[:2], tally[3:]])
    if run.ranks.world_size > 1:
        dist.all_reduce(values[:2], op=dist.ReduceOp.MAX)
    run.clock, bad_in_row, loss_sum, finite_steps, skipped = values.tolist()
    if skipped:
        log.warning("by step %d: non-finite loss or gradient, step skipped %d time(s) since the last check (%d in a "
                    "row)", run.counters["step"], skipped, bad_in_row)
        tally[3] = 0.0
    run.counters["bad_steps"] = int(bad_in_row)
    run.counters["skipped_steps"] += int(skipped)
    run.set_lr()
    bar.set_postfix(loss=f"{loss_sum / max(finite_steps, 1):.4f}")
    return stop_reason(run)


def stop_reason(run: Run) -> str:
    cfg = run.cfg
    if run.counters["bad_steps"] >= cfg.max_bad_steps:
        return (f"{run.counters['bad_steps']} non-finite steps in a row: stopping with the last good checkpoint. "
                f"Try a lower --lr, --no-amp, or check the data with `python dataset.py check`")
    if cfg.max_minutes is not None and run.clock >= cfg.max_minutes * 60:
        return f"time budget of {cfg.max_minutes} minutes spent"
    return ""


def session_spent(run: Run, epoch_seconds: float) -> bool:
    """--session-minutes, checked between epochs (a resumed run starts at an epoch's first batch, so stopping
    inside one would drop its other batches): true when another epoch as long as the last would not fit in what
    is left of this invocation's minutes. Agreed by all ranks (max)."""
    if run.cfg.session_minutes is None:
        return False
    values = torch.tensor([time.perf_counter() - run.invoked, epoch_seconds], device=run.device)
    if run.ranks.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    session, epoch = values.tolist()
    return session + epoch > run.cfg.session_minutes * 60


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Hard Dice per validation case and class (2D: slices stacked into the case's volume) and the val loss."""
    loss_fn = run.loss_fn.loss if run.cfg.deep_supervision else run.loss_fn
    return inference.validate_cases(run.model, run.val_cases.images, run.val_cases.labels, run.cfg.dims, loss_fn,
                                    progress=True, patch_size=run.cfg.patch_size if run.cfg.dims == 3 else None,
                                    device=run.device, amp_dtype=run.amp_dtype, batch_size=2 * run.cfg.batch_size)


# ---------------------------------------------------------------- checkpoints and outputs


def save_checkpoint(run: Run, path: Path) -> None:
    """Weights, optimiser, scaler, counters, RNG states and config: enough to resume exactly or to predict."""
    utils.atomic_torch_save({
        "model": run.model.state_dict(),
        "model_args": model_args(run.cfg),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "amp_dtype": _dtype_name(run.amp_dtype),
        "counters": run.counters,
        "total_steps": run.total_steps,
        "rng": utils.get_rng_state(),
        "config": asdict(run.cfg),
        "data_digest": run.data_fingerprint,
        "class_names": list(utils.CLASS_NAMES),
        "data_config": asdict(dataset.DataConfig()),
    }, path)


def restore(run: Run, path: Path) -> None:
    """Continue the run saved in `path`. The checkpoint is read to the CPU and each state placed by its
    load_state_dict (the RNG states must stay CPU tensors); DataError if the data holds other files now."""
    ckpt = _load_last(path)
    saved_fingerprint = ckpt.get("data_digest")  # checkpoints from before it was saved are not checked
    if saved_fingerprint and saved_fingerprint != run.data_fingerprint:
        raise dataset.DataError(f"{run.cfg.data_dir} does not hold the files {path} was trained on (their names or "
                                f"contents differ): pass the run's data with --data-dir, or start a new run")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    load_scaler_state(run, ckpt)
    run.counters = {"skipped_steps": 0, **ckpt["counters"]}
    # The steps left at this world size (2D epochs have N // world_size // B steps): resumed on another number of
    # GPUs, the schedule still ends with the last epoch. Same world size: the saved total.
    run.total_steps = run.counters["step"] + (run.cfg.epochs - run.counters["epoch"]) * math.ceil(
        len(run.source) / run.cfg.accumulate)
    utils.set_rng_state(ckpt["rng"], cuda=run.device.type == "cuda")
    run.clock = run.counters["train_seconds"]
    run.set_lr()
    log.info("resumed %s after epoch %d (step %d, %.1f min trained, best mean foreground Dice %.4f at epoch %d)",
             path, run.counters["epoch"], run.counters["step"], run.clock / 60, run.counters["best_dice"],
             run.counters["best_epoch"])


# ---------------------------------------------------------------- main


def fit(run: Run) -> str:
    """Epochs until done, out of budget or stopped; returns why it ended."""
    cfg, out = run.cfg, Path(run.cfg.out)
    nan_row = {key: math.nan for key in utils.METRIC_COLUMNS}
    stop = ""
    run.session_base, run.started = run.counters["train_seconds"], time.perf_counter()
    while run.counters["epoch"] < cfg.epochs and not stop:
        epoch = run.counters["epoch"] + 1
        started = time.perf_counter()
        result = train_one_epoch(run, epoch)
        stop = result.pop("stop")
        if run.counters["bad_steps"] >= cfg.max_bad_steps:
            return stop  # no checkpoint of this epoch: last.pt and best.pt keep the last good weights
        ending = bool(stop) or epoch == cfg.epochs
        row = {**nan_row, **result, "epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
        if run.ranks.is_main and (epoch % cfg.val_every == 0 or ending):
            row.update(evaluate(run))
        row["seconds"] = time.perf_counter() - started
        run.counters["epoch"] = epoch
        run.counters["train_seconds"] = run.elapsed
        run.counters["history"].append(row)
        if run.ranks.is_main:
            if row["dice_mean_fg"] > run.counters["best_dice"]:
                run.counters.update(best_dice=row["dice_mean_fg"], best_epoch=epoch)
                save_checkpoint(run, out / "best.pt")
            save_checkpoint(run, out / "last.pt")
            utils.write_history(run.counters["history"], out)
            log.info(utils.format_epoch(row))
        barrier(run.ranks)
        if not stop and epoch < cfg.epochs and session_spent(run, time.perf_counter() - started):
            stop = (f"this session's {cfg.session_minutes} minutes are spent (another epoch would not fit); continue "
                    f"the run with --resume")
    return stop or f"{cfg.epochs} epochs done"


def check_ranks_agree(run: Run) -> None:
    """DDP keeps replicas identical by construction; verify it once at the end, cheaply, by checksums."""
    if run.ranks.world_size == 1:
        return
    flat = torch.cat([p.detach().float().flatten() for p in run.model.parameters()])
    checksum = torch.stack([flat.sum(), flat.square().sum(), flat.abs().max()])
    gathered = [torch.zeros_like(checksum) for _ in range(run.ranks.world_size)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(other, gathered[0]) for other in gathered[1:]):
        raise RuntimeError(f"model weights differ between ranks after training: {[g.tolist() for g in gathered]}")
    log.info("weights identical on %d ranks", run.ranks.world_size)


def main(argv: list[str] | None = None) -> int:
    invoked = time.perf_counter()  # --session-minutes counts from here: start-up and a cold cache build included
    cfg, overrides = parse_config(argv, __doc__)
    ranks, device = init_distributed(cfg)
    try:
        utils.setup_logging(cfg.verbose, ranks.rank)
        cfg = resolve_config(cfg, overrides)
        out = Path(cfg.out)
        if not cfg.resume and (out / "last.pt").exists():
            raise SystemExit(f"{out} already holds a run (last.pt): pass --resume to continue it, "
                             "or choose another --out")
        if ranks.is_main:
            if out.exists() and not out.is_dir():
                raise SystemExit(f"--out {out} is a file; a run folder is a folder: choose another --out")
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_run(out)  # noqa: F841 - released when the process (or this call) ends
            utils.setup_logging(cfg.verbose, ranks.rank, log_file=out / "train.log")
            utils.write_json(out / "config.json", asdict(cfg))
        if cfg.keep_freed_memory and utils.keep_freed_memory(device):
            log.debug("keeping freed CPU memory for reuse (--no-keep-freed-memory turns it off)")
        set_algorithms(cfg, device)
        run = build_run(cfg, ranks, device, invoked)
        if cfg.resume:
            restore(run, out / "last.pt")
            if done := run.finished():
                log.info("%s has finished (%s): nothing to resume. To train more, start a new run from its weights: "
                         "--init-from %s --out NEW_RUN", out, done, out / "best.pt")
                return 0
        n_params = count_parameters(run.model)
        log.info("training a %dD UNet (%s parameters) on %s: %d train / %d validation cases, %d batches of %d per "
                 "epoch, device %s, amp %s, world size %d", cfg.dims, f"{n_params:,}", cfg.data_dir,
                 len(run.source.cases.keys), len(run.val_cases.keys), len(run.source), cfg.batch_size, device,
                 run.amp_dtype or "off (fp32)", ranks.world_size)
        reason = fit(run)
        check_ranks_agree(run)
        if ranks.is_main:
            log.info("stopped: %s. Best mean foreground validation Dice %.4f at epoch %d. Outputs in %s", reason,
                     run.counters["best_dice"], run.counters["best_epoch"], out)
        return 1 if run.counters["bad_steps"] >= cfg.max_bad_steps else 0
    except (dataset.DataError, utils.CheckpointError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
