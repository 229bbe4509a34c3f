"""Tests for inference.py: window placement, Gaussian weights, sliding window vs direct passes and MONAI, TTA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from inference import gaussian_importance_map, predict_case, sliding_window_predict, window_starts

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def tiny_net(spatial_dims: int, kernel: int = 3, num_classes: int = 6, seed: int = 0) -> nn.Module:
    """Two zero-padded convs: with kernel 3, windows disagree near their borders (not flip-invariant either);
    with kernel 1 the model is pointwise, hence translation-equivariant and flip-invariant."""
    conv = CONV[spatial_dims]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            conv(1, 4, kernel, padding=kernel // 2), nn.Tanh(), conv(4, num_classes, kernel, padding=kernel // 2)
        )
        for param in model.parameters():  # sharper logits so that probabilities vary over the volume
            param.data.mul_(3.0)
    return model.eval()


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def direct(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(image), dim=1)


def flip_average(model: nn.Module, image: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Hand-written mirror TTA over spatial axes of (B, C, *S): mean over all flip subsets."""
    dims = [a + 2 for a in axes]
    combos = [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]
    total = sum(direct(model, image.flip(c)).flip(c) for c in combos)
    return total / len(combos)


@pytest.mark.parametrize(
    "size, patch, overlap, expected",
    [
        (256, 128, 0.5, [0, 64, 128]),
        (128, 128, 0.5, [0]),
        (100, 64, 0.5, [0, 18, 36]),
        (144, 64, 0.5, [0, 27, 53, 80]),
        (256, 128, 0.0, [0, 128]),
        (130, 128, 0.0, [0, 2]),
    ],
)
def test_window_starts_known_values(size, patch, overlap, expected):
    starts = window_starts(size, patch, overlap)
    assert starts == expected
    assert max(np.diff(starts), default=0) <= patch * (1 - overlap)


@pytest.mark.parametrize("patch_size", [(16, 10), (7, 10, 16)])
def test_gaussian_map_matches_monai(patch_size):
    compute_importance_map = pytest.importorskip("monai.data.utils").compute_importance_map
    ours = gaussian_importance_map(patch_size)
    theirs = compute_importance_map(patch_size, mode="gaussian", sigma_scale=0.125)
    assert ours.shape == patch_size and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert ours.min() >= 1e-3 and ours.max() <= 1.0
    assert gaussian_importance_map(patch_size) is ours  # cached


