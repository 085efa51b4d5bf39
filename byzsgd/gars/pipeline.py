"""Pre-aggregation pipelines: ``--pre_agg`` specs such as ``clipping:tau=5,nnm`` run before a rule.

A spec is a comma-separated list of stages applied **in order**; a stage is a name from
:mod:`byzsgd.gars.preagg`, optionally followed by ``:key=value`` parameters (several with
``:`` again, or as further ``key=value`` items after a comma: ``bucketing:s=3,nnm`` and
``clipping:tau=5`` both parse).  ``""`` / ``"none"`` is the empty pipeline (the rule alone).

Each stage maps what it receives -- ``n`` rows of which at most ``f`` are Byzantine -- to
what the next stage (finally the rule) sees; :meth:`Pipeline.check` walks that chain at
start and refuses below any bound, naming the stage, the rule, n, f and the bound:

* ``nnm`` (Allouah et al., AISTATS 2023): n rows -> n mixed rows.  Every output row may carry
  some Byzantine weight, but the paper's analysis (Lemma/Thm. on (f, kappa)-robustness) is
  precisely for the composition "NNM then an (f, kappa)-robust rule applied with the same f":
  the rule sees (n, f).  Own bound ``n >= 2f + 1``.
* ``bucketing:s=S`` (Karimireddy, He, Jaggi, ICLR 2022): a seeded permutation, then
  ceil(n/S) bucket averages.  The f Byzantine rows fall into at most f buckets, so the rule
  sees (ceil(n/S), f).  Own bound (the paper's honest-majority of buckets, and the library
  function's check) ``ceil(n/S) >= 2f + 1``, i.e. ``n >= 2Sf + 1``.  Default S = 2.  The
  permutation is drawn from ``seed`` and ``step`` (see :func:`stage_seed`): reproducible runs,
  a fresh permutation every step.
* ``clipping[:tau=T]`` (static norm clipping; default tau: median of the row norms): one
  row -> one row, a Byzantine row stays the only tainted one: (n, f).  Own bound ``n >= f + 1``.
* ``arc`` (Adaptive Robust Clipping, Allouah et al. 2024): clipping with a threshold chosen
  from the norms: (n, f).  Own bound ``n >= 2f + 1``.

Because the stages are the library functions themselves (:func:`byzsgd.gars.pre_aggregate`),
``Pipeline.parse("clipping,nnm")(x, f)`` equals ``nnm(clipping(x, f), f)`` exactly, on CPU and
CUDA.  Non-finite rows: as each stage documents (NNM and clipping turn them into NaN rows,
which the rule then discards within its bound).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from byzsgd.errors import ConfigError, ResilienceError, UnknownNameError
from byzsgd.gars import registry

__all__ = ["Pipeline", "Stage", "parse", "robust_aggregate", "stage_seed", "STAGES"]


def _positive_int(stage: str, key: str, text: str) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"pre-aggregation stage {stage!r}: parameter {key!r} must be an "
                          f"integer >= 1, got {text!r}") from None
    if v < 1:
        raise ConfigError(f"pre-aggregation stage {stage!r}: parameter {key!r} must be an "
                          f"integer >= 1, got {text!r}")
    return v


def _positive_float(stage: str, key: str, text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 < v < float("inf")):
        raise ConfigError(f"pre-aggregation stage {stage!r}: parameter {key!r} must be a "
                          f"finite number > 0, got {text!r}")
    return v


@dataclass(frozen=True)
class StageKind:
    """What a stage name means: its parameters (spec key -> (library keyword, parser)),
    its own bound, and how it changes (n, f) for what follows."""

    name: str
    params: dict[str, tuple[str, Callable[[str, str, str], Any]]]
    bound: Callable[[dict, int], int]          # least n for f, given the parsed parameters
    condition: Callable[[dict], str]
    effect: Callable[[dict, int, int], tuple[int, int]]  # (n, f) -> what the next stage sees


def _bucket_size(p: dict) -> int:
    return p.get("bucket_size", 2)


STAGES: dict[str, StageKind] = {
    "nnm": StageKind("nnm", {}, lambda p, f: 2 * f + 1, lambda p: "n >= 2f + 1",
                     lambda p, n, f: (n, f)),
    "bucketing": StageKind(
        "bucketing", {"s": ("bucket_size", _positive_int)},
        lambda p, f: 2 * _bucket_size(p) * f + 1,
        lambda p: f"ceil(n/s) >= 2f + 1, i.e. n >= 2sf + 1 with s={_bucket_size(p)}",
        lambda p, n, f: (-(-n // _bucket_size(p)), f)),
    "clipping": StageKind("clipping", {"tau": ("tau", _positive_float)}, lambda p, f: f + 1,
                          lambda p: "n >= f + 1", lambda p, n, f: (n, f)),
    "arc": StageKind("arc", {}, lambda p, f: 2 * f + 1, lambda p: "n >= 2f + 1",
                     lambda p, n, f: (n, f)),
}
assert set(STAGES) == set(registry.names(pre=True)), "pipeline stages out of sync with preagg"


def stage_seed(seed: int, step: int, position: int) -> int:
    """The seed a randomised stage uses at ``step``: a fixed mix of the run's seed, the step
    and the stage's position, so that runs are reproducible and steps differ."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + position) & (2**63 - 1)
    return x


