"""What a PS makes of one gradient quorum: the aggregate its optimizer steps with.

One object, :class:`GradientAggregation`, owns the stages in order, so that a deployment's PS
and the in-process screen (:mod:`byzsgd.experiments.screen`) run the same code:

1. non-finite rows (NaN/Inf: never from a correct worker while the model is finite) are left
   out, the rule then tolerating that many fewer Byzantine rows (:mod:`byzsgd.roles.aggregation`);
2. the **per-worker momentum** stage (``--worker_momentum beta``): each finite row replaced by
   its worker's momentum buffer (:class:`byzsgd.gars.worker_momentum.WorkerMomentum`, PyTorch's
   heavy-ball convention).  Stateful: the PS computes every momentum from what it received, so
   no worker can choose its momentum, only its gradient;
3. which momentum rows enter the rule (``--wm_rows``):

   * ``quorum``: the rows of the quorum's senders only -- q_w = n_w - fw rows, fw of them
     possibly Byzantine.  Under the asynchronous adversary that puts its fw workers in every
     quorum, that is fw of q_w (2 of 5 at fw = 2 of 7);
   * ``recent`` (default of the main job): the momentum rows of **every** worker whose row was
     updated within the last ``--wm_staleness`` steps, the quorum's fresh and the others'
     as they were at their last quorum.  A worker's momentum is its own stream averaged over
     ~1/(1 - beta) steps anyway, so a row a few steps old is still an honest estimate, while
     the Byzantine share falls back to fw of n_w (2 of 7): the adversary can still order the
     messages, but no longer shrink the honest part of what the rule sees.  The quorum's rows
     are always in (at least q_w rows: the bound checked at start still holds);
4. the pre-aggregation pipeline (``--pre_agg``) and the rule (``--gar``), with f = fw.

Without worker momentum the rows are the quorum's gradients (stages 2-3 are skipped).
"""
from __future__ import annotations

import torch

from byzsgd.errors import ConfigError
from byzsgd.gars.pipeline import Pipeline
from byzsgd.gars.worker_momentum import WorkerMomentum
from byzsgd.roles.aggregation import apply_rule, finite_rows

__all__ = ["GradientAggregation", "WM_ROWS"]

#: ``--wm_rows`` choices (see the module docstring)
WM_ROWS = ("quorum", "recent")


