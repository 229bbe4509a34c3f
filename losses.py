"""Training losses: weighted soft Dice, cross-entropy, Dice + CE, and a deep-supervision wrapper.

Every loss takes logits (B, C, *S) of any float dtype and an int64 target (B, *S) with values in
0..C-1, works for 2D and 3D alike (reductions over range(2, ndim)), and returns a float32 scalar.
The softmax is applied exactly once, here: the model returns logits. The arithmetic runs in
float32 even under bf16/fp16 autocast, because sums over ~10^6 voxels lose too much in 16 bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("dice", "ce", "dicece")
DEFAULT_EPS = 1e-5


def default_class_weights(num_classes: int = 6) -> torch.Tensor:
    """The seed project's Dice weights: (1, 2, ..., C) / sum, i.e. [1, 2, 3, 4, 5, 6] / 21 for 6 classes.

    Later (smaller) classes weigh more: background 1/21, prostate 6/21. float32 (C,).
    """
    weights = torch.arange(1, num_classes + 1, dtype=torch.float32)
    return weights / weights.sum()


def inverse_frequency_weights(label_counts: Sequence[float] | torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Class weights proportional to count ** -power, normalised to sum 1. float32 (C,).

    label_counts: voxels per class over the training labels, e.g. np.bincount(labels.ravel(), minlength=6).
    power: 1 for inverse frequency, 0.5 for inverse square root (milder).
    A class absent from the training labels is counted as one voxel rather than dividing by zero.
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError(f"label_counts must be non-negative voxel counts per class, got {counts.tolist()}")
    weights = counts.clamp(min=1.0) ** -power
    return (weights / weights.sum()).float()


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim < 3 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, {num_classes}, *spatial), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must be (B, *spatial) = {(logits.shape[0], *logits.shape[2:])}, got "
                         f"{tuple(target.shape)} (squeeze the channel axis of the label batch)")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (B, *S) -> float32 (B, C, *S); all C channels, whatever classes the batch holds."""
    return F.one_hot(target, num_classes).movedim(-1, 1).float()


def _as_weights(class_weights: Sequence[float] | torch.Tensor | None, num_classes: int) -> torch.Tensor:
    if class_weights is None:
        return default_class_weights(num_classes)
    weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if weights.numel() != num_classes or bool((weights < 0).any()):
        raise ValueError(f"class_weights needs {num_classes} non-negative values, got {weights.tolist()}")
    return weights


