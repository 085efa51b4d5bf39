"""Model registry: ``build_model(name, input_shape=..., num_classes=..., seed=...)``.

Every name of Garfield's ``select_model``, with the network Garfield builds for it:

- Garfield's own networks: ``convnet`` (MNIST; log_softmax outputs, use the ``nll`` loss),
  ``cifarnet``, ``cnn``.
- Garfield's CIFAR-sized networks (kuangliu's pytorch-cifar forms: stride-1 stem, no early
  down-sampling): ``resnet18``, ``preactresnet18``, ``senet18``, ``resnext29`` (2x64d),
  ``densenet121``, ``dpn92``, ``googlenet``, ``mobilenet``, ``mobilenetv2``,
  ``shufflenetg2``, ``efficientnetb0``, ``regnetx200`` (RegNetX-200MF).  They end in global
  average pooling, so they take any image of at least 8x8 and any number of channels (e.g.
  MNIST).  On ImageNet-sized inputs (both sides >= 96) they become their ImageNet form:
  torchvision's network where it is the same one (resnet18, googlenet, densenet121,
  mobilenet_v2, efficientnet_b0, RegNetX-200MF), otherwise the same stages after the
  ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool).
- torchvision's ImageNet networks, as in Garfield: ``resnet34``, ``resnet50``, ``resnet152``,
  ``vgg16``, ``vgg19`` (3-channel inputs of at least 32x32) and ``inception`` (Inception v3,
  at least 75x75; without the auxiliary classifier, so the output is one logits tensor).
- ``torchvision:<name>`` (or a plain torchvision model name not listed above):
  ``torchvision.models.get_model(name, weights=None, num_classes=...)``.  Weights are never
  downloaded.

Also ``linear`` (ours): logistic regression on the flattened input, for protocol benchmarks.

Outputs are logits except ``convnet``'s.  The number of classes is the dataset's (Garfield
always builds 10).  A shape a network cannot take is a ConfigError naming what it needs.
Every model is built under ``torch.manual_seed(seed)`` inside a forked RNG (the caller's
global RNG state is untouched), so every parameter server starting from the same seed holds
the same model bit for bit.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from byzsgd.errors import ConfigError, UnknownNameError
from byzsgd.learning.models.common import image_shape, is_large
from byzsgd.learning.models.dense import DPN92, DenseNet121
from byzsgd.learning.models.googlenet import GoogLeNet
from byzsgd.learning.models.mobile import EfficientNetB0, MobileNet, MobileNetV2, ShuffleNetG2
from byzsgd.learning.models.regnet import RegNetX200
from byzsgd.learning.models.resnets import PreActResNet18, ResNet18, ResNeXt29
from byzsgd.learning.models.small import CNN, CifarNet, ConvNet, Linear

__all__ = ["build_model", "model_names", "register_model", "MODELS",
           "ConvNet", "CifarNet", "CNN", "Linear", "ResNet18", "PreActResNet18", "ResNeXt29", "DenseNet121",
           "DPN92", "GoogLeNet", "MobileNet", "MobileNetV2", "ShuffleNetG2", "EfficientNetB0",
           "RegNetX200"]

ModelFactory = Callable[[tuple, int], nn.Module]


def _torchvision(tv_name: str, display: str, min_side: int = 1, **kwargs) -> ModelFactory:
    """A factory of torchvision's ``tv_name`` (random init), after checking the shape."""

    def factory(shape, nc):
        c, h, w = image_shape(shape, display)
        if c != 3:
            raise ConfigError(f"model {display!r} (torchvision's {tv_name}) takes 3-channel "
                              f"images, got {c} channel(s)")
        if min(h, w) < min_side:
            raise ConfigError(f"model {display!r} (torchvision's {tv_name}) needs inputs of at "
                              f"least {min_side}x{min_side}, got {h}x{w}")
        import torchvision.models as tvm  # lazy: ~1 s to import

        return tvm.get_model(tv_name, weights=None, num_classes=nc, **kwargs)

    return factory


def _regnetx200_imagenet(shape, nc):
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=13, w_0=24, w_a=36.44, w_m=2.49,
                                               group_width=8), num_classes=nc)


def _sized(cifar: Callable, imagenet: Optional[ModelFactory] = None) -> ModelFactory:
    """The CIFAR form, or ``imagenet`` on ImageNet-sized inputs (when given; else the CIFAR
    class handles large inputs itself, with the ImageNet stem)."""

    def factory(shape, nc):
        if imagenet is not None and len(shape) == 3 and is_large(shape):
            return imagenet(shape, nc)
        return cifar(shape, nc)

    return factory


MODELS: dict[str, ModelFactory] = {
    "convnet": ConvNet,
    "cifarnet": CifarNet,
    "cnn": _sized(CNN),
    "resnet18": _sized(ResNet18, _torchvision("resnet18", "resnet18")),
    "preactresnet18": _sized(PreActResNet18),
    "senet18": _sized(lambda s, nc: PreActResNet18(s, nc, se=True)),
    "resnext29": _sized(ResNeXt29),
    "densenet121": _sized(DenseNet121, _torchvision("densenet121", "densenet121")),
    "dpn92": _sized(DPN92),
    "googlenet": _sized(GoogLeNet, _torchvision("googlenet", "googlenet", aux_logits=False,
                                                init_weights=True)),
    "mobilenet": _sized(MobileNet),
    "mobilenetv2": _sized(MobileNetV2, _torchvision("mobilenet_v2", "mobilenetv2")),
    "shufflenetg2": _sized(ShuffleNetG2),
    "efficientnetb0": _sized(EfficientNetB0, _torchvision("efficientnet_b0", "efficientnetb0")),
    "regnetx200": _sized(RegNetX200, _regnetx200_imagenet),
    "resnet34": _torchvision("resnet34", "resnet34", 32),
    "resnet50": _torchvision("resnet50", "resnet50", 32),
    "resnet152": _torchvision("resnet152", "resnet152", 32),
    "vgg16": _torchvision("vgg16", "vgg16", 32),
    "vgg19": _torchvision("vgg19", "vgg19", 32),
    "inception": _torchvision("inception_v3", "inception", 75, aux_logits=False, init_weights=True),
}

GARFIELD_MODELS = tuple(MODELS)  # every name of Garfield's select_model
MODELS["linear"] = Linear  # ours: logistic regression (protocol benchmarks)


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
    return _torchvision(tv_name, display)


def build_model(name: str, *, dataset_info=None, input_shape: Optional[Sequence[int]] = None,
                num_classes: Optional[int] = None, seed: int = 0) -> nn.Module:
    """A freshly initialised model, identical for identical (name, shapes, seed).

    Give either ``dataset_info`` (anything with ``input_shape`` and ``num_classes``, e.g. a
    :class:`byzsgd.learning.dataset.Dataset`) or ``input_shape`` and ``num_classes``.  The model is
    on CPU, in training mode, float32."""
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
