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
        return _DiceCE.apply(logits, target, self)

    def composed(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The same loss from DiceLoss and CrossEntropyLoss through autograd: the reference the tests hold
        forward() to."""
        log_probs = torch.log_softmax(logits.float(), dim=1)
        dice = self.dice.from_probs(log_probs.exp(), target)
        return self.lambda_dice * dice + self.lambda_ce * self.ce.from_log_probs(log_probs, target)


class _DiceCE(torch.autograd.Function):
    """Dice + CE of DiceCELoss with its gradient written out: one softmax, no one-hot tensor, and a backward of a
    few passes over (B, C, *S) instead of autograd's dozen: the default 2D step takes 6 ms (2.4%) less.

    With p = softmax(z), per Dice group m (the batch, or each sample) and class c: I = sum of p_c over the voxels
    labelled c, D = sum p_c + #voxels labelled c + eps, dice = (2 I + eps) / D. The Dice term's gradient in p_c
    at voxel v is a_c + b_c [t_v = c], with a_c = lambda w_c dice / (M D) and b_c = -2 lambda w_c / (M D)
    (M groups); through the softmax, dz_c = p_c (g_c - sum_k p_k g_k). Cross-entropy adds omega_v (p_c - [t_v = c])
    with omega_v = 1 / #voxels, or w_t / sum of w_t over voxels when weighted.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, loss: DiceCELoss) -> torch.Tensor:
        label = target.unsqueeze(1)
        log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32)
        probs = log_probs.exp()
        p_true, log_p_true = probs.gather(1, label), log_probs.gather(1, label)
        del log_probs
        batch, classes = probs.shape[:2]
        flat_label, spatial = target.reshape(batch, -1), tuple(range(2, probs.ndim))
        inter = probs.new_zeros(batch, classes).scatter_add_(1, flat_label, p_true.reshape(batch, -1))
        count = probs.new_zeros(batch, classes).scatter_add_(1, flat_label, torch.ones_like(p_true).reshape(batch, -1))
        psum = probs.sum(spatial)
        dice_loss = loss.dice
        if dice_loss.batch_dice:
            inter, count, psum = inter.sum(0, keepdim=True), count.sum(0, keepdim=True), psum.sum(0, keepdim=True)
        denominator = psum + count + dice_loss.eps
        dice = (2.0 * inter + dice_loss.eps) / denominator
        weights = torch.zeros(classes, dtype=torch.float32, device=probs.device)
        weights[classes - dice_loss.weights.numel():] = dice_loss.weights  # 0 for a left-out background
        dice_term = 1.0 - (dice * weights).sum(-1).mean()
        if loss.ce.weights is None:
            voxel_weight = torch.full_like(p_true, 1.0 / p_true.numel())
        else:
            voxel_weight = loss.ce.weights[label]
            voxel_weight = voxel_weight / voxel_weight.sum()
        ce_term = -(voxel_weight * log_p_true).sum()
        groups = dice.shape[0]
        scale = loss.lambda_dice * weights / (groups * denominator)
        ctx.save_for_backward(probs, label, p_true, voxel_weight, scale * dice, -2.0 * scale)
        ctx.lambda_ce, ctx.dtype = loss.lambda_ce, logits.dtype
        return loss.lambda_dice * dice_term + loss.lambda_ce * ce_term

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        probs, label, p_true, voxel_weight, a, b = ctx.saved_tensors
        shape = (a.shape[0], a.shape[1], *[1] * (probs.ndim - 2))
        a, b = (grad_output * a).view(shape), (grad_output * b).view(shape)
        b_true = b.expand(probs.shape).gather(1, label)
        ce = (grad_output * ctx.lambda_ce) * voxel_weight
        # Every full-size product is formed from probs, so it keeps probs' (channels-last) layout: mixing
        # layouts in one elementwise op is several times slower on a CPU.
        grad = probs * a
        grad.addcmul_(probs, ce - grad.sum(1, keepdim=True) - p_true * b_true)
        grad.scatter_add_(1, label, p_true * b_true - ce)
        return grad.to(ctx.dtype), None, None


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
