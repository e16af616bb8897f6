"""Repeated blocks: optimize a model's identical layers once and reuse the result.

A stack of transformer layers captures to one long program whose layers differ only in which
weights they read. `split_repeated` cuts a program where a single value, read by at least two
ops, is live between one part and the rest (the residual stream between layers, read by the
next layer and its skip connection; program inputs count as live from their first use to
their last), finds the longest run of consecutive parts that are the same sub-program up to
their interface values (`Part.program`: its inputs are the values it reads from outside, in
order of first use; constants and values computed from constants only are copied in), and
returns the parts: what comes before the run, each repetition, what comes after. The optimizer optimizes each distinct part program once and
`splice` substitutes the optimized parts back.

Sound by construction: two parts are reused only if their sub-programs are equal
(`ir.Program` equality: same ops, parameters, types, constants and wiring; opaque calls
compare by identity, except that calls of one primitive with equal plain parameters (numbers,
strings, dtypes: `erfc` in an exact GELU) are made one object first, so a part holding any
other opaque call is never shared), and each optimized part computes
the same values as its sub-program. What it gives up: rewrites across a cut (a transpose of the
residual stream moved from one layer into the next). The cut value keeps the layout the program
gave it. A value live across most of the program (a tied embedding read by the first and last
ops, a padding mask's bias or a weight read by every layer) would keep every cut from having a
single live value: when no run is found otherwise, such values are let across the cuts and
each part reads them as interface values. A plain chain (transpose, tanh, transpose, tanh...)
has no cut and units of fewer than `MIN_UNIT_NODES` ops are not split off: those programs are
optimized whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import enum

import numpy as np

from .ir import Node, OpaqueCall, Params, Program, ProgramBuilder

MIN_UNIT_NODES = 24  # a repeated unit must hold at least this many ops to be optimized on its own
NEVER_FREE = frozenset({"input", "opaque", "opaque_output"})


@dataclass(frozen=True)
class Part:
    """A contiguous run of a program's ops as a sub-program of its interface values."""

    program: Program  # inputs: ``interface`` values; outputs: ``outputs`` values
    interface: tuple[int, ...]  # ids (in the whole program) of the values it reads from outside
    outputs: tuple[int, ...]  # ids (in the whole program) of its values read later or returned


@dataclass(frozen=True)
class Split:
    """A program cut into parts (in program order); ``repeats`` parts share one sub-program."""

    parts: tuple[Part, ...]
    repeats: int
    unit_nodes: int

    @property
    def distinct(self) -> list[Program]:
        """The part programs to optimize, each once, in order of first appearance."""
        return list(dict.fromkeys(p.program for p in self.parts))


def constant_nodes(program: Program) -> set[int]:
    """Ids of literals, constants, iotas and values computed from them only (copied into parts)."""
    free: set[int] = set()
    for i, node in enumerate(program.nodes):
        if node.op in NEVER_FREE:
            continue
        if all(j in free for j in node.inputs):  # leaves have no inputs
            free.add(i)
    return free


def _part(program: Program, free: set[int], body: Sequence[int], outputs: Sequence[int]) -> Part:
    """The sub-program computing ``outputs`` from ``body`` ops and the values they read."""
    b = ProgramBuilder()
    local: dict[int, int] = {}
    interface: list[int] = []

    def ref(j: int) -> int:
        if j not in local:
            if j in free:
                n = program.nodes[j]
                local[j] = b.add_node(Node(n.op, tuple(ref(k) for k in n.inputs), n.params, n.type))
            else:
                local[j] = b.input(program.type_of(j))
                interface.append(j)
        return local[j]

    for i in body:
        n = program.nodes[i]
        local[i] = b.add_node(Node(n.op, tuple(ref(k) for k in n.inputs), n.params, n.type))
    return Part(b.build([local[o] for o in outputs]), tuple(interface), tuple(outputs))


