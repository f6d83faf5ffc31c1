"""Models chosen by name: shapes, gradients, and the parameter counts of He et al. (2016)."""

from __future__ import annotations

import pytest
import torch

from rkd_engine.models import available_models, build_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet_params_option_a(depth: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Counted by hand: 3x3 convolutions without bias, BN (2 per channel), no shortcut parameters."""
    n = (depth - 2) // 6
    total = 9 * in_channels * 16 + 2 * 16  # stem conv + BN
    for cin, cout in ((16, 16), (16, 32), (32, 64)):
        for i in range(n):
            first_in = cin if i == 0 else cout
            total += 9 * first_in * cout + 9 * cout * cout + 2 * 2 * cout
    return total + 64 * num_classes + num_classes


def test_available_models():
    assert available_models() == ["mlp", "cnn", "resnet8", "resnet20", "resnet32", "resnet56"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet20"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 7, 9), (1, 1, 3)])
def test_forward_backward_on_image_shapes(name, shape, device):
    torch.manual_seed(0)
    model = build_model(name, shape, 7).to(device)
    x = torch.randn(5, *shape, device=device)
    out = model(x)
    assert out.shape == (5, 7)
    assert out.dtype == torch.float32
    out.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet32", "resnet56"])
def test_deep_resnets_forward(name):
    model = build_model(name, (3, 32, 32), 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("shape", [(20,), (4, 5), (1, 8, 8)])
def test_mlp_flattens_any_shape(shape):
    model = build_model("mlp", shape, 3, hidden_sizes=(16, 8), dropout=0.1)
    assert model(torch.randn(4, *shape)).shape == (4, 3)
    features = 1
    for s in shape:
        features *= s
    assert _params(model) == (features * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3)
    assert _params(build_model("mlp", shape, 3, hidden_sizes=())) == features * 3 + 3  # linear model


@pytest.mark.parametrize(("depth", "paper"), [(20, 0.27), (32, 0.46), (56, 0.85)])
def test_resnet_parameter_counts_match_the_paper(depth, paper):
    model = build_model(f"resnet{depth}", (3, 32, 32), 10)
    count = _params(model)
    assert count == _resnet_params_option_a(depth)
    assert round(count / 1e6, 2) == paper  # He et al. 2016, Table 6
    # option B adds a 1x1 projection + BN at the two stage transitions
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert _params(build_model(f"resnet{depth}", (3, 32, 32), 10, shortcut="B")) == count + projections


def test_resnet_option_a_shortcut_is_identity_with_zero_channels():
    model = build_model("resnet8", (3, 16, 16), 4)
    block = model.blocks[1]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 16, 16)
    shortcut = block._shortcut(x)
    assert shortcut.shape == (2, 32, 8, 8)
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(shortcut[:, :8] == 0)
    assert torch.all(shortcut[:, 24:] == 0)


def test_build_model_is_reproducible_under_a_seed():
    torch.manual_seed(3)
    a = build_model("resnet8", (1, 8, 8), 10)
    torch.manual_seed(3)
    b = build_model("resnet8", (1, 8, 8), 10)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="resnet56"):  # lists the choices
        build_model("vgg16", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"image inputs \(C, H, W\)"):
        build_model("resnet20", (20,), 10)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn", (8, 8), 10)
    with pytest.raises(TypeError, match="depth"):
        build_model("resnet20", (3, 32, 32), 10, depth=3)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", (3, 32, 32), 10, shortcut="C")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (4,), 0)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (0, 3), 2)
    with pytest.raises(ValueError, match="hidden_sizes"):
        build_model("mlp", (4,), 2, hidden_sizes=(8, 0))
    with pytest.raises(ValueError, match="width"):
        build_model("cnn", (1, 8, 8), 2, width=0)
