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
from .static_values import StaticValues, keeps_every_row

ATTENTION_OPS = ("attention", "attention_fp8", "packed_attention", "attention_vjp")
STEER_FACTOR = 1e6  # how much dearer every other op is when steering extraction to attention


FAST_MATH = 'raised under precision="fast_math"'


@dataclass(frozen=True)
class SoftmaxMiss:
    """One softmax of the chosen program that is not inside attention (or an exponential that
    spells one but for float edge cases), and why."""

    node: int
    reason: str
    what: str = "softmax"

    def __str__(self) -> str:
        return f"{self.what} %{self.node}: {self.reason}"


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


def _scores_source(program: Program, scores: int, path: list[Node] | None = None) -> Node:
    """The op that produced a softmax's ``scores``, seen through views, scales, biases and selects
    (each op seen through is appended to ``path``)."""
    seen = program.nodes[scores]
    path = [] if path is None else path
    for _ in range(16):
        path.append(seen)
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


def softmax_misses(program: Program, precision: str = "exact") -> list[SoftmaxMiss]:
    """A `SoftmaxMiss` for each live softmax of ``program`` (every one is outside attention), and,
    under "exact", for each exponential normalised over its last axis and multiplied by V that
    only fast math would read as a softmax (no max subtracted, exp(s - logsumexp(s)))."""
    live = set(program.live_nodes())
    users = _consumers(program, live)
    outputs = set(program.outputs)
    misses = []
    for i in sorted(live):
        node = program.nodes[i]
        if node.op == "exp" and precision == "exact":
            spelling = _unstable_softmax(program, i, users)
            if spelling:
                misses.append(SoftmaxMiss(i, f"{spelling} (not exact; {FAST_MATH})", "exp"))
        if node.op == "exp":
            shared = _written_out_softmax(program, i, users)
            if shared:
                misses.append(SoftmaxMiss(i, shared, "exp"))
        scores = _softmax_scores(program, i)
        if scores is None:
            continue
        readers = _skip_views(program, i, users)
        dots = [u for u in readers if program.nodes[u].op == "dot_general"]
        others = [program.nodes[u].op for u in readers if program.nodes[u].op != "dot_general"]
        path: list[Node] = []
        source = _scores_source(program, scores, path)
        where_mask = _softmax_where_mask(program, i, scores, users)
        if where_mask is not None:
            reason = _where_reason(program, where_mask, readers)
        elif source.op == "dot_general" and (source.type.dtype == "float64" or (
                source.type.dtype == "float16" and precision == "exact")):
            reason = _unraised_dtype(source.type.dtype)
        elif i in outputs:
            reason = "the attention weights are also an output (attention does not return them)"
        elif not dots:
            reason = (f"its result is not multiplied by V: it feeds {', '.join(sorted(set(others)))}"
                      if others else "its result is not multiplied by V")
            if others == ["mul"] and precision == "exact" and _feeds_dot(program, readers[0], users):
                reason += f" (P times a factor, then by V: {FAST_MATH} where the factor is constant along the keys)"
            elif "mul" in others and has_attention(program):  # a jax.grad program whose forward became attention
                if _scores_summed_with_a_cotangent(program, path, users):
                    reason += (" (a traced scale's own gradient, sum(g ⊙ Q·Kᵀ), reads the scores' cotangent g: "
                               "from the op's dQ it would sum across the op's boundary, where one grouping can "
                               f"overflow and the other not: not exact; {FAST_MATH})")
                else:
                    reason += " (its gradient's P·dP: the forward is attention, this spelling's backward is not raised)"
        elif source.op != "dot_general":
            reason = (f"its scores are not a matmul Q·Kᵀ with a scale, soft-cap, bias or where-mask "
                      f"(nearest producer: {source.op})")
        else:  # the forward's own spelling first: a gradient program's backward reads P as well
            reason = _score_spelling(program, path, precision) or (
                _read_elsewhere(others, program, i, users) if others else
                "Q·Kᵀ, softmax and P·V do not line up as attention (the softmax is not over the keys "
                "both matmuls contract, or P·V contracts another axis)")
        misses.append(SoftmaxMiss(i, reason))
    return misses


def _read_elsewhere(others: list[str], program: Program, node_id: int, users: dict[int, list[int]]) -> str:
    """Why attention weights read by more than P·V stay: a jax.grad program's written-out softmax
    backward (``P * dP``, summed over the keys) that no gradient rule matched, or another use."""
    if _feeds_row_sum_of_product(program, node_id, users):
        return ("the attention weights are also read by the gradient's written-out softmax backward, "
                "which no rule raised to the op's gradients (attention does not return the weights)")
    readers = ", ".join(sorted(set(others)))
    return f"the attention weights are also used elsewhere, by {readers} (attention does not return them)"


