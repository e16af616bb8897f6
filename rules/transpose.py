"""Transpose propagation: transposes compose, cancel, and move through every op in both
directions (sunk towards the inputs and bubbled towards the outputs), so the e-graph holds
every placement of a transpose and the cost model picks where it is cheapest: folded into a
matmul's operand or output layout, into a reshape, a broadcast, a reduction, or an
elementwise region."""

from __future__ import annotations

from egglog import String, eq, i64, union, var

from eqsat_attn.egraph.language import IntVec, Term, TermList, perm_range, shape, term_list
from eqsat_attn.egraph.rulesets import RuleSet, asking, rl, rw

transpose = RuleSet("transpose", " ".join(__doc__.split("\n\n")[0].split()))

x, a, b, c = (var(n, Term) for n in "xabc")
p, q, s, s_in, s_out, d, axes = (var(n, IntVec) for n in ("p", "q", "s", "s_in", "s_out", "d", "axes"))
lc, rc, lb, rb, sa, sb = (var(n, IntVec) for n in ("lc", "rc", "lb", "rb", "sa", "sb"))
op, dt, pr = var("op", String), var("dt", String), var("pr", String)
y, dim = var("y", i64), var("dim", i64)
NONE = IntVec.empty()
MAX_RANK = 8
MAX_CONCAT = 4  # concatenations of 2 to 4 operands (a cache and a new entry; Q/K/V weights)


@transpose.family
def compose():
    """transpose(transpose(x, p), q) is one transpose by the composed permutation."""
    yield rw(Term.transpose(Term.transpose(x, p), q), Term.transpose(x, q.map(lambda i: p[i])))


@transpose.family
def identity():
    """A transpose by the identity permutation (ranks 0 to 8) is its operand."""
    for r in range(MAX_RANK + 1):
        yield rw(Term.transpose(x, perm_range(r)), x)


@transpose.family
def unary():
    """Transposes commute with unary elementwise ops, integer powers and casts."""
    yield rw(Term.transpose(Term.unary(op, x), p), Term.unary(op, Term.transpose(x, p)))
    yield rw(Term.unary(op, Term.transpose(x, p)), Term.transpose(Term.unary(op, x), p))
    yield rw(Term.transpose(Term.integer_pow(x, y), p), Term.integer_pow(Term.transpose(x, p), y))
    yield rw(Term.integer_pow(Term.transpose(x, p), y), Term.transpose(Term.integer_pow(x, y), p))
    yield rw(Term.transpose(Term.convert(x, dt), p), Term.convert(Term.transpose(x, p), dt))
    yield rw(Term.convert(Term.transpose(x, p), dt), Term.transpose(Term.convert(x, dt), p))


@transpose.family
def binary():
    """A transpose of a binary op is the op of transposed operands, and back: from operands
    transposed alike, or from one transposed operand and a broadcast (a bias or scalar)."""
    yield rw(Term.transpose(Term.binary(op, a, b), p), Term.binary(op, Term.transpose(a, p), Term.transpose(b, p)))
    yield rw(Term.binary(op, Term.transpose(a, p), Term.transpose(b, p)), Term.transpose(Term.binary(op, a, b), p))
    bcast = Term.broadcast(x, s, d)
    yield from asking(
        Term.binary(op, Term.transpose(a, p), bcast), [], "inverse", (p, NONE, NONE, NONE), 1,
        lambda inv: Term.transpose(Term.binary(op, a, Term.transpose(bcast, inv)), p),
    )
    yield from asking(
        Term.binary(op, bcast, Term.transpose(b, p)), [], "inverse", (p, NONE, NONE, NONE), 1,
        lambda inv: Term.transpose(Term.binary(op, Term.transpose(bcast, inv), b), p),
    )


@transpose.family
def select():
    """A transpose of a select is the select of transposed operands, and back."""
    yield rw(
        Term.transpose(Term.select(c, a, b), p),
        Term.select(Term.transpose(c, p), Term.transpose(a, p), Term.transpose(b, p)),
    )
    yield rw(
        Term.select(Term.transpose(c, p), Term.transpose(a, p), Term.transpose(b, p)),
        Term.transpose(Term.select(c, a, b), p),
    )


@transpose.family
def broadcast():
    """A transpose of a broadcast is a broadcast of a (smaller) transpose.

    Only this way: a transpose inside a broadcast is not bubbled out of it. Where a transpose
    of the broadcast is asked for, this rule relates the same classes, and the cheaper form is
    the transpose of the smaller operand; bubbling made every layout of a broadcast mask or
    constant a transpose of every other (5-D attention: 8,657 e-nodes, 3,396 without)."""
    yield from asking(
        Term.transpose(Term.broadcast(x, s, d), p), [d.length() >= i64(1)], "broadcast_sink", (s, d, p, NONE), 3,
        lambda q2, s2, d2: Term.broadcast(Term.transpose(x, q2), s2, d2),
    )
    # a broadcast scalar (masks' fills, -inf, scales) takes the permuted shape: no index math asked
    yield rw(Term.transpose(Term.broadcast(x, s, NONE), p), Term.broadcast(x, p.map(lambda i: s[i]), NONE))


