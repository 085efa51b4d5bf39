"""An image-folder split decoded lazily: ImageNet does not fit in memory as float tensors.

:class:`LazyImages` stands where an in-memory dataset has its ``inputs`` tensor: it has a
``shape``, ``index_select(0, idx)`` and slicing, and decodes only the images a batch needs
(PIL; the shorter side resized to ``size * 256 / 224``, the centre ``size`` x ``size`` crop,
RGB, per-channel normalisation).  The decode is deterministic, so a worker's batch for a step
is the same in every process, as with the in-memory datasets.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from byzsgd.errors import ConfigError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")
_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    """Decoder threads (PIL releases the GIL while decoding and resizing)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="byzsgd-decode")
    return _POOL


def scan(folder: str, classes: Optional[Sequence[str]] = None) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, class names) of ``folder/<class>/<image>``, sorted.

    ``classes`` fixes the class list (a validation split labelled like its training split);
    by default it is the sorted sub-folders of ``folder``."""
    if classes is None:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise ConfigError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        files = sorted(e.path for e in os.scandir(sub)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                          f"sub-folders")
    return paths, labels, list(classes)


class LazyImages:
    """[N, 3, size, size] float32 images, decoded from ``paths`` when indexed."""

    dtype = torch.float32

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]):
        if int(size) < 1:
            raise ConfigError(f"image size must be >= 1, got {size}")
        self.paths = list(paths)
        self.size = int(size)
        self.resize = max(self.size, round(self.size * 256 / 224))
        self._mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.shape = torch.Size((len(self.paths), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"LazyImages(n={len(self)}, size={self.size})"

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as a normalised float32 [3, size, size] array."""
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img.draft("RGB", (self.resize, self.resize))  # JPEG: decode at a reduced scale
                img = img.convert("RGB")
                w, h = img.size
                scale = self.resize / min(w, h)
                nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
                img = img.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - self.size) // 2, (nh - self.size) // 2
                img = img.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(img, dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot decode image {path}: {exc}") from exc
        arr = arr.transpose(2, 0, 1) / 255.0
        return (arr - self._mean) / self._std

    def _stack(self, indices: Sequence[int]) -> Tensor:
        out = torch.empty((len(indices), 3, self.size, self.size), dtype=torch.float32)
        if len(indices) == 0:
            return out
        arrays = _pool().map(self.decode, indices) if len(indices) > 1 else map(self.decode, indices)
        for k, arr in enumerate(arrays):
            out[k] = torch.from_numpy(arr)
        return out

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("LazyImages can only be indexed along dimension 0")
        return self._stack([int(i) for i in index.reshape(-1).tolist()])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._stack(range(*key.indices(len(self))))
        if isinstance(key, Tensor):
            return self.index_select(0, key)
        i = int(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return torch.from_numpy(self.decode(i % len(self)))
