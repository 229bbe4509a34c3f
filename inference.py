"""Inference core: softmax probabilities for one case, 2D slice-wise or 3D by Gaussian-weighted sliding window.

Shared by predict.py and train.py's validation. Everything here returns float32 *probabilities* (softmax over
the class axis), never logits: overlapping windows and mirrored test-time-augmentation (TTA) copies are
averaged in probability space, as nnU-Net does. Averaging logits instead would let one over-confident window
dominate; averaging probabilities keeps each window's vote bounded.

Axis conventions: tensors are channel-first, ``(B, C, *spatial)``; 3D volumes are in nibabel order
``(X, Y, Z)``; a 2D case is a stack of slices ``(n_slices, H, W)``.

``sliding_window_predict`` and ``predict_case`` run under ``torch.inference_mode()``, so their outputs are
inference tensors: reading them, ``argmax``, ``.cpu()`` and ``.numpy()`` are fine anywhere; to modify one in place
outside inference mode, ``.clone()`` it first. Putting the model in ``eval()`` mode is the caller's job.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metrics
from utils import CLASS_NAMES

__all__ = ["gaussian_importance_map", "window_starts", "sliding_window_predict", "predict_case", "validate_cases"]


@functools.lru_cache(maxsize=8)
def _gaussian_cached(
    patch_size: tuple[int, ...], sigma_scale: float, min_weight: float, device: torch.device, dtype: torch.dtype
) -> Tensor:
    weights = None
    for size in patch_size:
        # Centred on the window's middle, (size - 1) / 2, so the map is mirror-symmetric (TTA-safe).
        offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-0.5 * (offsets / (size * sigma_scale)) ** 2)
        weights = profile if weights is None else weights[..., None] * profile
    return weights.clamp_(min=min_weight).to(device=device, dtype=dtype)


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_weight: float = 1e-3,
) -> Tensor:
    """Separable Gaussian window weights, shape ``patch_size``, value 1 at the Gaussian's centre.

    Per axis ``exp(-d**2 / (2 sigma**2))`` with ``d`` the distance in voxels from the window centre
    ``(size - 1) / 2`` and ``sigma = size * sigma_scale``; the product over axes is clamped below at
    ``min_weight`` so that no voxel has zero (or denormal) weight, which would make the normalising sum
    vanish at image corners. The same map as MONAI's ``compute_importance_map(mode="gaussian")``.

    The result is cached and shared between calls: do not modify it in place.
    """
    patch = tuple(int(p) for p in patch_size)
    if not patch or min(patch) < 1:
        raise ValueError(f"patch_size must be positive integers, got {patch_size!r}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian_cached(patch, float(sigma_scale), float(min_weight), torch.device(device), dtype)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size`` (``size >= patch``).

    As nnU-Net's ``compute_steps``: the fewest windows whose step is at most ``patch * (1 - overlap)``, spread
    evenly so that the first starts at 0 and the last ends exactly at the border (``size - patch``).
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch ({patch}); pad it first")
    if size == patch:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (count - 1)
    return [round(step * i) for i in range(count)]


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _format_input(x: Tensor, memory_format: torch.memory_format | None) -> Tensor:
    """Apply the requested memory format; ``torch.channels_last`` means channels_last_3d for 5D input."""
    if memory_format is None:
        return x
    if x.ndim == 5 and memory_format == torch.channels_last:
        memory_format = torch.channels_last_3d
    return x.contiguous(memory_format=memory_format)


def _flip_combinations(mirror_axes: Sequence[int], spatial_dims: int) -> list[tuple[int, ...]]:
    """All 2**k subsets of the spatial ``mirror_axes`` as tensor dims of a (B, C, *S) tensor; () first."""
    axes = sorted({int(a) for a in mirror_axes})
    if len(axes) != len(mirror_axes) or any(a < 0 or a >= spatial_dims for a in axes):
        raise ValueError(
            f"mirror/TTA axes must be distinct spatial axes in 0..{spatial_dims - 1} (0-based over the model input's "
            f"spatial dims), got {tuple(mirror_axes)}"
        )
    dims = [a + 2 for a in axes]
    return [combo for k in range(len(dims) + 1) for combo in itertools.combinations(dims, k)]


def _check_logits(logits: object, x: Tensor) -> None:
    """Refuse model outputs that are not (n, K, *spatial of x) tensors, with a message saying what is expected."""
    shape_ok = isinstance(logits, Tensor) and logits.ndim == x.ndim and logits.shape[0] == x.shape[0]
    if not shape_ok or logits.shape[2:] != x.shape[2:]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the model must return one logits tensor (B, num_classes, *spatial) with the input's spatial shape; "
            f"input {tuple(x.shape)} gave {got} (deep-supervision models must return only the full-resolution "
            "output in eval mode)"
        )


def _forward_probs(
    model: nn.Module,
    x: Tensor,
    mirror_axes: Sequence[int] = (),
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> Tensor:
    """Softmax probabilities (n, K, *P) float32 for a batch x (n, C_in, *P), averaged over mirrored copies."""
    flips = _flip_combinations(mirror_axes, x.ndim - 2)
    total = None
    for dims in flips:
        with _autocast(x.device, amp_dtype):
            logits = model(_format_input(x.flip(dims) if dims else x, memory_format))
        _check_logits(logits, x)
        # Contiguous first: a softmax over the channels of a channels-last tensor, and adding it into the
        # contiguous output, are strided and slower than this copy.
        probs = torch.softmax(logits.contiguous(), dim=1, dtype=torch.float32)
        if dims:
            probs = probs.flip(dims)
        total = probs if total is None else total.add_(probs)
    if len(flips) > 1:
        total.div_(len(flips))
    return total


def _pad_to_patch(image: Tensor, patch: Sequence[int]) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad spatial axes shorter than the patch (half before, rest after); return the crop that undoes it."""
    before = [max(p - s, 0) // 2 for s, p in zip(image.shape[2:], patch)]
    after = [max(p - s, 0) - b for s, p, b in zip(image.shape[2:], patch, before)]
    crop = (slice(None), slice(None), *(slice(b, b + s) for b, s in zip(before, image.shape[2:])))
    if not any(before) and not any(after):
        return image, crop
    # F.pad takes (last axis before, last axis after, second-last ...); 0 is the z-scored mean intensity.
    pad = [n for b, a in zip(reversed(before), reversed(after)) for n in (b, a)]
    return F.pad(image, pad, mode="constant", value=0.0), crop


def _progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm  # only needed for the bar; keeps the core importable with torch alone

    return tqdm(items, desc=desc, leave=False, disable=None)  # None: no bar when the output is not a terminal


def _check_patch(patch_size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims or min(patch) < 1:
        raise ValueError(f"patch_size {tuple(patch_size)} must give {spatial_dims} positive sizes for this input")
    return patch


def _window_grid(
    size: Sequence[int], patch: Sequence[int], overlap: float, weight: Tensor | None, device: torch.device
) -> tuple[list[tuple[slice, ...]], Tensor]:
    """The windows (spatial slices) covering ``size`` and the total weight (*size) float32 each voxel receives."""
    corners = itertools.product(*(window_starts(s, p, overlap) for s, p in zip(size, patch)))
    regions = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in corners]
    weight_sum = torch.zeros(tuple(size), dtype=torch.float32, device=device)
    for region in regions:
        weight_sum[region].add_(1.0 if weight is None else weight)
    return regions, weight_sum


@torch.inference_mode()
def sliding_window_predict(
    model: nn.Module,
    image: Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    gaussian: bool = True,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    mirror_axes: Sequence[int] = (),
    memory_format: torch.memory_format | None = None,
) -> Tensor:
    """Softmax probabilities of ``model`` over ``image`` by overlapping windows.

    Args:
        model: maps (n, C_in, *patch_size) to logits (n, num_classes, *patch_size); on ``image``'s device.
        image: (B, C_in, *S) in the dtype the model takes (float32), S of 2 or 3 axes. Axes shorter than the
            patch are zero-padded (half before, rest after) and the output cropped back to S.
        patch_size: window size, one int per spatial axis.
        overlap: in [0, 1); window starts per axis come from :func:`window_starts` (step <= patch * (1 - overlap),
            the last window ends at the border).
        sw_batch_size: windows per forward pass (windows of all B images are batched together).
        gaussian: weight each window's probabilities by :func:`gaussian_importance_map` (else uniformly).
        amp_dtype: run the model under autocast with this dtype (device type taken from ``image``).
        progress: show a tqdm bar over window batches.
        mirror_axes: spatial axes (0-based) to mirror per window for TTA; all 2**k flip combinations are averaged.
        memory_format: e.g. ``torch.channels_last`` for the window batches (channels_last_3d in 3D).

    Returns:
        (B, num_classes, *S) float32 on ``image``'s device: at each voxel, the importance-weighted mean over the
        windows covering it of softmax(logits). Probabilities are averaged, not logits.
    """
    spatial_dims = image.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"image must be (B, C, *S) with 2 or 3 spatial axes, got shape {tuple(image.shape)}")
    patch = _check_patch(patch_size, spatial_dims)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    padded, crop = _pad_to_patch(image, patch)
    size = padded.shape[2:]
    weight = gaussian_importance_map(patch, device=image.device) if gaussian else None
    regions, weight_sum = _window_grid(size, patch, overlap, weight, image.device)
    jobs = [(b, region) for b in range(image.shape[0]) for region in regions]
    output = None
    for first in _progress(range(0, len(jobs), sw_batch_size), progress, "windows"):
        batch = jobs[first : first + sw_batch_size]
        windows = torch.stack([padded[(b, slice(None), *region)] for b, region in batch])
        probs = _forward_probs(model, windows, mirror_axes, amp_dtype, memory_format)
        if output is None:
            output = torch.zeros((image.shape[0], probs.shape[1], *size), dtype=torch.float32, device=image.device)
        for (b, region), window_probs in zip(batch, probs):
            target = output[(b, slice(None), *region)]
            if weight is None:
                target.add_(window_probs)
            else:
                target.addcmul_(window_probs, weight)
    output.div_(weight_sum)
    if padded is image:
        return output
    return output[crop].contiguous()


