"""Model registry: ``build_model(name, input_shape=..., num_classes=..., seed=...)``.

Built-in names:

``convnet``   Garfield's MNIST network, layer for layer (conv 5x5 1->10, max-pool 2, ReLU;
              conv 5x5 10->20, Dropout2d, max-pool 2, ReLU; flatten 320 -> fc 50, ReLU, dropout;
              fc 50 -> 10; log_softmax).  21,840 parameters on MNIST.  Outputs log-probabilities
              (use the ``nll`` loss, as Garfield does; ``cross-entropy`` gives the same value).
``cifarnet``  Garfield's Cifarnet (the PyTorch tutorial net: conv 5x5 3->6, pool, conv 5x5 6->16,
              pool, fc 400->120->84->classes; ReLUs).  62,006 parameters on CIFAR-10.  Logits.
``resnet18``  ResNet-18, CIFAR variant (3x3 stem conv, no max-pool, BatchNorm, basic blocks
              64-128-256-512).  11,173,962 parameters on CIFAR-10.  Logits.
``torchvision:<name>`` (or a plain torchvision model name not listed above)
              ``torchvision.models.get_model(name, weights=None, num_classes=...)`` — never
              downloads weights.  These expect 3-channel images of a size they accept.

Every model is built under ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global
RNG state is untouched), so every parameter server starting from the same seed holds the same
model bit for bit.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from byzsgd.errors import ConfigError, UnknownNameError

__all__ = ["build_model", "model_names", "register_model", "ConvNet", "CifarNet", "ResNet18",
           "MODELS"]


class ConvNet(nn.Module):
    """Garfield's MNIST convnet (``Net`` of its examples); log_softmax outputs."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h, w = _image_shape(input_shape, "convnet")
        self.conv1 = nn.Conv2d(c, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ConfigError(f"convnet needs inputs of at least 16x16, got {h}x{w}")
        self.flat_features = 20 * fh * fw  # 320 on 28x28
        self.fc1 = nn.Linear(self.flat_features, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.reshape(-1, self.flat_features)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class CifarNet(nn.Module):
    """Garfield's Cifarnet (the PyTorch CIFAR-10 tutorial network); logits."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = _image_shape(input_shape, "cifarnet")
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ConfigError(f"cifarnet needs inputs of at least 16x16, got {h}x{w}")
        self.flat_features = 16 * fh * fw  # 400 on 32x32
        self.fc1 = nn.Linear(self.flat_features, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.reshape(-1, self.flat_features)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, no max-pool, BatchNorm; logits."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "resnet18")
        self.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride),
                                        _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"model {name!r} needs image inputs [C,H,W], got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


ModelFactory = Callable[[tuple, int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "convnet": lambda shape, nc: ConvNet(shape, nc),
    "cifarnet": lambda shape, nc: CifarNet(shape, nc),
    "resnet18": lambda shape, nc: ResNet18(shape, nc),
}


def register_model(name: str, factory: ModelFactory) -> None:
    """Add ``factory(input_shape, num_classes) -> nn.Module`` to the registry."""
    MODELS[name.lower()] = factory


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm  # lazy: ~1 s to import

    return sorted(tvm.list_models(module=tvm))


def model_names(include_torchvision: bool = False) -> list[str]:
    names = sorted(MODELS)
    if include_torchvision:
        names += [f"torchvision:{n}" for n in _torchvision_names()]
    return names


def _torchvision_factory(tv_name: str, display: str) -> ModelFactory:
    known = _torchvision_names()
    if tv_name not in known:
        if display.lower().startswith("torchvision:"):
            raise UnknownNameError("model", display, [f"torchvision:{n}" for n in known])
        raise UnknownNameError("model", display, sorted(MODELS) + ["torchvision:<name> (any of "
                               "torchvision.models.list_models())"])

    def factory(shape, nc):
        import torchvision.models as tvm

        return tvm.get_model(tv_name, weights=None, num_classes=nc)

    return factory


def build_model(name: str, *, dataset_info=None, input_shape: Optional[Sequence[int]] = None,
                num_classes: Optional[int] = None, seed: int = 0) -> nn.Module:
    """A freshly initialised model, identical for identical (name, shapes, seed).

    Give either ``dataset_info`` (anything with ``input_shape`` and ``num_classes``, e.g. a
    :class:`byzsgd.data.Dataset`) or ``input_shape`` and ``num_classes``.  The model is on CPU,
    in training mode, float32."""
    if dataset_info is not None:
        input_shape = tuple(dataset_info.input_shape) if input_shape is None else input_shape
        num_classes = int(dataset_info.num_classes) if num_classes is None else num_classes
    if input_shape is None or num_classes is None:
        raise ConfigError("build_model needs dataset_info or both input_shape and num_classes")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if not isinstance(name, str) or not name.strip():
        raise UnknownNameError("model", str(name), sorted(MODELS))
    key = name.strip()
    if key.lower().startswith("torchvision:"):
        factory = _torchvision_factory(key.split(":", 1)[1], key)
    elif key.lower() in MODELS:
        factory = MODELS[key.lower()]
    else:
        factory = _torchvision_factory(key, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = factory(tuple(int(d) for d in input_shape), int(num_classes))
    return model.float().train()
