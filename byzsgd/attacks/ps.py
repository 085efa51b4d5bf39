"""Parameter-server attacks: the model a Byzantine PS sends in place of its own.

Each is ``model(state, rank, step, args, memory) -> Tensor | None``: the model sent to
``rank`` at ``step`` (None: nothing), given the honest ``state``, the parsed arguments and a
dict the attack keeps between calls (stale's history).  Every PS attack takes the same
arguments (``scale``, ``fraction``, ``lag``, ``delay``, ``step``, ``seed``, ``eager``).
``delay`` (``timing="late"``) and ``crash`` (``timing="exit"``) send the honest model, late
or until they exit; the behaviour is :class:`byzsgd.roles.byzantine.PSAttack`.
"""
from __future__ import annotations

import collections

import torch

from byzsgd.attacks import catalog
from byzsgd.attacks.catalog import Arg, Attack, Derived, number, truth

ARGS = (
    Arg("scale", 10.0, number(float), "random, reverse, equivocate: the forgery's scale"),
    Arg("fraction", 0.5, number(float, 0.0, 1.0), "drop: the share of coordinates zeroed"),
    Arg("lag", 20, number(int), "stale: the model of step t - lag is replayed"),
    Arg("delay", 1.0, number(float), "delay: seconds each model is sent late"),
    Arg("step", Derived(lambda cfg: max(1, cfg.num_iter // 4), "num_iter // 4"), number(int),
        "crash: the step it exits at"),
    Arg("seed", Derived(lambda cfg: cfg.seed * 1000 + cfg.rank, "seed * 1000 + rank"), number(int),
        "random, drop, equivocate: the noise's seed"),
    Arg("eager", True, truth, "a forging PS sends its forged model to its peers as soon as a step "
        "starts (garfield mode)"),
)


def _gen(args: dict, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((args["seed"] * 1_000_003 + step * 1009 + rank) % (2**63))


def _random(state, rank, step, args, memory):
    noise = torch.randn(state.shape, generator=_gen(args, step, rank), dtype=state.dtype)
    return noise.to(state.device) * args["scale"]


def _reverse(state, rank, step, args, memory):
    return -args["scale"] * state


def _nan(state, rank, step, args, memory):
    return torch.full_like(state, float("nan"))


def _drop(state, rank, step, args, memory):
    mask = (torch.rand(state.shape, generator=_gen(args, step, 0)) < args["fraction"]).to(state.device)
    return state.masked_fill(mask, 0.0)


def _equivocate(state, rank, step, args, memory):
    """Every recipient gets its own model: honest plus recipient-seeded noise, and recipients
    of odd rank the reversed model."""
    noise = torch.randn(state.shape, generator=_gen(args, step, rank), dtype=state.dtype).to(state.device)
    forged = state + args["scale"] * noise * (state.abs().mean() + 1e-3)
    return -forged if rank % 2 else forged


def _stale(state, rank, step, args, memory):
    history = memory.setdefault("history", collections.deque(maxlen=max(1, args["lag"] + 1)))
    if step != memory.get("step", -1):
        history.append(state.clone())
        memory["step"] = step
    return history[0]


def _silent(state, rank, step, args, memory):
    return None


def _honest(state, rank, step, args, memory):
    return state


def _ps(name: str, reference: str, fn, *, sends: str = "forged", timing: str | None = None) -> None:
    catalog.register(Attack(name, "ps", reference, ("ps",), ARGS, fn=fn, sends=sends, timing=timing))


_ps("random", "Garfield's random PS attack: Gaussian noise of std scale", _random)
_ps("reverse", "Garfield's reverse attack on models: -scale * model", _reverse)
_ps("drop", "Garfield's partial drop attack on models: a fraction of coordinates zeroed", _drop)
_ps("nan", "Non-finite model: every coordinate NaN", _nan)
_ps("equivocate", "Equivocation (El-Mhamdi et al., ByzSGD, Distributed Computing 2022): a "
    "different model to each recipient", _equivocate)
_ps("stale", "Replay of an old model (lag steps), an asynchronous-network adversary", _stale)
_ps("silent", "Never answers: a crashed or partitioned PS", _silent, sends="nothing")
_ps("delay", "Answers late (delay seconds): a slow PS", _honest, sends="honest", timing="late")
_ps("crash", "Exits at a set step: a crash failure", _honest, sends="honest", timing="exit")

