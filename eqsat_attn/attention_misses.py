"""Why a softmax did not become attention: the report's answer for each one left in the chosen
program, and the price of attention the e-graph found but the cost model did not choose.

The rules raise every spelling they know to one `softmax` op first, so a softmax left in the
chosen program marks attention that was either never matched (the nearest form it missed is read
off its neighbours) or matched and priced out (the e-graph then holds an Attention e-node, and a
second extraction steered to it says by how much it lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cost import program_cost
from .ir import Node, Program

ATTENTION_OPS = ("attention", "attention_fp8", "packed_attention", "attention_vjp")
STEER_FACTOR = 1e6  # how much dearer every other op is when steering extraction to attention


@dataclass(frozen=True)
class SoftmaxMiss:
    """One softmax of the chosen program that is not inside attention, and why."""

    node: int
    reason: str

    def __str__(self) -> str:
        return f"softmax %{self.node}: {self.reason}"


def _consumers(program: Program, live: set[int]) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for i in sorted(live):
        for j in program.nodes[i].inputs:
            users.setdefault(j, []).append(i)
    return users


def _skip_views(program: Program, node_id: int, users: dict[int, list[int]]) -> list[int]:
    """The consumers of ``node_id`` seen through reshapes, transposes and casts."""
    out = []
    for u in users.get(node_id, []):
        if program.nodes[u].op in ("reshape", "transpose", "convert_element_type"):
            out.extend(_skip_views(program, u, users))
        else:
            out.append(u)
    return out


def _scores_source(program: Program, node: Node) -> Node:
    """The op that produced a softmax's scores, seen through views, scales, biases and selects."""
    seen = program.nodes[node.inputs[0]]
    for _ in range(16):
        if seen.op in ("reshape", "transpose", "convert_element_type", "mul", "div", "add", "sub", "tanh",
                       "select_n", "broadcast_in_dim"):
            operands = [program.nodes[i] for i in seen.inputs]
            dots = [o for o in operands if o.op == "dot_general"]
            if dots:
                return dots[0]
            # the scores are the widest operand that is not a predicate or a broadcast (a fill, a bias row)
            big = max(operands, key=lambda o: (o.type.rank, o.type.dtype != "bool", o.op != "broadcast_in_dim"),
                      default=None)
            if big is None or big is seen:
                break
            seen = big
        else:
            break
    return seen


def softmax_misses(program: Program) -> list[SoftmaxMiss]:
    """A `SoftmaxMiss` for each live softmax of ``program`` (every one is outside attention)."""
    live = set(program.live_nodes())
    users = _consumers(program, live)
    outputs = set(program.outputs)
    misses = []
    for i in sorted(live):
        node = program.nodes[i]
        if node.op != "softmax":
            continue
        readers = _skip_views(program, i, users)
        dots = [u for u in readers if program.nodes[u].op == "dot_general"]
        others = [program.nodes[u].op for u in readers if program.nodes[u].op != "dot_general"]
        source = _scores_source(program, node)
        if i in outputs or (dots and others):
            reason = "the attention weights are also used elsewhere (attention does not return them)"
        elif not dots:
            reason = (f"its result is not multiplied by V: it feeds {', '.join(sorted(set(others)))}"
                      if others else "its result is not multiplied by V")
        elif source.op != "dot_general":
            reason = (f"its scores are not a matmul Q·Kᵀ with a scale, soft-cap, bias or where-mask "
                      f"(nearest producer: {source.op})")
        else:
            reason = ("Q·Kᵀ, softmax and P·V do not line up as attention (the softmax is not over the keys "
                      "both matmuls contract, or P·V contracts another axis)")
        misses.append(SoftmaxMiss(i, reason))
    return misses


class PreferAttention:
    """``base`` with every op but attention made ``STEER_FACTOR`` times dearer, so extraction takes
    attention wherever the e-graph has it (to price what the chosen program gave up)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.name = f"{getattr(base, 'name', 'model')}, steered to attention"

    def node_cost(self, node: Any) -> float:
        cost = float(self.base.node_cost(node))
        return cost if node.op in ATTENTION_OPS else cost * STEER_FACTOR

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


def has_attention(program: Program) -> bool:
    return any(program.nodes[i].op in ATTENTION_OPS for i in program.live_nodes())


def unchosen_attention_note(chosen: Program, steered: Program, model: Any) -> str | None:
    """The report line for attention found but not chosen: for how many of the chosen program's
    softmaxes, and both programs' predicted costs."""
    if not has_attention(steered) or has_attention(chosen):
        return None
    left = len(softmax_misses(chosen))
    found = left - len(softmax_misses(steered))
    with_attention, without = program_cost(steered, model), program_cost(chosen, model)
    name = getattr(model, "name", "the cost model")
    return (f"attention was found for {found} of the {left} softmax(es) here but not chosen: "
            f"{_seconds(with_attention)} with it against {_seconds(without)} without it under {name} "
            "(e.g. tiles too large for these shapes)")


def _seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


__all__ = ["PreferAttention", "SoftmaxMiss", "has_attention", "softmax_misses", "unchosen_attention_note"]
