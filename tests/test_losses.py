"""losses: Dice, CE and Dice+CE at known points, weights, background and batch options, training, deep supervision."""

import pytest
import torch
import torch.nn.functional as F

import losses
import modules

C = 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_target(shape, num_classes=C):
    return torch.randint(0, num_classes, shape)


def perfect_logits(target, num_classes=C, scale=50.0):
    return scale * F.one_hot(target, num_classes).movedim(-1, 1).float()


SHAPES = [(2, 12, 10), (2, 6, 5, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
@pytest.mark.parametrize("batch_dice", [True, False])
def test_loss_is_zero_at_a_perfect_prediction(shape, name, batch_dice):
    target = random_target(shape)
    target[0][target[0] == 5] = 0  # a class absent from one sample must not cost anything either
    loss = losses.make_loss(name, C, batch_dice=batch_dice)(perfect_logits(target), target)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_dice_loss_matches_hand_formula(shape):
    target = random_target(shape)
    logits = torch.randn(shape[0], C, *shape[1:])
    probs = logits.softmax(1)
    onehot = F.one_hot(target, C).movedim(-1, 1).float()
    dims = (0, *range(2, probs.ndim))
    dice = (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    weights = torch.arange(1.0, 7.0) / 21
    expected = 1 - (weights * dice).sum()
    assert losses.DiceLoss(C)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_default_weights_are_the_normalised_one_to_six():
    torch.testing.assert_close(losses.default_class_weights(6), torch.tensor([1.0, 2, 3, 4, 5, 6]) / 21)


def _all_right_except_prostate():
    """Target with every class; the prediction is perfect except that prostate voxels are called bladder."""
    target = torch.arange(C).repeat_interleave(20).reshape(1, 12, 10)
    predicted = target.clone()
    predicted[target == 5] = 3
    return perfect_logits(predicted), target


def test_class_weights_scale_the_cost_of_each_class_as_expected():
    logits, target = _all_right_except_prostate()
    # Prostate Dice 0 costs its normalised weight; bladder Dice 2*20/(40+20) = 2/3 costs a third of its weight.
    default = losses.DiceLoss(C)(logits, target).item()
    assert default == pytest.approx(6 / 21 + 4 / 21 / 3, abs=1e-3)
    uniform = losses.DiceLoss(C, class_weights=[1] * C)(logits, target).item()
    assert uniform == pytest.approx(1 / 6 + 1 / 6 / 3, abs=1e-3)
    prostate_only = losses.DiceLoss(C, class_weights=[0, 0, 0, 0, 0, 1])(logits, target).item()
    assert prostate_only == pytest.approx(1.0, abs=1e-3)
    body_only = losses.DiceLoss(C, class_weights=[0, 1, 0, 0, 0, 0])(logits, target).item()
    assert body_only == pytest.approx(0.0, abs=1e-3)


def test_weighted_cross_entropy_emphasises_the_weighted_class():
    logits, target = _all_right_except_prostate()
    plain = losses.make_loss("ce", C)(logits, target).item()
    weighted = losses.make_loss("ce", C, class_weights=[1, 1, 1, 1, 1, 10], weighted_ce=True)(logits, target).item()
    # All the error sits on prostate voxels; weighting them up raises their share of the mean.
    assert weighted == pytest.approx(plain * 6 * 10 / 15, rel=1e-4)
    unweighted_despite_weights = losses.make_loss("ce", C, class_weights=[1, 1, 1, 1, 1, 10])(logits, target)
    assert unweighted_despite_weights.item() == pytest.approx(plain, rel=1e-6)


def test_excluding_background_drops_its_term_and_renormalises():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :2, :] = 1  # 20 body voxels, predicted as background
    logits = perfect_logits(torch.zeros_like(target))
    with_bg = losses.DiceLoss(C, class_weights=[1] * C)(logits, target).item()
    without_bg = losses.DiceLoss(C, class_weights=[1] * C, include_background=False)(logits, target).item()
    background_dice = 2 * 80 / (100 + 80)
    assert with_bg == pytest.approx((1 - background_dice + 1) / 6, abs=1e-4)
    # Body Dice 0 among 5 classes; classes absent from both score 1.
    assert without_bg == pytest.approx(1 / 5, abs=1e-4)


def test_batch_dice_pools_the_batch_and_per_sample_averages_it():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, :2, :2] = 5  # prostate only in sample 0, and missed there
    logits = perfect_logits(torch.zeros_like(target))
    weights = [0, 0, 0, 0, 0, 1]
    batch = losses.DiceLoss(C, class_weights=weights, batch_dice=True)(logits, target).item()
    per_sample = losses.DiceLoss(C, class_weights=weights, batch_dice=False)(logits, target).item()
    assert batch == pytest.approx(1.0, abs=1e-4)  # pooled prostate Dice 0
    assert per_sample == pytest.approx(0.5, abs=1e-4)  # sample 1 has no prostate anywhere: Dice 1


@pytest.mark.parametrize("spatial_dims, size", [(2, (16, 16)), (3, (8, 8, 8))], ids=["2d", "3d"])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_loss_decreases_when_training_a_tiny_unet(spatial_dims, size, name):
    image = torch.randn(2, 1, *size)
    # Toy task: the class is the intensity bin, learnable from the pixel alone.
    target = torch.bucketize(image[:, 0], torch.tensor([-1.0, -0.4, 0.0, 0.4, 1.0]))
    model = modules.UNet(spatial_dims, features=(4, 8), norm="instance")
    loss_fn = losses.make_loss(name, C)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    history = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = loss_fn(model(image), target)
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_low_precision_logits_give_a_float32_loss_close_to_full_precision(name):
    target = random_target((2, 16, 16))
    logits = torch.randn(2, C, 16, 16)
    loss_fn = losses.make_loss(name, C)
    full = loss_fn(logits, target)
    low_logits = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(low_logits, target)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=2e-2)
    low.backward()
    assert low_logits.grad.dtype == torch.bfloat16 and torch.isfinite(low_logits.grad.float()).all()


