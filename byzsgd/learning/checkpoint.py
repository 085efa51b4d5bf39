"""Checkpoints of a parameter server: state vector + optimizer state + step, written atomically.

File layout (one directory may hold several ranks)::

    <dir>/ckpt-r<rank>-s<step:09d>.pt

A checkpoint is written to a hidden temporary file in the same directory, flushed, fsynced,
renamed over its final name (atomic on POSIX), then the directory is fsynced: a crash at
any point leaves either the previous checkpoints untouched or the new one complete — never
a half-written file under a checkpoint name.  Temporary files (``.ckpt-*.tmp``) are never
picked up by :func:`latest_checkpoint` and are cleaned up on the next save.

Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, never code, so a
hostile pickle (``__reduce__`` payload) is refused instead of executed.  The state vector's
size, dtype and a SHA-256 of its bytes are checked; any mismatch or corruption raises
:class:`byzsgd.errors.ConfigError` with the file name and the reason.

``step`` is the number of *completed* training steps: resuming from a checkpoint of step
``s`` runs steps ``s, s+1, ...``.

Wiring into a PS (sketch)::

    policy = CheckpointPolicy(cfg.checkpoint_dir, every=cfg.checkpoint_every, rank=cfg.rank)
    if cfg.resume:
        self.step = policy.restore(self.replica) or 0
        # (PSes sharing one directory: policy.restore(self.replica,
        #  common_checkpoint_step(dir, cfg.ps_ranks)) resumes them all at the same step)
    ...
    # at the end of step t (after the gather):
    policy.maybe_save(t + 1, self.replica)
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from byzsgd.errors import ConfigError

log = logging.getLogger("byzsgd.learning.checkpoint")

FORMAT = "byzsgd-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-r(\d+)-s(\d+)\.pt$")


def checkpoint_name(rank: int, step: int) -> str:
    return f"ckpt-r{int(rank)}-s{int(step):09d}.pt"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: torch.Tensor
    optimizer_state: dict
    extra: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)  # name -> state_dict (absent in old files)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, *, step: int, model_state: torch.Tensor,
                    optimizer_state: dict, extra: dict | None = None,
                    components: dict | None = None) -> Path:
    """Write a checkpoint atomically at ``path`` (temp file, fsync, rename, fsync dir).
    ``components``: more state of the rank (name -> a state_dict of tensors, numbers, lists),
    e.g. the PS's per-worker momentum buffers."""
    path = Path(path)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"checkpoint step must be an integer >= 0, got {step!r}")
    if not isinstance(model_state, torch.Tensor) or model_state.dim() != 1 \
            or not model_state.is_floating_point():
        raise ConfigError("checkpoint model_state must be a 1-D floating-point tensor")
    if not isinstance(optimizer_state, dict):
        raise ConfigError("checkpoint optimizer_state must be a dict (optimizer.state_dict())")
    state = model_state.detach().cpu().contiguous().clone()
    payload = dict(format=FORMAT, version=VERSION, step=step, model_state=state,
                   state_size=state.numel(), dtype=str(state.dtype).replace("torch.", ""),
                   sha256=_digest(state), optimizer_state=optimizer_state, extra=dict(extra or {}))
    if components:
        payload["components"] = dict(components)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def load_checkpoint(path: str | os.PathLike, *, expected_state_size: int) -> Checkpoint:
    """Load and check a checkpoint; :class:`ConfigError` on any mismatch or corruption."""
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted zip, truncated file, forbidden pickle global, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where} is corrupted or not a safe checkpoint "
                          f"(refused by torch.load(weights_only=True)): {reason[:300]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a byzsgd checkpoint")
    if payload.get("version") != VERSION:
        raise ConfigError(f"{where}: unsupported checkpoint version {payload.get('version')!r} "
                          f"(this byzsgd reads version {VERSION})")
    step = payload.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{where}: bad step {step!r}")
    state = payload.get("model_state")
    if not isinstance(state, torch.Tensor) or state.dim() != 1 or not state.is_floating_point():
        raise ConfigError(f"{where}: model_state is not a 1-D floating-point tensor")
    if state.numel() != expected_state_size:
        raise ConfigError(f"{where}: state vector has {state.numel()} entries but this model has "
                          f"{expected_state_size} (different model or dataset?)")
    if payload.get("state_size") != state.numel():
        raise ConfigError(f"{where}: recorded state size {payload.get('state_size')!r} does not "
                          f"match the tensor ({state.numel()})")
    if payload.get("sha256") != _digest(state):
        raise ConfigError(f"{where}: state vector checksum mismatch (corrupted file)")
    opt = payload.get("optimizer_state")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) \
            or not isinstance(opt.get("state"), dict):
        raise ConfigError(f"{where}: optimizer_state is not an optimizer state_dict")
    extra = payload.get("extra")
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: extra is not a dict")
    components = payload.get("components", {})  # checkpoints written before them have none
    if not isinstance(components, dict) or not all(isinstance(v, dict) for v in components.values()):
        raise ConfigError(f"{where}: components is not a dict of state dicts")
    return Checkpoint(path, step, state, opt, extra, components)


