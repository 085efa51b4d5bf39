"""Depthwise-separable networks, CIFAR forms as in Garfield: ``mobilenet`` (v1),
``mobilenetv2``, ``shufflenetg2`` (ShuffleNet v1, 2 groups), ``efficientnetb0``.

Global average pooling at the end: any input of at least 8x8.  ImageNet-sized inputs:
torchvision's MobileNetV2 and EfficientNet-B0; MobileNet and ShuffleNet with the ImageNet
stem (see :mod:`.common`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from byzsgd.learning.models.common import image_shape, is_large, stem


def _conv_bn(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1) -> list:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2, groups=groups,
                      bias=False), nn.BatchNorm2d(c_out)]


class MobileNet(nn.Module):
    """MobileNet v1 (Howard et al. 2017), CIFAR form: 3x3 stem to 32, thirteen depthwise
    3x3 + pointwise blocks to 1024 maps, four of them with stride 2."""

    CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = image_shape(input_shape, "mobilenet", min_side=8)
        layers: list[nn.Module] = [stem(c, 32, is_large((c, h, w)))]
        planes = 32
        for entry in self.CFG:
            out, stride = (entry, 1) if isinstance(entry, int) else entry
            layers += _conv_bn(planes, planes, 3, stride, groups=planes) + [nn.ReLU(inplace=True)]
            layers += _conv_bn(planes, out) + [nn.ReLU(inplace=True)]
            planes = out
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1 (linear); stride-1 blocks add a shortcut (a
    1x1 projection when the widths differ, as in Garfield's CIFAR version)."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int):
        super().__init__()
        mid = expansion * c_in
        self.body = nn.Sequential(*_conv_bn(c_in, mid), nn.ReLU(inplace=True),
                                  *_conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU(inplace=True),
                                  *_conv_bn(mid, c_out))
        self.shortcut = None
        if stride == 1:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(*_conv_bn(c_in, c_out))

    def forward(self, x):
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), CIFAR form: stride-1 stem and second stage;
    (expansion, width, blocks, stride): (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
    (6,160,3,2) (6,320,1,1), then 1x1 conv to 1280."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, _, _ = image_shape(input_shape, "mobilenetv2", min_side=8)
        layers: list[nn.Module] = [*_conv_bn(c, 32, 3), nn.ReLU(inplace=True)]
        planes = 32
        for t, out, n, s in self.CFG:
            for i in range(n):
                layers.append(_InvertedResidual(planes, out, t, s if i == 0 else 1))
                planes = out
        layers += [*_conv_bn(320, 1280), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _ShuffleUnit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an
    average-pooled shortcut, stride 1 adds the input."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        mid = c_out // 4
        g1 = 1 if c_in == 24 else groups  # the first unit's input is too narrow to group
        self.g1, self.stride = g1, stride
        self.conv1 = nn.Sequential(*_conv_bn(c_in, mid, groups=g1))
        self.conv2 = nn.Sequential(*_conv_bn(mid, mid, 3, stride, groups=mid))
        self.conv3 = nn.Sequential(*_conv_bn(mid, c_out, groups=groups))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x):
        out = F.relu(self.conv1(x))
        n, ch, h, w = out.shape
        out = out.view(n, self.g1, ch // self.g1, h, w).transpose(1, 2).reshape(n, ch, h, w)
        out = self.conv3(F.relu(self.conv2(out)))
        if self.pool is not None:
            return F.relu(torch.cat([out, self.pool(x)], 1))
        return F.relu(out + x)


class ShuffleNetG2(nn.Module):
    """ShuffleNet v1 (Zhang et al. 2018) with 2 groups, Garfield's CIFAR form: 1x1 stem to
    24, stages of 4-8-4 units to 200-400-800 maps (the first unit of each halves the size)."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 groups: int = 2, widths: Sequence[int] = (200, 400, 800),
                 blocks: Sequence[int] = (4, 8, 4)):
        super().__init__()
        c, h, w = image_shape(input_shape, "shufflenetg2", min_side=8)
        layers: list[nn.Module] = [stem(c, 24, is_large((c, h, w)), kernel=1)]
        planes = 24
        for out, n in zip(widths, blocks):
            for i in range(n):
                layers.append(_ShuffleUnit(planes, out - planes if i == 0 else out,
                                           2 if i == 0 else 1, groups))
                planes = out
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _MBConv(nn.Module):
    """EfficientNet block: expand 1x1, depthwise kxk, squeeze-excitation (swish), project 1x1;
    stride-1 same-width blocks add the input."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expansion: int):
        super().__init__()
        mid = expansion * c_in
        self.expand = nn.Sequential(*_conv_bn(c_in, mid), nn.SiLU()) if expansion != 1 else nn.Identity()
        self.depthwise = nn.Sequential(*_conv_bn(mid, mid, k, stride, groups=mid), nn.SiLU())
        se = max(1, int(c_in * 0.25))
        self.se1, self.se2 = nn.Conv2d(mid, se, 1), nn.Conv2d(se, mid, 1)
        self.project = nn.Sequential(*_conv_bn(mid, c_out))
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.depthwise(self.expand(x))
        out = out * self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(out, 1)))).sigmoid()
        out = self.project(out)
        return out + x if self.skip else out


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019), Garfield's CIFAR form: stride-1 3x3 stem to 32, seven
    stages (expansion, width, blocks, kernel, stride) with strides 1-2-2-2-1-2-1, no 1280-wide
    head conv; dropout 0.2 before the classifier.  No drop-connect: Garfield's schedule for it
    never leaves 0."""

    CFG = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2),
           (6, 112, 3, 5, 1), (6, 192, 4, 5, 2), (6, 320, 1, 3, 1))

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, _, _ = image_shape(input_shape, "efficientnetb0", min_side=8)
        layers: list[nn.Module] = [*_conv_bn(c, 32, 3), nn.SiLU()]
        planes = 32
        for t, out, n, k, s in self.CFG:
            for i in range(n):
                layers.append(_MBConv(planes, out, k, s if i == 0 else 1, t))
                planes = out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.linear(self.dropout(out))
