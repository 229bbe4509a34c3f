"""modules.UNet: 2D/3D shapes at odd sizes, gradients, init, channels-last, bf16 autocast, deep supervision."""

import math

import pytest
import torch
from torch import nn

import modules
import utils

TINY = (4, 8, 16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "spatial_dims, shape, features",
    [
        (2, (1, 1, 32, 32), TINY),
        (2, (2, 1, 33, 35), TINY),
        (2, (2, 1, 256, 144), (4, 8, 16, 32, 64)),
        (2, (1, 1, 256, 140), (4, 8, 16, 32, 64)),
        (3, (1, 1, 16, 16, 16), TINY),
        (3, (2, 1, 33, 34, 35), TINY),
        (3, (1, 2, 9, 20, 7), (4, 8, 16, 32)),
    ],
)
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_output_has_input_spatial_shape_and_num_classes_channels(spatial_dims, shape, features, norm):
    in_channels = shape[1]
    model = modules.UNet(spatial_dims, in_channels=in_channels, num_classes=6, features=features, norm=norm)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 6, *shape[2:])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 33, 35)), (3, (2, 1, 13, 10, 11))])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_gradient_reaches_every_parameter(spatial_dims, shape, act, deep_supervision):
    model = modules.UNet(spatial_dims, features=TINY, act=act, deep_supervision=deep_supervision)
    out = model(torch.randn(shape))
    outputs = out if isinstance(out, list) else [out]
    # A random projection, not out.sum(): batch norm makes the plain sum nearly flat in the weights.
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_initialisation_is_kaiming_with_zero_bias_and_unit_norm(spatial_dims):
    model = modules.UNet(spatial_dims, features=(16, 32, 64), norm="instance", deep_supervision=True)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.weight.numel() >= 2000:
            fan_in = module.weight[0].numel()
            expected = math.sqrt(2.0 / fan_in)
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), name
            assert abs(module.weight.mean().item()) < 0.1 * expected, name
            checked += 1
        if getattr(module, "bias", None) is not None:
            assert torch.all(module.bias == 0), name
        if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
            assert torch.all(module.weight == 1), name
    assert checked >= 8


def test_conv_layers_before_a_norm_have_no_bias_and_head_has_one():
    model = modules.UNet(2, features=TINY)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs if m.kernel_size == (3, 3))
    assert model.head.bias is not None and model.head.kernel_size == (1, 1)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 40, 24)), (3, (2, 1, 12, 17, 8))])
def test_channels_last_matches_contiguous(spatial_dims, shape):
    model = modules.UNet(spatial_dims, features=TINY).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        memory_format = utils.channels_last_format(spatial_dims)
        model = model.to(memory_format=memory_format)
        out = model(x.contiguous(memory_format=memory_format))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 40, 24)), (3, (2, 1, 12, 17, 8))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_runs_forward_and_backward(spatial_dims, shape, channels_last):
    model = modules.UNet(spatial_dims, features=TINY)
    x = torch.randn(shape)
    if channels_last:
        memory_format = utils.channels_last_format(spatial_dims)
        model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (shape[0], 6, *shape[2:])
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps ~3 significant digits; the logits should agree to a few percent of their scale.
    assert (low - reference).abs().max() < 0.05 * reference.abs().max() + 0.05


@pytest.mark.parametrize(
    "spatial_dims, shape, features",
    [(2, (2, 1, 33, 35), (4, 8, 16, 32)), (3, (1, 1, 33, 34, 35), TINY), (3, (2, 1, 16, 16, 16), TINY)],
)
def test_deep_supervision_returns_full_then_coarser_logits_in_training_only(spatial_dims, shape, features):
    model = modules.UNet(spatial_dims, features=features, deep_supervision=True)
    outs = model(torch.randn(shape))
    assert isinstance(outs, list) and len(outs) == len(features) - 1
    for k, out in enumerate(outs):
        assert out.shape == (shape[0], 6, *(math.ceil(s / 2**k) for s in shape[2:]))
    model.eval()
    with torch.no_grad():
        full = model(torch.randn(shape))
    assert isinstance(full, torch.Tensor) and full.shape == (shape[0], 6, *shape[2:])


def test_deep_supervision_off_has_no_extra_heads():
    assert len(modules.UNet(3, features=TINY).aux_heads) == 0
    assert len(modules.UNet(3, features=TINY, deep_supervision=True).aux_heads) == 1


def test_model_has_no_softmax_so_outputs_are_logits():
    model = modules.UNet(2, features=TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 16, 16))
    assert not torch.allclose(out.sum(1), torch.ones(1, 16, 16))
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in model.modules())


def test_count_parameters_of_default_2d_model():
    model = modules.UNet(2)
    assert modules.count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert 7_000_000 < modules.count_parameters(model) < 9_000_000


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"spatial_dims": 2, "norm": "group"}, "norm"),
        ({"spatial_dims": 2, "act": "gelu"}, "act"),
        ({"spatial_dims": 2, "features": (8,)}, "features"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error):
    with pytest.raises(ValueError, match=error):
        modules.UNet(**kwargs)


def test_input_with_wrong_number_of_axes_is_rejected():
    model = modules.UNet(3, features=TINY)
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 1, 16, 16))


def _same_as_reference(ours: nn.Module, reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Give `reference` our parameters, run both forward and backward on x, and check that outputs and the
    gradients of the input and of every parameter agree; returns our output."""
    for module in (ours, reference):
        for param in module.parameters():
            nn.init.normal_(param)
    reference.load_state_dict(ours.state_dict())  # the same parameter names and shapes
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    grad = torch.randn_like(y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y_ours, y_ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    for (name, p_ours), p_ref in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, msg=name)
    return y_ours


@pytest.mark.parametrize("spatial_dims, size", [(2, (6, 5)), (3, (6, 5, 3))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upconv_is_torchs_transposed_convolution(spatial_dims, size, channels_last):
    """UpConv (one matrix product) computes what ConvTranspose(kernel 2, stride 2) does, gradients included,
    and keeps the input's memory format."""
    reference = (nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d)(8, 4, 2, stride=2).double()
    memory_format = utils.channels_last_format(spatial_dims) if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, *size, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = _same_as_reference(modules.UpConv(spatial_dims, 8, 4).double(), reference, x)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("spatial_dims, size", [(2, (6, 5)), (3, (6, 5, 3))])
def test_instance_norm_on_channels_last_matches_torch_and_stays_channels_last(spatial_dims, size):
    ours = modules._make_norm(spatial_dims, "instance", 4).double()
    reference = (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(4, affine=True).double()
    memory_format = utils.channels_last_format(spatial_dims)
    x = torch.randn(3, 4, *size, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = _same_as_reference(ours, reference, x)
    assert y.is_contiguous(memory_format=memory_format)
    with torch.no_grad():  # inference takes another path (group norm)
        y_inference = ours(x)
    torch.testing.assert_close(y_inference, y)
    assert y_inference.is_contiguous(memory_format=memory_format)


def test_checkpoints_of_the_convtranspose_unet_still_load():
    """Before UpConv the decoder used ConvTranspose under the same names: a UNet with that decoder, loaded from
    the same state dict, computes the same logits."""
    model = modules.UNet(2, features=TINY).eval()
    legacy = modules.UNet(2, features=TINY).eval()
    for up in legacy.ups:
        up.up = nn.ConvTranspose2d(*up.up.weight.shape[:2], kernel_size=2, stride=2)
    legacy.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 1, 24, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), legacy(x))
