"""What a worker trains on and a PS evaluates with, given a loaded dataset
(:mod:`byzsgd.learning.data`): the partition of the training set among the workers (``iid``,
``dirichlet:<alpha>``), each worker's shard and its deterministic batches, CIFAR-style
augmentation, and evaluation on a test set.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from byzsgd.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from byzsgd.learning.dataset import Dataset

__all__ = ["WorkerShard", "partition", "test_batches", "evaluate", "augment_batch", "default_augment"]



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


class CachedBatches:
    """``batch(step)`` through a small cache of the last ``_cache_size`` batches made by
    ``_make_batch`` (every PS asks a worker for the same step: one batch serves them all)."""

    _cache_size: int
    _batches: dict

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


class WorkerShard(CachedBatches):
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

    def _make_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.batch_indices(step)
        x = self.dataset.take(idx)  # only these rows are normalised
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
    """Consecutive (inputs, labels) slices of the dataset (views when the whole split is held
    as float32; else each slice normalised from the uint8 pixels)."""
    n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        yield dataset.rows(a, b), dataset.labels[a:b]


test_batches.__test__ = False  # not a pytest test


#: the evaluation batch on the CPU: a quarter of the activations' memory of 1,000 (a PS's PSS
#: peaked at 131-142 MB while it evaluated, 70 MB between) and no slower (MNIST convnet, 10,000
#: test images, one thread: 0.53 s against 0.76 s with 1,000)
CPU_EVAL_BATCH = 250


def evaluate(model: torch.nn.Module, dataset: Dataset, max_samples: Optional[int] = None,
             batch_size: int = 1000, loss_fn=None) -> tuple[float, float]:
    """(accuracy in percent, mean loss) of ``model`` on ``dataset`` (first ``max_samples``).

    Under ``torch.no_grad`` in eval mode (the previous mode restored).  The default loss is
    cross-entropy on the outputs, which is also right for models ending in ``log_softmax``
    (log_softmax is idempotent), so it equals NLL for those."""
    if dataset.decoded_on_the_fly:  # bound the batch's memory
        batch_size = min(batch_size, 100)
    was_training = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if device.type == "cpu":  # a PS's memory peak: 1,000 images of the MNIST convnet's
        batch_size = min(batch_size, CPU_EVAL_BATCH)  # activations are ~35 MB (PSS 131-142 MB)
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
