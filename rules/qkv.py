"""Projection layouts: sibling matmuls that share an input equal one matmul over concatenated
weights followed by slices (horizontal fusion: Q/K/V projections, gate and up projections),
and a slice of a fused projection equals a projection by the sliced weight, so both the merged
and the split programs are in the e-graph. Transposes move through slices, so a split-off V
projection can write Vᵀ itself (IREE PR 19810: writing V transposed is what stops the merge).

`projections` relates fused and split projections; `packed_qkv` turns attention over the three
thirds of one fused QKV projection into packed-QKV attention, which reads Q, K and V in place.
Groups are bounded: only dot_generals of one shared program value by program weights (rank 2,
one contraction over the input's last axis), at most `MAX_GROUP` siblings, each group matched
once (in program order)."""

from __future__ import annotations

from egglog import String, eq, f64, i64, relation, union, var

from eqsat_attn.egraph import qkv_math  # registers the index-math questions this file asks
from eqsat_attn.egraph.language import KERNEL_FILL, IntVec, Term, dtype, ivec, program_order, shape, term_list
from eqsat_attn.egraph.rulesets import RuleSet, asking, rl, rw

projections = RuleSet("projections", " ".join(__doc__.split("\n\n")[0].split()))
packed_qkv = RuleSet(
    "packed_qkv",
    "Attention over the Q, K, V thirds of one fused projection is packed-QKV attention (read in place).",
)

MAX_GROUP = qkv_math.PACK  # Q, K, V; gate and up are pairs
RANKS = range(2, 6)  # rank of the projected input ([tokens, E] to [B, S, ..., E])
x, y, w, e, m, pk = (var(n, Term) for n in ("x", "y", "w", "e", "m", "pk"))
fl = var("fl", f64)  # the mask fill, carried by packed attention
lc, rc, sx, sw, st, li, s1, l1, s2, l2, p, s4, sp = (
    var(n, IntVec) for n in ("lc", "rc", "sx", "sw", "st", "li", "s1", "l1", "s2", "l2", "p", "s4", "sp")
)
qa, oa = var("qa", IntVec), var("oa", IntVec)
dt, wdt, pr = var("dt", String), var("wdt", String), var("pr", String)
scale, causal = var("scale", f64), var("causal", i64)
NONE = IntVec.empty()


projection = relation("projection", Term, Term, Term, IntVec, IntVec, String, String, i64)
"""``projection(x, d, w, lc, rc, dt, pr, order)``: d is x @ w (preferred type dt, precision pr), a
program value x (contracting its last axis) by a program weight w of rank 2 at position ``order``
in the program. Sibling groups are
joined over these facts, not over the dot terms: the join over every dot variant the other rules
create took seconds per round on long matmul chains, for no match."""


@projections.family
def projection_facts():
    """Record each projection of a program value by a program weight (`projection`)."""
    d, o = var("d", Term), var("o", i64)
    for rank in RANKS:
        yield rl(
            eq(d).to(Term.dot(x, w, lc, rc, NONE, NONE, dt, pr)), lc == ivec([rank - 1]), rc.length() == i64(1),
            shape(x) == sx, sx.length() == i64(rank), program_order(x) >= i64(0),
            eq(program_order(w)).to(o), shape(w) == sw, sw.length() == i64(2),
        )(projection(x, d, w, lc, rc, dt, pr, o))



@projections.family
def horizontal():
    """Sibling projections of one input (x @ w1, ..., x @ wn, n <= 3, weights of one dtype and
    orientation) equal slices of one projection by the concatenated weights."""
    for rank in RANKS:
        for n in range(2, MAX_GROUP + 1):
            ds = [var(f"d{i}", Term) for i in range(n)]
            ws = [var(f"w{i}", Term) for i in range(n)]
            sws = [var(f"sw{i}", IntVec) for i in range(n)]
            order = [var(f"o{i}", i64) for i in range(n)]
            facts = [projection(x, ds[0], ws[0], lc, rc, dt, pr, order[0])]
            for i in range(1, n):
                facts += [projection(x, ds[i], ws[i], lc, rc, dt, pr, order[i]), order[i - 1] < order[i]]
            facts += [shape(x) == sx, sx.length() == i64(rank)]
            for i in range(n):
                facts += [shape(ws[i]) == sws[i], dtype(ws[i]) == wdt]
            free = i64(1) - rc[0]  # the weight's output axis
            fused = Term.dot(x, Term.concat(term_list(ws), free), lc, rc, NONE, NONE, dt, pr)
            actions, offset = [], i64(0)
            for i in range(n):
                size = sws[i][free]
                start = ivec([0] * rank).set(rank - 1, offset)
                actions.append(union(ds[i]).with_(Term.slice(fused, start, sx.set(rank - 1, offset + size))))
                offset = offset + size
            yield rl(*facts)(*actions)


