"""One UNet for 2D and 3D segmentation: small named blocks, layers picked by `spatial_dims`.

The figure, for features (f0, f1, ..., fL):

    x -> DoubleConv(in, f0) ----------------------------------------> Up(f1, f0) -> 1x1 conv -> logits
              Down(f0, f1) ------------------------------> Up(f2, f1)
                  ...                                 ...
                      Down(f(L-1), fL)  (bottleneck)  ->

Every resolution step halves each spatial axis, so the model pads its input to a multiple of
2 ** (len(features) - 1) and crops the logits back: output spatial shape == input spatial shape.
The model returns logits; the softmax belongs to the loss and to inference, never to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils import channels_last_format


class _ChannelsLastInstanceNorm:
    """Instance norm that keeps channels-last inputs channels-last. torch's instance norm views (B, C, *S) as
    (1, B*C, *S), which a channels-last tensor is not, so it copies to contiguous and back (30% of a 3D training
    step here). The same arithmetic on the tensor as it lies: batch norm over each sample alone when training;
    group norm with one group per channel without gradients (half the time, but its backward is 10x slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.is_contiguous() or self.track_running_stats
                or x.ndim != self._get_no_batch_dim() + 1):
            return super().forward(x)  # measured on CPUs only; cuDNN has its own channels-last kernels
        if not torch.is_grad_enabled():
            return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        return torch.cat([F.batch_norm(sample, None, None, self.weight, self.bias, True, 0.0, self.eps)
                          for sample in x.split(1)])


class InstanceNorm2d(_ChannelsLastInstanceNorm, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_ChannelsLastInstanceNorm, nn.InstanceNorm3d):
    pass


class UpConv(nn.Module):
    """Transposed convolution with kernel 2 and stride 2, (B, in, *S) -> (B, out, *2S), as one matrix product.

    Each input voxel feeds its own 2x2(x2) output block, so the layer is a (in -> 2**d * out) linear map per
    voxel followed by a reshuffle. Done so, forward and backward take half the time of torch's
    ConvTranspose2d/3d on a CPU, whose backward runs at ~10-30% of matmul speed at these sizes. The parameters
    are those of ConvTranspose (weight (in, out, 2, 2[, 2]), bias (out)): the same init and checkpoints.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        _layers(spatial_dims)  # checks spatial_dims
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, *[2] * spatial_dims))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ConvTranspose's own default initialisation (UNet replaces it with init_weights)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(self.weight)[0])
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, (batch, _, *size), out = self.spatial_dims, x.shape, self.weight.shape[1]
        # (in, out, k0, k1, ..) -> (in, k0, k1, .., out): output channel fastest, as channels-last wants.
        weight = self.weight.movedim(1, -1).reshape(self.weight.shape[0], -1)
        y = F.linear(x.movedim(1, -1), weight.t(), self.bias.repeat(2**d))  # (B, *S, 2**d * out)
        # (B, S0, S1, .., k0, k1, .., out) -> (B, S0, k0, S1, k1, .., out) -> (B, 2 S0, 2 S1, .., out)
        order = [0, *(axis for i in range(d) for axis in (1 + i, 1 + d + i)), 1 + 2 * d]
        y = y.view(batch, *size, *[2] * d, out).permute(order).reshape(batch, *(2 * s for s in size), out)
        y = y.movedim(-1, 1)  # channels-last strides
        return y if x.is_contiguous(memory_format=channels_last_format(d)) else y.contiguous()


# One lookup per dimension, so there is no 2D copy of the 3D code.
_LAYERS: dict[int, dict[str, type[nn.Module]]] = {
    2: {"conv": nn.Conv2d, "pool": nn.MaxPool2d, "batch": nn.BatchNorm2d, "instance": InstanceNorm2d},
    3: {"conv": nn.Conv3d, "pool": nn.MaxPool3d, "batch": nn.BatchNorm3d, "instance": InstanceNorm3d},
}
NORMS = ("batch", "instance")
ACTIVATIONS = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01


def _layers(spatial_dims: int) -> dict[str, type[nn.Module]]:
    if spatial_dims not in _LAYERS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return _LAYERS[spatial_dims]


def _make_norm(spatial_dims: int, norm: str, channels: int) -> nn.Module:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "instance":
        # affine=True gives instance norm a learnable scale and shift, like batch norm.
        return _layers(spatial_dims)["instance"](channels, affine=True)
    return _layers(spatial_dims)["batch"](channels)


def _make_act(act: str) -> nn.Module:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return nn.ReLU(inplace=True) if act == "relu" else nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


class DoubleConv(nn.Sequential):
    """(B, in, *S) -> [conv3 -> norm -> act] x 2 -> (B, out, *S)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", act: str = "relu"):
        conv = _layers(spatial_dims)["conv"]
        # No conv bias: the normalisation that follows would cancel it.
        super().__init__(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            _make_norm(spatial_dims, norm, out_channels),
            _make_act(act),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            _make_norm(spatial_dims, norm, out_channels),
            _make_act(act),
        )


