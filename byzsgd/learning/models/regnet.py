"""``regnetx200``: RegNetX-200MF (Radosavovic et al. 2020), Garfield's CIFAR form: 3x3 stem to
64, stages of 1-1-4-7 blocks of widths 24-56-152-368, strides 1-1-2-2, group width 8,
bottleneck ratio 1, no squeeze-excitation.  ImageNet-sized inputs: the paper's network built
with torchvision's RegNet (depth 13, w0 24, wa 36.44, wm 2.49, group width 8)."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from byzsgd.learning.models.common import image_shape


class _XBlock(nn.Module):
    """1x1, 3x3 grouped (groups of ``group_width`` maps), 1x1; residual with projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, groups=c_out // group_width,
                      bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class RegNetX200(nn.Module):
    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, _, _ = image_shape(input_shape, "regnetx200", min_side=8)
        layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True)]
        planes = 64
        for depth, width, stride in ((1, 24, 1), (1, 56, 1), (4, 152, 2), (7, 368, 2)):
            for i in range(depth):
                layers.append(_XBlock(planes, width, stride if i == 0 else 1, 8))
                planes = width
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
