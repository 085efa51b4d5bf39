"""Garfield's three hand-made networks: ``convnet`` (MNIST), ``cifarnet`` and ``cnn`` (CIFAR);
and ``linear`` (ours: multinomial logistic regression, for protocol benchmarks)."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from byzsgd.errors import ConfigError
from byzsgd.learning.models.common import image_shape, is_large, stem


class Linear(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input (7,850
    parameters on MNIST-shaped inputs).  Small enough that a step measures the protocol, not
    the model (scripts/bench_scale.py).

    Outputs log-probabilities, like ``convnet``: right under the default ``nll`` loss (on raw
    logits ``nll`` is unbounded and the model stalled at ~74% on MNIST) and unchanged under
    ``cross-entropy`` (``log_softmax`` of log-probabilities is the identity)."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        features = 1
        for d in input_shape:
            features *= int(d)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class ConvNet(nn.Module):
    """Garfield's MNIST convnet (``Net`` of its examples); log_softmax outputs."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h, w = image_shape(input_shape, "convnet")
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
        c, h, w = image_shape(input_shape, "cifarnet")
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


class CNN(nn.Module):
    """Garfield's ``cnn``: three blocks of two 3x3 convolutions (32-64, 128-128, 256-256, the
    first of each with BatchNorm), a max-pool after each, Dropout2d 0.05 after the second, then
    fc 4096 -> 1024 -> 512 -> classes with dropout 0.1.  5,852,170 parameters on CIFAR-10.

    The flatten size follows the input (4096 = 256x4x4 on 32x32); ImageNet-sized inputs go
    through the ImageNet stem first (224 -> 56, so 256x7x7)."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = image_shape(input_shape, "cnn", min_side=8)
        large = is_large((c, h, w))
        if large:
            h, w = (h + 1) // 2, (w + 1) // 2
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(
            stem(c, 32, large, bias=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Dropout2d(p=0.05),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.flat_features = 256 * (h // 8) * (w // 8)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.1), nn.Linear(self.flat_features, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, 512), nn.ReLU(inplace=True), nn.Dropout(p=0.1),
            nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
