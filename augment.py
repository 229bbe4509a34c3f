"""Data augmentation on the training device: one function for 2D and 3D batches.

`augment_batch(image, label, generator, cfg)` takes a batch that already lives on the device
(image float (B, 1, *S), label int64 (B, *S)) and returns a new one of the same shapes. Spatial
transforms move image and label together (the label by nearest neighbour, so no false classes
appear at borders); intensity transforms touch the image only. Every random number comes from
`generator`, which must live on the batch's device, so a seeded generator reproduces a batch exactly.
On a GPU nothing here reads a value back to the host (no `.item()`, `nonzero()` or `if tensor`): each would
stall the host until the queued training step had finished. Where the CPU skips work for samples that were not
drawn, a GPU does it for the whole batch and masks the result, which gives the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """What to do to each sample. Probabilities are per sample (flips: per sample and axis); 0 switches a part off.

    Intensity amounts are in z-score units (images are standardised before they reach the device).
    Defaults are mild on purpose: the anatomy and its appearance vary little between scanners of one study.
    """

    flip_axes: tuple[int, ...] = (0,)  # spatial axes that may be mirrored; 0 = nibabel x (left-right in HipMRI)
    flip_prob: float = 0.5
    rotate_prob: float = 0.2
    max_rotate_degrees: float = 10.0  # in the plane of spatial axes 0 and 1 (3D: the finely sampled x-y plane)
    scale_prob: float = 0.2
    scale_range: tuple[float, float] = (0.9, 1.1)  # zoom factor; > 1 enlarges the anatomy
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.8, 1.25)  # exponent applied to the image rescaled to [0, 1]
    bias_prob: float = 0.15
    bias_strength: float = 0.2  # std of the log gain of a smooth multiplicative field (MR coil shading)
    contrast_prob: float = 0.3
    contrast_range: tuple[float, float] = (0.9, 1.1)  # factor on the deviation from the sample's mean
    brightness_prob: float = 0.3
    brightness_shift: float = 0.1  # offset drawn from [-shift, shift]
    noise_prob: float = 0.15
    noise_std: float = 0.05  # Gaussian noise std drawn from [0, noise_std]


def augment_batch(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator,
                  cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, rotate, scale and re-shade a batch; never changes shapes, dtypes or devices.

    image: float (B, 1, *S), label: int64 (B, *S), S = (H, W) or (X, Y, Z); `generator` on image.device.
    The input tensors are not modified.
    """
    spatial_dims = image.ndim - 2
    if label.shape != image.shape[:1] + image.shape[2:]:
        raise ValueError(f"augment_batch: label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
    if any(axis < 0 or axis >= spatial_dims for axis in cfg.flip_axes):
        raise ValueError(f"AugmentConfig.flip_axes {cfg.flip_axes}: spatial axes of a {spatial_dims}D batch are "
                         f"0..{spatial_dims - 1}")
    image, label = _random_affine(image, label, generator, cfg)
    image, label = _random_flips(image, label, generator, cfg)
    return _random_intensity(image, generator, cfg), label


def _flags_readable(device: torch.device) -> bool:
    """Whether reading a tensor's values on the host is free: on the CPU; on a GPU it is a device-to-host sync."""
    return device.type == "cpu"


def _none_chosen(chosen: torch.Tensor) -> bool:
    """True when no sample is chosen and that can be known without a sync (tensors on the CPU); elsewhere False,
    and the caller does the work for every sample, masked by `chosen`."""
    return _flags_readable(chosen.device) and not bool(chosen.any())


def _chosen(batch: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Bool (B,): which samples get a transform applied with probability `prob`."""
    return torch.rand(batch, generator=generator, device=generator.device) < prob


def _uniform(batch: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, device=generator.device)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against a (B, ...) tensor of `ndim` dimensions."""
    return values.view(-1, *([1] * (ndim - 1)))


def _random_flips(image, label, generator, cfg):
    for axis in cfg.flip_axes:
        flip = _chosen(image.shape[0], cfg.flip_prob, generator)
        image = torch.where(_per_sample(flip, image.ndim), image.flip(axis + 2), image)
        label = torch.where(_per_sample(flip, label.ndim), label.flip(axis + 1), label)
    return image, label


def _random_affine(image, label, generator, cfg):
    """Rotation in the plane of spatial axes 0-1 and isotropic scaling, applied only to the samples drawn."""
    batch = image.shape[0]
    rotate = _chosen(batch, cfg.rotate_prob, generator)
    scale = _chosen(batch, cfg.scale_prob, generator)
    angles = _uniform(batch, -1.0, 1.0, generator) * math.radians(cfg.max_rotate_degrees) * rotate
    factors = torch.where(scale, _uniform(batch, *cfg.scale_range, generator), torch.ones_like(angles))
    chosen = rotate | scale
    if _flags_readable(image.device):  # resample only the samples drawn
        index = chosen.nonzero().squeeze(1)
        if index.numel() == 0:
            return image, label
    else:  # resample all and keep the drawn ones: picking them out would need their count on the host
        index = torch.arange(batch, device=image.device)
    theta = _sampling_matrices(angles[index], factors[index], image.shape[2:])
    grid = F.affine_grid(theta, [len(index), 1, *image.shape[2:]], align_corners=False)
    # Resample (image - min) with zero padding so the corners brought in by a rotation look like background.
    part, part_label = image[index], label[index]
    low = part.amin(dim=tuple(range(1, part.ndim)), keepdim=True)
    moved = F.grid_sample(part - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    moved_label = F.grid_sample(part_label.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False).squeeze(1).round().long()
    keep = chosen[index]
    image, label = image.clone(), label.clone()
    image[index] = torch.where(_per_sample(keep, part.ndim), moved.to(image.dtype), part)
    label[index] = torch.where(_per_sample(keep, part_label.ndim), moved_label, part_label)
    return image, label


def _sampling_matrices(angles: torch.Tensor, factors: torch.Tensor, spatial_shape) -> torch.Tensor:
    """(N, d, d+1) matrices for `affine_grid`: output -> input coordinates, rotation and zoom in pixel units.

    affine_grid works in [-1, 1] coordinates per axis, listed last axis first; rotating there would shear a
    non-square image, so the rotation is built in pixel units and conjugated by the per-axis half sizes.
    """
    n, dims = len(angles), len(spatial_shape)
    matrix = torch.eye(dims, device=angles.device).repeat(n, 1, 1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, -sin, sin, cos
    matrix = matrix / factors.view(n, 1, 1)  # zoom in by f: output pixel p reads input p / f
    # Made on the host and sent without blocking: torch.tensor(..., device=cuda) would wait for the queued kernels.
    half = torch.tensor([s / 2 for s in spatial_shape], dtype=matrix.dtype).to(angles.device, non_blocking=True)
    matrix = matrix * half.view(1, 1, dims) / half.view(1, dims, 1)  # diag(1/half) @ M @ diag(half)
    matrix = matrix.flip(1).flip(2)  # tensor-axis order -> affine_grid's (x=last axis, y, z) order
    return torch.cat([matrix, torch.zeros(n, dims, 1, device=angles.device, dtype=matrix.dtype)], dim=2)


def _random_intensity(image, generator, cfg):
    batch, ndim = image.shape[0], image.ndim
    reduce = tuple(range(1, ndim))
    low = image.amin(dim=reduce, keepdim=True)
    high = image.amax(dim=reduce, keepdim=True)
    gamma = torch.where(_chosen(batch, cfg.gamma_prob, generator), _uniform(batch, *cfg.gamma_range, generator),
                        torch.ones(batch, device=image.device))
    unit = ((image - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    image = torch.where(_per_sample(gamma != 1, ndim), unit ** _per_sample(gamma, ndim) * (high - low) + low, image)
    image = _random_bias_field(image, low, generator, cfg)
    contrast = torch.where(_chosen(batch, cfg.contrast_prob, generator),
                           _uniform(batch, *cfg.contrast_range, generator), torch.ones(batch, device=image.device))
    mean = image.mean(dim=reduce, keepdim=True)
    image = (image - mean) * _per_sample(contrast, ndim) + mean
    shift = _uniform(batch, -cfg.brightness_shift, cfg.brightness_shift, generator)
    image = image + _per_sample(shift * _chosen(batch, cfg.brightness_prob, generator), ndim)
    sigma = _uniform(batch, 0.0, cfg.noise_std, generator) * _chosen(batch, cfg.noise_prob, generator)
    if not _none_chosen(sigma > 0):  # the last draw of a batch: skipping it changes no other
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        image = image + noise * _per_sample(sigma, ndim)
    return image


def _random_bias_field(image, low, generator, cfg):
    """Multiply (image - min) by exp(smooth field): the slow shading of MR receive coils."""
    batch, spatial_dims = image.shape[0], image.ndim - 2
    chosen = _chosen(batch, cfg.bias_prob, generator)
    # Drawn whether or not any sample is chosen, so that the draws after it are the same on every device.
    coarse = torch.randn((batch, 1) + (4,) * spatial_dims, generator=generator, device=image.device)
    if _none_chosen(chosen):
        return image
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    field = F.interpolate(coarse, size=image.shape[2:], mode=mode, align_corners=True)
    shaded = (image - low) * torch.exp(cfg.bias_strength * field).to(image.dtype) + low
    return torch.where(_per_sample(chosen, image.ndim), shaded, image)  # (image - low) + low is not always image
