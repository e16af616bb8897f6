"""Recognising ALiBi among attention biases, so the kernels compute it instead of reading it.

A bias is taken as `kernels.alibi.Alibi` only when the program provably computes exactly
``dtype(f32(slope[b, h]) · f32(row_coef·i + col_coef·j + offset))``:

* up to views (``broadcast_in_dim``, reshapes that insert or drop length-1 axes) and at most one
  ``convert_element_type`` from float32 to the bias dtype (the single rounding the kernels repeat),
  and an optional ``neg`` (exact: -(a·p) = (-a)·p in IEEE arithmetic),
* the bias is one float32 ``mul`` of two operands, in either order:
  - the slopes: views of a static value (`static_values.StaticValues`: constants, literals and
    what is computed from them, float32) whose only non-unit axes become the bias's B or H axes;
  - the positions: an affine function of the query and key indices, built from ``iota``,
    integer-valued literals or constants, ``add``, ``sub``, ``neg``, multiplication by an integer
    constant, converts between integer and float32/float64 types, and views. Every intermediate
    value is an integer of magnitude below 2^24 (checked from the shapes), so each step is exact
    in any of those dtypes, and the float32 conversion the kernels do gives the same operand.

Anything else (a position from runtime values, a bf16 product, slopes that vary over queries)
is not ALiBi here: the bias is read from memory as before. The check is structural and exact,
never a numerical comparison with a tolerance.
"""

from __future__ import annotations

import numpy as np

from .ir import Program
from .kernels.alibi import ALIBI_DTYPES, EXACT_INTEGERS, Alibi
from .static_values import StaticValues

#: dtypes positions may pass through exactly (integers below 2^24)
POSITION_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64")
#: the bias's logical axes: B, H, Sq, Sk
ROW_AXIS, KEY_AXIS = 2, 3

Affine = tuple[tuple[int, ...], int]  # (coefficient per axis of the node, constant)


def _unit_axes_view(src: tuple[int, ...], out: tuple[int, ...]) -> list[int | None] | None:
    """For a reshape that only inserts or drops length-1 axes: for each source axis, the output
    axis holding it (None for a dropped length-1 axis); None for any other reshape."""
    kept_src = [a for a, n in enumerate(src) if n != 1]
    kept_out = [a for a, n in enumerate(out) if n != 1]
    if [src[a] for a in kept_src] != [out[a] for a in kept_out]:
        return None
    where: list[int | None] = [None] * len(src)
    for a, b in zip(kept_src, kept_out):
        where[a] = b
    return where


def _view_source(program: Program, node_id: int) -> tuple[int, list[int | None]] | None:
    """(operand, for each operand axis the node's axis it lands on, None for a length-1 axis)
    when the node is a view (a broadcast or a unit-axes reshape), else None."""
    node = program.nodes[node_id]
    if node.op not in ("broadcast_in_dim", "reshape") or len(node.inputs) != 1:
        return None
    src = tuple(program.type_of(node.inputs[0]).shape)
    out = tuple(program.type_of(node_id).shape)
    if node.op == "broadcast_in_dim":
        dims = tuple(node.params["broadcast_dimensions"])
        return node.inputs[0], [None if n == 1 else d for n, d in zip(src, dims)]
    where = _unit_axes_view(src, out)
    return None if where is None else (node.inputs[0], where)


def _range(form: Affine, shape: tuple[int, ...]) -> tuple[int, int]:
    """The least and greatest value over the node's indices."""
    coefs, constant = form
    low = constant + sum(min(0, c * (n - 1)) for c, n in zip(coefs, shape))
    high = constant + sum(max(0, c * (n - 1)) for c, n in zip(coefs, shape))
    return low, high


def _exact_in(dtype: str, low: int, high: int) -> bool:
    """Every integer in [low, high] is held exactly by ``dtype`` (no wrap, no rounding), and is
    below 2^24 in magnitude (exact in float32)."""
    if max(-low, high) >= EXACT_INTEGERS:
        return False
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return int(info.min) <= low and high <= int(info.max)
    return True


