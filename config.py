"""The training configuration: a dataclass with commented defaults, and the command line that overrides it.

`asdict(TrainConfig)` is written to RUN/config.json and into every checkpoint; bench.py reads the
defaults from here, so the benchmark always measures the model and batch a user trains by default.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, fields, replace

from utils import NUM_CLASSES

# Options that may differ from the saved config when resuming: they change where the run reads and writes or
# how long this invocation goes, not what it computes. --epochs and --max-minutes are not among them: they
# define the learning-rate schedule (train longer with --init-from, a new run from a checkpoint's weights).
# --out and --data-dir are where the run and its data are now (train.resolve_config checks the data is the same).
RESUME_MAY_CHANGE = {"out", "data_dir", "resume", "session_minutes", "device", "workers", "cache_dir", "verbose",
                     "val_every", "max_bad_steps", "keep_freed_memory"}
# Options of one invocation: on --resume they come from the command line (or their defaults), never from the saved
# config (a --session-minutes or --device given once must not apply to every later resume).
INVOCATION_ONLY = {"resume", "session_minutes", "device", "workers", "verbose"}
# What --init-from takes from the checkpoint (the model it rebuilds); everything else starts anew.
MODEL_FIELDS = ("dims", "features", "norm", "deep_supervision")


CHOICES = {"dims": (2, 3), "scheduler": ("onecycle", "cosine", "poly"), "loss": ("dice", "ce", "dicece"),
           "norm": ("batch", "instance")}


@dataclass
class TrainConfig:
    data_dir: str | None = None  # HipMRI root (2D or 3D layout); None trains on a phantom generated once into the cache
    dims: int | None = None  # 2 or 3; None takes it from the layout found in data_dir
    out: str = "runs/unet"  # run folder
    epochs: int = 40  # upper bound on epochs; --max-minutes may stop earlier
    max_minutes: float | None = None  # training-time budget of the whole run (all resumes); the lr schedule spans it
    session_minutes: float | None = None  # stop this invocation after M minutes (saving last.pt); schedule unchanged
    batch_size: int | None = None  # None: 8 in 2D (whole 256x128 slices), 2 in 3D (patches)
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    scheduler: str = "onecycle"  # onecycle | cosine | poly
    loss: str = "dicece"  # dice | ce | dicece
    class_weights: str = "default"  # default ([1..6] normalised) | inverse (from training labels) | none | w0,w1,..,w5
    features: tuple[int, ...] = (16, 32, 64, 128, 256)  # channels per UNet stage
    norm: str | None = None  # batch | instance; None: batch in 2D, instance in 3D (batches of 2 patches)
    deep_supervision: bool = False  # extra losses on the decoder's coarser outputs
    patch_size: tuple[int, ...] = (128, 128, 64)  # 3D training patch (x, y, z); 2D trains on whole slices
    steps_per_epoch: int | None = None  # None: one pass over the slices (2D), 250 patches per batch slot (3D)
    foreground_fraction: float = 1 / 3  # share of 3D patches centred on a foreground class
    augment: bool = True  # on-device flips, small rotation/scaling, intensity changes
    seed: int = 0  # seeds the init, the 3D split, batch order and augmentation
    amp: bool = True  # bf16 autocast where native (CPU with AVX512-BF16/AMX, Ampere+ GPUs), else fp16 + GradScaler
    channels_last: bool = True  # NHWC/NDHWC memory format (faster convolutions)
    compile: bool = False  # torch.compile the model
    keep_freed_memory: bool = True  # CPU (glibc): reuse freed memory, not fault it in again; up to 1.6x peak RSS
    accumulate: int = 1  # gradient accumulation steps
    clip_grad: float = 1.0  # max gradient norm, applied after unscaling
    val_every: int = 1  # validate every N epochs (and always at the end)
    sync_bn: bool = False  # SyncBatchNorm under DDP
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    device: str | None = None  # cpu | cuda | cuda:N ; None picks the best
    workers: int | None = None  # processes for building the cache
    cache_dir: str | None = None  # decoded data and the default phantom; default $HIPMRI_CACHE or ~/.cache/hipmri-seg
    resume: bool = False  # continue from RUN/last.pt (the run in --out, wherever it was trained)
    init_from: str | None = None  # start a new run from this checkpoint's weights (fine-tune / train longer)
    deterministic: bool = False  # deterministic algorithms (cuDNN, scatter): exact resume on GPU, somewhat slower
    verbose: bool = False  # debug logging


# ---------------------------------------------------------------- command line


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """Every TrainConfig field as an option; defaults are SUPPRESSed so we can tell what the user set."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    defaults = TrainConfig()
    comments = _field_comments()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{comments.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", metavar="N", help=help_text)
        else:
            kind = {"dims": int, "epochs": int, "batch_size": int, "steps_per_epoch": int, "workers": int,
                    "max_minutes": float, "session_minutes": float}.get(f.name, type(default) if default is not None
                                                                        else str)
            parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=help_text)
    return parser


def _field_comments() -> dict[str, str]:
    """The comment after each TrainConfig field, so --help and the dataclass never disagree."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def parse_config(argv: list[str] | None, description: str = "") -> tuple[TrainConfig, dict]:
    """The config the command line asks for, and the options it set explicitly (for --resume checks)."""
    overrides = vars(build_parser(description).parse_args(argv))
    for key in ("features", "patch_size"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(TrainConfig(), **overrides), overrides


def dims_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on cfg.dims: batch size 8 in 2D (whole slices), 2 in 3D (patches); batch norm
    in 2D, instance norm in 3D (the batch statistics of 2 correlated patches are noise)."""
    if cfg.dims not in CHOICES["dims"]:
        raise ValueError(f"dims must be 2 or 3 before the defaults that depend on it, got {cfg.dims!r}")
    if cfg.batch_size is None:
        cfg = replace(cfg, batch_size=8 if cfg.dims == 2 else 2)
    if cfg.norm is None:
        cfg = replace(cfg, norm="batch" if cfg.dims == 2 else "instance")
    return cfg


def model_args(cfg: TrainConfig) -> dict:
    """Everything UNet(**model_args) needs; stored in every checkpoint so predict.py needs no flags."""
    return {"spatial_dims": cfg.dims, "in_channels": 1, "num_classes": NUM_CLASSES,
            "features": tuple(cfg.features), "norm": cfg.norm, "deep_supervision": cfg.deep_supervision}
