"""`Limits`: the bounds on one equality-saturation run, shared by the driver that enforces them
and the options, explorer and CLI that set them (re-exported as ``eqsat_attn.Limits``)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on equality saturation; past any of them the best program found so far is used.

    They bound each e-graph run: one for the whole program, or one per distinct repeated block
    (`eqsat_attn.blocks`). ``iterations`` (rounds of the rule sets) and ``nodes`` (e-nodes, checked
    after each rule set's run) count work, so the program chosen is the same on any machine;
    ``seconds`` is a safety net checked between the same steps, and a run it stops warns
    (RuntimeWarning), since where it stops depends on the machine's speed and load."""

    iterations: int = 30
    nodes: int = 200_000
    seconds: float = 20.0

    def __post_init__(self) -> None:
        for name in ("iterations", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Limits.{name} must be a whole number >= 1, got {value!r}")
        seconds = self.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not seconds > 0:
            raise ValueError(f"Limits.seconds must be a number of seconds > 0 (math.inf for no time limit), "
                             f"got {seconds!r}")