def _as_volume(image: np.ndarray | Tensor, device: torch.device | str) -> Tensor:
    """A case as a float32 tensor on ``device`` (copies numpy input, so read-only memmaps are fine)."""
    if isinstance(image, Tensor):
        volume = image.to(device=device, dtype=torch.float32)
    else:
        volume = torch.tensor(np.asarray(image), dtype=torch.float32, device=device)
    if volume.ndim != 3:
        raise ValueError(
            f"predict_case expects one case of 3 axes ((n_slices, H, W) for 2D, (X, Y, Z) for 3D), got shape "
            f"{tuple(volume.shape)}; drop singleton axes first"
        )
    return volume


def _predict_slices(
    model: nn.Module,
    volume: Tensor,
    patch_size: Sequence[int] | None,
    batch_size: int,
    options: dict,
    progress: bool,
) -> Tensor:
    """(n_slices, H, W) -> (num_classes, n_slices, H, W): slices as (b, 1, H, W) batches, whole or windowed."""
    output = None
    for first in _progress(range(0, volume.shape[0], batch_size), progress, "slices"):
        slices = volume[first : first + batch_size, None]
        if patch_size is None:
            probs = _forward_probs(model, slices, **options)
        else:
            probs = sliding_window_predict(model, slices, patch_size, sw_batch_size=batch_size, **options)
        if output is None:
            output = torch.empty((probs.shape[1], *volume.shape), dtype=torch.float32, device=volume.device)
        output[:, first : first + slices.shape[0]] = probs.transpose(0, 1)
    return output


