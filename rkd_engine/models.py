"""Models chosen by name: an MLP, a small CNN for 8x8 images and the CIFAR ResNets of He et al. (2016).

``build_model(name, input_shape, num_classes, **kwargs)`` returns an ``nn.Module`` mapping a batch
``(B, *input_shape)`` to scores ``f`` of shape ``(B, m)``. The convolutional models end in adaptive
average pooling, so they take images of any size. A name ``package.module:factory`` is the user's own
model: ``factory(**kwargs)`` with ``input_shape`` and ``num_classes`` added where it accepts them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

_RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56}


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU (-> Dropout)`` per hidden size, then a linear layer to ``m`` scores."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """For 8x8 images: two 3x3 conv-BN-ReLU at ``width`` channels, 2x2 max-pool, two at ``2 width``,
    global average pool, linear. About 66K parameters at ``width = 32`` for 10 classes."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(width, 2 * width),
            *_conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions (He et al. 2016).

    Where the shape changes, shortcut option A subsamples ``x`` with the stride and zero-pads the new
    channels (no parameters; the paper's CIFAR choice); option B is a 1x1 strided convolution with BN.
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin
        self.project: nn.Module | None = None
        if (stride != 1 or cin != cout) and shortcut == "B":
            self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.project is not None:
            return self.project(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): depth ``6n + 2``.

    A 3x3 convolution to 16 channels, three stages of ``n`` basic blocks at 16, 32 and 64 channels (the
    first block of stages 2 and 3 has stride 2), global average pool, linear. Kaiming-normal
    initialisation. With shortcut option A: 0.27M parameters at depth 20, 0.46M at 32, 0.85M at 56.
    """

    def __init__(self, depth: int, in_channels: int, num_classes: int, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)), inplace=True)
        out = self.pool(self.blocks(out)).flatten(1)
        return self.fc(out)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got input_shape {tuple(input_shape)}")
    return input_shape  # type: ignore[return-value]


def _build_mlp(input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
    features = 1
    for size in input_shape:
        features *= size
    hidden = kwargs.pop("hidden_sizes", (256, 256))
    if isinstance(hidden, int):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ValueError(f"hidden_sizes must be a sequence of integers >= 1, got {hidden!r}")
    dropout = kwargs.pop("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    _no_more("mlp", kwargs)
    return MLP(features, num_classes, tuple(hidden), float(dropout))


def _build_cnn(input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
    channels = _image_shape("cnn", input_shape)[0]
    width = kwargs.pop("width", 32)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    _no_more("cnn", kwargs)
    return SmallCNN(channels, num_classes, width)


def _resnet_builder(name: str) -> Callable[..., nn.Module]:
    def build(input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
        channels = _image_shape(name, input_shape)[0]
        shortcut = kwargs.pop("shortcut", "A")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding identity) or 'B' (1x1 projection), got {shortcut!r}")
        _no_more(name, kwargs)
        return CifarResNet(_RESNET_DEPTHS[name], channels, num_classes, str(shortcut))

    return build


def _no_more(name: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"model {name!r} got unexpected keyword argument(s) {sorted(kwargs)}")


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    **{name: _resnet_builder(name) for name in _RESNET_DEPTHS},
}


def is_user_model(name: str) -> bool:
    """Whether ``name`` names a user factory (``package.module:factory``) rather than a built-in model."""
    return isinstance(name, str) and ":" in name


def resolve_factory(name: str) -> Callable[..., object]:
    """The callable ``factory`` of ``package.module:factory`` (the working directory is importable, as for
    ``python -m``). ``ValueError`` naming what could not be found."""
    module_name, _, attr = name.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ValueError(f"a user model must be written package.module:factory, got {name!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while importing
        raise ValueError(f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    factory: object = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{name} is not callable (got a {type(factory).__name__})")
    return factory


def _build_user_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
    factory = resolve_factory(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in kwargs:
            raise ValueError(f"{key} is set by the data; do not pass it as a model option")
        if takes_any or key in params:
            kwargs[key] = value
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} must return a torch.nn.Module, got {type(model).__name__}")
    return model


def available_models() -> list[str]:
    """The names ``build_model`` accepts."""
    return list(_BUILDERS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
    """A model mapping ``(B, *input_shape)`` inputs to ``(B, num_classes)`` scores.

    - ``mlp``: any input shape (flattened); ``hidden_sizes`` (default ``(256, 256)``), ``dropout`` (0).
    - ``cnn``: a small CNN for 8x8 images ``(C, H, W)``; ``width`` (32).
    - ``resnet8``, ``resnet20``, ``resnet32``, ``resnet56``: He et al. (2016) CIFAR ResNets for images
      ``(C, H, W)``; ``shortcut`` ``"A"`` (default: zero-padded identity, as in the paper) or ``"B"``.
    - ``package.module:factory``: the user's own model, ``factory(**kwargs)`` with ``input_shape`` and
      ``num_classes`` passed where its signature takes them (or ``**kwargs``); it must return a module.
    """
    if is_user_model(name):
        shape = tuple(input_shape)
        return _build_user_model(name, shape, num_classes, **kwargs)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)} or package.module:factory")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return _BUILDERS[name](shape, num_classes, **kwargs)
