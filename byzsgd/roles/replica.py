"""A node's model replica: the model as one flat state vector, its optimizer, its data.

The state vector is ``[parameters | floating BatchNorm buffers]`` (see
:class:`byzsgd.learning.flat_state.FlatState`): what PSes send and aggregate.  Gradients cover the
parameters only; a worker also sends the buffers its forward pass updated, which the PS
aggregates with the same rule so that BatchNorm statistics are robust too.
"""
from __future__ import annotations

import torch

from byzsgd.gars.worker_momentum import optimizer_args

from byzsgd.device import resolve as resolve_device
from byzsgd.learning import data, device_data, models, shards
from byzsgd.learning import flat_state, losses, optim
from byzsgd.config import RunConfig


def step_seed(seed: int, worker: int, step: int) -> int:
    """The torch seed of worker ``worker``'s forward pass of batch ``step`` (63 bits)."""
    return (int(seed) * 1_000_003 + int(worker) * 7_919 + int(step) * 104_729 + 0x5EED) % (1 << 63)


class Replica:
    """``device``: where the model, its optimizer, the batches and the gradients live
    (default: ``cfg.device`` resolved for this rank, :func:`byzsgd.device.resolve`)."""

    def __init__(self, cfg: RunConfig, *, with_test_set: bool = False, with_train_shard: bool = False,
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.test_set = data.load_dataset(cfg.dataset, train=False, root=cfg.data_root) \
            if with_test_set else None
        if self.test_set is not None:  # resident on the device when it fits (else as before)
            self.test_set = device_data.dataset_on(self.test_set, self.device)
        self.shard = None
        info = self.test_set
        if with_train_shard:
            train = data.load_dataset(cfg.dataset, train=True, root=cfg.data_root)
            self.shard = device_data.on_device(
                shards.WorkerShard(train, cfg.worker_index, cfg.num_workers, cfg.batch,
                                 split=cfg.split, seed=cfg.seed, augment=train.name.startswith("cifar")),
                self.device)
            info = train
        self.num_classes = info.num_classes
        # initialised on the CPU (the same model for every device and seed), then moved
        self.model = models.build_model(cfg.model, dataset_info=info, seed=cfg.seed)
        if self.device.type != "cpu":
            self.model.to(self.device)
        self.flat = flat_state.flat_state(self.model)
        self.loss_fn = losses.build_loss(cfg.loss)
        # --worker_momentum moves the momentum to the workers' streams (never applied twice)
        self.optimizer = optim.build_flat_optimizer(cfg.optimizer, self.flat,
                                                       optimizer_args(cfg.worker_momentum, cfg.opt_args)) \
            if with_test_set else None
        self.flip_labels = False

    # -- sizes ------------------------------------------------------------------------
    @property
    def state_size(self) -> int:
        return self.flat.state_size

    @property
    def grad_size(self) -> int:
        return self.flat.num_params

    @property
    def buffer_size(self) -> int:
        return self.flat.num_buffers

    # -- state ------------------------------------------------------------------------
    def state_vector(self) -> torch.Tensor:
        """A snapshot (copy) of the state: safe to send while the model keeps training."""
        return self.flat.flat.clone()

    def load_state_vector(self, vec: torch.Tensor) -> None:
        self.flat.load(vec)

    # -- PS side ----------------------------------------------------------------------
    def apply_gradient(self, grad: torch.Tensor, buffers: torch.Tensor | None = None) -> None:
        """One optimizer step with the aggregated gradient (and aggregated BN buffers)."""
        self.flat.load_grad(grad)
        self.optimizer.step()
        if buffers is not None and self.buffer_size:
            with torch.no_grad():
                self.flat.buffers.copy_(buffers)

    def evaluate(self, *, full: bool = False) -> tuple[float, float]:
        limit = None if full or not self.cfg.eval_samples else self.cfg.eval_samples
        return shards.evaluate(self.model, self.test_set, max_samples=limit)

    # -- worker side ------------------------------------------------------------------
    def _batch(self, step: int):
        x, y = self.shard.batch(step)
        if self.flip_labels:  # label-flipping attack: a data-level Byzantine behaviour
            y = self.num_classes - 1 - y
        return x, y

    def gradient_at(self, state: torch.Tensor, step: int, attempt: int = 0):
        """(gradient, buffers or None, loss) of the batch for ``step`` on model ``state``;
        ``attempt`` > 0 takes another batch (a retry must be an independent sample).

        The returned tensors are reused buffers: copy them before the next call."""
        if attempt:
            step += attempt * (self.shard.steps_per_epoch * 1009 + 1)
        grad, loss = self._gradient(self._batch(step), self.cfg.worker_index, state, step)
        buffers = self.flat.buffers if self.buffer_size else None
        return grad, buffers, loss

    def _gradient(self, batch, worker_index: int, state: torch.Tensor, step: int):
        """What a correct worker's gradient is a function of: the model ``state``, the batch,
        and the forward pass's randomness (dropout), seeded by (seed, worker, step) too: every
        PS asking for step t gets the same gradient whatever the order the requests came in, a
        seeded run repeats (docs/gpu.md, determinism), and a PS can check it
        (:mod:`byzsgd.roles.gradient_check`)."""
        self.flat.load(state)
        x, y = batch
        torch.manual_seed(step_seed(self.cfg.seed, worker_index, step))
        return flat_state.compute_gradient(self.model, self.loss_fn, x, y)

    def gradient_of(self, shard, worker_index: int, state: torch.Tensor, step: int) -> torch.Tensor:
        """The gradient correct worker ``worker_index`` (its ``shard``) sends for ``step`` on
        ``state`` (a copy): what a PS's gradient check recomputes."""
        return self._gradient(shard.batch(step), worker_index, state, step)[0].clone()

    def extra_gradients(self, step: int, count: int) -> list[torch.Tensor]:
        """Gradients of ``count`` other batches on the currently loaded model (copies).

        What a lone Byzantine worker uses to estimate the honest gradients' spread."""
        state = self.flat.flat.clone()
        out = []
        span = self.shard.steps_per_epoch
        for k in range(1, count + 1):
            x, y = self._batch(step + k * max(1, span // (count + 1)) + k)
            grad, _ = flat_state.compute_gradient(self.model, self.loss_fn, x, y)
            out.append(grad.clone())
            self.flat.load(state)  # BN buffers moved during the extra passes
        return out

    def other_workers_gradients(self, step: int) -> list[torch.Tensor]:
        """The honest gradients of every other worker's batch of ``step`` on the currently
        loaded model (copies): what the omniscient adversary knows."""
        if not hasattr(self, "_other_shards"):
            cfg = self.cfg
            self._other_shards = [
                device_data.on_device(
                    shards.WorkerShard(self.shard.dataset, i, cfg.num_workers, cfg.batch, split=cfg.split,
                                     seed=cfg.seed, augment=self.shard.augment), self.device)
                for i in range(cfg.num_workers) if i != cfg.worker_index]
        state = self.flat.flat.clone()
        out = []
        for shard in self._other_shards:
            x, y = shard.batch(step)
            grad, _ = flat_state.compute_gradient(self.model, self.loss_fn, x, y)
            out.append(grad.clone())
            self.flat.load(state)
        return out