@torch.inference_mode()
def predict_case(
    model: nn.Module,
    image: np.ndarray | Tensor,
    spatial_dims: int,
    patch_size: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    tta_axes: Sequence[int] = (),
    batch_size: int = 8,
    overlap: float = 0.5,
    progress: bool = False,
    memory_format: torch.memory_format | None = None,
    gaussian: bool = True,
) -> Tensor:
    """Softmax probabilities for one case; the model must already be on ``device`` and in eval mode.

    Args:
        image: one case, any float dtype (converted to float32 on ``device``).
            2D model: (n_slices, H, W), the stacked slices of a case; each slice is run as (b, 1, H, W),
            ``batch_size`` slices per forward pass, whole (the model pads internally) unless ``patch_size``
            (H, W) is given, in which case each batch of slices is windowed like a 3D volume.
            3D model: (X, Y, Z), run by :func:`sliding_window_predict` with ``patch_size`` (required) and
            ``batch_size`` windows per forward pass.
        spatial_dims: 2 or 3, the model's spatial dims.
        tta_axes: mirror TTA over these spatial axes of the *model input*, 0-based: for 2D over (H, W), for 3D
            over (X, Y, Z). Probabilities are averaged over all 2**k flip combinations (flip the input, predict,
            flip the output back); in 3D this is done per window.
        amp_dtype, overlap, progress, memory_format, gaussian: as in :func:`sliding_window_predict`.

    Returns:
        2D: (num_classes, n_slices, H, W); 3D: (num_classes, X, Y, Z). float32 probabilities on ``device``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _flip_combinations(tta_axes, spatial_dims)  # validate before any work
    volume = _as_volume(image, device)
    options = {"mirror_axes": tuple(tta_axes), "amp_dtype": amp_dtype, "memory_format": memory_format}
    if spatial_dims == 2:
        if patch_size is not None:
            options.update(overlap=overlap, gaussian=gaussian)
        return _predict_slices(model, volume, patch_size, batch_size, options, progress)
    if patch_size is None:
        raise ValueError("3D prediction needs patch_size (the training patch size, e.g. from the run's config.json)")
    probs = sliding_window_predict(
        model, volume[None, None], patch_size, overlap, batch_size, gaussian, progress=progress, **options
    )
    return probs[0]


def validate_cases(model: nn.Module, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], spatial_dims: int,
                   loss_fn: nn.Module | None = None, progress: bool = False, **predict_options) -> dict[str, float]:
    """The validation metric train.py selects best.pt by: hard Dice per case and class (2D: the case's stacked
    slices), averaged over cases, and `loss_fn` on each whole case.

    Returns {"val_loss", "dice_mean_fg", "dice_<class>" for each foreground class}. The model is put in eval mode;
    `predict_options` go to :func:`predict_case` (patch_size, device, amp_dtype, batch_size, ...).
    """
    model.eval()
    dice_rows, loss_sum = [], 0.0
    for image, label in _progress(list(zip(images, labels)), progress, "validate"):
        probs = predict_case(model, image, spatial_dims, **predict_options)
        if loss_fn is not None:
            target = torch.from_numpy(np.asarray(label, dtype=np.int64)).to(probs.device)
            # softmax(log p) == p, so a loss that takes logits applies to probabilities through their log.
            loss_sum += float(loss_fn(torch.log(probs.clamp_min(1e-8))[None], target[None]))
        dice_rows.append(metrics.dice_per_class(probs.argmax(0).cpu().numpy(), np.asarray(label), len(CLASS_NAMES)))
    summary = metrics.summarise(np.array(dice_rows), CLASS_NAMES)
    row = {"val_loss": loss_sum / len(dice_rows) if loss_fn is not None else math.nan,
           "dice_mean_fg": summary["mean_foreground"]}
    row.update({f"dice_{name}": summary["mean"][name] for name in CLASS_NAMES[1:]})
    return row