def _feeds_row_sum_of_product(program: Program, node_id: int, users: dict[int, list[int]]) -> bool:
    """Whether the weights (through views and casts) are multiplied by something that is then
    summed: the ``sum(P * dP)`` of softmax's backward."""
    for reader in _skip_views(program, node_id, users):
        if program.nodes[reader].op == "mul":
            for user in _skip_views(program, reader, users):
                if program.nodes[user].op in ("reduce_sum", "neg"):
                    return True
    return False


def _unraised_dtype(dtype: str) -> str:
    """Why scores of this dtype are not raised (rules/attention.py, `scores_of_matmul`)."""
    if dtype == "float64":
        return "its scores are float64: the op computes in float32 (not exact)"
    return (f"its scores are float16, which overflow past 65504 where the op's float32 scores do not "
            f"(not exact; {FAST_MATH}; a product with preferred_element_type=float32 is raised)")


def _softmax_scores(program: Program, node_id: int) -> int | None:
    """The scores of a softmax: a `softmax` node's operand, or x where the node is the stable
    softmax written out, ``exp(x - max(x)) / sum(exp(x - max(x)))`` over the last axis (the cost
    model may price that form as cheap as the node); else None."""
    nodes = program.nodes
    node = nodes[node_id]
    if node.op == "softmax":
        return node.inputs[0]
    if node.op != "div":
        return None
    exp_id, total = node.inputs[0], nodes[node.inputs[1]]
    exp = nodes[exp_id]
    while total.op in ("broadcast_in_dim", "reshape", "convert_element_type"):
        total = nodes[total.inputs[0]]
    if exp.op != "exp" or total.op != "reduce_sum" or total.inputs[0] not in (exp_id, *_where_kept(program, total.inputs[0], exp_id)):
        return None
    shifted = nodes[exp.inputs[0]]
    if shifted.op != "sub":
        return None
    row_max = nodes[shifted.inputs[1]]
    while row_max.op in ("broadcast_in_dim", "reshape", "stop_gradient", "max"):
        row_max = nodes[row_max.inputs[-1]]
    return shifted.inputs[0] if row_max.op == "reduce_max" and row_max.inputs[0] == shifted.inputs[0] else None


def _where_kept(program: Program, node_id: int, value: int) -> tuple[int, ...]:
    """(node_id,) when it is ``where(mask, value, 0)`` (jax.nn.softmax's masked row sum), else ()."""
    node = program.nodes[node_id]
    if node.op == "select_n" and len(node.inputs) == 3 and node.inputs[2] == value and _is_fill(program, node.inputs[1], 0.0):
        return (node_id,)
    return ()


def _is_fill(program: Program, node_id: int, value: float) -> bool:
    """Whether the node is the literal ``value`` broadcast (through casts)."""
    node = program.nodes[node_id]
    while node.op in ("broadcast_in_dim", "convert_element_type"):
        node = program.nodes[node.inputs[0]]
    return node.op == "literal" and float(node["value"]) == value


def _softmax_where_mask(program: Program, softmax_id: int, scores: int, users: dict[int, list[int]]) -> int | None:
    """The mask of ``jax.nn.softmax(s, where=mask)`` when the softmax is one: its scores are
    ``where(mask, s, -inf)`` and a reader zeroes it again, ``where(mask, P, 0)``; else None."""
    hidden = program.nodes[scores]
    if hidden.op != "select_n" or len(hidden.inputs) != 3 or not _is_fill(program, hidden.inputs[1], float("-inf")):
        return None
    mask = hidden.inputs[0]
    for u in _skip_views(program, softmax_id, users):
        reader = program.nodes[u]
        if reader.op == "select_n" and reader.inputs[0] == mask and _is_fill(program, reader.inputs[1], 0.0):
            return mask
    return None


def _where_reason(program: Program, mask: int, readers: list[int]) -> str:
    """Why ``jax.nn.softmax(s, where=mask)`` · V is not raised: the mask may hide a whole row (there
    the where-softmax is 0 and attention NaN), or, where it keeps every row, its zeroed P is what a
    gradient program reads for V's gradient (the op's differs in a NaN row)."""
    value = StaticValues(program).value(mask)
    if value is None:
        return ("jax.nn.softmax(s, where=mask): the mask depends on the inputs and may hide a whole row (key "
                "padding), where the where-softmax gives 0 and attention NaN (not exact)")
    if not keeps_every_row(value):
        return ("jax.nn.softmax(s, where=mask): the mask hides a whole row, where the where-softmax gives 0 and "
                "attention NaN (not exact)")
    return ("jax.nn.softmax(s, where=mask): its P, zeroed where the mask hides, is read beside the product with V "
            f"(V's gradient Pᵀ·dO differs from the op's in a row of NaN scores: not exact; {FAST_MATH})")


