"""``googlenet`` (Szegedy et al. 2015), Garfield's CIFAR form: a 3x3 stem to 192 maps instead
of the ImageNet stem, nine inception modules (3a-3b, pool, 4a-4e, pool, 5a-5b) whose 5x5
branch is two 3x3 convolutions, BatchNorm everywhere.  ImageNet-sized inputs: torchvision's."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from byzsgd.learning.models.common import image_shape


def _cbr(c_in: int, c_out: int, k: int) -> list:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1-3x3; 1x1-3x3-3x3; 3x3 max-pool-1x1."""

    def __init__(self, c_in, n1, r3, n3, r5, n5, pool):
        super().__init__()
        self.b1 = nn.Sequential(*_cbr(c_in, n1, 1))
        self.b2 = nn.Sequential(*_cbr(c_in, r3, 1), *_cbr(r3, n3, 3))
        self.b3 = nn.Sequential(*_cbr(c_in, r5, 1), *_cbr(r5, n5, 3), *_cbr(n5, n5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_cbr(c_in, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, _, _ = image_shape(input_shape, "googlenet", min_side=8)
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.features = nn.Sequential(
            *_cbr(c, 192, 3),
            _Inception(192, 64, 96, 128, 16, 32, 32), _Inception(256, 128, 128, 192, 32, 96, 64),
            pool,
            _Inception(480, 192, 96, 208, 16, 48, 64), _Inception(512, 160, 112, 224, 24, 64, 64),
            _Inception(512, 128, 128, 256, 24, 64, 64), _Inception(512, 112, 144, 288, 32, 64, 64),
            _Inception(528, 256, 160, 320, 32, 128, 128),
            pool,
            _Inception(832, 256, 160, 320, 32, 128, 128), _Inception(832, 384, 192, 384, 48, 128, 128))
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
