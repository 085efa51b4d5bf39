"""One split of a dataset in memory (:class:`Dataset`) and the on-disk dataset cache.

The type every reader (:mod:`byzsgd.learning.readers`) returns and every consumer (shards,
models, evaluation) takes; and the cache of decoded arrays that lets every node of a machine
memory-map the same pixels (:func:`cache_dir`), so that a split is decoded once per machine.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

_CACHE_ENV = "BYZSGD_CACHE_DIR"


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


def file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def cached_arrays(key: tuple, produce) -> tuple[np.ndarray, np.ndarray]:
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


def u8_tensor(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(arr)  # a copy-on-write memory map stays one (writable, shared pages)

