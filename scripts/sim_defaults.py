#!/usr/bin/env python3
"""Screen candidate default configurations in one process (no network): worst-case accuracy.

A screening tool, not the acceptance (the acceptance is a real deployment, scripts/
bench_attacks.py): it trains the MNIST convnet with ``--workers`` workers' real gradients
(byzsgd.learning: the same shards, model and batches as a deployment) on one simulated PS
and ranks configurations ``rule[+pipeline][+wm beta]`` by their worst final accuracy over
the attacks, for each fw.  Each step:

1. every correct worker computes the gradient of its batch for the step on the PS's model;
2. the quorum is the first ``n - fw`` arrivals: the fw Byzantine workers (they send first,
   the worst case) and ``n - 2 fw`` correct ones drawn at random (seeded) each step;
3. the Byzantine workers run ``byzsgd.attacks.forge(attack, honest, fw, ...)`` omnisciently:
   ``honest`` is the quorum's correct gradients (the rule-aware attacks, ``optimal_alie`` /
   ``optimal_ipm``, tune against the rule on raw gradients: they know neither the pipeline
   nor the momentum -- a limit of this screen);
4. per-worker momentum (``+wm``, byzsgd.gars.worker_momentum) on the quorum's rows, then
   ``robust_aggregate(rule, rows, fw, pipeline)`` (byzsgd.gars.pipeline), then the SGD step.

Optimizer: SGD with ``--lr`` and momentum ``--momentum`` for configurations without worker
momentum; with worker momentum beta the optimizer's momentum is 0 (never both) and the
learning rate is ``--lr / (1 - beta)`` unless ``--no_wm_lr_scale``: the exponential average
has the gradient's scale while heavy-ball momentum multiplies steps by 1 / (1 - beta), so
this compares equal step sizes (the table header says which).  Accuracy: the final model on
the first ``--eval_samples`` test images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from byzsgd import attacks  # noqa: E402
from byzsgd.gars.pipeline import Pipeline, robust_aggregate  # noqa: E402
from byzsgd.gars.worker_momentum import WorkerMomentum  # noqa: E402
from byzsgd.learning import data, models  # noqa: E402

ATTACKS = ["optimal_alie", "optimal_ipm", "alie", "ipm"]
CONFIGS = ["median", "median+nnm", "median+wm0.9", "median+nnm+wm0.9",
           "mda", "mda+nnm+wm0.9", "trimmed_mean+nnm+wm0.9"]
ATTACK_ARGS = {"alie": {"z": 100}, "ipm": {"epsilon": 10}}  # as scripts/bench_attacks.py


def parse_config(text: str) -> tuple[str, Pipeline, float]:
    """``rule[+pipeline][+wmBETA]`` -> (rule, pipeline, beta); e.g. ``median+clipping,nnm+wm0.9``."""
    rule, *parts = text.split("+")
    beta, pipe = 0.0, []
    for part in parts:
        if part.startswith("wm"):
            beta = float(part[2:])
        else:
            pipe.append(part)
    return rule, Pipeline.parse(",".join(pipe)), beta


class Sim:
    def __init__(self, args):
        self.args = args
        self.train = data.load_dataset("mnist", train=True)
        self.test = data.load_dataset("mnist", train=False)
        self.shards = [data.WorkerShard(self.train, i, args.workers, args.batch, seed=args.seed)
                       for i in range(args.workers)]

    def run(self, config: str, attack: str, fw: int) -> float:
        a = self.args
        rule, pipe, beta = parse_config(config)
        n, q = a.workers, a.workers - fw
        pipe.check(rule, q, fw)
        model = models.build_model("convnet", dataset_info=self.train, seed=a.seed)
        params = [p for p in model.parameters()]
        dim = sum(p.numel() for p in params)
        lr = a.lr / (1 - beta) if beta and not a.no_wm_lr_scale else a.lr
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0 if beta else a.momentum)
        byz = list(range(fw)) if attack != "none" else []
        wm = WorkerMomentum(beta, dim, range(n)) if beta else None
        gen = torch.Generator().manual_seed(a.seed)
        for step in range(a.steps):
            honest_ranks = [r for r in range(n) if r not in byz]
            pick = torch.randperm(len(honest_ranks), generator=gen)[: q - len(byz)].tolist()
            quorum_honest = sorted(honest_ranks[i] for i in pick)
            grads = {}
            for r in quorum_honest:
                x, y = self.shards[r].batch(step)
                model.zero_grad(set_to_none=True)
                F.nll_loss(model(x), y).backward()
                grads[r] = torch.cat([p.grad.reshape(-1) for p in params])
            if byz:
                honest = torch.stack(list(grads.values()))
                kw = dict(ATTACK_ARGS.get(attack, {}))
                if attacks.get(attack).needs_rule:
                    kw.update(gar=rule, n=q)
                forged = attacks.forge(attack, honest, fw, **kw)
                grads = {**{r: forged[i] for i, r in enumerate(byz)}, **grads}
            grads = {r: g for r, g in grads.items() if bool(torch.isfinite(g).all())}
            rows = wm.rows(grads) if wm else torch.stack(list(grads.values()))
            g = robust_aggregate(rule, rows, fw, pipe, step=step, seed=a.seed)
            off = 0
            for p in params:
                p.grad = g[off: off + p.numel()].view_as(p).clone()
                off += p.numel()
            opt.step()
        return data.evaluate(model, self.test, max_samples=a.eval_samples)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=";".join(CONFIGS),
                   help="';'-separated rule[+pipeline][+wmBETA] (default: %(default)s)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated worker attacks")
    p.add_argument("--fw", default="1,2", help="comma-separated numbers of Byzantine workers")
    p.add_argument("--workers", type=int, default=7)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9, help="optimizer momentum (no +wm)")
    p.add_argument("--no_wm_lr_scale", action="store_true",
                   help="keep --lr with worker momentum (default: lr / (1 - beta))")
    p.add_argument("--no_baseline", action="store_true", help="skip the no-attack column")
    p.add_argument("--eval_samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = [c for c in args.configs.split(";") if c]
    for c in configs:
        rule, pipe, beta = parse_config(c)
        for fw in (int(v) for v in args.fw.split(",")):
            pipe.check(rule, args.workers - fw, fw)  # refuse before training anything
    sim = Sim(args)
    cols = ([] if args.no_baseline else [("none", 0)]) + [
        (att, int(fw)) for fw in args.fw.split(",") for att in args.attacks.split(",") if att]
    table: dict[str, dict[str, float]] = {}
    t0 = time.time()
    for c in configs:
        table[c] = {}
        for att, fw in cols:
            t = time.time()
            acc = sim.run(c, att, fw or 1)
            table[c][f"{att}@{fw}" if fw else att] = acc
            print(f"{c:>26} {att:>13} fw={fw}: {acc:6.2f}%  ({time.time() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    keys = [f"{a}@{f}" if f else a for a, f in cols]
    print(f"sim_defaults: {args.workers} workers, {args.steps} steps, batch {args.batch}, lr {args.lr} "
          f"(worker momentum: {'same lr' if args.no_wm_lr_scale else 'lr/(1-beta)'}, optimizer "
          f"momentum 0; otherwise optimizer momentum {args.momentum}), seed {args.seed}, accuracy on "
          f"{args.eval_samples} test images; total {time.time() - t0:.0f} s")
    width = max(10, *(len(k) + 1 for k in keys))
    print(f"{'config':>26} " + " ".join(f"{k:>{width}}" for k in keys) + "   worst@fw")
    ranked = []
    for c, accs in table.items():
        worst = {fw: min(v for k, v in accs.items() if k.endswith(f"@{fw}"))
                 for fw in sorted({f for _, f in cols if f})}
        ranked.append((min(worst.values()) if worst else 0.0, c))
        print(f"{c:>26} " + " ".join(f"{accs[k]:>{width}.2f}" for k in keys) + "   "
              + " ".join(f"{w:.2f}@{fw}" for fw, w in worst.items()))
    print("ranking by worst case over attacks and fw: "
          + ", ".join(f"{c} ({w:.2f})" for w, c in sorted(ranked, reverse=True)))
    if args.json:
        print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
