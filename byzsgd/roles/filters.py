"""The worker-side model filters of synchronous ByzSGD (``--mode paper --sync``).

In the synchronous variant a worker pulls the model of **one** PS instead of q_ps of them,
so it must tell a correct model from a forged one on its own.  The paper gives two tests,
both based on what the worker saw at its previous step (model x', gradient g', update u'):

* **Lipschitz filter** — the empirical Lipschitz coefficient of the new model,
  ``k = ||g - g'|| / ||x - x'||`` (g: the worker's gradient at the pulled model x), must not
  exceed the ``q``-quantile of the coefficients the worker observed before, with the paper's
  q = (n_ps - fps) / n_ps.  A model whose gradient changed more than the loss's smoothness
  allows for the distance moved (a replayed model: tiny ``||x - x'||``; a model crafted
  where the loss is steep) fails it.  Every coefficient observed enters the history (a
  sliding window, since k drifts as training goes): keeping only the accepted ones would
  truncate the history at its own quantile and ratchet the threshold down.  Byzantine PSes
  contribute at most about fps / n_ps of it, so the q-quantile stays within the correct
  models' range.  A correct model fails with probability about 1 - q; the worker then
  pulls the next PS and computes its gradient on **another** batch, an independent trial.
* **Outliers filter** — the model must lie within ``K * lr * gap * ||u'||`` of the model the
  worker expects, ``x' - lr * gap * u'`` (gap: steps since x'), with the paper's factor
  K = 3T + 2 for a gather every T steps.  A model far from where SGD can have taken it (a
  random or scaled model, one from another run) fails it.  ``u'`` is the worker's estimate
  of the SGD update — its own gradients through the PS's momentum — so the test follows the
  optimizer the PSes run.

Two forms of each test (``--outliers_bound``, ``--lipschitz_history``):

* ``authors`` (the default) follows the ByzSGD authors' own code of the synchronous
  algorithm (LPD-EPFL/Garfield, ``tensorflow_impl/applications/Garfield_legacy/byzWorker.py``,
  its ``--smart`` mode): the outliers bound is
  ``lr * ||g|| * ((3T + 2)(n_w - f_w) / (4 f_w) + 2 ((t - 1) mod T))`` with g the gradient
  the worker just computed at the pulled model, compared with the distance of the pulled
  model to the worker's own local model, and run only when f_w > 0; the Lipschitz history
  keeps every coefficient, the current one included in the quantile, trimmed to the last
  50 when it reaches 100.  (That prototype computes both values but acts on neither; here a
  model that fails is dropped and the next PS pulled.)
* ``update`` / ``window``: byzsgd's earlier forms, kept as named variants: the bound
  ``K * lr * gap * ||u'||`` (u' the previous SGD update, K = 3T + 2) also run when f_w = 0,
  and a sliding window of earlier coefficients with a warm-up.

Distances are over the parameters only (BatchNorm buffers are not moved by SGD).  Every
comparison is NaN-safe: a model with NaN/Inf fails both filters.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from byzsgd.config import parse_bool


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v.double()))


@dataclass
class Verdict:
    ok: bool
    reason: str = ""  # "" when ok, else "outliers", "lipschitz", "nonfinite" or "step"
    value: float = float("nan")  # the distance or the coefficient tested
    bound: float = float("nan")


class LipschitzFilter:
    """Accepts a coefficient if it is at most the ``quantile`` of the last ``window``
    coefficients observed; the first ``warmup`` are accepted unconditionally (there is
    nothing to compare them with yet)."""

    def __init__(self, quantile: float, warmup: int = 5, window: int = 20):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if warmup < 1 or window < warmup:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup} window={window}")
        self.quantile = quantile
        self.warmup = warmup
        self.window = window
        self._order: list[float] = []  # sorted history
        self._fifo: list[float] = []  # arrival order, to slide the window

    @staticmethod
    def coefficient(grad: torch.Tensor, prev_grad: torch.Tensor, model: torch.Tensor,
                    prev_model: torch.Tensor) -> float:
        moved = _norm(model - prev_model)
        change = _norm(grad - prev_grad)
        if not (math.isfinite(moved) and math.isfinite(change)):
            return float("inf")
        if moved == 0.0:
            return 0.0 if change == 0.0 else float("inf")
        return change / moved

    def threshold(self) -> float:
        if len(self._order) < self.warmup:
            return float("inf")
        index = max(0, math.ceil(self.quantile * len(self._order)) - 1)
        return self._order[index]

    def check(self, k: float) -> Verdict:
        bound = self.threshold()
        ok = math.isfinite(k) and k <= bound
        return Verdict(ok, "" if ok else "lipschitz", k, bound)

    def test(self, k: float) -> Verdict:
        """Check ``k`` against the earlier coefficients, then record it."""
        verdict = self.check(k)
        self.record(k)
        return verdict

    def record(self, k: float) -> None:
        if not math.isfinite(k):
            return
        bisect.insort(self._order, k)
        self._fifo.append(k)
        if len(self._fifo) > self.window:
            old = self._fifo.pop(0)
            del self._order[bisect.bisect_left(self._order, old)]

    def __len__(self) -> int:
        return len(self._order)


class AuthorsLipschitzHistory:
    """The authors' Lipschitz test: the current coefficient joins the history first, then it
    must not exceed the history's ``quantile`` (numpy's linear-interpolation percentile, as
    ``np.percentile``); the history is trimmed to its last ``keep`` values when it reaches
    ``cap``.  No warm-up: the first coefficient is its own quantile and passes."""

    def __init__(self, quantile: float, cap: int = 100, keep: int = 50):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if not 1 <= keep <= cap:
            raise ValueError(f"need 1 <= keep <= cap, got keep={keep} cap={cap}")
        self.quantile, self.cap, self.keep = quantile, cap, keep
        self.history: list[float] = []

    def threshold(self) -> float:
        if not self.history:
            return float("inf")
        ordered = sorted(self.history)
        pos = self.quantile * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    def test(self, k: float) -> Verdict:
        """Record ``k`` (when finite), then test it against the quantile it is part of."""
        self.record(k)
        bound = self.threshold()
        ok = math.isfinite(k) and k <= bound
        return Verdict(ok, "" if ok else "lipschitz", k, bound)

    def record(self, k: float) -> None:
        if not math.isfinite(k):
            return
        self.history.append(k)
        if len(self.history) >= self.cap:
            del self.history[:-self.keep]

    def __len__(self) -> int:
        return len(self.history)


def authors_outliers_bound(lr: float, grad_norm: float, T: int, n_w: int, f_w: int, t: int) -> float:
    """The authors' outliers bound ``lr ||g|| ((3T + 2)(n_w - f_w) / (4 f_w) + 2 ((t - 1) mod T))``
    (byzWorker.py); ``inf`` when f_w = 0 (they run the test only when f_w > 0)."""
    if f_w <= 0:
        return float("inf")
    return lr * grad_norm * ((3 * T + 2) * (n_w - f_w) / (4 * f_w) + 2 * ((t - 1) % T))


class OutliersFilter:
    """Accepts a model within ``factor * lr * gap * ||u'||`` of ``x' - lr * gap * u'``
    (``--outliers_bound update``)."""

    def __init__(self, factor: float, lr: float):
        if not factor > 0 or not lr > 0:
            raise ValueError(f"factor and lr must be > 0, got factor={factor} lr={lr}")
        self.factor = factor
        self.lr = lr

    def check(self, model: torch.Tensor, prev_model: torch.Tensor, update: torch.Tensor,
              gap: int) -> Verdict:
        gap = max(1, gap)
        step = self.lr * gap
        distance = _norm(model - (prev_model - step * update))
        bound = self.factor * step * _norm(update)
        ok = math.isfinite(distance) and distance <= bound
        return Verdict(ok, "" if ok else "outliers", distance, bound)


class SGDUpdate:
    """The worker's estimate of the update the PSes apply: its own gradients through SGD's
    momentum (PyTorch's convention: ``m = mu * m + (1 - dampening) * g``; nesterov
    ``g + mu * m``; weight decay adds ``wd * x`` to g)."""

    def __init__(self, opt_args: dict):
        self.momentum = float(opt_args.get("momentum", 0.0))
        self.dampening = float(opt_args.get("dampening", 0.0))
        self.nesterov = parse_bool(opt_args.get("nesterov", False))
        self.weight_decay = float(opt_args.get("weight_decay", 0.0))
        self.buf: torch.Tensor | None = None

    def advance(self, grad: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """Take the step at ``model`` with ``grad``: update the momentum buffer, return the
        update SGD applies."""
        g = grad + self.weight_decay * model if self.weight_decay else grad
        if not self.momentum:
            return g.clone()
        self.buf = g.clone() if self.buf is None else self.momentum * self.buf + (1 - self.dampening) * g
        return g + self.momentum * self.buf if self.nesterov else self.buf.clone()

    def reset(self) -> None:
        self.buf = None


@dataclass
class Previous:
    """What the worker remembers of the last model it accepted."""
    step: int
    model: torch.Tensor  # parameters only
    grad: torch.Tensor
    update: torch.Tensor


class ModelFilters:
    """Both filters and the worker's memory, as the worker uses them at every pull.

    ``screen`` (before computing a gradient) refuses non-finite models and far steps, and
    with ``--outliers_bound update`` runs the outliers filter; ``judge`` (after, with the
    gradient at the pulled model) runs the authors' outliers bound (it needs that gradient)
    and the Lipschitz filter; ``accept`` remembers the model.  With no previous model (the
    first step) every model passes: the worker then bootstraps from the median of q_ps
    models instead of trusting one."""

    #: Farthest a pulled model's step may lie beyond the last accepted one.
    max_gap = 4

    def __init__(self, *, quantile: float, warmup: int, window: int, factor: float, opt_args: dict,
                 outliers_bound: str = "update", lipschitz_history: str = "window", T: int = 1,
                 n_w: int = 1, f_w: int = 0):
        if outliers_bound not in ("authors", "update"):
            raise ValueError(f"outliers_bound must be authors or update, got {outliers_bound!r}")
        if lipschitz_history not in ("authors", "window"):
            raise ValueError(f"lipschitz_history must be authors or window, got {lipschitz_history!r}")
        self.lipschitz = (AuthorsLipschitzHistory(quantile) if lipschitz_history == "authors"
                          else LipschitzFilter(quantile, warmup, window))
        self.lr = float(opt_args.get("lr", 0.1))
        self.outliers = OutliersFilter(factor, self.lr)
        self.outliers_bound = outliers_bound
        self.T, self.n_w, self.f_w = max(1, int(T)), n_w, f_w
        self.sgd = SGDUpdate(opt_args)
        self.prev: Previous | None = None
        self.rejected = {"outliers": 0, "lipschitz": 0}

    def screen(self, params: torch.Tensor, step: int) -> Verdict:
        if not bool(torch.isfinite(params).all()):
            self.rejected["outliers"] += 1
            return Verdict(False, "nonfinite")
        if self.prev is None:
            return Verdict(True)
        if not 0 < step - self.prev.step <= self.max_gap:
            # the outliers bound grows with the gap, so a PS claiming a far step could pass
            # anything; and a worker that accepted it would wait for that step forever.  A
            # worker this far behind catches up through the median of q_ps models instead.
            self.rejected["outliers"] += 1
            return Verdict(False, "step", float(step - self.prev.step), float(self.max_gap))
        if self.outliers_bound != "update":
            return Verdict(True)
        verdict = self.outliers.check(params, self.prev.model, self.prev.update, step - self.prev.step)
        if not verdict.ok:
            self.rejected["outliers"] += 1
        return verdict

    def authors_outliers(self, params: torch.Tensor, grad: torch.Tensor, step: int) -> Verdict:
        """The authors' test: the pulled model within their bound of the worker's own local
        model ``x' - lr * gap * u'`` (what the worker reaches applying its own update)."""
        prev = self.prev
        gap = max(1, step - prev.step)
        distance = _norm(params - (prev.model - self.lr * gap * prev.update))
        bound = authors_outliers_bound(self.lr, _norm(grad), self.T, self.n_w, self.f_w, step)
        ok = math.isfinite(distance) and distance <= bound
        return Verdict(ok, "" if ok else "outliers", distance, bound)

    def judge(self, params: torch.Tensor, grad: torch.Tensor, step: int | None = None) -> Verdict:
        """The authors' outliers test (``--outliers_bound authors``) and the Lipschitz filter;
        the coefficient joins the history either way."""
        if self.prev is None:
            return Verdict(True)
        if self.outliers_bound == "authors" and self.f_w > 0:
            verdict = self.authors_outliers(params, grad, self.prev.step + 1 if step is None else step)
            if not verdict.ok:
                self.rejected["outliers"] += 1
                return verdict
        verdict = self.lipschitz.test(self._coefficient(params, grad))
        if not verdict.ok:
            self.rejected["lipschitz"] += 1
        return verdict

    def observe(self, params: torch.Tensor, grad: torch.Tensor) -> None:
        """A model taken without judging it (the median of a gather step or a bootstrap):
        its Lipschitz coefficient still joins the history."""
        if self.prev is not None:
            self.lipschitz.record(self._coefficient(params, grad))

    def _coefficient(self, params: torch.Tensor, grad: torch.Tensor) -> float:
        return LipschitzFilter.coefficient(grad, self.prev.grad, params, self.prev.model)

    def accept(self, params: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        update = self.sgd.advance(grad, params)
        self.prev = Previous(step, params.clone(), grad.clone(), update.clone())


def filters_for(cfg) -> ModelFilters:
    """The filters a ``--mode paper --sync`` worker runs, from its configuration."""
    # with per-worker momentum beta the PS's steps are (about) SGD with momentum beta on the
    # aggregate: the worker's estimate of the update follows that
    opt_args = dict(cfg.opt_args, momentum=cfg.worker_momentum) if cfg.worker_momentum > 0 else cfg.opt_args
    return ModelFilters(quantile=cfg.lipschitz_q, warmup=cfg.lipschitz_warmup,
                        window=cfg.lipschitz_window, factor=cfg.outliers_k, opt_args=opt_args,
                        outliers_bound=cfg.outliers_bound, lipschitz_history=cfg.lipschitz_history,
                        T=cfg.gather_every, n_w=cfg.num_workers, f_w=cfg.fw)