def _scores_summed_with_a_cotangent(program: Program, path: list[Node], users: dict[int, list[int]]) -> bool:
    """Whether the Q·Kᵀ under a softmax's scores (``path``, from `_scores_source`) is multiplied by a
    traced factor and also by another tensor that is then summed: the factor's gradient ``sum(g ⊙ x)``
    as jax.grad writes it (CLIP's and Swin-v2's learned logit scale)."""
    if not path or not any(n.op == "mul" for n in path):
        return False
    on_path = {id(n) for n in path}
    for dot in (i for i in path[-1].inputs if program.nodes[i].op == "dot_general"):
        for product in users.get(dot, ()):
            node = program.nodes[product]
            if node.op == "mul" and id(node) not in on_path and any(
                    program.nodes[u].op == "reduce_sum" for u in users.get(product, ())):
                return True
    return False


def _feeds_dot(program: Program, node_id: int, users: dict[int, list[int]]) -> bool:
    return any(program.nodes[u].op == "dot_general" for u in _skip_views(program, node_id, users))


def _is_tensor(program: Program, node_id: int) -> bool:
    """Whether an operand varies (not a broadcast scalar literal)."""
    node = program.nodes[node_id]
    return not (node.op == "broadcast_in_dim" and program.nodes[node.inputs[0]].type.rank == 0
                and program.nodes[node.inputs[0]].op == "literal")


def _is_indicator(program: Program, node_id: int) -> bool:
    """Whether a factor is a 0/1 mask: a cast of booleans, a select of 0 and 1, or a static 0/1 value."""
    node = program.nodes[node_id]
    while node.op in ("broadcast_in_dim", "reshape", "transpose"):
        node = program.nodes[node.inputs[0]]
    if node.op == "convert_element_type" and program.nodes[node.inputs[0]].type.dtype == "bool":
        return True
    if node.op == "select_n" and len(node.inputs) == 3:
        low, high = node.inputs[1:]
        if (_is_fill(program, low, 0.0) and _is_fill(program, high, 1.0)) or (
                _is_fill(program, low, 1.0) and _is_fill(program, high, 0.0)):
            return True
    value = StaticValues(program).value(node_id)
    return value is not None and bool(((value == 0) | (value == 1)).all())


def _is_row_constant(program: Program, node_id: int) -> bool:
    """Whether a factor is a broadcast constant along the last two axes (the queries and keys)."""
    node = program.nodes[node_id]
    if node.op != "broadcast_in_dim" or node.type.rank < 2:
        return False
    source = program.nodes[node.inputs[0]].type.shape
    dims = tuple(node["broadcast_dimensions"])
    rank = node.type.rank
    return all(source[k] == 1 for k, d in enumerate(dims) if d >= rank - 2)


def _score_spelling(program: Program, path: list[Node], precision: str) -> str | None:
    """Why scores spelled with a multiplicative mask or a bias after the where-mask are not raised
    (read off the ops between the softmax and Q·Kᵀ), or None."""
    ops = [n.op for n in path]
    products = [n for n in path if n.op == "mul" and all(_is_tensor(program, j) for j in n.inputs)]
    if "select_n" not in ops and any(any(_is_indicator(program, j) for j in n.inputs) for n in products):
        reason = ("its scores are multiplied by a mask (w·b - C·(1-b)): not a where-mask where a hidden score is "
                  "Inf or NaN (not exact")
        return reason + (f"; {FAST_MATH} for a 0/1 causal mask)" if precision == "exact" else ")")
    if any(any(_is_row_constant(program, j) for j in n.inputs) for n in products):
        return ("its scores are multiplied by a tensor factor constant along the queries and keys (a per-head "
                "scale, as Swin-v2's logit scale): raised only where it multiplies the bare Q·Kᵀ, whose Q it moves onto")
    rounded = _rounded_after_bias(program, path)
    if rounded:
        return (f"its scores are rounded to {rounded} after a bias is added (T5 in torch: (s + mask).type_as(q)); "
                "the op adds the bias to float32 scores and never rounds them (not exact)")
    if "select_n" in ops and any(op in ("add", "sub") for op in ops[:ops.index("select_n")]):
        reason = "a bias is added after the where-mask, so the hidden scores are fill + bias, not one fill (not exact"
        return reason + (f"; {FAST_MATH} for a -inf or finfo.min fill)" if precision == "exact" else ")")
    return None