@projections.family
def split_projection():
    """A slice of a projection's output along the weight's output axis is the projection by the
    sliced weight (a fused QKV projection, as GPT-2 writes it, equals three projections)."""
    for rank in RANKS:
        lhs = Term.slice(Term.dot(x, w, lc, rc, NONE, NONE, dt, pr), st, li)
        free = i64(1) - rc[0]
        conditions = [shape(x) == sx, sx.length() == i64(rank), lc == ivec([rank - 1]), rc.length() == i64(1),
                      shape(w) == sw, sw.length() == i64(2), program_order(w) >= i64(0)]
        conditions += [st[i] == i64(0) for i in range(rank - 1)] + [li[i] == sx[i] for i in range(rank - 1)]
        w_part = Term.slice(w, ivec([0, 0]).set(free, st[rank - 1]), sw.set(free, li[rank - 1]))
        yield rw(lhs, Term.dot(x, w_part, lc, rc, NONE, NONE, dt, pr), *conditions)


@projections.family
def adjacent_slices():
    """Two program slices of one value that meet along its last axis are slices of one slice
    covering both (so Q and K of a fused QKV projection can become one QK projection)."""
    for rank in range(1, 6):
        conditions = [s1.length() == i64(rank), program_order(y) >= i64(0), program_order(var("e1", Term)) >= i64(0),
                      program_order(var("e2", Term)) >= i64(0)]
        conditions += [s1[i] == s2[i] for i in range(rank - 1)] + [l1[i] == l2[i] for i in range(rank - 1)]
        conditions += [l1[rank - 1] == s2[rank - 1]]
        e1, e2 = var("e1", Term), var("e2", Term)
        merged = Term.slice(y, s1, l2)
        zeros = ivec([0] * rank)
        first = Term.slice(merged, zeros, IntVec(*[l1[i] - s1[i] for i in range(rank)]))
        second = Term.slice(merged, zeros.set(rank - 1, s2[rank - 1] - s1[rank - 1]),
                            IntVec(*[l2[i] - s1[i] for i in range(rank)]))
        yield rl(eq(e1).to(Term.slice(y, s1, l1)), eq(e2).to(Term.slice(y, s2, l2)), *conditions)(
            union(e1).with_(first), union(e2).with_(second)
        )


@projections.family
def slice_transpose():
    """A transpose of a slice is a slice of the transpose (so the transpose can reach the
    slice's producer, e.g. a projection writing Vᵀ)."""
    yield rw(Term.transpose(Term.slice(y, st, li), p), Term.slice(Term.transpose(y, p), p.map(lambda i: st[i]),
                                                                   p.map(lambda i: li[i])))


@packed_qkv.family
def packed_split():
    """One third of an axis, reshaped into (heads, head_dim), is the same entry of the array
    reshaped to [..., 3, heads, head_dim, ...] (how a fused QKV output is split into heads)."""
    sy, s_out = var("sy", IntVec), var("s_out", IntVec)
    yield from asking(
        Term.reshape(Term.slice(y, st, li), s_out), [shape(y) == sy], "packed_split", (sy, st, li, s_out), 3,
        lambda packed, st5, li5: Term.reshape(Term.slice(Term.reshape(y, packed), st5, li5), s_out),
    )


@packed_qkv.family
def packed_attention():
    """Attention (no mask tensor) whose Q, K, V are entries 0, 1, 2 along one axis of one array,
    read in one layout, is packed-QKV attention over that array."""
    sts = [var(f"ps{i}", IntVec) for i in range(3)]
    lis = [var(f"pl{i}", IntVec) for i in range(3)]
    q, k, v = (Term.reshape(Term.slice(pk, sts[i], lis[i]), s4) for i in range(3))
    bounds = sts[0].append(lis[0]).append(sts[1]).append(lis[1]).append(sts[2]).append(lis[2])
    yield from asking(
        Term.attention(q, k, v, Term.no_mask(), qa, qa, qa, oa, scale, causal, String("none"), String(""), fl, f64(0.0)),
        [shape(pk) == sp, sp.length() == i64(5), fl <= f64(KERNEL_FILL)], "packed_attention", (sp, bounds, qa, s4), 1,
        lambda pa: Term.packed_attention(pk, Term.no_mask(), pa, oa, scale, causal, String("none")),
    )