@dataclass(frozen=True)
class Stage:
    """One parsed stage: a name of :data:`STAGES` and its library keyword arguments."""

    name: str
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        kind = STAGES[self.name]
        rev = {lib: key for key, (lib, _) in kind.params.items()}
        return self.name + "".join(f":{rev[k]}={v}" for k, v in sorted(self.params.items()))


def _parse_stage(token: str) -> Stage:
    name, *items = token.split(":")
    name = name.strip()
    if name not in STAGES:
        raise UnknownNameError("pre-aggregation stage", name, list(STAGES))
    stage = Stage(name, {})
    for item in items:
        stage = _with_param(stage, item)
    return stage


def _with_param(stage: Stage, item: str) -> Stage:
    kind = STAGES[stage.name]
    known = ", ".join(sorted(kind.params)) or "none"
    key, eq, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key or not value:
        raise ConfigError(f"pre-aggregation stage {stage.name!r}: parameter {item!r} is not "
                          f"key=value (known parameters: {known})")
    if key not in kind.params:
        raise ConfigError(f"pre-aggregation stage {stage.name!r} has no parameter {key!r} "
                          f"(known parameters: {known})")
    lib, parser = kind.params[key]
    if lib in stage.params:
        raise ConfigError(f"pre-aggregation stage {stage.name!r}: parameter {key!r} given twice")
    return Stage(stage.name, {**stage.params, lib: parser(stage.name, key, value)})