class _Positions:
    """Affine forms of integer-valued position arrays (module docstring), memoised per node."""

    def __init__(self, program: Program, static: StaticValues) -> None:
        self.program, self.static = program, static
        self._forms: dict[int, Affine | None] = {}

    def form(self, node_id: int, depth: int = 0) -> Affine | None:
        if node_id not in self._forms:
            self._forms[node_id] = None if depth > 64 else self._form(node_id, depth)
        return self._forms[node_id]

    def _form(self, node_id: int, depth: int) -> Affine | None:
        t = self.program.nodes[node_id].type
        if t is None or t.dtype not in POSITION_DTYPES:
            return None
        shape = tuple(t.shape)
        rank = len(shape)
        form = self._structural(node_id, shape, depth + 1)
        if form is None:
            form = self._fitted(node_id, shape)
        if form is None or len(form[0]) != rank or not _exact_in(t.dtype, *_range(form, shape)):
            return None
        coefs, constant = form
        return tuple(0 if n == 1 else c for c, n in zip(coefs, shape)), constant

    def _operand(self, input_id: int, rank: int, depth: int) -> Affine | None:
        """An elementwise operand's form over the node's axes (a rank-0 operand broadcasts)."""
        form = self.form(input_id, depth)
        if form is None:
            return None
        if not form[0]:
            return (0,) * rank, form[1]
        return form if len(form[0]) == rank else None

    def _structural(self, node_id: int, shape: tuple[int, ...], depth: int) -> Affine | None:
        node = self.program.nodes[node_id]
        op, rank = node.op, len(shape)
        if op == "iota":
            coefs = [0] * rank
            coefs[int(node.params["dimension"])] = 1
            return tuple(coefs), 0
        if op in ("broadcast_in_dim", "reshape"):
            view = _view_source(self.program, node_id)
            if view is None:
                return None
            src = self.form(view[0], depth)
            if src is None:
                return None
            coefs = [0] * rank
            for c, axis in zip(src[0], view[1]):
                if axis is not None:
                    coefs[axis] = c
            return tuple(coefs), src[1]
        if op == "convert_element_type":
            return self.form(node.inputs[0], depth)
        if op == "neg":
            a = self._operand(node.inputs[0], rank, depth)
            return None if a is None else (tuple(-c for c in a[0]), -a[1])
        if op in ("add", "sub", "mul") and len(node.inputs) == 2:
            a, b = (self._operand(i, rank, depth) for i in node.inputs)
            if a is None or b is None:
                return None
            if op == "add":
                return tuple(x + y for x, y in zip(a[0], b[0])), a[1] + b[1]
            if op == "sub":
                return tuple(x - y for x, y in zip(a[0], b[0])), a[1] - b[1]
            if any(a[0]) and any(b[0]):
                return None  # a product of two positions is not affine
            (c, scaled) = (a[1], b) if not any(a[0]) else (b[1], a)
            return tuple(c * x for x in scaled[0]), c * scaled[1]
        return None

    def _fitted(self, node_id: int, shape: tuple[int, ...]) -> Affine | None:
        """A static integer-valued array (e.g. a NumPy arange captured as a constant) that is
        exactly affine in its indices: fitted from its corner and unit steps, then checked at
        every element."""
        value = self.static.value(node_id)
        if value is None or value.dtype.kind not in "iuf" or not np.all(np.isfinite(value)):
            return None
        if value.dtype.kind == "f" and not np.array_equal(value, np.trunc(value)):
            return None
        if value.size and np.max(np.abs(value.astype(np.float64))) >= EXACT_INTEGERS:
            return None
        v = value.astype(np.int64)
        origin = (0,) * len(shape)
        constant = int(v[origin]) if v.size else 0
        coefs = []
        for a, n in enumerate(shape):
            step = tuple(1 if b == a else 0 for b in range(len(shape)))
            coefs.append(int(v[step]) - constant if n > 1 else 0)
        fitted = np.int64(constant)
        for a, (c, n) in enumerate(zip(coefs, shape)):  # broadcast index vectors: no index grid
            fitted = fitted + c * np.arange(n, dtype=np.int64).reshape([n if b == a else 1 for b in range(len(shape))])
        return (tuple(coefs), constant) if np.array_equal(v, np.broadcast_to(fitted, shape)) else None