def _best_run(keys: Sequence[int], sizes: Sequence[int]) -> tuple[int, int, int] | None:
    """(start, period, repeats) of the run of equal consecutive groups covering the most ops."""
    m = len(keys)
    best: tuple[int, int, int, int] | None = None  # (covered ops, -period, start, repeats)
    for period in range(1, m // 2 + 1):
        for start in range(m - 2 * period + 1):
            unit = keys[start:start + period]
            n = 1
            while keys[start + n * period:start + (n + 1) * period] == unit:
                n += 1
            unit_nodes = sum(sizes[start:start + period])
            if n < 2 or unit_nodes < MIN_UNIT_NODES:
                continue
            cand = (n * unit_nodes, -period, -start, n)
            if best is None or cand > best:
                best = cand
    if best is None:
        return None
    return -best[2], -best[1], best[3]


_PLAIN = (type(None), bool, int, str, np.dtype, enum.Enum)


def _plain_key(value: object) -> object | None:
    """A key equal for equal data (floats by their bits: -0.0 is not 0.0), or None when
    ``value`` is not data only (a jaxpr, a function, an array): such calls stay apart."""
    if isinstance(value, tuple):
        keys = [_plain_key(v) for v in value]
        return None if any(k is None for k in keys) else ("tuple", *keys)
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    return None


def share_plain_opaque_calls(program: Program) -> Program:
    """``program`` with each set of opaque calls of one primitive, equal plain parameters and
    equal result types made one `OpaqueCall` object (same node ids), so parts holding them can
    compare equal; calls with any other parameter keep their own object."""
    shared: dict[tuple, OpaqueCall] = {}
    nodes = list(program.nodes)
    for i, node in enumerate(nodes):
        call = node.params.get("call") if node.op == "opaque" else None
        if not isinstance(call, OpaqueCall):
            continue
        params = tuple((name, _plain_key(v)) for name, v in sorted(call.params.items()))
        if any(k is None for _, k in params):
            continue
        key = (call.primitive, params, call.out_types)
        try:
            one = shared.setdefault(key, call)
        except TypeError:  # an unhashable parameter
            continue
        if one is not call:
            nodes[i] = Node(node.op, node.inputs, Params({**node.params, "call": one}), node.type)
    return Program(tuple(nodes), program.inputs, program.outputs, program.effects)


def split_repeated(program: Program) -> Split | None:
    """Cut ``program`` around its longest run of identical parts; None if it has none.

    A program with effects (prints, callbacks) is not cut: its parts would not keep them."""
    if program.effects:
        return None
    program = share_plain_opaque_calls(program)
    free = constant_nodes(program)
    order = [i for i in program.live_nodes() if i not in free and program.nodes[i].op != "input"]
    if len(order) < 2 * MIN_UNIT_NODES:
        return None
    split = _cut(program, free, order, set())
    if split is None:
        # values live across most of the program (a tied embedding read at both ends, a padding
        # mask's bias read by every layer) keep every cut from having one live value: let them
        # cross the cuts as interface values of each part, computed (with what they read) first,
        # so the first layer does not compute what the others read
        _, first_use, last_use = _liveness(program, order)
        ambient = {i for i, k in last_use.items() if k - first_use[i] >= len(order) // 2}
        if ambient:
            hoisted, front = _hoisted(program, order, ambient)
            split = _cut(program, free, hoisted, ambient, front - 1)
    return split


def _liveness(program: Program, order: Sequence[int]) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """(position in ``order``, first use, last use) of the values ``order`` computes and reads."""
    pos = {i: k for k, i in enumerate(order)}
    end = len(order)  # a program output is read "after the end"
    # a program input counts as live from its first use to its last, like a computed value, so
    # the first layer (reading the model's input) cuts where the others (reading the residual) do
    inputs = set(program.inputs)
    first_use: dict[int, int] = {i: k for k, i in enumerate(order)}
    last_use = dict.fromkeys(order, -1)
    for k, i in enumerate(order):
        for j in program.nodes[i].inputs:
            if j in pos or j in inputs:
                first_use.setdefault(j, k)
                last_use[j] = max(last_use.get(j, -1), k)
    for o in program.outputs:
        if o in last_use:
            last_use[o] = end
    return pos, first_use, last_use


def _hoisted(program: Program, order: Sequence[int], values: set[int]) -> tuple[list[int], int]:
    """``order`` with ``values`` and everything of ``order`` they read moved to the front (each
    group keeping its relative order: still a topological order), and how many were moved."""
    in_order = set(order)
    cone: set[int] = set()
    stack = [v for v in values if v in in_order]
    while stack:
        i = stack.pop()
        if i not in cone:
            cone.add(i)
            stack.extend(j for j in program.nodes[i].inputs if j in in_order)
    return [i for i in order if i in cone] + [i for i in order if i not in cone], len(cone)


def _cut(program: Program, free: set[int], order: Sequence[int], ambient: set[int],
         cut_after: int = -1) -> Split | None:
    """The split of ``order`` around its longest run of identical parts (``ambient`` values not
    counted live at the cuts; also cut after position ``cut_after`` when it is >= 0), or None."""
    pos, first_use, last_use = _liveness(program, order)
    end = len(order)
    readers: dict[int, set[int]] = {}
    for i in order:
        for j in program.nodes[i].inputs:
            readers.setdefault(j, set()).add(i)
    opening = [0] * (end + 1)
    closing = [0] * (end + 1)
    for i, k in last_use.items():
        if k > first_use[i] and i not in ambient:
            opening[first_use[i]] += 1
            closing[k] += 1
    # cut after position k when order[k] is the only value still read and at least two ops read
    # it (a residual stream: the next block and its skip connection), never inside a plain chain
    cuts: list[int] = [cut_after] if 0 <= cut_after < end - 1 else []
    live = 0
    for k, i in enumerate(order):
        live += opening[k] - closing[k]
        if k != cut_after and (live == 1 and last_use[i] > k and len(readers.get(i, ())) >= 2
                and program.nodes[i].type is not None and k < end - 1 and i not in ambient):
            cuts.append(k)
    bounds = [-1, *cuts, end - 1]
    segments = [list(order[lo + 1:hi + 1]) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    if len(segments) < 2:
        return None

    def outputs_of(body: Sequence[int]) -> list[int]:
        last = pos[body[-1]]
        return [i for i in body if last_use[i] > last]

    ids: dict[Program, int] = {}
    keys = [ids.setdefault(_part(program, free, s, outputs_of(s)).program, len(ids)) for s in segments]
    run = _best_run(keys, [len(s) for s in segments])
    if run is None:
        return None
    start, period, repeats = run
    groups = [segments[:start]]
    groups += [segments[start + r * period:start + (r + 1) * period] for r in range(repeats)]
    groups.append(segments[start + repeats * period:])
    parts = []
    for group in groups:
        body = [i for s in group for i in s]
        if body:
            parts.append(_part(program, free, body, outputs_of(body)))
    return Split(tuple(parts), repeats, sum(len(s) for s in groups[1]))


def union(programs: Sequence[Program]) -> Program:
    """One program computing ``programs`` side by side: all their inputs, then all their outputs,
    in order (the parts around the repeated run are optimized in one e-graph run this way: each
    run has a fixed cost)."""
    b = ProgramBuilder()
    outputs: list[int] = []
    for program in programs:
        local = {i: b.input(program.type_of(i)) for i in program.inputs}
        for i in program.live_nodes():
            if i not in local:
                n = program.nodes[i]
                local[i] = b.add_node(Node(n.op, tuple(local[k] for k in n.inputs), n.params, n.type))
        outputs += [local[o] for o in program.outputs]
    return b.build(outputs)


def unpack(joined: Program, programs: Sequence[Program]) -> list[Program] | None:
    """``joined``, a program computing what ``union(programs)`` computes, cut back into one
    program per part (same inputs and outputs as the part); None if one part's outputs read
    another part's inputs."""
    if joined.input_types != tuple(t for p in programs for t in p.input_types) or joined.effects:
        return None
    pieces = []
    n_in = n_out = 0
    for program in programs:
        own = joined.inputs[n_in:n_in + len(program.inputs)]
        outs = joined.outputs[n_out:n_out + len(program.outputs)]
        n_in, n_out = n_in + len(program.inputs), n_out + len(program.outputs)
        cone = set(outs)
        for i in range(len(joined.nodes) - 1, -1, -1):
            if i in cone:
                cone.update(joined.nodes[i].inputs)
        b = ProgramBuilder()
        local = {i: b.input(joined.type_of(i)) for i in own}
        for i in sorted(cone):
            if i in local:
                continue
            n = joined.nodes[i]
            if n.op == "input":  # another part's input
                return None
            local[i] = b.add_node(Node(n.op, tuple(local[k] for k in n.inputs), n.params, n.type))
        piece = b.build([local[o] for o in outs])
        if piece.output_types != program.output_types:
            return None
        pieces.append(piece)
    return pieces


def splice(program: Program, split: Split, optimized: dict[Program, Program]) -> Program:
    """``program`` with every part replaced by ``optimized[part.program]`` (same values)."""
    free = constant_nodes(program)
    b = ProgramBuilder()
    new: dict[int, int] = {i: b.add_node(program.nodes[i]) for i in program.inputs}

    def ref(j: int) -> int:
        if j not in new:
            if j not in free:
                raise AssertionError(f"value %{j} is used before the part computing it")
            n = program.nodes[j]
            new[j] = b.add_node(Node(n.op, tuple(ref(k) for k in n.inputs), n.params, n.type))
        return new[j]

    for part in split.parts:
        sub = optimized[part.program]
        local = dict(zip(sub.inputs, (ref(j) for j in part.interface)))
        for i in sub.live_nodes():
            if i not in local:
                n = sub.nodes[i]
                local[i] = b.add_node(Node(n.op, tuple(local[k] for k in n.inputs), n.params, n.type))
        for old, o in zip(part.outputs, sub.outputs):
            new[old] = local[o]
    return b.build([ref(o) for o in program.outputs])
