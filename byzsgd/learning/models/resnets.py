"""Residual networks with basic or grouped blocks, CIFAR forms as in Garfield (kuangliu's
pytorch-cifar): ``resnet18``, ``preactresnet18``, ``senet18``, ``resnext29`` (2x64d).

All end in global average pooling, so they take any input of at least 8x8; ImageNet-sized
inputs get the ImageNet stem (see :mod:`.common`); ``resnet18`` there is torchvision's.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from byzsgd.learning.models.common import image_shape, is_large, stem


def _shortcut(c_in: int, c_out: int, stride: int, norm: bool = True) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out)) if norm else nn.Sequential(conv)


class _BasicBlock(nn.Module):
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
        c, _, _ = image_shape(input_shape, "resnet18", min_side=8)
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


class _SqueezeExcite(nn.Module):
    """Channel gates from the global average (1x1 convolutions as the fully connected pair)."""

    def __init__(self, channels: int, reduced: int, act=F.relu):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.act = act

    def forward(self, x):
        w = self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))
        return x * self.fc2(w).sigmoid()


class _PreActBlock(nn.Module):
    """BN-ReLU before each convolution; the projection shortcut (if any) sees the activated
    input.  With ``se`` the residual is gated by squeeze-and-excitation (SENet18)."""

    def __init__(self, in_planes: int, planes: int, stride: int, se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or in_planes != planes
        self.shortcut = _shortcut(in_planes, planes, stride, norm=False)
        self.se = _SqueezeExcite(planes, planes // 16) if se else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.project else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return self.se(out) + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016), CIFAR form: stem conv without BN (the blocks
    normalise first), stages 64-128-256-512 of two blocks.  ``se=True``: SENet18 (Hu et al.),
    Garfield's form with pre-activation blocks and BN-ReLU after the stem."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 se: bool = False):
        super().__init__()
        name = "senet18" if se else "preactresnet18"
        c, h, w = image_shape(input_shape, name, min_side=8)
        self.stem = stem(c, 64, is_large((c, h, w)), norm_act=se)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_PreActBlock(in_planes, planes, stride, se), _PreActBlock(planes, planes, 1, se)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _ResNeXtBlock(nn.Module):
    """1x1 reduce, 3x3 grouped (``cardinality`` groups), 1x1 expand x2; projection shortcut."""

    def __init__(self, in_planes: int, cardinality: int, width: int, stride: int):
        super().__init__()
        gw = cardinality * width
        self.conv1 = nn.Conv2d(in_planes, gw, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(gw)
        self.conv2 = nn.Conv2d(gw, gw, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(gw)
        self.conv3 = nn.Conv2d(gw, 2 * gw, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * gw)
        self.shortcut = _shortcut(in_planes, 2 * gw, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNeXt29(nn.Module):
    """ResNeXt-29 (Xie et al. 2017), Garfield's 2x64d: 1x1 stem conv to 64, three stages of
    three blocks, cardinality 2, bottleneck width 64 doubling per stage (output 256-512-1024)."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 cardinality: int = 2, width: int = 64):
        super().__init__()
        c, h, w = image_shape(input_shape, "resnext29", min_side=8)
        self.stem = stem(c, 64, is_large((c, h, w)), kernel=1)
        blocks, in_planes = [], 64
        for stage, stride in enumerate((1, 2, 2)):
            bw = width * 2 ** stage
            for i in range(3):
                blocks.append(_ResNeXtBlock(in_planes, cardinality, bw, stride if i == 0 else 1))
                in_planes = 2 * cardinality * bw
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