@pytest.mark.parametrize("spatial_dims, size", [(2, (24, 20)), (3, (12, 10, 8))])
def test_one_window_equals_direct_pass(spatial_dims, size):
    model, image = tiny_net(spatial_dims), rand(2, 1, *size)
    probs = sliding_window_predict(model, image, size, overlap=0.5, sw_batch_size=3)
    assert probs.shape == (2, 6, *size) and probs.dtype == torch.float32
    assert torch.allclose(probs, direct(model, image), atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("spatial_dims, size, patch", [(2, (37, 29), (16, 12)), (3, (21, 17, 13), (8, 8, 6))])
def test_pointwise_model_any_overlap_equals_direct_pass(spatial_dims, size, patch, overlap):
    """Every window gives the same probabilities at a voxel, so only correct weight normalisation returns them."""
    model, image = tiny_net(spatial_dims, kernel=1), rand(1, 1, *size)
    probs = sliding_window_predict(model, image, patch, overlap=overlap, sw_batch_size=5)
    assert torch.allclose(probs, direct(model, image), atol=1e-5)


@pytest.mark.parametrize("spatial_dims, size, patch", [(2, (32, 16), (16, 8)), (3, (16, 8, 12), (8, 4, 6))])
def test_overlap_zero_tiles_exactly(spatial_dims, size, patch):
    """Windows tiling the volume without overlap: each tile is the direct pass over that tile alone."""
    model, image = tiny_net(spatial_dims), rand(1, 1, *size)
    probs = sliding_window_predict(model, image, patch, overlap=0.0, sw_batch_size=3)
    for corner in itertools.product(*(range(0, s, p) for s, p in zip(size, patch))):
        region = (slice(None), slice(None), *(slice(c, c + p) for c, p in zip(corner, patch)))
        assert torch.allclose(probs[region], direct(model, image[region]), atol=1e-6)


@pytest.mark.parametrize("gaussian, overlap", [(True, 0.5), (False, 0.25)])
@pytest.mark.parametrize("spatial_dims, size, patch", [(2, (40, 64), (16, 16)), (3, (40, 20, 40), (16, 8, 16))])
def test_matches_monai_sliding_window_inference(spatial_dims, size, patch, gaussian, overlap):
    """Sizes where MONAI's regular stride and our even spacing give the same windows (size - patch is a multiple
    of patch * (1 - overlap)); MONAI averages the predictor's output, so it is given softmax(model(x))."""
    sliding_window_inference = pytest.importorskip("monai.inferers").sliding_window_inference
    model, image = tiny_net(spatial_dims), rand(2 if spatial_dims == 2 else 1, 1, *size)
    ours = sliding_window_predict(model, image, patch, overlap=overlap, sw_batch_size=5, gaussian=gaussian)
    with torch.no_grad():
        theirs = sliding_window_inference(
            image,
            patch,
            5,
            lambda x: torch.softmax(model(x), dim=1),
            overlap=overlap,
            mode="gaussian" if gaussian else "constant",
            sigma_scale=0.125,
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
    # The comparison only means something if the blending weights matter here.
    other = sliding_window_predict(model, image, patch, overlap=overlap, sw_batch_size=5, gaussian=not gaussian)
    assert (ours - other).abs().max() > 1e-3


@pytest.mark.parametrize("spatial_dims, size, patch", [(2, (33, 35), (40, 48)), (3, (33, 35, 37), (40, 40, 40))])
def test_smaller_than_patch_is_padded_and_cropped(spatial_dims, size, patch):
    model, image = tiny_net(spatial_dims), rand(1, 1, *size)
    probs = sliding_window_predict(model, image, patch)
    assert probs.shape == (1, 6, *size) and probs.is_contiguous()
    pads = [(p - s) // 2 for s, p in zip(size, patch)]
    pad_arg = [n for b, s, p in zip(reversed(pads), reversed(size), reversed(patch)) for n in (b, p - s - b)]
    expected = direct(model, torch.nn.functional.pad(image, pad_arg))
    crop = (slice(None), slice(None), *(slice(b, b + s) for b, s in zip(pads, size)))
    assert torch.allclose(probs, expected[crop], atol=1e-6)


def test_odd_sizes_partly_smaller_than_patch_match_monai():
    """(33, 35, 37) with patch (40, 16, 16): axis 0 padded, the others windowed with an exact step."""
    sliding_window_inference = pytest.importorskip("monai.inferers").sliding_window_inference
    model, image = tiny_net(3), rand(1, 1, 33, 40, 32)
    ours = sliding_window_predict(model, image, (40, 16, 16), overlap=0.5)
    with torch.no_grad():
        theirs = sliding_window_inference(
            image, (40, 16, 16), 4, lambda x: torch.softmax(model(x), dim=1), overlap=0.5, mode="gaussian"
        )
    assert ours.shape == (1, 6, 33, 40, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    odd = sliding_window_predict(model, rand(1, 1, 33, 35, 37), (40, 16, 16), overlap=0.5)
    assert odd.shape == (1, 6, 33, 35, 37)
    assert torch.allclose(odd.sum(1), torch.ones(1, 33, 35, 37), atol=1e-5)


@pytest.mark.parametrize("spatial_dims, shape, axes", [(2, (3, 20, 16), (0, 1)), (3, (12, 10, 8), (0, 1, 2))])
def test_tta_with_flip_invariant_model_is_unchanged(spatial_dims, shape, axes):
    model, image = tiny_net(spatial_dims, kernel=1), rand(*shape).numpy()
    patch = None if spatial_dims == 2 else (8, 8, 8)
    plain = predict_case(model, image, spatial_dims, patch_size=patch)
    mirrored = predict_case(model, image, spatial_dims, patch_size=patch, tta_axes=axes)
    assert torch.allclose(plain, mirrored, atol=1e-6)


@pytest.mark.parametrize("spatial_dims, shape, axes", [(2, (3, 20, 16), (0, 1)), (3, (12, 10, 8), (0, 2))])
def test_tta_equals_hand_flip_average_and_is_a_distribution(spatial_dims, shape, axes):
    model, image = tiny_net(spatial_dims), rand(*shape)
    patch = None if spatial_dims == 2 else shape  # one window, so per-window TTA is whole-volume TTA
    mirrored = predict_case(model, image, spatial_dims, patch_size=patch, tta_axes=axes, batch_size=2)
    plain = predict_case(model, image, spatial_dims, patch_size=patch, batch_size=2)
    if spatial_dims == 2:
        expected = flip_average(model, image[:, None], axes).transpose(0, 1)
    else:
        expected = flip_average(model, image[None, None], axes)[0]
    assert torch.allclose(mirrored, expected, atol=1e-6)
    assert (mirrored - plain).abs().max() > 1e-3
    assert torch.allclose(mirrored.sum(0), torch.ones(shape), atol=1e-5)
    assert mirrored.min() >= 0 and mirrored.max() <= 1


def test_tta_in_sliding_window_is_a_distribution():
    model, image = tiny_net(3), rand(1, 1, 20, 18, 12)
    probs = sliding_window_predict(model, image, (8, 8, 8), mirror_axes=(0, 1, 2))
    assert torch.allclose(probs.sum(1), torch.ones(1, 20, 18, 12), atol=1e-5)


def test_predict_case_2d_stack_equals_per_slice_passes():
    model = tiny_net(2)
    stack = rand(5, 256, 144).numpy().astype(np.float16)  # the cache may hold float16
    probs = predict_case(model, stack, spatial_dims=2, batch_size=2)
    assert probs.shape == (6, 5, 256, 144) and probs.dtype == torch.float32
    for i in range(5):
        one = torch.from_numpy(stack[i].astype(np.float32))[None, None]
        assert torch.allclose(probs[:, i], direct(model, one)[0], atol=1e-6)


def test_predict_case_2d_with_patch_windows_each_slice():
    model, stack = tiny_net(2), rand(3, 40, 24)
    probs = predict_case(model, stack, spatial_dims=2, patch_size=(16, 16), batch_size=2)
    expected = sliding_window_predict(model, stack[:, None], (16, 16), sw_batch_size=4)
    assert torch.allclose(probs, expected.transpose(0, 1), atol=1e-6)


def test_predict_case_3d_equals_sliding_window():
    model, volume = tiny_net(3), rand(20, 18, 12)
    probs = predict_case(
        model, volume, spatial_dims=3, patch_size=(8, 8, 8), memory_format=torch.channels_last, progress=True
    )
    assert probs.shape == (6, 20, 18, 12)
    assert torch.allclose(probs, sliding_window_predict(model, volume[None, None], (8, 8, 8))[0], atol=1e-6)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (4, 32, 24)), (3, (16, 16, 12))])
def test_bfloat16_autocast_is_close_to_float32(spatial_dims, shape):
    model, image = tiny_net(spatial_dims), rand(*shape)
    patch = None if spatial_dims == 2 else (8, 8, 8)
    full = predict_case(model, image, spatial_dims, patch_size=patch)
    half = predict_case(model, image, spatial_dims, patch_size=patch, amp_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05
    assert torch.allclose(half.sum(0), torch.ones(shape), atol=1e-5)


def test_bad_arguments_are_refused():
    model2, model3 = tiny_net(2), tiny_net(3)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(model3, rand(1, 1, 8, 8, 8), (4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_predict(model3, rand(1, 1, 8, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="axes"):
        predict_case(model2, rand(2, 8, 8), spatial_dims=2, tta_axes=(2,))
    with pytest.raises(ValueError, match="patch_size"):
        predict_case(model3, rand(8, 8, 8), spatial_dims=3)
    with pytest.raises(ValueError, match="3 axes"):
        predict_case(model2, rand(8, 8), spatial_dims=2)
    with pytest.raises(ValueError, match="logits"):
        predict_case(lambda x: x[:, :, :-1], rand(2, 8, 8), spatial_dims=2)
