"""What an attention mask is: causal, a sliding window, key padding, or arbitrary.

The Attention op carries its boolean mask (or additive bias) as an operand; what kind of mask it
is decides which kernel paths apply (tile skipping for causal and windows, per-batch key lengths
for padding). This reads the kind off the chosen program: a mask computed from iotas and
constants alone is evaluated and its pattern recognised; one that depends on the inputs is key
padding when it varies only along the batch and key axes, and arbitrary otherwise.
"""

from __future__ import annotations

import numpy as np

from .alibi_bias import alibi_of
from .ir import Program
from .static_values import StaticValues

STATIC_OPS_LIMIT = 64  # a static mask sub-program larger than this is not evaluated


def _ancestors(program: Program, node_id: int) -> list[int]:
    seen, stack = set(), [node_id]
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(program.nodes[i].inputs)
    return sorted(seen)


def _static_value(program: Program, node_id: int) -> np.ndarray | None:
    """The mask's value when it depends on no input (iotas, literals, constants), else None."""
    if len(_ancestors(program, node_id)) > STATIC_OPS_LIMIT:
        return None
    return StaticValues(program).value(node_id)


def _varying_axes(program: Program, node_id: int) -> set[int] | None:
    """Axes of the mask along which it may vary: those its broadcasts do not create."""
    node = program.nodes[node_id]
    rank = node.type.rank
    if node.op == "broadcast_in_dim":
        source = program.nodes[node.inputs[0]]
        dims = tuple(node["broadcast_dimensions"])
        return {d for k, d in enumerate(dims) if source.type.shape[k] != 1}
    if node.op in ("convert_element_type", "not"):
        return _varying_axes(program, node.inputs[0])
    if node.op in ("and", "or", "mul", "min", "max", "select_n"):
        parts = [_varying_axes(program, i) for i in node.inputs]
        if any(p is None for p in parts):
            return None
        return set().union(*parts)
    if node.op == "reshape":  # only size-1 axes inserted or removed: the others keep their order
        source = program.nodes[node.inputs[0]].type.shape
        src_axes = [k for k, n in enumerate(source) if n != 1]
        out_axes = [k for k, n in enumerate(node.type.shape) if n != 1]
        if [source[k] for k in src_axes] == [node.type.shape[k] for k in out_axes]:
            inner = _varying_axes(program, node.inputs[0])
            if inner is None:
                return None
            return {out_axes[src_axes.index(k)] for k in inner if k in src_axes}
        return None
    return {d for d in range(rank) if node.type.shape[d] != 1}


def _pattern(keep: np.ndarray) -> str:
    """Name the [.., Sq, Sk] pattern of a static boolean mask: one shared by every batch and head,
    or key padding (a mask that varies only along the batch and the keys, as `_varying_axes`
    names a computed one)."""
    rows = keep.reshape(-1, *keep.shape[-2:])
    if not all(np.array_equal(rows[0], r) for r in rows[1:]):
        first = keep[(slice(None), *(slice(0, 1),) * (keep.ndim - 2), slice(None))]
        return "key padding" if np.array_equal(keep, np.broadcast_to(first, keep.shape)) else "arbitrary"
    m = rows[0]
    sq, sk = m.shape
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    if np.array_equal(m, j <= i):
        return "causal"
    for w in range(1, sk):
        if np.array_equal(m, (j <= i) & (j > i - w)):
            return f"sliding window {w}"
    if np.array_equal(m, np.broadcast_to(m[:1], m.shape)):
        return "key padding"
    return "arbitrary"


def mask_kind(program: Program, mask_id: int, additive: bool = False) -> str:
    """"causal", "sliding window W", "key padding" or "arbitrary" for a boolean mask (True keeps),
    or for an additive bias whose hidden entries are -inf or very negative (``additive``); an
    additive bias the kernels compute from slopes (`alibi_bias.alibi_of`) is "ALiBi <form>"."""
    if additive:
        alibi = alibi_of(program, mask_id)
        if alibi is not None:
            return f"ALiBi {alibi.describe()}"
    value = _static_value(program, mask_id)
    if value is not None:
        keep = value > -1e4 if additive else value.astype(bool)
        if additive and not np.all((value == 0) | ~keep):
            return "bias"
        return _pattern(keep)
    if additive:
        return "bias"
    varying = _varying_axes(program, mask_id)
    rank = program.nodes[mask_id].type.rank
    if varying is not None and varying <= {0, rank - 1}:
        return "key padding"
    return "arbitrary"


__all__ = ["mask_kind"]