@transpose.family
def reduce():
    """Transposes move through reductions with the reduced axes remapped."""
    yield from asking(
        Term.reduce(op, Term.transpose(x, p), axes), [], "reduce_bubble", (p, axes, NONE, NONE), 2,
        lambda axes2, q2: Term.transpose(Term.reduce(op, x, axes2), q2),
    )
    yield from asking(
        Term.transpose(Term.reduce(op, x, axes), q), [shape(x) == s], "reduce_sink",
        (axes, q, IntVec(s.length()), NONE), 1,
        lambda p2: Term.reduce(op, Term.transpose(x, p2), axes),
    )


@transpose.family
def reshape():
    """Transposes move through reshapes that only split or merge axes the permutation keeps together."""
    yield from asking(
        Term.transpose(Term.reshape(x, s_out), p), [shape(x) == s_in], "reshape_sink", (s_in, s_out, p, NONE), 2,
        lambda p2, s2: Term.reshape(Term.transpose(x, p2), s2),
    )
    yield from asking(
        Term.reshape(Term.transpose(x, p), s_out), [shape(x) == s_in], "reshape_bubble", (s_in, p, s_out, NONE), 2,
        lambda mid, q2: Term.transpose(Term.reshape(x, mid), q2),
    )


def _dims(contract, batch):
    return IntVec(contract.length()).append(contract).append(batch)


@transpose.family
def dot_output():
    """A transpose of a matmul's output is the same matmul writing another layout."""
    yield from asking(
        Term.transpose(Term.dot(a, b, lc, rc, lb, rb, dt, pr), p), [shape(a) == sa, shape(b) == sb], "dot_out_sink",
        (IntVec(sa.length(), sb.length()), _dims(lc, lb), _dims(rc, rb), p), 4,
        lambda qa, qb, lb2, rb2: Term.dot(Term.transpose(a, qa), Term.transpose(b, qb), lc, rc, lb2, rb2, dt, pr),
    )


@transpose.family
def dot_operand():
    """A transposed matmul operand folds into the matmul's dimension numbers."""
    yield from asking(
        Term.dot(Term.transpose(a, q), b, lc, rc, lb, rb, dt, pr), [shape(b) == sb], "dot_operand_fold",
        (q, _dims(lc, lb), IntVec(0), IntVec(sb.length() - rc.length() - rb.length())), 1,
        lambda r: Term.transpose(Term.dot(a, b, lc.map(lambda i: q[i]), rc, lb.map(lambda i: q[i]), rb, dt, pr), r),
    )
    yield from asking(
        Term.dot(a, Term.transpose(b, q), lc, rc, lb, rb, dt, pr), [shape(a) == sa], "dot_operand_fold",
        (q, _dims(rc, rb), IntVec(1), IntVec(sa.length() - lc.length() - lb.length())), 1,
        lambda r: Term.transpose(Term.dot(a, b, lc, rc.map(lambda i: q[i]), lb, rb.map(lambda i: q[i]), dt, pr), r),
    )



@transpose.family
def concatenate():
    """A transpose of a concatenation (2 to 4 operands) is the concatenation of the transposed
    operands along the axis the permutation moves the concatenated axis to, and back, also from
    two operands of which one is transposed (the other is transposed back): so a transpose of a
    decode step's [cache; new entry] reaches the new entry's producer, and a projection writing
    the new entry in another layout can be concatenated to the cache in that layout."""
    for n in range(2, MAX_CONCAT + 1):
        parts = [var(f"c{i}", Term) for i in range(n)]
        yield from asking(
            Term.transpose(Term.concat(term_list(parts), dim), p), [], "inverse", (p, NONE, NONE, NONE), 1,
            lambda inv, parts=parts: Term.concat(term_list([Term.transpose(t, p) for t in parts]), inv[dim]),
        )
        # written as facts from the concatenation down: egglog planned the nested pattern from
        # its transposes, joining every transpose sharing a permutation before the operand list
        # (4 operands: 47 s of one 2,509-e-node run of a rotary probe, matching nothing; now ~0)
        cells = [var(f"l{i}", TermList) for i in range(n)]
        moved = [var(f"t{i}", Term) for i in range(n)]
        e = var("_e", Term)
        facts = [eq(e).to(Term.concat(cells[0], dim))]
        facts += [eq(cells[i]).to(TermList.cons(moved[i], cells[i + 1] if i + 1 < n else TermList.nil())) for i in range(n)]
        facts += [eq(moved[i]).to(Term.transpose(parts[i], p)) for i in range(n)]
        yield rl(*facts)(union(e).with_(Term.transpose(Term.concat(term_list(parts), p[dim]), p)))
    for transposed_first in (True, False):
        lhs = [Term.transpose(a, p), b] if transposed_first else [a, Term.transpose(b, p)]
        yield from asking(
            Term.concat(term_list(lhs), dim), [], "inverse", (p, NONE, NONE, NONE), 1,
            lambda inv, first=transposed_first: Term.transpose(
                Term.concat(term_list([a, Term.transpose(b, inv)] if first else [Term.transpose(a, inv), b]), p[dim]), p),
        )