class Down(nn.Sequential):
    """(B, in, *S) -> maxpool 2 -> DoubleConv -> (B, out, *S/2)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", act: str = "relu"):
        super().__init__(
            _layers(spatial_dims)["pool"](kernel_size=2),
            DoubleConv(spatial_dims, in_channels, out_channels, norm, act),
        )


class Up(nn.Module):
    """(B, in, *S/2) -> transposed conv 2 -> cat skip (B, out, *S) -> DoubleConv -> (B, out, *S)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", act: str = "relu"):
        super().__init__()
        self.up = UpConv(spatial_dims, in_channels, out_channels)
        self.conv = DoubleConv(spatial_dims, 2 * out_channels, out_channels, norm, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """UNet for 2D or 3D: input (B, in_channels, *spatial) -> logits (B, num_classes, *spatial).

    Any spatial size works: the input is zero-padded at the high end of each axis to a multiple of
    2 ** (len(features) - 1) and the logits are cropped back. No softmax: the outputs are logits.

    Args:
        spatial_dims: 2 (input (B, C, H, W)) or 3 (input (B, C, X, Y, Z)).
        in_channels: image channels (1 for MR).
        num_classes: output channels, one per class (6 for HipMRI).
        features: channels per resolution level, top to bottom; len(features) - 1 poolings.
        norm: "batch" or "instance" (instance for small batches, e.g. 3D patches with batch 2).
        act: "relu" or "leaky_relu" (slope 0.01).
        deep_supervision: in training mode also return logits from the lower decoder levels, as a list
            [full, 1/2, 1/4, ...]; list element k has spatial size ceil(S / 2**k) per axis and covers
            input voxels [i * 2**k, (i + 1) * 2**k). In eval mode the model returns the full-resolution
            tensor only, so inference code never sees the list.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 6,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        norm: str = "batch",
        act: str = "relu",
        deep_supervision: bool = False,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels, got {features!r}")
        layers = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.features = features
        self.deep_supervision = deep_supervision
        self.divisor = 2 ** (len(features) - 1)
        self.stem = DoubleConv(spatial_dims, in_channels, features[0], norm, act)
        self.downs = nn.ModuleList(
            Down(spatial_dims, c_in, c_out, norm, act) for c_in, c_out in zip(features[:-1], features[1:])
        )
        # Decoder from the bottom up: ups[0] leaves the bottleneck, ups[-1] reaches full resolution.
        self.ups = nn.ModuleList(
            Up(spatial_dims, c_in, c_out, norm, act) for c_in, c_out in zip(features[:0:-1], features[-2::-1])
        )
        self.head = layers["conv"](features[0], num_classes, kernel_size=1)
        # One extra head per decoder level below full resolution, ordered 1/2, 1/4, ... (bottleneck excluded).
        self.aux_heads = nn.ModuleList(
            layers["conv"](c, num_classes, kernel_size=1) for c in (features[1:-1] if deep_supervision else ())
        )
        init_weights(self, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x (B, in_channels, *S) float -> logits (B, num_classes, *S), or a list in deep-supervision training."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"UNet({self.spatial_dims}D) expects input (B, C, *spatial), got shape {tuple(x.shape)}")
        size = x.shape[2:]
        x = _pad_to_multiple(x, self.divisor)
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        decoded = []
        for up in self.ups:
            x = up(x, skips.pop())
            decoded.append(x)
        logits = _crop(self.head(x), size, 1)
        if not (self.deep_supervision and self.training):
            return logits
        # decoded[-1] is full resolution; decoded[-2] is 1/2, decoded[-3] is 1/4, ...
        aux = [_crop(head(decoded[-2 - k]), size, 2 ** (k + 1)) for k, head in enumerate(self.aux_heads)]
        return [logits, *aux]


def _pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad the high end of each spatial axis of (B, C, *S) up to a multiple of `divisor`."""
    # Floor division rather than (-s) % divisor: torch.compile with dynamic shapes (torch 2.13) fails
    # to lower the modulo once batch norm turns the padded size into a float.
    pads = [(s + divisor - 1) // divisor * divisor - s for s in x.shape[2:]]
    if not any(pads):
        return x
    # F.pad takes (low, high) pairs starting from the last axis.
    pad_arg = [p for high in reversed(pads) for p in (0, high)]
    return F.pad(x, pad_arg)


def _crop(x: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
    """Crop (B, C, *S') to the ceil(size / stride) voxels that cover the unpadded input."""
    # Integer ceiling division: exact, and stays an integer expression when torch.compile traces
    # dynamic shapes (math.ceil(s / stride) would go through a float).
    keep = tuple(slice(0, (s + stride - 1) // stride) for s in size)
    return x[(slice(None), slice(None), *keep)]


def init_weights(model: nn.Module, act: str = "relu") -> None:
    """Kaiming normal (fan_in) for conv and transposed-conv weights, zero biases, norm weights one."""
    nonlinearity, slope = ("relu", 0.0) if act == "relu" else ("leaky_relu", LEAKY_SLOPE)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, UpConv)):
            nn.init.kaiming_normal_(module.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