def list_checkpoints(directory: str | os.PathLike, rank: int) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints of ``rank`` in ``directory``, oldest first."""
    directory = Path(directory)
    out = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        m = _NAME.match(p.name)
        if m and int(m.group(1)) == int(rank) and p.is_file():
            out.append((int(m.group(2)), p))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike, rank: int) -> Path | None:
    """The newest checkpoint file of ``rank`` (by step), or None (not validated: see load)."""
    found = list_checkpoints(directory, rank)
    return found[-1][1] if found else None


def common_checkpoint_step(directory: str | os.PathLike, ranks: Iterable[int]) -> int | None:
    """The newest step every one of ``ranks`` has a checkpoint of (None if there is none):
    where PSes sharing a checkpoint directory should all resume, so their steps agree."""
    common: set[int] | None = None
    for rank in ranks:
        steps = {step for step, _ in list_checkpoints(directory, rank)}
        common = steps if common is None else common & steps
    return max(common) if common else None


def prune_checkpoints(directory: str | os.PathLike, rank: int, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``rank``; returns the deleted paths."""
    found = list_checkpoints(directory, rank)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else [p for _, p in found]
    for p in doomed:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return doomed


class CheckpointPolicy:
    """Periodic checkpoints of one rank's replica (``.flat.flat``, ``.optimizer``,
    ``.state_vector()``, ``.load_state_vector(vec)``), keeping the ``keep`` newest.

    ``components``: further state saved and restored with it (name -> an object with
    ``state_dict()`` / ``load_state_dict(d)``, e.g. the PS's :class:`WorkerMomentum`).  A
    checkpoint without a component (written before it existed) restores the rest and leaves
    that component as it is (logged)."""

    def __init__(self, directory: str | os.PathLike, every: int, rank: int, keep: int = 2,
                 extra: dict | None = None, components: dict | None = None):
        if not isinstance(every, int) or every < 0:
            raise ConfigError(f"--checkpoint_every must be an integer >= 0, got {every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"checkpoint keep must be >= 1, got {keep!r}")
        self.dir = Path(directory)
        self.every = every
        self.rank = int(rank)
        self.keep = keep
        self.extra = dict(extra or {})
        self.components = dict(components or {})
        self.last_saved: int | None = None

    def path_for(self, step: int) -> Path:
        return self.dir / checkpoint_name(self.rank, step)

    def save(self, step: int, replica: Any) -> Path:
        opt = replica.optimizer.state_dict() if replica.optimizer is not None else \
            {"state": {}, "param_groups": []}
        path = save_checkpoint(self.path_for(step), step=step, model_state=replica.state_vector(),
                               optimizer_state=opt, extra=dict(self.extra, rank=self.rank),
                               components={name: c.state_dict() for name, c in self.components.items()})
        self.last_saved = step
        prune_checkpoints(self.dir, self.rank, self.keep)
        # temporary files of this rank left behind by a crash mid-write (only this rank's
        # process writes them, so none of them is being written right now)
        for stale in self.dir.glob(f".ckpt-r{self.rank}-s*.pt.*.tmp"):
            if _NAME.match(stale.name[1:].split(".pt.")[0] + ".pt"):
                try:
                    stale.unlink()
                except OSError:
                    pass
        return path

    def maybe_save(self, step: int, replica: Any) -> Path | None:
        """Save when ``step`` (completed steps) is a positive multiple of ``every``."""
        if self.every <= 0 or step <= 0 or step % self.every or step == self.last_saved:
            return None
        return self.save(step, replica)

    def restore(self, replica: Any, step: int | None = None) -> int | None:
        """Load the newest valid checkpoint into ``replica`` (or the one of ``step``, e.g.
        :func:`common_checkpoint_step`); returns its step, or None when there is none.  A
        corrupted newest file is skipped (with a warning) for the previous one; if
        checkpoints exist but none is valid, ConfigError (never a silent restart)."""
        found = list_checkpoints(self.dir, self.rank)
        if step is not None:
            found = [(s, p) for s, p in found if s == step]
            if not found:
                raise ConfigError(f"no checkpoint of step {step} for rank {self.rank} in {self.dir}")
        if not found:
            return None
        size = replica.flat.flat.numel()
        errors = []
        for step, path in reversed(found):
            try:
                ckpt = load_checkpoint(path, expected_state_size=size)
            except ConfigError as exc:
                log.warning("skipping checkpoint: %s", exc)
                errors.append(str(exc))
                continue
            if ckpt.extra.get("rank", self.rank) != self.rank:
                errors.append(f"checkpoint {path} belongs to rank {ckpt.extra.get('rank')}")
                continue
            ckpt.model_state = ckpt.model_state.to(replica.flat.flat.dtype)
            if replica.optimizer is not None and ckpt.optimizer_state.get("param_groups"):
                try:
                    replica.optimizer.load_state_dict(ckpt.optimizer_state)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise ConfigError(f"checkpoint {path}: optimizer state does not fit this "
                                      f"optimizer: {exc}") from None
            for name, component in self.components.items():
                if name in ckpt.components:
                    try:
                        component.load_state_dict(ckpt.components[name])
                    except ConfigError as exc:
                        raise ConfigError(f"checkpoint {path}: {name}: {exc}") from None
                else:
                    log.warning("checkpoint %s has no %s (written without it): it starts afresh",
                                path, name)
            replica.load_state_vector(ckpt.model_state)
            self.last_saved = ckpt.step
            log.info("rank %d resumed from %s (step %d)", self.rank, path, ckpt.step)
            return ckpt.step
        raise ConfigError(f"no valid checkpoint for rank {self.rank} in {self.dir}: "
                          + "; ".join(errors))