def test_dice_ce_is_the_lambda_weighted_sum_of_its_parts():
    target = random_target((2, 9, 7))
    logits = torch.randn(2, C, 9, 7)
    dice = losses.make_loss("dice", C)(logits, target)
    ce = losses.make_loss("ce", C)(logits, target)
    combined = losses.make_loss("dicece", C, lambda_dice=0.3, lambda_ce=2.0)(logits, target)
    assert combined.item() == pytest.approx(0.3 * dice.item() + 2.0 * ce.item(), rel=1e-5)


def test_one_hot_keeps_every_class_channel_even_if_absent():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    onehot = losses.one_hot(target, C)
    assert onehot.shape == (1, C, 4, 4) and onehot[:, 1:].sum() == 0 and onehot.dtype == torch.float32


def test_inverse_frequency_weights():
    weights = losses.inverse_frequency_weights([600, 300, 60, 20, 15, 5])
    expected = torch.tensor([1 / 600, 1 / 300, 1 / 60, 1 / 20, 1 / 15, 1 / 5], dtype=torch.float64)
    torch.testing.assert_close(weights, (expected / expected.sum()).float())
    milder = losses.inverse_frequency_weights([400, 100, 100, 100, 100, 1], power=0.5)
    assert milder[5] / milder[0] == pytest.approx(20.0, rel=1e-5)
    absent = losses.inverse_frequency_weights([10, 0, 10, 10, 10, 10])
    assert torch.isfinite(absent).all() and absent.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        losses.inverse_frequency_weights([10, -1, 3])


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 33, 35)), (3, (2, 1, 17, 12, 9))], ids=["2d", "3d"])
def test_deep_supervision_loss_matches_weighted_sum_on_strided_targets(spatial_dims, shape):
    model = modules.UNet(spatial_dims, features=(4, 8, 16, 32), deep_supervision=True)
    outputs = model(torch.randn(shape))
    target = random_target((shape[0], *shape[2:]))
    base = losses.make_loss("dicece", C)
    got = losses.DeepSupervisionLoss(base)(outputs, target)
    weights = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    expected = 0.0
    for k, (logits, weight) in enumerate(zip(outputs, weights)):
        stride = (slice(None), *[slice(None, None, 2**k)] * spatial_dims)
        expected = expected + weight * base(logits, target[stride])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        single = model(torch.randn(shape))
    assert losses.DeepSupervisionLoss(base)(single, target).item() == pytest.approx(base(single, target).item())


def test_deep_supervision_loss_rejects_mismatches():
    target = random_target((1, 8, 8))
    outputs = [torch.randn(1, C, 8, 8), torch.randn(1, C, 3, 3)]
    with pytest.raises(ValueError, match="expected"):
        losses.DeepSupervisionLoss(losses.DiceLoss(C))(outputs, target)
    with pytest.raises(ValueError, match="weights"):
        losses.DeepSupervisionLoss(losses.DiceLoss(C), weights=[1.0])(outputs[:1] * 2, target)


@pytest.mark.parametrize(
    "logits_shape, target, error",
    [
        ((2, 5, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), ValueError),
        ((2, C, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long), ValueError),
        ((2, C, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8), TypeError),
    ],
)
def test_bad_inputs_raise(logits_shape, target, error):
    with pytest.raises(error):
        losses.make_loss("dicece", C)(torch.randn(logits_shape), target)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="loss name"):
        losses.make_loss("focal", C)
    with pytest.raises(ValueError, match="class_weights"):
        losses.DiceLoss(C, class_weights=[1, 2, 3])
    with pytest.raises(ValueError, match="sum to zero"):
        losses.DiceLoss(C, class_weights=[1, 0, 0, 0, 0, 0], include_background=False)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("weighted_ce", [False, True])
def test_dice_ce_written_out_gradient_matches_autograd(shape, batch_dice, include_background, weighted_ce):
    """DiceCELoss.forward computes its gradient by hand; it must equal autograd through DiceLoss + CE."""
    target = random_target(shape)
    target[1][target[1] == 4] = 2  # a class absent from one sample
    loss = losses.make_loss("dicece", C, class_weights=[0.5, 1, 2, 3, 1, 4], weighted_ce=weighted_ce,
                            include_background=include_background, batch_dice=batch_dice, lambda_dice=0.7,
                            lambda_ce=1.3)
    logits = 3 * torch.randn(shape[0], C, *shape[1:])
    ours, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    value, expected = loss(ours, target), loss.composed(reference, target)
    (2.5 * value).backward()
    (2.5 * expected).backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-7)


def test_dice_ce_gradient_keeps_dtype_and_channels_last():
    target = random_target((2, 16, 8))
    logits = torch.randn(2, C, 16, 8).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    loss = losses.make_loss("dicece", C)
    loss(logits, target).backward()
    reference = logits.detach().clone().requires_grad_()
    loss.composed(reference, target).backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), reference.grad.float(), rtol=2e-2, atol=1e-4)
