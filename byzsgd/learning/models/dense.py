"""Networks that concatenate features: ``densenet121`` (Huang et al. 2017) and ``dpn92``
(dual path, Chen et al. 2017), CIFAR forms as in Garfield.  Global average pooling at the
end: any input of at least 8x8.  ImageNet-sized inputs: torchvision's DenseNet-121, DPN-92
with the ImageNet stem (see :mod:`.common`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from byzsgd.learning.models.common import image_shape, is_large, stem


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k) then BN-ReLU-3x3 conv (k); its k maps join the input's."""

    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class _Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False),
                         nn.AvgPool2d(2, ceil_mode=True))


class DenseNet121(nn.Module):
    """DenseNet-121, CIFAR form: 3x3 stem conv to 2k = 64 maps, dense blocks of 6-12-24-16
    layers (growth k = 32), transitions halving the maps (compression 0.5)."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32):
        super().__init__()
        c, _, _ = image_shape(input_shape, "densenet121", min_side=8)
        planes = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(c, planes, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(planes, growth))
                planes += growth
            if i < len(blocks) - 1:
                layers.append(_Transition(planes, math.floor(planes * 0.5)))
                planes = math.floor(planes * 0.5)
        layers += [nn.BatchNorm2d(planes), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _DualPathBlock(nn.Module):
    """Grouped bottleneck whose output splits in a residual part (added to the first
    ``out_planes`` input maps) and a dense part (``dense`` maps appended)."""

    def __init__(self, last: int, mid: int, out_planes: int, dense: int, stride: int, first: bool):
        super().__init__()
        self.out_planes = out_planes
        self.conv1 = nn.Conv2d(last, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes + dense, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes + dense)
        self.shortcut = nn.Identity()
        if first:
            self.shortcut = nn.Sequential(
                nn.Conv2d(last, out_planes + dense, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes + dense))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_planes
        return F.relu(torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1))


class DPN92(nn.Module):
    """DPN-92, Garfield's CIFAR configuration: 3x3 stem to 64, four stages of 3-4-20-3 blocks,
    bottleneck widths 96-192-384-768, residual widths 256-512-1024-2048, dense increments
    16-32-24-128."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = image_shape(input_shape, "dpn92", min_side=8)
        self.stem = stem(c, 64, is_large((c, h, w)))
        last, blocks = 64, []
        for mid, out, n, dense, stride in ((96, 256, 3, 16, 1), (192, 512, 4, 32, 2),
                                           (384, 1024, 20, 24, 2), (768, 2048, 3, 128, 2)):
            for i in range(n):
                blocks.append(_DualPathBlock(last, mid, out, dense, stride if i == 0 else 1, i == 0))
                last = out + (i + 2) * dense
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