def _peel_views(program: Program, node_id: int, axes: list[int | None]) -> tuple[int, list[int | None]]:
    """Follow views down from ``node_id`` whose axes sit at the bias's logical ``axes``: the
    first non-view node and where its axes sit."""
    while True:
        view = _view_source(program, node_id)
        if view is None:
            return node_id, axes
        node_id, where = view
        axes = [None if w is None else axes[w] for w in where]


def _slopes(program: Program, static: StaticValues, node_id: int, axes: list[int | None]) -> np.ndarray | None:
    """float32 [1 or B, 1 or H]: a static float32 operand whose non-unit axes are B or H."""
    node_id, axes = _peel_views(program, node_id, axes)
    value = static.value(node_id)
    if value is None or value.dtype != np.float32:
        return None
    shape = value.shape
    logical = [a for a, n in zip(axes, shape) if n != 1]
    if any(a not in (0, 1) for a in logical) or len(set(logical)) != len(logical):
        return None
    table = value.reshape([n for n in shape if n != 1])
    if logical == [1, 0]:
        table = table.T
    sizes = {a: n for a, n in zip(logical, (n for n in shape if n != 1))}
    return table.reshape(sizes.get(0, 1), sizes.get(1, 1))


def alibi_of(program: Program, bias_id: int, static: StaticValues | None = None) -> Alibi | None:
    """The bias node ``bias_id`` (an attention's bias, broadcastable to [B, H, Sq, Sk]) as ALiBi,
    or None where the program does not provably compute it as ALiBi (module docstring)."""
    static = static or StaticValues(program)
    t = program.nodes[bias_id].type
    if t is None or t.rank > 4 or t.dtype not in ALIBI_DTYPES:
        return None
    node_id, axes = _peel_views(program, bias_id, list(range(4 - t.rank, 4)))
    rounding = t.dtype
    node = program.nodes[node_id]
    if node.op == "convert_element_type" and node.type is not None:
        src = program.type_of(node.inputs[0])
        if src.dtype != "float32":
            return None
        node_id, axes = _peel_views(program, node.inputs[0], axes)
        node = program.nodes[node_id]
    elif t.dtype != "float32":
        return None
    negate = node.op == "neg"
    if negate:
        node_id, axes = _peel_views(program, node.inputs[0], axes)
        node = program.nodes[node_id]
    if node.op != "mul" or node.type is None or node.type.dtype != "float32" or len(node.inputs) != 2:
        return None
    positions = _Positions(program, static)
    for slope_id, position_id in (node.inputs, node.inputs[::-1]):
        slopes = _slopes(program, static, slope_id, axes)
        form = positions.form(position_id) if slopes is not None else None
        if form is None or program.type_of(position_id).dtype != "float32":
            continue
        coefs, constant = form
        if len(coefs) != len(axes):
            continue
        by_axis = {ROW_AXIS: 0, KEY_AXIS: 0}
        if any(c and axes[a] not in by_axis for a, c in enumerate(coefs)):
            continue  # positions that vary over B or H
        for a, c in enumerate(coefs):
            if c:
                by_axis[axes[a]] += c
        table = -slopes if negate else slopes
        return Alibi.from_array(table, row_coef=by_axis[ROW_AXIS], col_coef=by_axis[KEY_AXIS],
                                offset=constant, dtype=rounding)
    return None