@dataclass(frozen=True)
class Pipeline:
    """An ordered, validated list of pre-aggregation stages (possibly empty)."""

    stages: tuple[Stage, ...] = ()

    @classmethod
    def parse(cls, spec: "str | Pipeline | None") -> "Pipeline":
        """Parse a ``--pre_agg`` spec; raises ConfigError naming what is wrong."""
        if isinstance(spec, Pipeline):
            return spec
        if spec is None:
            return cls()
        if not isinstance(spec, str):
            raise ConfigError(f"pre-aggregation spec must be a string, got {spec!r}")
        text = spec.strip()
        if text.lower() in ("", "none"):
            return cls()
        stages: list[Stage] = []
        for token in text.split(","):
            token = token.strip()
            if not token:
                raise ConfigError(f"pre-aggregation spec {spec!r}: empty stage")
            if "=" in token and ":" not in token:  # "bucketing:s=2,..." continued: a parameter
                if not stages:
                    raise ConfigError(f"pre-aggregation spec {spec!r}: parameter {token!r} "
                                      f"before any stage; known stages: {', '.join(STAGES)}")
                stages[-1] = _with_param(stages[-1], token)
            else:
                stages.append(_parse_stage(token))
        return cls(tuple(stages))

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.stages) or "none"

    def __bool__(self) -> bool:
        return bool(self.stages)

    def shapes(self, n: int, f: int) -> list[tuple[int, int]]:
        """(n, f) seen by each stage, then by the rule (len(stages) + 1 entries)."""
        out = [(n, f)]
        for st in self.stages:
            n, f = STAGES[st.name].effect(st.params, n, f)
            out.append((n, f))
        return out

    def output(self, n: int, f: int) -> tuple[int, int]:
        """(n', f'): how many rows the rule receives and how many may be Byzantine."""
        return self.shapes(n, f)[-1]

    def check(self, rule: str, n: int, f: int) -> None:
        """Refuse (ResilienceError) when a stage, or ``rule`` after the stages, is below its
        bound for ``n`` inputs with ``f`` Byzantine; the message names stage, rule, n, f, bound."""
        r = registry.get(rule)
        if r.pre:
            raise ConfigError(f"{rule!r} is a pre-aggregation stage, not a rule: put it in "
                              f"the pipeline and choose an aggregation rule")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"pipeline {self}: n must be an int >= 1, got {n!r}")
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ConfigError(f"pipeline {self}: f must be an int >= 0, got {f!r}")
        shapes = self.shapes(n, f)
        for i, st in enumerate(self.stages):
            sn, sf = shapes[i]
            kind = STAGES[st.name]
            bound = kind.bound(st.params, sf)
            if sn < bound:
                raise ResilienceError(
                    f"{st} (stage {i + 1} of pipeline {self}, before rule {rule})", sn, sf,
                    bound, kind.condition(st.params))
        rn, rf = shapes[-1]
        bound = r.min_inputs(rf)
        if rn < bound:
            via = " -> ".join(f"{s}: n={a}" for s, (a, _) in zip(self.stages, shapes))
            raise ResilienceError(
                f"{rule} (after pipeline {self}: {via} -> {rule}: n={rn}; from n={n}, f={f})",
                rn, rf, bound, r.condition)

    def __call__(self, rows: torch.Tensor, f: int, *, step: int = 0, seed: int = 0) -> torch.Tensor:
        """Apply the stages in order to ``rows`` [n, d]; returns [n', d] (see :meth:`output`)."""
        from byzsgd.gars import pre_aggregate  # the package imports this module's neighbours

        for i, st in enumerate(self.stages):
            params = dict(st.params)
            if st.name == "bucketing":
                params["seed"] = stage_seed(seed, step, i)
            rows = pre_aggregate(st.name, rows, f, **params)
        return rows


def parse(spec: "str | Pipeline | None") -> Pipeline:
    """Shorthand for :meth:`Pipeline.parse`."""
    return Pipeline.parse(spec)


def robust_aggregate(rule: str, rows: torch.Tensor, f: int, pipeline: "str | Pipeline | None" = None,
                     *, step: int = 0, seed: int = 0, **params) -> torch.Tensor:
    """The PS's one call: check the bounds, apply ``pipeline``, then ``rule`` with its f'.

    The check is integer arithmetic, cheap enough to repeat every step; deployments also
    call :meth:`Pipeline.check` at start so that a bad configuration never starts."""
    from byzsgd.gars import aggregate

    pipe = Pipeline.parse(pipeline)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ConfigError(f"robust_aggregate: rows must be a 2-D tensor [n, d], got "
                          f"{getattr(rows, 'shape', type(rows))}")
    n = rows.shape[0]
    pipe.check(rule, n, f)
    _, f_out = pipe.output(n, f)
    return aggregate(rule, pipe(rows, f, step=step, seed=seed), f_out, **params)
