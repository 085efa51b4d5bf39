"""Pieces shared by the model families: input-shape checks and the two stems.

Garfield's CIFAR networks start with a stride-1 convolution (32x32 inputs keep their
resolution).  On ImageNet-sized inputs that would cost ~50x the compute, so the same
networks take the stem their ImageNet versions use instead: 7x7 stride-2 convolution,
BatchNorm, ReLU, 3x3 stride-2 max-pool (224 -> 56), then the same stages.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from byzsgd.errors import ConfigError
from byzsgd.learning.catalog import LARGE_SIDE  # inputs this large on both sides: ImageNet-sized


def image_shape(input_shape: Sequence[int], name: str, min_side: int = 1) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W) (a 2-d shape gets one channel), or a ConfigError."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"model {name!r} needs image inputs [C,H,W], got {tuple(input_shape)}")
    if min(shape[1:]) < min_side:
        raise ConfigError(f"model {name!r} needs inputs of at least {min_side}x{min_side}, "
                          f"got {shape[1]}x{shape[2]}")
    return shape  # type: ignore[return-value]


def is_large(shape: Sequence[int]) -> bool:
    """Whether a (C, H, W) input is ImageNet-sized (both sides >= LARGE_SIDE)."""
    return min(int(shape[-2]), int(shape[-1])) >= LARGE_SIDE


def stem(c_in: int, c_out: int, large: bool, *, kernel: int = 3, bias: bool = False,
         norm_act: bool = True) -> nn.Sequential:
    """The first layer: the CIFAR form (``kernel`` x ``kernel`` conv, stride 1, then BatchNorm
    and ReLU unless ``norm_act`` is false) or, for ``large`` inputs, the ImageNet form."""
    if large:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, stride=2, padding=1))
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)]
    if norm_act:
        layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)
