"""The typed exception tree shared by every layer.

A leaf module: it imports nothing from byzsgd, so the network layer, the GARs and the
roles can all raise and catch the same types without import cycles.
"""
from __future__ import annotations


class ByzSGDError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(ByzSGDError, ValueError):
    """A configuration that cannot run: refused at start, never at step 1000."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup (GAR, attack, model, dataset, ...) for a name that does not exist."""

    def __init__(self, what: str, name: str, known: list[str]):
        self.what, self.name, self.known = what, name, sorted(known)
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.args[0]


class ResilienceError(ConfigError):
    """A rule asked to tolerate f Byzantine inputs out of n, with n below its bound."""

    def __init__(self, rule: str, n: int, f: int, bound: int, condition: str = ""):
        self.rule, self.n, self.f, self.bound = rule, n, f, bound
        cond = f" ({condition})" if condition else ""
        super().__init__(
            f"rule {rule!r} needs at least n={bound} inputs to tolerate f={f} Byzantine{cond}, "
            f"but gets n={n}"
        )