class GradientAggregation:
    """The gradient side of a PS step (see the module docstring).

    ``worker_ranks``: every worker's rank (the momentum keeps one row each);
    ``beta``: ``--worker_momentum`` (0: off); ``rows``: ``--wm_rows``;
    ``staleness``: ``--wm_staleness`` (steps a row may lag and still enter, ``recent`` only)."""

    def __init__(self, rule: str, f: int, rule_args: dict | None, *, dim: int, worker_ranks,
                 pipeline: "str | Pipeline | None" = None, beta: float = 0.0, rows: str = "quorum",
                 staleness: int = 20, drop_nonfinite: bool = True, seed: int = 0,
                 device: "torch.device | str" = "cpu"):
        if rows not in WM_ROWS:
            raise ConfigError(f"--wm_rows must be one of {', '.join(WM_ROWS)}, got {rows!r}")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"--wm_staleness must be an int >= 0, got {staleness!r}")
        self.rule, self.f, self.rule_args = rule, f, dict(rule_args or {})
        self.pipeline = Pipeline.parse(pipeline)
        self.drop_nonfinite, self.seed = drop_nonfinite, seed
        self.worker_ranks = list(worker_ranks)
        self._slot = {r: i for i, r in enumerate(self.worker_ranks)}  # rank -> momentum row
        self.momentum = WorkerMomentum(beta, dim, self.worker_ranks, device=device) if beta > 0 else None
        self.rows_mode = rows
        self.staleness = staleness
        #: rank -> the last step its momentum row was updated at (``recent`` rows)
        self.updated_at: dict[int, int] = {}
        self.nonfinite_dropped = 0
        #: workers that sent a non-finite row while others' were finite (``recent`` rows):
        #: Byzantine, as stage 1 counts them; while such a worker has no row among those that
        #: enter, the rule tolerates one Byzantine row fewer (it cannot be among them)
        self.nonfinite_senders: set[int] = set()
        #: workers caught forging (:mod:`byzsgd.roles.gradient_check`): never in the rows
        #: again, and no longer among the fw Byzantine rows the rule must tolerate
        self.banned: set[int] = set()
        #: the spot checks were found unreliable on this PS (more than fw distinct workers
        #: failed them: :meth:`byzsgd.roles.ps_step.PSStep.lift_bans`) and are off for good
        self.check_off = False

    def ban(self, rank: int) -> None:
        self.banned.add(int(rank))

    @property
    def f_now(self) -> int:
        """The Byzantine rows the rule must still tolerate: fw less the workers banned."""
        return max(0, self.f - len(self.banned))

    def __call__(self, step: int, senders: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(aggregate, the senders whose non-finite rows were left out) of the quorum
        ``rows`` (row i from ``senders[i]``)."""
        if self.momentum is not None and self.rows_mode == "recent":
            return self._recent(step, senders, rows)
        kept = finite_rows(self.rule, rows, self.f_now, self.pipeline,          # stage 1
                           drop_nonfinite=self.drop_nonfinite)
        rows_in = kept.rows
        if self.momentum is not None:                                            # stage 2
            rows_in = self._momentum_rows([senders[i] for i in kept.kept], kept.rows)
        out = apply_rule(self.rule, rows_in, kept.f, pipeline=self.pipeline,     # stage 4
                         step=step, seed=self.seed, **self.rule_args)
        self.nonfinite_dropped += len(kept.dropped)
        return out, [senders[i] for i in kept.dropped]

    def _momentum_rows(self, senders: list[int], rows: torch.Tensor) -> torch.Tensor:
        """The momentum stage (``quorum`` rows): each finite row replaced by its sender's
        momentum, updated with it; a non-finite row handed to the rule anyway
        (--drop_nonfinite false, or too few finite rows) stays as it is and never enters a
        momentum."""
        finite = torch.isfinite(rows).all(dim=1).tolist()
        use = [j for j, ok in enumerate(finite) if ok]
        if not use:
            return rows
        out = rows.clone()
        out[use] = self.momentum.heavy_ball_rows({senders[j]: rows[j] for j in use})
        return out

    def _recent(self, step: int, senders: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        finite = torch.isfinite(rows).all(dim=1).tolist()
        fresh = {senders[i]: rows[i] for i, ok in enumerate(finite) if ok}
        dropped = [s for s, ok in zip(senders, finite) if not ok]
        if not self.drop_nonfinite and dropped:  # study the rule itself: hand it the quorum as is
            return self._rule_on(step, rows), []
        if fresh:
            self.momentum.heavy_ball_rows(fresh)
            for r in fresh:
                self.updated_at[r] = step
            self.nonfinite_senders.update(dropped)
        self.nonfinite_dropped += len(dropped)
        # every row updated recently: the quorum's (fresh) and the others' as they were; a
        # Byzantine worker that sent NaN keeps its last row, still one of the fw
        ranks = [r for r in self.worker_ranks if r in self.updated_at and r not in self.banned
                 and step - self.updated_at[r] <= self.staleness]
        if not ranks:  # every row non-finite (the model diverged): the rule gets them all
            return self._rule_on(step, rows), []
        idx = torch.tensor([self._slot[r] for r in ranks], device=self.momentum.momenta.device)
        stacked = self.momentum.momenta.index_select(0, idx).div_(1.0 - self.momentum.beta)
        # a worker known Byzantine (non-finite) with no row here is one Byzantine row fewer
        # among these: without it, 2 NaN senders of a first quorum of 5 left 3 rows for f = 2
        absent = self.nonfinite_senders - self.banned - set(ranks)
        return self._rule_on(step, stacked, max(0, self.f_now - len(absent))), dropped

    def _rule_on(self, step: int, rows: torch.Tensor, f: int | None = None) -> torch.Tensor:
        return apply_rule(self.rule, rows, self.f_now if f is None else f, pipeline=self.pipeline,
                          step=step, seed=self.seed, **self.rule_args)

    # -- what an attacker that knows the PS's state sees (the screen, the scheduled harness) --
    def rows_entering(self, step: int, quorum: list[int]) -> list[int]:
        """The ranks whose rows the rule sees at ``step`` when ``quorum`` is the quorum."""
        if self.momentum is None or self.rows_mode == "quorum":
            return list(quorum)
        return [r for r in self.worker_ranks if r not in self.banned and (r in quorum or
                (r in self.updated_at and step - self.updated_at[r] <= self.staleness))]

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The momentum buffers (:meth:`WorkerMomentum.state_dict`), the rows' ages, the
        banned workers and whether the checks are off: a resumed PS aggregates the same rows."""
        out = self.momentum.state_dict() if self.momentum is not None else {}
        out["updated_at"] = dict(self.updated_at)
        out["banned"] = sorted(self.banned)
        out["nonfinite_senders"] = sorted(self.nonfinite_senders)
        if self.check_off:
            out["check_off"] = True
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (a checkpoint of a bare WorkerMomentum too)."""
        state = dict(state)
        updated = state.pop("updated_at", {}) or {}
        banned = state.pop("banned", []) or []
        nonfinite = state.pop("nonfinite_senders", []) or []
        self.check_off = state.pop("check_off", False) is True
        if self.momentum is not None:
            self.momentum.load_state_dict(state)
        try:
            self.updated_at = {int(r): int(s) for r, s in dict(updated).items()}
            self.banned = {int(r) for r in banned}
            self.nonfinite_senders = {int(r) for r in nonfinite}
        except (TypeError, ValueError):
            raise ConfigError("gradient aggregation checkpoint: bad updated_at / banned / "
                              "nonfinite_senders") from None
