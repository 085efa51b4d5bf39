"""The vanilla baseline a deployment's accuracy is compared with: plain SGD in this process,
same model, data shards, batches, optimizer and seed as the deployment's nodes (the role
classes' own Replica), averaging the gradients of every worker's batch of each step.

A deployment with one PS, no Byzantine node and the average computes exactly this; any other
deployment that "trains" should end near it at the same step count (a robust rule with a
Byzantine worker, a run with a silent node), which is what "trains" means in the tests.
"""
from __future__ import annotations

import functools

import torch

from byzsgd.config import RunConfig
from byzsgd.roles.replica import Replica


@functools.lru_cache(maxsize=8)
def _accuracy(steps: int, workers: int, items: tuple) -> float:
    kwargs = {k: dict(v) if k.endswith("_args") else v for k, v in items}
    base = dict(num_ps=1, fps=0, num_workers=workers, fw=0, gar="average", num_iter=steps,
                acc_freq=steps, log=False, **kwargs)
    torch.manual_seed(0)
    ps = Replica(RunConfig(rank=0, **base), with_test_set=True)
    shards = [Replica(RunConfig(rank=r, **base), with_train_shard=True) for r in range(1, workers + 1)]
    for t in range(steps):
        state = ps.state_vector()
        grads = [w.gradient_at(state, t)[0].clone() for w in shards]
        ps.apply_gradient(torch.stack(grads).mean(0))
    return ps.evaluate(full=True)[0]


def vanilla_accuracy(steps: int, workers: int, **config) -> float:
    """Full-test-set accuracy (%) of ``steps`` steps of SGD over ``workers`` workers' batches
    (RunConfig fields in ``config``: batch, opt_args, seed, model, dataset...)."""
    items = tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in config.items()))
    return _accuracy(steps, workers, items)