def soft_dice_per_class(
    probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool = True, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Soft Dice (2 sum(p g) + eps) / (sum p + sum g + eps) per class.

    probs, onehot: float (B, C, *S). batch_dice: sum over batch and space -> (C,);
    otherwise sum over space only -> (B, C). A class absent from both scores 1 (no penalty).
    """
    dims = tuple(range(2, probs.ndim))
    if batch_dice:
        dims = (0, *dims)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (2.0 * intersection + eps) / (denominator + eps)


class DiceLoss(nn.Module):
    """1 - weighted mean over classes of the soft Dice of softmax(logits) against one-hot(target).

    class_weights: (C,) non-negative; None -> default_class_weights (the normalised [1..6] / 21).
        Renormalised over the classes kept, so only their ratios matter.
    include_background: keep class 0 in the mean (the softmax always spans all classes).
    batch_dice: one Dice per class over the whole batch (stable with rare classes and small batches);
        False averages per-sample Dice over the batch.
    """

    def __init__(
        self,
        num_classes: int = 6,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        include_background: bool = True,
        batch_dice: bool = True,
        eps: float = DEFAULT_EPS,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.eps = eps
        weights = _as_weights(class_weights, num_classes)
        if not include_background:
            weights = weights[1:]
        if float(weights.sum()) <= 0:
            raise ValueError("class_weights of the classes kept sum to zero; nothing would be trained")
        # A buffer follows loss.to(device); not persistent, as the weights come from the config.
        self.register_buffer("weights", weights / weights.sum(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C, *S) float, target (B, *S) int64 -> float32 scalar in [0, 1]."""
        _check_inputs(logits, target, self.num_classes)
        return self.from_probs(torch.softmax(logits.float(), dim=1), target)

    def from_probs(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Same loss from float32 softmax probabilities (B, C, *S), for DiceCELoss to share the softmax."""
        start = 0 if self.include_background else 1
        dice = soft_dice_per_class(probs[:, start:], one_hot(target, self.num_classes)[:, start:],
                                   self.batch_dice, self.eps)
        return 1.0 - (dice * self.weights).sum(-1).mean()


class CrossEntropyLoss(nn.Module):
    """Mean voxel cross-entropy of logits (B, C, *S) against target (B, *S), optionally class-weighted.

    With class_weights, PyTorch's weighted mean divides by the summed weights of the target voxels,
    so the scale of the weights does not matter.
    """

    def __init__(self, num_classes: int = 6, class_weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        weights = None if class_weights is None else _as_weights(class_weights, num_classes)
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C, *S) float, target (B, *S) int64 -> float32 scalar."""
        _check_inputs(logits, target, self.num_classes)
        return self.from_log_probs(torch.log_softmax(logits.float(), dim=1), target)

    def from_log_probs(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Same loss from float32 log-softmax (B, C, *S)."""
        return F.nll_loss(log_probs, target, weight=self.weights)


class DiceCELoss(nn.Module):
    """lambda_dice * DiceLoss + lambda_ce * CrossEntropyLoss, sharing one log-softmax."""

    def __init__(self, dice: DiceLoss, ce: CrossEntropyLoss, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        if dice.num_classes != ce.num_classes:
            raise ValueError(f"DiceLoss has {dice.num_classes} classes but CrossEntropyLoss {ce.num_classes}")
        self.num_classes = dice.num_classes
        self.dice = dice
        self.ce = ce
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C, *S) float, target (B, *S) int64 -> float32 scalar."""
        _check_inputs(logits, target, self.num_classes)
        log_probs = torch.log_softmax(logits.float(), dim=1)
        dice = self.dice.from_probs(log_probs.exp(), target)
        return self.lambda_dice * dice + self.lambda_ce * self.ce.from_log_probs(log_probs, target)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss` over deep-supervision outputs [full, 1/2, 1/4, ...] (UNet in training mode).

    Output k is compared with the target taken at every 2**k-th voxel along each spatial axis
    (nearest neighbour: labels are never interpolated), which is the voxel at the corner of the
    2**k cell that output k covers. weights: one per output; None -> 2**-k, normalised to sum 1.
    A plain tensor (eval mode, or a model without deep supervision) goes straight to `loss`.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """outputs: logits (B, C, *S) or a list of them at S, ceil(S/2), ...; target (B, *S) int64."""
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights if self.weights is not None else [2.0**-k for k in range(len(outputs))]
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} deep-supervision outputs but {len(weights)} weights")
        total = sum(weights)
        terms = []
        for k, (logits, weight) in enumerate(zip(outputs, weights)):
            stride = 2**k
            sub_target = target[(slice(None), *(slice(None, None, stride) for _ in target.shape[1:]))]
            if sub_target.shape[1:] != logits.shape[2:]:
                raise ValueError(f"deep-supervision output {k} has spatial shape {tuple(logits.shape[2:])}, "
                                 f"expected {tuple(sub_target.shape[1:])} (ceil of target shape / {stride})")
            terms.append(self.loss(logits, sub_target) * (weight / total))
        return torch.stack(terms).sum()


def make_loss(
    name: str,
    num_classes: int = 6,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    weighted_ce: bool = False,
    include_background: bool = True,
    batch_dice: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> nn.Module:
    """Build a loss by name: "dice", "ce" or "dicece".

    class_weights weight the Dice term (None -> default_class_weights); cross-entropy is unweighted
    unless weighted_ce, in which case it uses the same class_weights (None -> the default ones).
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss name must be one of {LOSS_NAMES}, got {name!r}")
    ce_weights = _as_weights(class_weights, num_classes) if weighted_ce else None
    if name == "ce":
        return CrossEntropyLoss(num_classes, ce_weights)
    dice = DiceLoss(num_classes, class_weights, include_background, batch_dice, eps)
    if name == "dice":
        return dice
    return DiceCELoss(dice, CrossEntropyLoss(num_classes, ce_weights), lambda_dice, lambda_ce)