def _rounded_after_bias(program: Program, path: list[Node]) -> str | None:
    """The narrower float dtype the scores are cast to between an addition (a bias) and the
    softmax, seen from the softmax (``path``'s order), or None."""
    for n in path:
        if n.op in ("add", "sub"):
            return None
        if n.op == "convert_element_type" and n.type.dtype in ("bfloat16", "float16"):
            source = program.nodes[n.inputs[0]].type.dtype
            if source in ("float32", "float64") and any(m.op in ("add", "sub") for m in path[path.index(n):]):
                return n.type.dtype
    return None


def _through(program: Program, node_id: int, ops: tuple[str, ...]) -> Node:
    """The node under ``node_id`` seen through ``ops`` (single-operand views and casts)."""
    node = program.nodes[node_id]
    for _ in range(8):
        if node.op not in ops:
            break
        node = program.nodes[node.inputs[0]]
    return node


def _written_out_softmax(program: Program, exp_id: int, users: dict[int, list[int]]) -> str | None:
    """Why a stable softmax written out by hand (``exp(s - max(s))`` divided by its row sum, then
    multiplied by V) stayed expanded in the chosen program, or None: the rules raise that spelling to
    softmax, so it stays only where its pieces are read by more than the softmax (a jax.grad
    program's written-out backward: max's VJP reads the max, the backward reads the exponentials)."""
    nodes = program.nodes
    arg = nodes[program.nodes[exp_id].inputs[0]]
    if arg.op != "sub":
        return None
    shift = _through(program, arg.inputs[1], ("broadcast_in_dim", "reshape", "convert_element_type", "stop_gradient"))
    last = program.nodes[exp_id].type.rank - 1
    if shift.op == "max":  # max(-inf, m), as jax.nn.softmax writes it
        shift = max((_through(program, j, ("broadcast_in_dim", "convert_element_type")) for j in shift.inputs),
                    key=lambda n: n.op == "reduce_max")
    if shift.op != "reduce_max" or tuple(shift["axes"]) != (last,):
        return None
    readers = _skip_views(program, exp_id, users)
    normalised = [u for u in readers if nodes[u].op == "div" and nodes[u].inputs[0] == exp_id]
    if not any(_feeds_dot(program, u, users) for u in normalised):
        return None
    others = sorted({nodes[u].op for u in readers if nodes[u].op not in ("div", "reduce_sum")}
                    | {nodes[u].op for d in normalised for u in _skip_views(program, d, users)
                       if nodes[u].op != "dot_general"})
    if not others:
        return None
    return ("a stable softmax written out (exp(s - max) / sum) and multiplied by V, left expanded: its "
            f"exponentials or weights are also read by {', '.join(others)} (a jax.grad program's written-out "
            "backward that no rule raised to the op's gradients)")


def _unstable_softmax(program: Program, exp_id: int, users: dict[int, list[int]]) -> str | None:
    """How an exponential left in the chosen program spells softmax but for float edge cases, or
    None: divided by its own row sum (or its product with V divided by it) with no max subtracted,
    or exp(s - logsumexp(s)) multiplied by V."""
    nodes = program.nodes
    exp = nodes[exp_id]
    arg = nodes[exp.inputs[0]]
    readers = _skip_views(program, exp_id, users)
    if arg.op == "sub" and nodes[arg.inputs[1]].op == "broadcast_in_dim":
        shift = nodes[nodes[arg.inputs[1]].inputs[0]]
        if shift.op == "add" and any(nodes[j].op == "log" for j in shift.inputs) and _feeds_dot(program, exp_id, users):
            return "exp(s - logsumexp(s)) multiplied by V: softmax but in a row holding +inf"
        return None
    last = exp.type.rank - 1
    row_sums = [u for u in readers if nodes[u].op == "reduce_sum" and tuple(nodes[u]["axes"]) == (last,)]
    if not row_sums:
        return None
    normalised = any(nodes[u].op == "div" and nodes[u].inputs[0] == exp_id and _feeds_dot(program, u, users)
                     for u in readers)
    if normalised or any(nodes[u].op == "dot_general" for u in readers):
        return ("exp(s) normalised by its row sum with no max subtracted, then multiplied by V: softmax but where "
                "exp overflows (a score past 88)")
    return None


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
