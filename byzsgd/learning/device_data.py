"""Datasets resident on a compute device, with their batches and augmentation made there.

On top of :mod:`byzsgd.learning.data` (which loads a split into host memory) and
:mod:`byzsgd.learning.shards` (which decides each worker's batch indices): a node computing
on CUDA copies the loaded tensors to its device **once** (when they fit,
:func:`fits_on_device`), then builds every batch there — an ``index_select`` on the device,
and for CIFAR the random crop (4 pixels of padding) and horizontal flip as tensor ops on the
device.  The random draws of a batch (its indices, crop offsets and flips) are the host
generator's, exactly as :class:`~byzsgd.learning.shards.WorkerShard` draws them, so a batch is
the same on every device: bitwise (cropping and flipping only move values).

On the CPU nothing changes: :func:`on_device` returns the shard itself, the same batches as
before, at the same speed.  A dataset that does not fit (or is decoded lazily, ImageNet)
stays in host memory and each batch is copied to the device (from pinned memory).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from byzsgd.learning.shards import CachedBatches, WorkerShard, _rng

__all__ = ["DeviceShard", "on_device", "dataset_on", "fits_on_device", "augment_on_device",
           "MAX_RESIDENT_FRACTION"]

#: at most this fraction of the device's memory for one process's copy of a dataset
#: (several ranks share a GPU: 7 workers of CIFAR-10 take 7 x 0.6 GB of an 80-140 GB GPU)
MAX_RESIDENT_FRACTION = 0.05
_RESIDENT_CACHE: dict[tuple[int, str], object] = {}


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` may live on ``device`` (a fraction of its memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        total = torch.cuda.get_device_properties(device).total_memory
    except Exception:  # pragma: no cover
        return False
    return nbytes <= MAX_RESIDENT_FRACTION * total


def dataset_on(dataset, device: torch.device):
    """A copy of ``dataset`` with its inputs and labels on ``device`` (cached per process and
    device; the original when it is on the CPU, decoded lazily, or too big)."""
    device = torch.device(device)
    if device.type == "cpu" or getattr(dataset, "decoded_on_the_fly", False):
        return dataset
    key = (id(dataset), str(device))
    hit = _RESIDENT_CACHE.get(key)
    if hit is not None:
        return hit
    # float32 inputs, int64 labels; sized before the float32 split is built on the host
    nbytes = len(dataset.labels) * (4 * math.prod(dataset.input_shape) + 8)
    if not fits_on_device(nbytes, device):
        return dataset
    moved = _moved(dataset, device)
    _RESIDENT_CACHE[key] = moved
    return moved


def _moved(dataset, device: torch.device):
    """The same split with its normalised inputs and its labels on ``device``."""
    return type(dataset)(dataset.name, dataset.inputs.to(device), dataset.labels.to(device),
                         dataset.num_classes, dataset.train, dataset.source, dataset.mean, dataset.std)


def augment_on_device(x: Tensor, generator: torch.Generator, *, padding: int = 4,
                      pad_value: Sequence[float] = (0.0,)) -> Tensor:
    """:func:`byzsgd.learning.shards.augment_batch` on ``x``'s device: the same draws from
    the host ``generator`` (crop rows, crop columns, flips, in that order), the same result."""
    b, c, h, w = x.shape
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    fill = torch.as_tensor(tuple(pad_value), dtype=x.dtype).reshape(-1)
    if fill.numel() not in (1, c):
        raise ValueError(f"pad_value has {fill.numel()} values for {c} channels")
    padded = fill.to(dev).reshape(1, -1, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    oy, ox, flip = oy.to(dev, non_blocking=True), ox.to(dev, non_blocking=True), flip.to(dev, non_blocking=True)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class DeviceShard(CachedBatches):
    """A :class:`WorkerShard`'s batches made on ``device`` (same indices, same draws).

    Exposes what the roles use of a shard: ``batch(step)``, ``steps_per_epoch``,
    ``dataset`` (the host dataset), ``augment``, ``worker_index``, ``batch_indices``."""

    def __init__(self, shard: WorkerShard, device: torch.device, *, cache_size: int = 2,
                 resident: bool | None = None):
        """``resident``: None decides by size (:func:`fits_on_device`); True makes the batches
        from the (device's) tensors even on the CPU (tests)."""
        self.shard = shard
        self.device = torch.device(device)
        self.resident = dataset_on(shard.dataset, self.device)
        self.on_device = (self.resident is not shard.dataset) if resident is None else bool(resident)
        self._cache_size = cache_size
        self._batches: dict[int, tuple[Tensor, Tensor]] = {}

    def __getattr__(self, name):  # steps_per_epoch, dataset, augment, indices, ...
        return getattr(self.shard, name)

    def __len__(self) -> int:
        return len(self.shard)

    def _make_batch(self, step: int) -> tuple[Tensor, Tensor]:
        shard, dev = self.shard, self.device
        if not self.on_device:  # host-resident: the host batch, copied over
            x, y = shard.batch(step)
            return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        idx = shard.batch_indices(step).to(dev, non_blocking=True)
        x = self.resident.inputs.index_select(0, idx)
        y = self.resident.labels.index_select(0, idx)
        if shard.augment:
            x = augment_on_device(x, _rng(shard.seed, 4, shard.worker_index, step),
                                  pad_value=shard._pad_value)
        return x, y


def on_device(shard: WorkerShard, device: torch.device):
    """``shard`` itself on the CPU (nothing changes), else its :class:`DeviceShard`."""
    device = torch.device(device)
    if device.type == "cpu":
        return shard
    return DeviceShard(shard, device)
