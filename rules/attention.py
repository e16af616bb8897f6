"""Attention: raise softmax(scale * Q Kᵀ [masked]) V to one Attention op, and relate its
operand layouts through transposes so the cost model can choose between folding a
transpose into attention and bubbling it into the operand's producer (IREE PR 19250).

`attention_raise` normalises what libraries emit (broadcast chains, the max(-inf, ·) and
stop_gradient of a stable softmax, where-masks built from iota comparisons), raises the
stable softmax over the last axis to `softmax`, and matches attention in the canonical
batched matmul form the `canonical` rule set provides. `attention_layout` folds operand
transposes into the layouts and exposes the standard and transposed-V forms. `attention_grad` and
`attention_value_grad` raise a jax.grad program's written-out backward to the op's gradients,
reading softmax's VJP from `attention_grad_vjp`."""

from __future__ import annotations

import itertools

from egglog import String, eq, f64, i64, ne, union, var

from eqsat_attn.egraph.language import (
    KERNEL_FILL, IntVec, Term, answer, ask, attn_scores, causal_mask, dtype, grad_op, ivec, perm_range, rows_kept,
    scores_cot, shape, softmax_vjp, where_softmax_vjp,
)
from eqsat_attn.egraph.rulesets import RuleSet, asking, rl, rw

attention_raise = RuleSet(
    "attention_raise",
    "Raise stable softmax and softmax(scale * Q Kᵀ [masked]) V to Attention.",
    phase="raise",
)
attention_grad = RuleSet(
    "attention_grad",
    "Raise a jax.grad program's written-out attention backward to the op's gradients (attention_vjp).",
    phase="raise",
)
attention_grad_vjp = RuleSet(
    "attention_grad_vjp",
    "Find softmax's VJP in jax.grad's spellings (softmax_vjp, where_softmax_vjp), which attention_grad reads.",
    phase="raise",
)
attention_value_grad = RuleSet(
    "attention_value_grad",
    "Raise V's gradient alone (Pᵀ · do, Q and K not differentiated) to the op's dV (attention_vjp).",
    phase="raise",
)
attention_layout = RuleSet(
    "attention_layout",
    "Fold operand transposes into Attention layouts and expose the standard and transposed-V forms.",
)

x, y, z, m, q, k, v, e, s_, t_ = (var(n, Term) for n in ("x", "y", "z", "m", "q", "k", "v", "e", "s_", "t_"))
p, d1, d2, s1, s2, s3, qa, ka, va, oa = (
    var(n, IntVec) for n in ("p", "d1", "d2", "s1", "s2", "s3", "qa", "ka", "va", "oa")
)
dt, dt2, dt3, mk, cd = (var(n, String) for n in ("dt", "dt2", "dt3", "mk", "cd"))
pr = var("pr", String)  # a matmul's precision: the op computes at least as precisely (kernels/reference.py)
c, scale, neg = var("c", f64), var("scale", f64), var("neg", f64)
lb, rb = var("lb", IntVec), var("rb", IntVec)
causal = var("causal", i64)
NONE = IntVec.empty()
BHSD = ivec([0, 1, 2, 3])
BHDS = ivec([0, 1, 3, 2])
K_TRANSPOSED = ivec([0, 1, 3, 2])  # Kᵀ stored [B, H, D, S]: the canonical matmul's rhs
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint32")
MASK_THRESHOLD = -1e4  # exp(t - max) underflows to 0 in every float type for t at or below this


def scalar(value, dtype, shape_) -> Term:
    return Term.broadcast(Term.literal(value, dtype), shape_, NONE)


@attention_raise.family
def broadcast_compose():
    """A broadcast of a broadcast is one broadcast."""
    yield rw(Term.broadcast(Term.broadcast(x, s1, d1), s2, d2), Term.broadcast(x, s2, d1.map(lambda i: d2[i])))


@attention_raise.family
def unit_axis_broadcast():
    """A product broadcast only to insert unit axes is its reshape (the same elements in the same
    order): jnp.matmul squeezes a batch axis of length 1 (a batch of one, a single head) for its
    product and broadcasts the result back, so scores and P·V read as the reshape rules expect."""
    product = Term.dot(y, z, p, d2, lb, rb, dt, pr)
    yield from asking(Term.broadcast(product, s1, d1), [shape(product) == s2, s1.length() > d1.length()],
                      "unit_broadcast", (s2, s1, d1, NONE), 1, lambda target: Term.reshape(product, target))


@attention_raise.family
def folded_heads_dot():
    """A [B·H]-batched product of operands folded from [B, H, ..] (reshapes merging their two
    leading axes), viewed back as [B, H, ..], is the [B, H]-batched product of the unfolded operands:
    each output element is the same dot product of the same two vectors (the same products summed).
    GPT-NeoX and other torch ports fold the heads for the bmm and split them again for the mask and
    P · V; only a product that is viewed back, so other folded matmuls keep their one form, and not
    a unit axis merged (jnp.matmul's squeezed batch of one or single head: `unit_axis_broadcast`)."""
    sa, sb, lc, rc, s_folded = (var(n, IntVec) for n in ("sa", "sb", "lc", "rc", "s_folded"))
    a, b = var("a", Term), var("b", Term)
    folded = Term.dot(Term.reshape(a, s1), Term.reshape(b, s2), lc, rc, ivec([0]), ivec([0]), dt, pr)
    yield rw(Term.reshape(folded, s3), Term.dot(a, b, IntVec(lc[0] + 1), IntVec(rc[0] + 1), ivec([0, 1]), ivec([0, 1]), dt, pr),
             shape(a) == sa, shape(b) == sb, sa.length() == i64(4), sb.length() == i64(4), lc.length() == i64(1),
             rc.length() == i64(1), sa[0] == sb[0], sa[1] == sb[1], s1 == IntVec(sa[0] * sa[1], sa[2], sa[3]),
             s2 == IntVec(sb[0] * sb[1], sb[2], sb[3]), shape(folded) == s_folded,
             s3 == IntVec(sa[0], sa[1], s_folded[1], s_folded[2]), ne(sa[0]).to(i64(1)), ne(sa[1]).to(i64(1)))
    # a scalar applied before the view (`1/√D · bmm(q, kᵀ)`; torch's baddbmm(zeros, q, kᵀ, alpha)
    # adds the product to zeros): the view of the product, then the scalar (elementwise, exact)
    product, factor_shape, c2 = Term.dot(y, z, p, d2, lb, rb, dt2, pr), var("factor_shape", IntVec), var("c2", f64)
    scaled = Term.binary("mul", Term.broadcast(Term.literal(c, dt3), factor_shape, NONE), product)
    for op in ("mul", "div", "add", "sub"):
        for operand in (product, scaled):
            factor = Term.broadcast(Term.literal(c2, dt3), factor_shape, NONE)
            scalar_view = Term.broadcast(Term.literal(c2, dt3), s3, NONE)
            yield rw(Term.reshape(Term.binary(op, operand, factor), s3), Term.binary(op, Term.reshape(operand, s3), scalar_view))
            yield rw(Term.reshape(Term.binary(op, factor, operand), s3), Term.binary(op, scalar_view, Term.reshape(operand, s3)))
    # jax.grad's backward of that: a folded product's operand scaled after the fold (c · fold(g)) is
    # the fold of the scaled operand, so the product reads as the first rule's
    folded_operand = (Term.binary("mul", Term.broadcast(Term.literal(c2, dt3), factor_shape, NONE), Term.reshape(a, s1)),
                      Term.binary("mul", Term.reshape(a, s1), Term.broadcast(Term.literal(c2, dt3), factor_shape, NONE)))
    for form in folded_operand:
        yield rl(eq(e).to(Term.dot(form, y, lc, rc, ivec([0]), ivec([0]), dt2, pr)), shape(a) == sa, sa.length() == i64(4))(
            union(form).with_(Term.reshape(Term.binary("mul", Term.broadcast(Term.literal(c2, dt3), sa, NONE), a), s1)))


@attention_raise.family
def reshape_scalar_broadcast():
    """A reshape of a broadcast scalar is the scalar broadcast to the new shape."""
    yield rw(Term.reshape(Term.broadcast(x, s1, NONE), s2), Term.broadcast(x, s2, NONE))


@attention_raise.family
def stop_gradient_broadcast():
    """stop_gradient commutes with broadcast (it is the identity on values)."""
    yield rw(
        Term.unary("stop_gradient", Term.broadcast(x, s1, d1)),
        Term.broadcast(Term.unary("stop_gradient", x), s1, d1),
    )


@attention_raise.family
def convert_broadcast():
    """A cast of a broadcast is the broadcast of the cast."""
    yield rw(Term.convert(Term.broadcast(x, s1, d1), dt), Term.broadcast(Term.convert(x, dt), s1, d1))


@attention_raise.family
def max_neg_inf():
    """max(-inf, y) is y (the guard jax.nn.softmax puts on the row maximum)."""
    yield rw(Term.binary("max", scalar(float("-inf"), dt, s1), y), y)
    yield rw(Term.binary("max", y, scalar(float("-inf"), dt, s1)), y)


@attention_raise.family
def boolean_identities():
    """where(c, True, False) is c, True & m is m, and an integer x + 0 is x."""
    yield rw(Term.select(x, scalar(0.0, "bool", s1), scalar(1.0, "bool", s2)), x)
    yield rw(Term.binary("and", scalar(1.0, "bool", s1), y), y)
    yield rw(Term.binary("and", y, scalar(1.0, "bool", s1)), y)
    for int_dtype in INT_DTYPES:
        yield rw(Term.binary("add", y, scalar(0.0, int_dtype, s1)), y)


@attention_raise.family
def iota_broadcast():
    """A 1-D iota broadcast along axis d is the iota of the full shape along d."""
    yield rw(
        Term.broadcast(Term.iota(dt, s2, 0), s1, d2),
        Term.iota(dt, s1, d2[0]),
        s2.length() == i64(1), d2.length() == i64(1), s1[d2[0]] == s2[0],
    )


@attention_raise.family
def causal_masks():
    """row >= col over the last two axes' iotas is a causal mask, and so are its broadcasts,
    casts, its 0/1 indicator (`where(m, 1, 0)`, as `jnp.tril` of ones builds it) and that indicator
    tested `!= 0`, `== 1` or `> 0` (closed-over constant masks are recognised when encoded)."""
    row = Term.iota(dt, s1, var("i", i64))
    col = Term.iota(dt, s1, var("j", i64))
    last_two = (var("i", i64) == s1.length() - 2, var("j", i64) == s1.length() - 1)
    yield rl(eq(e).to(Term.binary("ge", row, col)), *last_two)(causal_mask(e))
    yield rl(eq(e).to(Term.binary("le", col, row)), *last_two)(causal_mask(e))
    yield rl(  # the last two axes kept whole (a [1, 1] or [1, Sk] "causal" mask spread over them is not)
        eq(e).to(Term.broadcast(m, s2, d2)), causal_mask(m), shape(m) == s1,
        d2.length() >= i64(2),
        d2[d2.length() - 1] == s2.length() - 1,
        d2[d2.length() - 2] == s2.length() - 2,
        s1[s1.length() - 1] == s2[s2.length() - 1], s1[s1.length() - 2] == s2[s2.length() - 2],
    )(causal_mask(e))
    yield rl(eq(e).to(Term.convert(m, dt)), causal_mask(m))(causal_mask(e))
    yield rl(eq(e).to(Term.reshape(m, s2)), causal_mask(m), shape(m) == s1, s2.length() >= i64(2),  # each matrix whole
             s1[s1.length() - 1] == s2[s2.length() - 1], s1[s1.length() - 2] == s2[s2.length() - 2])(causal_mask(e))
    yield rl(
        eq(e).to(Term.transpose(m, p)), causal_mask(m),
        p[p.length() - 1] == p.length() - 1, p[p.length() - 2] == p.length() - 2,
    )(causal_mask(e))
    yield rl(eq(e).to(Term.binary("ne", m, scalar(0.0, dt, s1))), causal_mask(m))(causal_mask(e))
    yield rl(eq(e).to(Term.binary("eq", m, scalar(1.0, dt, s1))), causal_mask(m))(causal_mask(e))
    yield rl(eq(e).to(Term.select(m, scalar(0.0, dt, s1), scalar(1.0, dt, s2))), causal_mask(m))(causal_mask(e))
    yield rl(eq(e).to(Term.binary("gt", m, scalar(0.0, dt, s1))), causal_mask(m))(causal_mask(e))


@attention_raise.family
def kept_rows():
    """A boolean mask keeps a key in every row (`rows_kept`) when it is causal, and so do its
    broadcasts, reshapes and transposes that keep the last axis (each row of theirs is one of its
    rows, or repeats a kept value), its `or` with anything, and its cast to bool (static masks are
    evaluated when encoded: a sliding window, `j < i + 1`, any pattern that keeps the diagonal)."""
    yield rl(causal_mask(m), dtype(m) == String("bool"))(rows_kept(m))
    yield rl(eq(e).to(Term.broadcast(m, s2, d2)), rows_kept(m), d2.length() >= i64(1),
             d2[d2.length() - 1] == s2.length() - 1)(rows_kept(e))
    yield rl(eq(e).to(Term.reshape(m, s2)), rows_kept(m), shape(m) == s1, s1.length() >= i64(1), s2.length() >= i64(1),
             s1[s1.length() - 1] == s2[s2.length() - 1])(rows_kept(e))
    yield rl(eq(e).to(Term.transpose(m, p)), rows_kept(m), p[p.length() - 1] == p.length() - 1)(rows_kept(e))
    yield rl(eq(e).to(Term.convert(m, String("bool"))), rows_kept(m))(rows_kept(e))
    for either in (Term.binary("or", m, y), Term.binary("or", y, m)):
        yield rl(eq(e).to(either), rows_kept(m))(rows_kept(e))


@attention_raise.family
def thresholded_masks():
    """``where(m, b, a) >= c`` with constants b >= c > a is m (``>``: b > c >= a), also over a
    broadcast of the where: an additive 0/-big mask compared back to booleans (as MaxText does)."""
    hi, lo, cut = var("hi", f64), var("lo", f64), var("cut", f64)
    chosen = Term.select(m, scalar(lo, dt, s1), scalar(hi, dt, s2))
    for op, separates in (("ge", (hi >= cut, lo < cut)), ("gt", (hi > cut, lo <= cut))):
        yield rw(Term.binary(op, chosen, scalar(cut, dt, s3)), m, *separates)
        yield rw(Term.binary(op, Term.broadcast(chosen, s3, d1), scalar(cut, dt, s3)), Term.broadcast(m, s3, d1), *separates)


def _finite_or_zero(t: Term) -> Term:
    """``where(is_finite(t), t, 0)``: jax.nn.logsumexp's guard on its row max."""
    return Term.select(Term.unary("is_finite", t), scalar(0.0, dt, s3), t)


def _shifted_exps(xx: Term, rank: int, guarded: bool = False):
    """(exp(x - max(x)), its row sum) as libraries write them (the max under stop_gradient or not;
    the sum in x's dtype, or accumulated in float32 and cast back as jax.nn.softmax does for half
    precision). ``guarded``: the max under logsumexp's `_finite_or_zero` instead."""
    last = ivec([rank - 1])
    keep = perm_range(rank - 1)
    plain = Term.reduce("reduce_max", xx, last)
    if guarded:
        plain = _finite_or_zero(plain)
    for row_max in (plain, Term.unary("stop_gradient", plain)):
        shifted = Term.binary("sub", xx, Term.broadcast(row_max, s1, keep))
        ex = Term.unary("exp", shifted)
        yield shifted, ex, Term.reduce("reduce_sum", ex, last)
        yield shifted, ex, Term.convert(Term.reduce("reduce_sum", Term.convert(ex, String("float32")), last), dt)


def _unshifted_exps(xx: Term, rank: int):
    """(x, exp(x), its row sum): `_shifted_exps` without the max subtracted (`attention_fast_math`)."""
    last = ivec([rank - 1])
    ex = Term.unary("exp", xx)
    yield xx, ex, Term.reduce("reduce_sum", ex, last)
    yield xx, ex, Term.convert(Term.reduce("reduce_sum", Term.convert(ex, String("float32")), last), dt)


def _stable_softmax_forms(xx: Term, rank: int, exps=_shifted_exps):
    """The stable softmax over the last axis of a rank-`rank` x, as libraries write it: divided by
    the row sum, multiplied by its reciprocal, or as exp(log_softmax(x)) (``exps``: the exponentials
    and their sums, `_shifted_exps` or `_unshifted_exps`)."""
    keep = perm_range(rank - 1)
    for shifted, ex, total in exps(xx, rank):
        yield ex, Term.binary("div", ex, Term.broadcast(total, s2, keep))
        for inverse in (Term.binary("div", scalar(1.0, dt2, s3), total), Term.integer_pow(total, -1)):
            reciprocal = Term.broadcast(inverse, s2, keep)
            yield ex, Term.binary("mul", ex, reciprocal)
            yield ex, Term.binary("mul", reciprocal, ex)
        log_total = Term.broadcast(Term.unary("log", total), s2, keep)
        yield ex, Term.unary("exp", Term.binary("sub", shifted, log_total))


@attention_raise.family
def scalar_broadcast_commute():
    """A scalar divided by a broadcast, the reciprocal and the log of a broadcast, are broadcasts of
    the elementwise result (so a keepdims reciprocal or log of a row sum reads as one broadcast)."""
    yield rl(eq(e).to(Term.binary("div", scalar(c, dt2, s1), Term.broadcast(y, s2, d2))), shape(y) == s3)(
        union(e).with_(Term.broadcast(Term.binary("div", scalar(c, dt2, s3), y), s2, d2))
    )
    yield rw(Term.unary("log", Term.broadcast(y, s2, d2)), Term.broadcast(Term.unary("log", y), s2, d2))
    yield rw(Term.integer_pow(Term.broadcast(y, s2, d2), -1), Term.broadcast(Term.integer_pow(y, -1), s2, d2))


@attention_raise.family
def softmax():
    """exp(x - max(x)) / sum(exp(x - max(x))) over the last axis is softmax(x), also written with
    the reciprocal of the sum or as exp(log_softmax(x)) (the sum may be accumulated in float32 and
    cast back, as jax.nn.softmax does for half precision)."""
    for rank in range(1, 9):
        for _, form in _stable_softmax_forms(x, rank):
            yield rw(form, Term.softmax(x), shape(x).length() == i64(rank))


@attention_raise.family
def kept_rows_where_sum():
    """The row sum of ``where(keep, exp(x - max(x)), 0)`` over scores x hidden by that very mask
    with -inf (``jax.nn.softmax(s, where=keep)``) is the row sum of exp(x - max(x)) when keep keeps
    a key in every row (`rows_kept`: causal, a sliding window): a hidden term is +0, or NaN only in
    a row whose kept terms hold a NaN too (its max is -inf or NaN), and both sums are that NaN. (A
    mask that may hide a whole row, as key padding may, is not rewritten: there the where's sum is
    0 and the softmax 0/0.)"""
    keep_ = var("keep_", Term)
    hidden = Term.select(keep_, scalar(float("-inf"), dt3, s3), y)
    for rank in range(2, 7):  # scores of every rank case
        last = ivec([rank - 1])
        for _, ex, _ in _shifted_exps(hidden, rank):
            masked = Term.select(keep_, scalar(0.0, dt2, s2), ex)
            yield rw(Term.reduce("reduce_sum", masked, last), Term.reduce("reduce_sum", ex, last),
                     rows_kept(keep_), dtype(keep_) == String("bool"), shape(y).length() == i64(rank))


def _deferred_normalisations(exps):
    """(exp(x - max) · V) / sum(exp(x - max)) is softmax(x) · V (``exps``: as `_stable_softmax_forms`)."""
    for rank in range(2, 7):
        keep = perm_range(rank - 1)
        for _, ex, total in exps(x, rank):
            product = Term.dot(ex, v, ivec([rank - 1]), d1, lb, rb, dt3, pr)
            yield rw(
                Term.binary("div", product, Term.broadcast(total, s2, keep)),
                Term.dot(Term.softmax(x), v, ivec([rank - 1]), d1, lb, rb, dt3, pr),
                shape(x).length() == i64(rank), s2.length() == i64(rank),
            )


@attention_raise.family
def deferred_normalisation():
    """(exp(x - max) · V) / sum(exp(x - max)) is softmax(x) · V: normalising after the product
    (as flash attention does) reassociates the same sums."""
    yield from _deferred_normalisations(_shifted_exps)


@attention_raise.family
def softmax_transpose():
    """Transposes that keep the last axis in place commute with softmax."""
    last_fixed = (p[p.length() - 1] == p.length() - 1,)
    yield rw(Term.transpose(Term.softmax(x), p), Term.softmax(Term.transpose(x, p)), *last_fixed)
    yield rw(Term.softmax(Term.transpose(x, p)), Term.transpose(Term.softmax(x), p), *last_fixed)


@attention_raise.family
def sums_times_ones():
    """P, or a matmul such as dP = dO · Vᵀ, times ones is itself (x · 1 = x in IEEE arithmetic, ±0,
    Inf and NaN included): elementwise, and as a product with nothing contracted whose all-ones
    operand has only batch axes, the canonical form of HF Flax's default head mask
    (``einsum("...hqk,h->...hqk", P, ones)``; jax.grad's transpose of it multiplies dP so). Only
    for such sums, whose values are compared up to reassociation: a CPU flushing denormals to zero
    flushes their denormal entries in the program's product, not without it. The ones may be a cast
    of 1 (HF casts its head mask to int32): 1 is exact in every numeric dtype."""
    yield rw(Term.convert(Term.literal(f64(1.0), dt2), dt), Term.literal(f64(1.0), dt),
             dt != String("bool"), dt2 != String("bool"))
    ones = scalar(1.0, dt2, s1)
    lc_, rc_, lb_, rb_ = (var(n, IntVec) for n in ("lc_", "rc_", "lb_", "rb_"))
    c_pr = var("c_pr", String)  # the product by ones: its precision is immaterial
    for summed in (Term.softmax(x), Term.dot(y, z, lc_, rc_, lb_, rb_, dt3, pr)):
        for form in (Term.binary("mul", summed, ones), Term.binary("mul", ones, summed)):
            yield rw(form, summed)
        for n_batch in range(1, 7):
            batch = perm_range(n_batch)
            for product in (Term.dot(ones, t_, NONE, NONE, batch, batch, dt, c_pr),
                            Term.dot(t_, ones, NONE, NONE, batch, batch, dt, c_pr)):
                yield rl(eq(e).to(product), eq(t_).to(summed), s1.length() == i64(n_batch), dtype(e) == dtype(t_))(
                    union(e).with_(t_))


@attention_raise.family
def softmax_reshape():
    """A reshape that keeps the last axis's length keeps every row whole (rows are contiguous), so
    the softmax of the reshape is the reshape of the softmax (grouped-query code merges the group
    axis into the heads for the softmax and splits it again for P·V)."""
    yield rw(Term.softmax(Term.reshape(x, s1)), Term.reshape(Term.softmax(x), s1),
             shape(x) == s2, s2[s2.length() - 1] == s1[s1.length() - 1])


# --- attention's scores: every spelling of scale, soft-cap, bias and mask becomes one `attn_scores`
# fact (language.attn_scores), so the raising rule below matches one form whatever composed it.

NO_MASK = Term.no_mask()
cap, fl, fl2, sc0 = var("cap", f64), var("fl", f64), var("fl2", f64), var("sc0", f64)
nb, causal2 = var("nb", i64), var("causal2", i64)
dtq, dtp, dte = var("dtq", String), var("dtp", String), var("dte", String)
ss, sk_, sv = var("ss", IntVec), var("sk", IntVec), var("sv", IntVec)
RANK_CASES = [(n_batch, n_free) for n_batch in (0, 1, 2) for n_free in (1, 2)] + [(3, 1)]
"""(batch axes, Q's free axes) of the canonical Q·Kᵀ forms raised: [S,D]; [H,S,D] or [B·H,S,D];
[B,H,S,D]; with a second free axis, heads sharing K/V (multi-query: K, V without a head axis;
grouped: [B, Hkv, G, Sq, D]); and [X,B,H,S,D] (attention under a vmap: X·B is the op's batch)."""
DECODE_CASES = [(2, 0), (1, 0)]
"""Rank cases of a query with no free axis (a decode step's single query, squeezed: [B, H, D] or
[H, D]): raised as one query row, forward and as gradients (no causal flag: one row has none)."""
GRAD_CASES = RANK_CASES + DECODE_CASES
"""The rank cases whose written-out backward the gradient rules raise."""


def _scores(e_: Term, q_, k_, scale_, cap_, mask_, kind_, fill_, causal_, nb_):
    return attn_scores(e_, q_, k_, scale_, cap_, mask_, kind_, fill_, causal_, nb_)


def _canonical_qk(a: Term, b: Term, n_batch: int, rank: int) -> Term:
    batch = perm_range(n_batch)
    return Term.dot(a, b, ivec([rank - 1]), ivec([n_batch]), batch, batch, dt, pr)


def _scaled(t: Term):
    """(form, factor) for ``t`` multiplied or divided by a broadcast scalar."""
    yield Term.binary("mul", t, scalar(c, dt2, s1)), c
    yield Term.binary("mul", scalar(c, dt2, s1), t), c
    yield Term.binary("div", t, scalar(c, dt2, s1)), f64(1.0) / c


def _matmul_scores(*dtype_conds):
    """`scores_of_matmul`'s rules, for products whose dtype meets ``dtype_conds``."""
    for n_batch, n_free in RANK_CASES + DECODE_CASES:
        rank = n_batch + n_free + 1
        k_rank = shape(k).length() == i64(n_batch + 2)
        plain = (1.0, 0.0, NO_MASK, String("none"), f64(KERNEL_FILL), i64(0), i64(n_batch))
        yield rl(eq(e).to(_canonical_qk(q, k, n_batch, rank)), shape(q).length() == i64(rank), k_rank, *dtype_conds)(
            _scores(e, q, k, f64(1.0), *plain[1:])
        )
        for form, factor in _scaled(x):
            yield rl(eq(e).to(_canonical_qk(form, k, n_batch, rank)), shape(x).length() == i64(rank), k_rank,
                     *dtype_conds)(_scores(e, x, k, factor, *plain[1:]))
            yield rl(
                eq(e).to(_canonical_qk(q, form, n_batch, rank)), shape(q).length() == i64(rank),
                shape(x).length() == i64(n_batch + 2), *dtype_conds,
            )(_scores(e, q, x, factor, *plain[1:]))


@attention_raise.family
def scores_of_matmul():
    """Q·Kᵀ in the canonical batched form (batch axes, then Q's free axes; Kᵀ as [batch.., D, Sk])
    is attention's scores, also when Q or K is multiplied or divided by a scalar: the factor becomes
    the scale, applied to the float32 scores inside the op (no standalone matmul is rewritten).
    Not a float16 product (its scores overflow past 65504 where the op's float32 scores do not:
    `half_scores` under fast_math) nor a float64 one (the op computes in float32)."""
    yield from _matmul_scores(dtype(e) != String("float16"), dtype(e) != String("float64"))


@attention_raise.family
def shared_query():
    """Q·Kᵀ whose K has one free axis more than Q's batch axes before its keys (a query shared by
    every batch element: learned latents or a MAP head's probe, ``einsum("nhd,bshd->bhns")``) is
    Q broadcast over that axis times K, with the axis leading both as a batch axis, transposed
    back: the same dot products, so the same values; the broadcast product is then canonical.
    Only where the program moves that axis (longer than 1: a unit axis moves anywhere) to the front
    of the product, where it is the batch."""
    sq, sk = var("sq", IntVec), var("sk", IntVec)
    # a query [N, H, D] (heads its batch): a product without batch axes is also how a projection
    # x·Wᵀ reads commuted (W "shared" over x's batch), and more batch axes are 5-D jax.nn attention's
    for n_batch in (1,):
        for n_free in (1,):
            rank = n_batch + n_free + 1  # Q's
            batch = perm_range(n_batch)
            product = Term.dot(q, k, ivec([rank - 1]), ivec([n_batch + 2]), batch, batch, dt, pr)
            shared = Term.broadcast(q, IntVec(sk[n_batch], *[sq[i] for i in range(rank)]), ivec(range(1, rank + 1)))
            keys = Term.transpose(k, ivec([n_batch, *range(n_batch), n_batch + 1, n_batch + 2]))
            batched = Term.dot(shared, keys, ivec([rank]), ivec([n_batch + 2]), perm_range(n_batch + 1),
                               perm_range(n_batch + 1), dt, pr)
            back = ivec([*range(1, n_batch + n_free + 1), 0, n_batch + n_free + 1])
            moved_first = Term.transpose(e, p)  # the program makes that axis its result's first: the batch
            # (and it has a softmax: so a program without one, an MLP, runs none of the rules this feeds)
            yield rl(eq(e).to(product), eq(t_).to(moved_first), eq(y).to(Term.softmax(z)), p[0] == i64(n_batch + n_free),
                     shape(q) == sq, sq.length() == i64(rank), shape(k) == sk, sk.length() == i64(n_batch + 3),
                     sk[n_batch] > i64(1))(
                union(e).with_(Term.transpose(batched, back)))


@attention_raise.family
def scores_scale():
    """A scalar multiple or quotient of scores multiplies the scale (and the fill of scores already
    masked: ``where(m, s, f) * c`` is ``where(m, s * c, f * c)``; a bias: ``(s + b) * c`` is scores
    ``s * c`` with bias ``b * c``, the factor distributed as a scale on Q is, so equal but where one
    side overflows and the other does not, as there); widening scores to float32 keeps
    them scores (the op computes them in float32)."""
    for form, factor in _scaled(x):
        yield rl(eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb))(
            _scores(e, q, k, sc0 * factor, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb)
        )
        yield rl(eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), m, String("bool"), fl, causal, nb))(
            _scores(e, q, k, sc0 * factor, f64(0.0), m, String("bool"), fl * factor, causal, nb)
        )
        yield rl(eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(1), nb))(
            _scores(e, q, k, sc0 * factor, f64(0.0), NO_MASK, String("none"), fl * factor, i64(1), nb)
        )
    # (s + b) * c is s * c + b * c: the factor distributes over the bias as over Q·Kᵀ's terms
    for (form, factor), (scaled_bias, _) in zip(_scaled(x), _scaled(z)):
        yield rl(eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), z, String("bias"), fl, i64(0), nb))(
            _scores(e, q, k, sc0 * factor, f64(0.0), scaled_bias, String("bias"), fl, i64(0), nb)
        )
    yield rl(eq(e).to(Term.convert(x, String("float32"))), _scores(x, q, k, sc0, cap, m, mk, fl, causal, nb))(
        _scores(e, q, k, sc0, cap, m, mk, fl, causal, nb)
    )


@attention_raise.family
def scores_softcap():
    """``c * tanh(s / c)`` of unmasked scores is logit soft-capping (Gemma) with cap c."""
    inner = Term.unary("tanh", Term.binary("div", x, scalar(c, dt2, s1)))
    for form in (Term.binary("mul", scalar(c, dt3, s2), inner), Term.binary("mul", inner, scalar(c, dt3, s2))):
        yield rl(eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb), c > f64(0.0))(
            _scores(e, q, k, sc0, c, NO_MASK, String("none"), fl, i64(0), nb)
        )


@attention_raise.family
def scores_reshape():
    """Scores reshaped with rows kept whole, then scaled, cast, soft-capped, biased or masked, are
    those scores modified before the reshape, with the other operand reshaped the other way
    (elementwise operations commute with a reshape): grouped-query code merges the group axis into
    the heads before it adds a [B, H, Sq, Sk] bias or mask."""
    reshaped = Term.reshape(x, s1)
    rows_whole = (shape(x) == s2, s2[s2.length() - 1] == s1[s1.length() - 1])
    scores_x = _scores(x, q, k, sc0, cap, m, mk, fl, causal, nb)
    # x the scores, or scores transposed with the keys kept last (`scores_transpose` carries on)
    unmoved = var("unmoved", Term)
    transposed_x = (eq(x).to(Term.transpose(unmoved, p)), _scores(unmoved, q, k, sc0, cap, m, mk, fl, causal, nb),
                    p[p.length() - 1] == p.length() - 1)
    full = (shape(y) == s1,)  # the other operand has the reshaped scores' shape (a select's predicate too)
    for scores in ((scores_x, *rows_whole), (*transposed_x, *rows_whole)):
        for op in ("add", "sub", "mul", "div"):
            yield rw(Term.binary(op, reshaped, y), Term.reshape(Term.binary(op, x, Term.reshape(y, s2)), s1), *scores, *full)
            yield rw(Term.binary(op, y, reshaped), Term.reshape(Term.binary(op, Term.reshape(y, s2), x), s1), *scores, *full)
        pred = (*full, shape(t_) == s1)
        yield rw(Term.select(t_, y, reshaped), Term.reshape(Term.select(Term.reshape(t_, s2), Term.reshape(y, s2), x), s1),
                 *scores, *pred)
        yield rw(Term.select(t_, reshaped, y), Term.reshape(Term.select(Term.reshape(t_, s2), x, Term.reshape(y, s2)), s1),
                 *scores, *pred)
        yield rw(Term.unary("tanh", reshaped), Term.reshape(Term.unary("tanh", x), s1), *scores)
        yield rw(Term.convert(reshaped, dt), Term.reshape(Term.convert(x, dt), s1), *scores)


@attention_raise.family
def scores_transpose():
    """Scores transposed with the keys' axis kept last (an einsum writing them in another layout:
    Gemma's [B, T, K, G, S]), then masked (through a reshape: `scores_reshape`), are the scores
    masked before the transpose, the other operands transposed back (elementwise operations
    commute with a transpose; the transpose of a broadcast folds into it)."""
    transposed = Term.transpose(x, p)
    facts = [_scores(x, q, k, sc0, cap, m, mk, fl, causal, nb), p[p.length() - 1] == p.length() - 1]
    inverse = ("inverse", (p, NONE, NONE, NONE), 1)
    # only a mask reshaped back by `scores_reshape` (where masks on transposed scores directly, as
    # 5-D jax.nn attention's, this doubled their e-graphs; the transpose rules relate those)
    keep = Term.reshape(t_, s2)
    yield from asking(Term.select(keep, y, transposed), facts, *inverse,
                      lambda inv: Term.transpose(Term.select(Term.transpose(keep, inv), Term.transpose(y, inv), x), p))
    yield from asking(Term.select(keep, transposed, y), facts, *inverse,
                      lambda inv: Term.transpose(Term.select(Term.transpose(keep, inv), x, Term.transpose(y, inv)), p))


@attention_raise.family
def scores_bias():
    """Unmasked scores plus (or minus) a tensor are scores with an additive bias, and biased scores
    plus (or minus) another tensor are scores with the sum of both biases (a relative-position bias
    and a padding mask added one after the other, as Swin does: the additions reassociated, so
    equal up to the rounding of their order, or where one order overflows and the other does not). (An additive
    0/-inf mask stays a bias, not a where-mask: ``s + -inf`` is NaN where s is +inf, so only
    its pattern is reported, by eqsat_attn.mask_kinds.)"""
    unmasked = _scores(x, q, k, sc0, cap, NO_MASK, String("none"), fl, i64(0), nb)
    for form in (Term.binary("add", x, z), Term.binary("add", z, x)):
        yield rl(eq(e).to(form), unmasked, ne(z).to(x))(_scores(e, q, k, sc0, cap, z, String("bias"), fl, i64(0), nb))
    yield rl(eq(e).to(Term.binary("sub", x, z)), unmasked, ne(z).to(x))(  # s - z is s + (-z) exactly
        _scores(e, q, k, sc0, cap, Term.unary("neg", z), String("bias"), fl, i64(0), nb)
    )
    # a second bias on biased scores: one bias, their sum ((s + b) + z as s + (b + z): the sums reassociated)
    biased = _scores(x, q, k, sc0, cap, m, String("bias"), fl, i64(0), nb)
    for form in (Term.binary("add", x, z), Term.binary("add", z, x)):
        yield rl(eq(e).to(form), biased, ne(z).to(x))(_scores(e, q, k, sc0, cap, Term.binary("add", m, z), String("bias"),
                                                               fl, i64(0), nb))
    yield rl(eq(e).to(Term.binary("sub", x, z)), biased, ne(z).to(x))(
        _scores(e, q, k, sc0, cap, Term.binary("sub", m, z), String("bias"), fl, i64(0), nb))


@attention_raise.family
def scores_traced_scale():
    """Unmodified scores times a traced scalar (a scale passed as an argument) are the scores of Q
    times that scalar: the op's scale is a constant, so the traced factor moves onto Q inside the
    fused op (the product is rounded once more there: a reassociation). (Scores divided by a traced
    scalar are not raised: that form is fp8's dequantization too, and the extra forms made an fp8
    block's extraction 0.8% dearer.)"""
    traced = Term.broadcast(t_, s1, NONE)
    for form in (Term.binary("mul", x, traced), Term.binary("mul", traced, x)):
        yield rl(
            eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb),
            shape(q) == s2, dtype(t_) == dtq, dtype(q) == dtq, shape(t_) == NONE,
        )(_scores(e, Term.binary("mul", q, Term.broadcast(t_, s2, NONE)), k, sc0, f64(0.0), NO_MASK, String("none"),
                  fl, i64(0), nb))


@attention_raise.family
def scores_per_head_scale():
    """Unmodified scores times a traced tensor factor constant along the keys (Swin-v2's per-head
    logit scale, [H, 1, 1] or [1, H, 1, 1] broadcast over [B, H, Sq, Sk]) are the scores of Q times
    that factor, broadcast over Q instead ([batch.., free.., D] has the scores' rank and leading
    axes, and the factor's key axis, of size 1, spreads over D): each score (q_i · k_j) f_i is
    (q_i f_i) · k_j in real numbers, the factor applied before the dot's sum rather than after it
    (the products rounded once more: a reassociation, as for a traced scalar). Forward only."""
    factor = Term.broadcast(t_, s1, d1)
    last = (d1.length() >= i64(1), d1[d1.length() - 1] == s1.length() - 1, s3[s3.length() - 1] == i64(1))
    for form in (Term.binary("mul", x, factor), Term.binary("mul", factor, x)):
        yield rl(
            eq(e).to(form), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb),
            shape(q) == s2, dtype(t_) == dtq, dtype(q) == dtq, shape(t_) == s3, *last,
        )(_scores(e, Term.binary("mul", q, Term.broadcast(t_, s2, d1)), k, sc0, f64(0.0), NO_MASK, String("none"),
                  fl, i64(0), nb))


@attention_raise.family
def scores_mask():
    """``where(m, s, fill)`` of scores is masked scores: a causal m sets the causal flag (beside an
    additive bias), any other boolean m is the op's boolean mask; a second where with the same fill
    keeps both (``and``; a causal part of an ``and`` becomes the flag)."""
    where = Term.select(m, scalar(fl, dt2, s1), x)
    # a causal mask, on scores with or without a bias
    for kind in (String("none"), String("bias")):
        yield rl(eq(e).to(where), causal_mask(m), _scores(x, q, k, sc0, cap, z, kind, fl2, i64(0), nb))(
            _scores(e, q, k, sc0, cap, z, kind, fl, i64(1), nb)
        )
    # a causal mask on scores masked already with the same fill
    yield rl(eq(e).to(where), causal_mask(m), _scores(x, q, k, sc0, cap, z, String("bool"), fl, i64(0), nb))(
        _scores(e, q, k, sc0, cap, z, String("bool"), fl, i64(1), nb)
    )
    # a boolean mask on unmasked scores, or beside the causal flag with the same fill
    yield rl(eq(e).to(where), dtype(m) == String("bool"), _scores(x, q, k, sc0, cap, NO_MASK, String("none"), fl2, i64(0), nb))(
        _scores(e, q, k, sc0, cap, m, String("bool"), fl, i64(0), nb)
    )
    yield rl(eq(e).to(where), dtype(m) == String("bool"), _scores(x, q, k, sc0, cap, NO_MASK, String("none"), fl, i64(1), nb))(
        _scores(e, q, k, sc0, cap, m, String("bool"), fl, i64(1), nb)
    )
    # two boolean masks with one fill: their conjunction
    yield rl(eq(e).to(where), dtype(m) == String("bool"), _scores(x, q, k, sc0, cap, z, String("bool"), fl, causal, nb), ne(z).to(m))(
        _scores(e, q, k, sc0, cap, Term.binary("and", z, m), String("bool"), fl, causal, nb)
    )
    # a conjunction with a causal part: the flag and the rest
    for both in (Term.binary("and", y, m), Term.binary("and", m, y)):
        yield rl(
            eq(e).to(Term.select(both, scalar(fl, dt2, s1), x)), causal_mask(y),
            _scores(x, q, k, sc0, cap, NO_MASK, String("none"), fl2, i64(0), nb),
        )(_scores(e, q, k, sc0, cap, m, String("bool"), fl, i64(1), nb))


# --- a bias and a boolean mask together: ``where(keep, s + bias, fill)`` is the op's "bias+bool"
# scores, its mask operand `Term.mask_pair(bias, keep)` (the where hides the bias wherever keep or
# the causal flag does, so a NaN or inf bias there never shows, as in the op). The rules mirror
# `scores_mask`'s over unmasked scores, with the bias carried in the pair.

BIAS_AND_BOOL = String("bias+bool")
bias_ = var("bias_", Term)


@attention_raise.family
def scores_bias_and_mask():
    """``where(m, s + bias, fill)`` of biased scores is "bias+bool" scores with mask pair
    (bias, m); beside the causal flag with the same fill it keeps the flag; a causal where over them
    sets the flag; a second boolean where with the same fill is the conjunction; a conjunction with
    a causal part over biased scores is the flag and the rest."""
    where = Term.select(m, scalar(fl, dt2, s1), x)
    biased = _scores(x, q, k, sc0, cap, bias_, String("bias"), fl2, i64(0), nb)
    # a boolean mask on biased scores, or on biased causal scores with the same fill
    yield rl(eq(e).to(where), dtype(m) == String("bool"), biased)(
        _scores(e, q, k, sc0, cap, Term.mask_pair(bias_, m), BIAS_AND_BOOL, fl, i64(0), nb)
    )
    biased_causal = _scores(x, q, k, sc0, cap, bias_, String("bias"), fl, i64(1), nb)
    yield rl(eq(e).to(where), dtype(m) == String("bool"), biased_causal)(
        _scores(e, q, k, sc0, cap, Term.mask_pair(bias_, m), BIAS_AND_BOOL, fl, i64(1), nb)
    )
    # a causal mask on "bias+bool" scores with the same fill
    paired = _scores(x, q, k, sc0, cap, Term.mask_pair(bias_, z), BIAS_AND_BOOL, fl, causal, nb)
    yield rl(eq(e).to(where), causal_mask(m), paired)(
        _scores(e, q, k, sc0, cap, Term.mask_pair(bias_, z), BIAS_AND_BOOL, fl, i64(1), nb)
    )
    # a second boolean mask with the same fill: the conjunction
    yield rl(eq(e).to(where), dtype(m) == String("bool"), paired, ne(z).to(m))(
        _scores(e, q, k, sc0, cap, Term.mask_pair(bias_, Term.binary("and", z, m)), BIAS_AND_BOOL, fl, causal, nb)
    )
    # a conjunction with a causal part (jax.nn.dot_product_attention's mask & is_causal)
    for both in (Term.binary("and", y, m), Term.binary("and", m, y)):
        yield rl(eq(e).to(Term.select(both, scalar(fl, dt2, s1), x)), causal_mask(y), biased)(
            _scores(e, q, k, sc0, cap, Term.mask_pair(bias_, m), BIAS_AND_BOOL, fl, i64(1), nb)
        )
        # one formed before a broadcast (``keep & causal`` at [B, 1, S, S]) masking biased scores: the
        # conjunction of the broadcasts, whose causal part the rule above sees (only here: applied to
        # every such broadcast it grows the e-graphs of masked jax.nn attention by up to 40%)
        spread = Term.broadcast(both, s2, d2)
        yield rl(eq(e).to(Term.select(spread, scalar(fl, dt2, s1), x)), causal_mask(y), biased)(
            union(spread).with_(Term.binary("and", Term.broadcast(y, s2, d2), Term.broadcast(m, s2, d2)))
        )


def _mask_operand(kind: str, mask4) -> tuple[Term, Term]:
    """(the mask its `attn_scores` fact holds, the attention's mask operand) for a mask kind:
    nothing, one tensor, or the pair of a bias and a boolean mask (each viewed by ``mask4``)."""
    if kind == "none":
        return m, NO_MASK
    if kind == "bias+bool":
        return Term.mask_pair(bias_, y), Term.mask_pair(mask4(bias_), mask4(y))
    return m, mask4(m)


@attention_raise.family
def mask_normal_forms():
    """Boolean spellings of one mask: ``where(m, fill, s)`` is ``where(not m, s, fill)``;
    ``where(m, True, False)`` is m's negation and ``not not m`` is m; a negated integer comparison
    is the opposite comparison; ``min`` and ``mul`` of booleans are ``and``."""
    yield rw(Term.select(m, x, scalar(c, dt2, s1)), Term.select(Term.unary("not", m), scalar(c, dt2, s1), x),
             dtype(m) == String("bool"))
    yield rw(Term.select(x, scalar(1.0, "bool", s1), scalar(0.0, "bool", s2)), Term.unary("not", x))
    yield rw(Term.unary("not", Term.unary("not", x)), x)
    opposite = {"lt": "ge", "ge": "lt", "gt": "le", "le": "gt", "eq": "ne", "ne": "eq"}
    for int_dtype in INT_DTYPES:
        for op, neg_op in opposite.items():
            yield rw(Term.unary("not", Term.binary(op, x, y)), Term.binary(neg_op, x, y), dtype(x) == String(int_dtype))
    for op in ("min", "mul"):
        yield rw(Term.binary(op, x, y), Term.binary("and", x, y), dtype(x) == String("bool"))


def _op_dims(n_batch: int, n_free: int):
    """(B, Hkv, H, Sq, D, Sk, Dv) of the op over a rank case's canonical operands, read off the
    shapes ``ss`` (Q), ``sk_`` (Kᵀ) and ``sv`` (V); a second free axis of Q is its group of heads."""
    sq = ss
    if n_free == 0:  # a squeezed single query
        b, hkv, g, s_q, d = sq[0] if n_batch == 2 else i64(1), sq[n_batch - 1], None, i64(1), sq[n_batch]
    elif n_batch == 3 and n_free == 1:
        b, hkv, g, s_q, d = sq[0] * sq[1], sq[2], None, sq[3], sq[4]
    elif n_batch == 2 and n_free == 1:
        b, hkv, g, s_q, d = sq[0], sq[1], None, sq[2], sq[3]
    elif n_batch == 2:
        b, hkv, g, s_q, d = sq[0], sq[1], sq[2], sq[3], sq[4]
    elif n_batch == 1 and n_free == 1:
        b, hkv, g, s_q, d = i64(1), sq[0], None, sq[1], sq[2]
    elif n_batch == 1:
        b, hkv, g, s_q, d = sq[0], i64(1), sq[1], sq[2], sq[3]
    elif n_free == 1:
        b, hkv, g, s_q, d = i64(1), i64(1), None, sq[0], sq[1]
    else:
        b, hkv, g, s_q, d = i64(1), i64(1), sq[0], sq[1], sq[2]
    heads = hkv if g is None else hkv * g
    return b, hkv, heads, s_q, d, sk_[n_batch + 1], sv[n_batch + 1]


def _swapped_views(n_batch: int):
    """(into, back) for Q's free axes (Sq, G) (the 5-D einsum of jax.nn.dot_product_attention):
    ``into(last)`` views such an array as the op's [B, H, Sq, last] (transposed to (G, Sq) and
    reshaped), ``back(last)`` views an op array [B, H, Sq, last] as Q's form again."""
    perm = list(range(n_batch + 3))
    perm[n_batch], perm[n_batch + 1] = perm[n_batch + 1], perm[n_batch]
    swap = ivec(perm)
    b = i64(1) if n_batch == 0 else ss[0]
    heads = (i64(1) if n_batch < 2 else ss[1]) * ss[n_batch + 1]
    s_q = ss[n_batch]
    return (
        lambda last: lambda t: Term.reshape(Term.transpose(t, swap), IntVec(b, heads, s_q, last)),
        lambda last: lambda t: Term.transpose(
            Term.reshape(t, IntVec(*[ss[i] for i in range(n_batch)], ss[n_batch + 1], ss[n_batch], last)), swap),
    )


def _attention_4d(n_batch: int, n_free: int, swapped: bool = False):
    """(q4, k4, v4, mask4, out) builders: the canonical operands of a rank case viewed as the
    op's [B, H, Sq, D], Kᵀ [B, Hkv, D, Sk], V [B, Hkv, Sk, Dv] and mask [B, H, Sq, Sk] by reshapes
    (a second free axis of Q is its group of heads sharing one K/V head), and the op's output
    reshaped back to the product's shape. ``swapped``: Q's free axes are (Sq, G), as in the 5-D
    einsum of jax.nn.dot_product_attention; Q, the mask and the output are transposed to and from
    (G, Sq)."""
    if swapped:
        _, k4, v4, _, _ = _attention_4d(n_batch, n_free)
        into, back = _swapped_views(n_batch)
        return into(ss[n_batch + 2]), k4, v4, into(sk_[n_batch + 1]), back(sv[n_batch + 1])
    b, hkv, heads, s_q, d, s_k, d_v = _op_dims(n_batch, n_free)
    out_shape = IntVec(*[ss[i] for i in range(n_batch + n_free)], d_v)
    return (
        lambda t: Term.reshape(t, IntVec(b, heads, s_q, d)),
        lambda t: Term.reshape(t, IntVec(b, hkv, d, s_k)),
        lambda t: Term.reshape(t, IntVec(b, hkv, s_k, d_v)),
        lambda t: Term.reshape(t, IntVec(b, heads, s_q, s_k)),
        lambda t: Term.reshape(t, out_shape),
    )


def _probabilities(scores_: Term):
    """P as programs write it: softmax of the scores, or computed in float32 and cast back to V's dtype."""
    yield Term.softmax(scores_), ()
    yield Term.convert(Term.softmax(scores_), dtp), (dtype(v) == dtp,)


@attention_raise.family
def kept_rows_zeroing():
    """P zeroed again where a mask hides it, ``where(keep, P, 0)``, changes nothing a product over
    the keys computes when the scores were hidden with -inf wherever keep hides them and keep keeps
    a key in every row: a hidden entry of P is then +0 (what the where writes), or NaN only in a row
    that also has a NaN where it keeps a key (the product is NaN either way). Two ways to know the
    hidden scores are -inf: a causal keep over scores with the causal flag (a causal -inf mask
    before the softmax), or scores that are ``where(keep, s, -inf)`` with that very keep
    (``jax.nn.softmax(s, where=keep)``), whatever else masks them. (Without a kept key a whole row
    of P is 0/0 = NaN where the where writes zeros: key padding is not rewritten.)"""
    post_mask, sx, lc, rc = var("post_mask", Term), var("sx", IntVec), var("lc", IntVec), var("rc", IntVec)
    dt4, s4 = var("dt4", String), var("s4", IntVec)
    neg_inf = f64(float("-inf"))
    causal_facts = [(_scores(x, q, k, sc0, cap, m, String(kind), neg_inf, i64(1), nb), causal_mask(post_mask))
                    for kind in ("none", "bias")]  # a boolean mask might hide a whole row: that row would differ
    where_facts = (_scores(x, q, k, sc0, cap, m, mk, neg_inf, causal, nb),
                   eq(x).to(Term.select(post_mask, scalar(neg_inf, dt4, s4), y)), rows_kept(post_mask))
    for facts in (*causal_facts, where_facts):
        for probs, conds in _probabilities(x):
            zeroed = Term.select(post_mask, scalar(0.0, dt2, s1), probs)
            yield rw(Term.dot(zeroed, v, lc, rc, lb, rb, dt3, pr), Term.dot(probs, v, lc, rc, lb, rb, dt3, pr),
                     *facts, dtype(post_mask) == String("bool"), shape(x) == sx, *conds, lc == IntVec(sx.length() - 1))


@attention_raise.family
def attention():
    """softmax(scores) · V is Attention, for scores in any spelling (`attn_scores`) and every rank
    case (`RANK_CASES`, `DECODE_CASES`); its result has the product's dtype (computed in that dtype when it is
    wider than Q's, e.g. a float32 product of bfloat16 operands)."""
    cases = [(n_batch, n_free, False) for n_batch, n_free in RANK_CASES + DECODE_CASES]
    cases += [(n_batch, n_free, True) for n_batch, n_free in RANK_CASES if n_free == 2]
    for n_batch, n_free, swapped in cases:
        rank = n_batch + n_free + 1
        batch = perm_range(n_batch)
        q4, k4, v4, mask4, back = _attention_4d(n_batch, n_free, swapped)
        shapes = (shape(q) == ss, ss.length() == i64(rank), shape(k) == sk_, shape(v) == sv,
                  sv.length() == i64(n_batch + 2), dtype(e) == dte, dtype(q) == dtq)
        for probs, p_conds in _probabilities(x):
            out = Term.dot(probs, v, ivec([rank - 1]), ivec([n_batch]), batch, batch, dt3, pr)
            for kind in ("none", "bias", "bool", "bias+bool"):
                # swapped: the causal flag is over Q's last free axis (G there), so it is not the op's
                flag = i64(0) if swapped or n_free == 0 else causal
                mask_fact, mask_term = _mask_operand(kind, mask4)
                facts = _scores(x, q, k, sc0, cap, mask_fact, String(kind), fl, flag, i64(n_batch))
                for same_dtype in (True, False):
                    compute = String("") if same_dtype else dte
                    dtype_cond = (dte == dtq,) if same_dtype else (dte != dtq,)
                    att = Term.attention(
                        q4(q), k4(k), v4(v), mask_term, BHSD, K_TRANSPOSED, BHSD, BHSD, sc0, flag, String(kind),
                        compute, fl, cap,
                    )
                    yield rl(eq(e).to(out), facts, *shapes, *p_conds, *dtype_cond)(union(e).with_(back(att)))


@attention_raise.family
def broadcast_product_sums():
    """Float32 products written as a broadcast multiply and a sum over the shared axis, as
    ``(q[..., :, None, :] * k[..., None, :, :]).sum(-1)`` and ``(p[..., None] * v[..., None, :, :]).sum(-2)``
    write Q·Kᵀ and P·V. The scores are the canonical product's (`attn_scores` of Q and Kᵀ, a fact: the
    sum itself is not rewritten, so it stays where attention is not raised); P·V, for P a softmax of
    such scores, is the attention op (float32 products, as the program's; only the order of the sum
    differs, inside the op: it is never rewritten to a standalone matmul)."""
    f32 = String("float32")
    for n_batch, n_free in RANK_CASES:
        rank = n_batch + n_free + 1  # the scores'; the broadcast product has one axis more
        lead = list(range(n_batch + n_free))
        spread_other = ivec([*range(n_batch), rank - 1, rank])  # K [batch.., Sk, D], V [batch.., Sk, Dv]
        swap = ivec([*range(n_batch), n_batch + 1, n_batch])
        plain = (f64(1.0), f64(0.0), NO_MASK, String("none"), f64(KERNEL_FILL), i64(0), i64(n_batch))

        def product_shape(first: IntVec, other: IntVec) -> tuple:
            """The broadcast product is [batch.., free.., Sk, D] (or Dv) of the two operands' own
            sizes, no axis stretched: their batch axes are the same sizes."""
            return (s1 == IntVec(*[first[i] for i in lead], other[n_batch], other[n_batch + 1]),
                    first.length() == i64(len(lead) + 1), other.length() == i64(n_batch + 2),
                    *(other[i] == first[i] for i in range(n_batch)))

        operands = (Term.broadcast(q, s1, ivec([*lead, rank])), Term.broadcast(k, s1, spread_other))
        for product in (Term.binary("mul", *operands), Term.binary("mul", *operands[::-1])):
            yield rl(eq(e).to(Term.reduce("reduce_sum", product, ivec([rank]))), shape(q) == ss, shape(k) == sk_,
                     *product_shape(ss, sk_), sk_[n_batch + 1] == ss[rank - 1], dtype(q) == f32, dtype(k) == f32)(
                _scores(e, q, Term.transpose(k, swap), *plain))
        # P·V is the attention itself (as `attention` raises a product), never a standalone matmul:
        # a matmul's sum order differs from the written sum's, which "exact" allows only in the op
        q4, k4, v4, mask4, back = _attention_4d(n_batch, n_free)
        flag = i64(0) if n_free == 0 else causal
        operands = (Term.broadcast(Term.softmax(x), s1, perm_range(rank)), Term.broadcast(v, s1, spread_other))
        for product in (Term.binary("mul", *operands), Term.binary("mul", *operands[::-1])):
            for kind in ("none", "bias", "bool", "bias+bool"):
                mask_fact, mask_term = _mask_operand(kind, mask4)
                att = Term.attention(q4(q), k4(k), v4(v), mask_term, BHSD, K_TRANSPOSED, BHSD, BHSD, sc0, flag,
                                     String(kind), String(""), fl, cap)
                yield rl(eq(e).to(Term.reduce("reduce_sum", product, ivec([rank - 1]))),
                         _scores(x, q, k, sc0, cap, mask_fact, String(kind), fl, flag, i64(n_batch)),
                         shape(x) == s2, shape(v) == sv, shape(q) == ss, ss.length() == i64(rank), shape(k) == sk_,
                         *product_shape(s2, sv), sv[n_batch] == s2[rank - 1],
                         dtype(x) == f32, dtype(v) == f32, dtype(q) == f32)(union(e).with_(back(att)))


@attention_layout.family
def fold_operand_transpose():
    """A transposed Q, K or V operand is the same operand read in another layout, when the
    kernel can read that layout (D minor for Q and K; D or S minor for V); other layouts
    would need the transpose anyway."""
    args = dict(q=q, k=k, v=v)
    axes = {"q": qa, "k": ka, "v": va}
    for name in ("q", "k", "v"):
        moved = {n: (Term.transpose(t, p) if n == name else t) for n, t in args.items()}
        new_axes = {n: (a.map(lambda i: p[i]) if n == name else a) for n, a in axes.items()}
        minor_axes = (3, 2) if name == "v" else (3,)  # logical D (and S for V) may be minor
        for minor in minor_axes:
            yield rw(
                Term.attention(moved["q"], moved["k"], moved["v"], m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap),
                Term.attention(q, k, v, m, new_axes["q"], new_axes["k"], new_axes["v"], oa, scale, causal, mk, cd, fl, cap),
                p[axes[name][minor]] == i64(3),
            )


@attention_layout.family
def fold_repeated_kv():
    """K and V repeated along their head axis, as ``jnp.repeat(x, G, axis=head)`` and Llama's
    ``repeat_kv`` write it (a broadcast to a new group axis right after the head axis, merged
    into it by a reshape: head kv·G + g is kv head kv), are the unrepeated K and V read by G
    query heads each: the op's query head i reads kv head i // (H / Hkv), the head the repeat put
    there. Nothing is copied (the op's grouped-query read). (Heads at axis 1 or 2 of K and V, as
    [B, H, S, D] and [B, S, H, D] code repeats them.)"""
    g_k, g_v = var("g_k", i64), var("g_v", i64)
    sk0, sv0, sk5, sv5, sk4, sv4 = (var(n, IntVec) for n in ("sk0", "sv0", "sk5", "sv5", "sk4", "sv4"))

    def repeated(t: Term, at: int, s5: IntVec, s4: IntVec) -> Term:
        return Term.reshape(Term.broadcast(t, s5, ivec([*range(at + 1), *range(at + 2, 5)])), s4)

    do_, wrt = var("do_", Term), var("wrt", i64)
    params = (qa, ka, va, oa, scale, causal, mk, cd, fl, cap)
    for hk in (1, 2):  # the head axis's position in K's layout: [B, H, S, D] or [B, S, H, D]
        for hv in (1, 2):  # and in V's
            rep_k, rep_v = repeated(k, hk, sk5, sk4), repeated(v, hv, sv5, sv4)
            same = (ka[1] == i64(hk), va[1] == i64(hv), shape(k) == sk0, shape(v) == sv0,
                    sk5[hk + 1] == g_k, sv5[hv + 1] == g_v, g_k == g_v,
                    sk4 == sk0.set(hk, sk0[hk] * g_k), sv4 == sv0.set(hv, sv0[hv] * g_v))
            yield rw(Term.attention(q, rep_k, rep_v, m, *params), Term.attention(q, k, v, m, *params), *same)
            # gradients: Q's and the bias's are the grouped op's; K's and V's are the repeated
            # operand's summed over its group (as jax.grad sums a broadcast's cotangent), which
            # the grouped op's backward sums itself (in its own order: a reassociation)
            yield rw(Term.attention_vjp(q, rep_k, rep_v, do_, m, *params, wrt),
                     Term.attention_vjp(q, k, v, do_, m, *params, wrt), *same, wrt != i64(1), wrt != i64(2))
            for index, at, s5 in ((1, hk, sk5), (2, hv, sv5)):
                yield rw(
                    Term.reduce("reduce_sum", Term.reshape(Term.attention_vjp(q, rep_k, rep_v, do_, m, *params, i64(index)),
                                                           s5), ivec([at + 1])),
                    Term.attention_vjp(q, k, v, do_, m, *params, i64(index)), *same,
                )


@attention_layout.family
def fold_gradient_transpose():
    """A transposed Q, K, V or output cotangent of an attention's gradient is the same operand
    read in another layout (as for attention itself); the gradient of a transposed operand is
    the transpose of the gradient of the operand."""
    do_ = var("do_", Term)
    args = dict(q=q, k=k, v=v, do=do_)
    axes = {"q": qa, "k": ka, "v": va, "do": oa}
    for name in ("q", "k", "v", "do"):
        moved = {n: (Term.transpose(t, p) if n == name else t) for n, t in args.items()}
        new_axes = {n: (a.map(lambda i: p[i]) if n == name else a) for n, a in axes.items()}
        minor_axes = (3, 2) if name == "v" else (3,)
        for minor in minor_axes:
            for wrt, operand in enumerate(("q", "k", "v", "bias")):
                before = Term.attention_vjp(moved["q"], moved["k"], moved["v"], moved["do"], m, qa, ka, va, oa, scale,
                                            causal, mk, cd, fl, cap, i64(wrt))
                after = Term.attention_vjp(q, k, v, do_, m, new_axes["q"], new_axes["k"], new_axes["v"], new_axes["do"],
                                           scale, causal, mk, cd, fl, cap, i64(wrt))
                yield rw(before, Term.transpose(after, p) if operand == name else after, p[axes[name][minor]] == i64(3))


@attention_layout.family
def fold_output_transpose():
    """A transpose of attention's output is attention writing another layout (D minor)."""
    yield from asking(
        Term.transpose(Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap), p), [oa[3] == p[3]],
        "attention_out_fold", (oa, p, NONE, NONE), 1,
        lambda oa2: Term.attention(q, k, v, m, qa, ka, va, oa2, scale, causal, mk, cd, fl, cap),
    )


@attention_layout.family
def expose_layouts():
    """Attention reading V in any layout is attention reading a transposed V in the standard
    ([B, H, S, D]) or transposed-V ([B, H, D, S]) layout, and attention writing any output
    layout is a transpose of attention writing [B, H, S, D]: the transposes can then fold
    back or bubble into V's producer and the output's consumer. (Q and K layouts only fold:
    exposing them too would multiply the layout combinations of every attention node.)"""
    for target, order in ((BHSD, ivec([0, 1, 2, 3])), (BHDS, ivec([0, 1, 3, 2]))):
        yield rw(
            Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap),
            Term.attention(
                q, k, Term.transpose(v, order.map(lambda a: va[a])), m, qa, ka, target, oa, scale, causal, mk, cd, fl, cap
            ),
        )
    yield from asking(
        Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap), [], "inverse", (oa, NONE, NONE, NONE), 1,
        lambda inv: Term.transpose(Term.attention(q, k, v, m, qa, ka, va, BHSD, scale, causal, mk, cd, fl, cap), inv),
    )


# --- gradients: a jax.grad program's written-out attention backward reads P, so the forward alone
# cannot become the op. `scores_cot` (language.py) follows the cotangent from the softmax's backward
# back through the score modifications to Q·Kᵀ, where dQ, dK and dV become `Term.attention_vjp`
# and P is no longer needed. The spellings are those jax.grad emits (jax.nn.softmax's VJP; the
# transposes of mul, div, convert, add and select_n).

g_, do_, sf_, kk_, w_, dp_ = (var(n, Term) for n in ("g_", "do_", "sf_", "kk_", "w_", "dp_"))
pv_, rc_, rb_ = (var(n, IntVec) for n in ("pv_", "rc_", "rb_"))
dt4 = var("dt4", String)


def _custom_jvp_vjp(probs: Term, d_probs: Term, rank: int, masked):
    """(row, corrected): jax.nn.softmax's VJP as its custom JVP is transposed, with y = P * dP: the
    row sum ``sum(-y)`` and ``corrected(total, dims)`` = ``y + P * masked(broadcast(total))``."""
    prod = Term.binary("mul", probs, d_probs)
    row = Term.reduce("reduce_sum", Term.unary("neg", prod), ivec([rank - 1]))

    def corrected(total: Term, dims: IntVec) -> Term:
        return Term.binary("add", prod, Term.binary("mul", probs, masked(Term.broadcast(total, s1, dims))))

    return row, corrected


def _softmax_vjp_forms(probs: Term, d_probs: Term, rank: int, masked=lambda t: t):
    """(form, conditions): softmax's VJP at cotangent d_probs as jax.grad writes jax.nn.softmax's,
    with y = P * dP, ``y + P * sum(-y)``; the row sum possibly reshaped and summed again over the
    unit axis. ``masked``: what the broadcast row sum passes through first
    (``jax.nn.softmax(s, where=keep)``'s VJP zeroes it where keep hides)."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    row, corrected = _custom_jvp_vjp(probs, d_probs, rank, masked)
    yield corrected(row, keep), ()
    yield corrected(Term.reduce("reduce_sum", Term.reshape(row, s3), last), keep), (s3[rank - 1] == i64(1),)
    # half precision: jax.nn.softmax sums in float32, so its VJP sums the unit axis there and casts back
    widened = Term.convert(Term.reduce("reduce_sum", Term.convert(Term.reshape(row, s3), String("float32")), last), dt4)
    yield corrected(widened, keep), (s3[rank - 1] == i64(1), dtype(row) == dt4)


def _unit_sum_vjp_forms(probs: Term, d_probs: Term, rank: int, masked=lambda t: t):
    """(form, conditions): `_softmax_vjp_forms`' with the row sum reshaped and summed over unit axes
    (G = 1, Hkv = 1, a batch of 1 for unbatched inputs) with the new one: jax.nn.dot_product_attention
    with one query head per K/V head, or one K/V head, sums two, and unbatched [T, N, H] inputs three."""
    row, corrected = _custom_jvp_vjp(probs, d_probs, rank, masked)
    for n_units in (1, 2):
        for units in itertools.combinations(range(rank - 1), n_units) if rank - 1 > n_units else ():
            summed = Term.reduce("reduce_sum", Term.reshape(row, s3), ivec([*units, rank - 1]))
            conds = (s3.length() == i64(rank), s3[rank - 1] == i64(1), *(s3[u] == i64(1) for u in units))
            yield corrected(summed, ivec([i for i in range(rank - 1) if i not in units])), conds


def _quotient_vjp_forms(probs: Term, d_probs: Term, rank: int):
    """(form, conditions): softmax's VJP as jax.grad writes a softmax spelled ``E / sum(E)`` by
    hand (E the exponentials): with w = dP / sum(E), ``(w + sum(P * -w)) * E``, which is
    ``P * dP - P * sum(P * dP)`` in real numbers (the op's backward computes that sum its own way);
    the row sum as summed with keepdims (reshaped and summed over the unit axis) or not."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    ex_ = var("ex_", Term)
    total = Term.broadcast(Term.reduce("reduce_sum", ex_, last), s2, keep)
    w = Term.binary("div", d_probs, total)
    row = Term.reduce("reduce_sum", Term.binary("mul", probs, Term.unary("neg", w)), last)
    same_softmax = (eq(probs).to(Term.binary("div", ex_, total)),)
    for total_row, conds in ((row, ()), (Term.reduce("reduce_sum", Term.reshape(row, s3), last), (s3[rank - 1] == i64(1),))):
        cotangent = Term.binary("add", w, Term.broadcast(total_row, s1, keep))
        for form in (Term.binary("mul", cotangent, ex_), Term.binary("mul", ex_, cotangent)):
            yield form, (*same_softmax, *conds)


def _power_quotient_vjp_forms(probs: Term, d_probs: Term, rank: int, masked=lambda t: t):
    """(form, conditions): softmax's VJP as jax.grad writes ``E / T`` with T = sum(E) kept as
    [.., 1] (jax.nn.softmax before jax 0.12, ``jax_softmax_custom_jvp`` off): the quotient's
    transpose squares the kept T, ``(dP / T + sum(-(dP * T^-2 * E))) * E``, which is
    ``P * dP - P * sum(P * dP)`` in real numbers since E / T is P (the row sum kept as [.., 1] and
    summed over the unit axis, with one or two unit batch axes too where the quotient broadcast over
    them). ``masked``: what the broadcast row sum passes through (`_softmax_vjp_forms`'s)."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    ex_ = var("ex_", Term)
    total = Term.reduce("reduce_sum", ex_, last)
    spread_total = Term.broadcast(total, s2, keep)
    inverse_square = Term.broadcast(Term.integer_pow(Term.broadcast(total, s3, keep), -2), s2, perm_range(rank))
    kept = Term.reshape(Term.reduce("reduce_sum", Term.binary("mul", Term.binary("mul", d_probs, inverse_square), ex_),
                                    last), s3)
    same_softmax = (eq(probs).to(Term.binary("div", ex_, spread_total)), s3[rank - 1] == i64(1), s3.length() == i64(rank))
    rows = [(ivec([rank - 1]), keep, ())]
    for n_units in (1, 2):  # unit batch axes the quotient broadcast over (unbatched inputs: two)
        for units in itertools.combinations(range(rank - 1), n_units):
            rows.append((ivec([*units, rank - 1]), ivec([i for i in range(rank - 1) if i not in units]),
                         tuple(s3[u] == i64(1) for u in units)))
    for summed, spread, units in rows:
        row = Term.reduce("reduce_sum", Term.unary("neg", kept), summed)
        cotangent = Term.binary("add", Term.binary("div", d_probs, spread_total), masked(Term.broadcast(row, s1, spread)))
        yield Term.binary("mul", cotangent, ex_), (*same_softmax, *units)  # exp's transpose: g * E


def _log_softmax_vjp_forms(probs: Term, d_probs: Term, rank: int):
    """(form, conditions): softmax's VJP as jax.grad writes ``exp(log_softmax(x))`` (P = exp(z) with
    z = sh - log(T), E = exp(sh), T = sum(E)): ``P * dP + E * sum(-(P * dP)) / T`` (the row sum kept
    as [.., 1], divided by T there and summed over the unit axis), which is ``P * dP - P * sum(P * dP)``
    in real numbers since E / T is P."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    ex_, sh_ = var("ex_", Term), var("sh_", Term)
    total = Term.reduce("reduce_sum", ex_, last)
    prod = Term.binary("mul", probs, d_probs)
    kept = Term.reshape(Term.reduce("reduce_sum", Term.unary("neg", prod), last), s3)
    row = Term.reduce("reduce_sum", Term.binary("div", kept, Term.broadcast(total, s3, keep)), last)
    log_probs = Term.binary("sub", sh_, Term.broadcast(Term.unary("log", total), s2, keep))
    same_softmax = (eq(probs).to(Term.unary("exp", log_probs)), eq(ex_).to(Term.unary("exp", sh_)),
                    s3[rank - 1] == i64(1), s3.length() == i64(rank))
    spread = Term.broadcast(row, s1, keep)
    for correction in (Term.binary("mul", spread, ex_), Term.binary("mul", ex_, spread)):
        for form in (Term.binary("add", prod, correction), Term.binary("add", correction, prod)):
            yield form, same_softmax


def _reciprocal_vjp_forms(probs: Term, d_probs: Term, rank: int):
    """(form, conditions): softmax's VJP as jax.grad writes ``E * (1 / T)`` (T = sum(E), the
    reciprocal as ``integer_pow(T, -1)``, what ``jnp.reciprocal`` writes): with r = 1 / T,
    ``(dP * r + sum(E * dP) * (-1 * T^-2)) * E``, which is ``P * dP - P * sum(P * dP)`` in real
    numbers since E * r is P (the row sum kept as [.., 1] and summed over the unit axis)."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    ex_ = var("ex_", Term)
    total = Term.reduce("reduce_sum", ex_, last)
    recip = Term.broadcast(Term.integer_pow(total, -1), s2, keep)
    kept = Term.reshape(Term.reduce("reduce_sum", Term.binary("mul", ex_, d_probs), last), s3)
    slope = Term.binary("mul", scalar(-1.0, dt2, s3), Term.integer_pow(Term.broadcast(total, s3, keep), -2))
    row = Term.reduce("reduce_sum", Term.binary("mul", kept, slope), last)
    same_softmax = (s3[rank - 1] == i64(1), s3.length() == i64(rank))
    cotangent = Term.binary("add", Term.binary("mul", d_probs, recip), Term.broadcast(row, s1, keep))
    for p_form in (Term.binary("mul", ex_, recip), Term.binary("mul", recip, ex_)):
        for form in (Term.binary("mul", cotangent, ex_), Term.binary("mul", ex_, cotangent)):
            yield form, (eq(probs).to(p_form), *same_softmax)


def _textbook_vjp_forms(probs: Term, d_probs: Term, rank: int):
    """(form, conditions): softmax's VJP written out by hand, as a custom_vjp attention's backward
    writes it (saving P): ``P * (dP - sum(P * dP))`` or ``P * dP - P * sum(P * dP)``, the row sum
    broadcast back along the keys (products in either order). That is the op's backward up to the
    order of its row sum (the op's flash backward sums ``dO * O``, `VJP_SPELLINGS`' note)."""
    last, keep = ivec([rank - 1]), perm_range(rank - 1)
    for prod in (Term.binary("mul", probs, d_probs), Term.binary("mul", d_probs, probs)):
        row = Term.broadcast(Term.reduce("reduce_sum", prod, last), s1, keep)
        centred = Term.binary("sub", d_probs, row)
        yield Term.binary("mul", probs, centred), ()
        yield Term.binary("mul", centred, probs), ()
        for correction in (Term.binary("mul", probs, row), Term.binary("mul", row, probs)):
            yield Term.binary("sub", prod, correction), ()


VJP_CUSTOM, VJP_UNIT_SUMS, VJP_POWER_QUOTIENT, VJP_QUOTIENT, VJP_BY_HAND = range(5)
VJP_SPELLINGS = (
    (VJP_CUSTOM, _softmax_vjp_forms), (VJP_UNIT_SUMS, _unit_sum_vjp_forms),
    (VJP_POWER_QUOTIENT, _power_quotient_vjp_forms), (VJP_QUOTIENT, _quotient_vjp_forms),
    (VJP_BY_HAND, _log_softmax_vjp_forms), (VJP_BY_HAND, _reciprocal_vjp_forms), (VJP_BY_HAND, _textbook_vjp_forms),
)
"""`softmax_vjp`'s spellings, numbered in the order the gradient rules accept them: a dP read as
one kind of value reads the spellings up to a number (`softmax_backward`): jax.nn.softmax's custom
JVP (row sum over the last axis; then summed over unit axes), the quotient's before jax 0.12, then
softmaxes written by hand (E / sum(E); exp(log_softmax) and E * (1 / sum(E))) and softmax's VJP
written by hand (`_textbook_vjp_forms`): these differ from the op's backward by the rounding of
E / T against P and the order of the sums, with the same NaN rows (a NaN or +inf score makes its
row's P and E NaN in both)."""


def _reshaped_softmax_ranks(n_batch: int, n_free: int, transposed: bool) -> list[int]:
    """The ranks of the reshaped softmax `reshaped_softmax_backward` reads for a rank case: merged
    axes, or a [B·H] batch split into [B, H] (BLOOM); of the scores transposed, grouped heads merged
    (Gemma: G into the heads)."""
    rank = n_batch + n_free + 1
    if transposed:
        return [rank - 1] if n_free == 2 else []
    return [*range(2, rank), *([rank + 1] if n_batch == 1 else [])]


VJP_RANKS = sorted({n_batch + n_free + 1 for n_batch, n_free in GRAD_CASES}
                   | {r for n_batch, n_free in RANK_CASES for t in (False, True) for r in _reshaped_softmax_ranks(n_batch, n_free, t)})
"""The ranks of the softmaxes whose VJP the gradient rules read (`softmax_vjp`)."""


@attention_grad_vjp.family
def softmax_vjps():
    """Softmax's VJP in each of jax.grad's spellings (`VJP_SPELLINGS`), and that of
    ``jax.nn.softmax(x, where=keep)``, at every rank the gradient rules read (`VJP_RANKS`):
    `softmax_vjp` and `where_softmax_vjp`, matched on the VJP alone (any x, any cotangent). Its own rule set, run just
    before `attention_grad` in each round (`rulesets.READS_FROM`), so that reads them in the same round."""
    keep_, dt5, s5 = var("keep_", Term), var("dt5", String), var("s5", IntVec)

    def hidden(t: Term) -> Term:
        return Term.select(keep_, scalar(0.0, dt5, s5), t)

    probs = Term.softmax(sf_)
    for rank in VJP_RANKS:
        for spelling, forms in VJP_SPELLINGS:
            for form, conditions in forms(probs, dp_, rank):
                yield rl(eq(e).to(form), *conditions)(softmax_vjp(e, sf_, dp_, i64(rank), i64(spelling)))
        for forms in (_softmax_vjp_forms, _unit_sum_vjp_forms):
            for form, conditions in forms(hidden(probs), hidden(dp_), rank, hidden):
                yield rl(eq(e).to(form), *conditions)(where_softmax_vjp(e, keep_, sf_, dp_, i64(rank)))
        # before jax 0.12: the quotient's, its P the unhidden E / sum(where(keep, E, 0)) (that sum is
        # sum(E) where keep keeps a key in every row, `kept_rows_where_sum`, as the gradient rules require)
        for form, conditions in _power_quotient_vjp_forms(probs, hidden(dp_), rank, hidden):
            yield rl(eq(e).to(form), *conditions)(where_softmax_vjp(e, keep_, sf_, dp_, i64(rank)))


def _where_softmax_backward(rank: int, facts, d_out: Term):
    """jax.nn.softmax(s, where=keep)'s VJP (`where_softmax_vjp`): its P is ``where(keep, softmax(s'), 0)``
    over s' = ``where(keep, s, -inf)``, and it zeroes dP and the broadcast row sum where keep hides.
    Where keep keeps a key in every row (`rows_kept`) that P equals the op's wherever keep keeps (a
    hidden entry of softmax(s') is +0, or its row is NaN throughout), so the VJP is the cotangent of
    s' wherever keep keeps (hidden entries are 0 here; the where's own backward, `scores_backward`,
    zeroes them on the way to s)."""
    keep_, dt5, s6 = var("keep_", Term), var("dt5", String), var("s6", IntVec)
    kept = (rows_kept(keep_), eq(sf_).to(Term.select(keep_, scalar(float("-inf"), dt5, s6), w_)))
    for d_probs in (d_out, Term.convert(d_out, String("float32"))):
        yield rl(where_softmax_vjp(e, keep_, sf_, dp_, i64(rank)), eq(dp_).to(d_probs), *facts, *kept)(
            scores_cot(e, sf_, sf_, do_, v))


@attention_grad.family
def unit_axis_last():
    """A sum over a unit axis that a reshape inserted before the last axis (softmax's VJP over axis
    -2 or 1 keeps its row sum as [.., 1, Sq]: the program's rows run along a non-last axis, and the
    transpose rules carry the rest of the backward to the canonical layout) is the sum over that
    unit axis inserted last instead: the same one element of the same linear order is summed
    either way (exactly equal), so `_softmax_vjp_forms` reads the row sum in one form; so also through
    a widening or a negation (the quotient's spelling before jax 0.12 sums ``-kept``)."""
    u = d1[0]
    unit_first = (d1.length() == i64(1), s3[u] == i64(1), u != s3.length() - 1)
    last_unit = s3.remove(u).push(i64(1))
    yield rw(Term.reduce("reduce_sum", Term.reshape(y, s3), d1),
             Term.reduce("reduce_sum", Term.reshape(y, last_unit), IntVec(s3.length() - 1)), *unit_first)
    yield rw(Term.reduce("reduce_sum", Term.convert(Term.reshape(y, s3), dt), d1),
             Term.reduce("reduce_sum", Term.convert(Term.reshape(y, last_unit), dt), IntVec(s3.length() - 1)),
             *unit_first)
    yield rw(Term.reduce("reduce_sum", Term.unary("neg", Term.reshape(y, s3)), d1),
             Term.reduce("reduce_sum", Term.unary("neg", Term.reshape(y, last_unit)), IntVec(s3.length() - 1)),
             *unit_first)


@attention_grad.family
def unit_axis_sum():
    """A sum over axes of length 1 only is a reshape: XLA's algebraic simplifier replaces it by one
    (the init 0 is the sum's identity: a -0 stays -0, bit for bit), so the backward of
    `unit_axis_broadcast`'s broadcast, jax.grad's sum over the inserted unit axis, reads as a view.
    Only a sum a product reads (dO and the scores' cotangent): a row sum kept as [.., 1] and summed
    again would become its own operand's view, a cycle that misled extraction (jax.nn's 5-D grads)."""
    summed = Term.reduce("reduce_sum", x, d1)
    for product in (Term.dot(summed, y, p, d2, lb, rb, dt, pr), Term.dot(y, summed, p, d2, lb, rb, dt, pr)):
        yield from asking(summed, [eq(z).to(product), shape(x) == s2], "unit_reduce", (s2, d1, NONE, NONE), 1,
                          lambda target: Term.reshape(x, target))


@attention_grad.family
def widened_dot_operand():
    """A float32 product of a half-precision operand widened to float32 and one still half (the
    backward of P · V accumulated in float32 whose output was cast back to half precision: its
    cotangent is widened before dP = do · Vᵀ) is the float32 product of the two half operands:
    each product of two bfloat16 or float16 values is exact in float32 (8- or 11-bit significands,
    float32's exponent range for bfloat16), and both accumulate in float32 (a reassociation). Where
    a default precision rounds float32 operands (TF32 keeps 11 bits: both exact; a TPU's bfloat16
    pass rounds a float16 operand), the half product is the more precise. The same with both
    operands widened (Q and K cast to float32 for the scores, as GPT-J and MaxText's
    float32_qk_product write it), and with the other operand float32 already (dS · K): a mixed
    product widens its half operand to float32 itself (both ways: a mixed product is also the
    product of the widened operand)."""
    f32 = String("float32")
    for half_dtype in ("bfloat16", "float16"):
        cond = (dtype(x) == dt, dtype(y) == dt, dt == String(half_dtype))
        dims = (d1, d2, lb, rb, f32, pr)
        yield rw(Term.dot(Term.convert(x, f32), y, *dims), Term.dot(x, y, *dims), *cond)
        yield rw(Term.dot(y, Term.convert(x, f32), *dims), Term.dot(y, x, *dims), *cond)
        yield rw(Term.dot(Term.convert(x, f32), Term.convert(y, f32), *dims), Term.dot(x, y, *dims), *cond)
        # one operand float32 already: a mixed product widens the half operand to float32 itself
        mixed = (dtype(x) == String(half_dtype), dtype(y) == f32)
        yield rw(Term.dot(Term.convert(x, f32), y, *dims), Term.dot(x, y, *dims), *mixed)
        yield rw(Term.dot(y, Term.convert(x, f32), *dims), Term.dot(y, x, *dims), *mixed)
        # and back: jnp.einsum of a float32 Q and a half K writes the mixed product itself; its
        # half operand widened (exact) gives the float32 K the op's gradients read
        yield rw(Term.dot(x, y, *dims), Term.dot(Term.convert(x, f32), y, *dims), *mixed)
        yield rw(Term.dot(y, x, *dims), Term.dot(y, Term.convert(x, f32), *dims), *mixed)


@attention_grad.family
def probabilities_first():
    """``dP * P`` is ``P * dP`` (how the backward of exp writes softmax's VJP): the forms below read P first."""
    yield rw(Term.binary("mul", x, Term.softmax(y)), Term.binary("mul", Term.softmax(y), x))


@attention_grad.family
def softmax_backward():
    """jax.grad's backward of softmax(s) · V at output cotangent do: softmax's VJP (`softmax_vjp`,
    `where_softmax_vjp`) at dP = do · Vᵀ (cast to float32 when P was cast to V's dtype) is the
    cotangent of the scores s (`scores_cot`), over every rank case, a decode step's squeezed query
    too: jax.nn.softmax's spellings, and at the plain dP those of a softmax written by hand (exp(log_softmax)
    and E * (1 / sum(E)) over `RANK_CASES` only). A float32 dP rounded to V's half dtype and widened
    again (P cast to V's dtype, P · V accumulated in float32: jax.grad rounds P's cotangent to P's
    dtype) is dP less precise: the op's backward keeps dP in float32, as for the widened bfloat16 dP."""
    f32 = String("float32")
    spelling = var("spelling", i64)
    for n_batch, n_free in GRAD_CASES:
        rank = n_batch + n_free + 1
        batch = perm_range(n_batch)
        facts = (_scores(sf_, q, k, sc0, cap, m, mk, fl, causal, i64(n_batch)), shape(v).length() == i64(n_batch + 2))
        d_out = Term.dot(do_, v, ivec([rank - 1]), ivec([n_batch + 1]), batch, batch, dt, pr)
        by_hand = VJP_BY_HAND if (n_batch, n_free) in RANK_CASES else VJP_QUOTIENT
        rounded = (dtype(v) == dtp, dt == f32, dtp != f32)
        d_probs_kinds = ((d_out, by_hand, ()), (Term.convert(d_out, f32), VJP_POWER_QUOTIENT, ()),
                         (Term.convert(Term.convert(d_out, dtp), f32), VJP_POWER_QUOTIENT, rounded))
        for d_probs, last_spelling, conditions in d_probs_kinds:
            yield rl(softmax_vjp(e, sf_, dp_, i64(rank), spelling), spelling <= i64(last_spelling), eq(dp_).to(d_probs),
                     *conditions, *facts)(scores_cot(e, sf_, sf_, do_, v))
        yield from _where_softmax_backward(rank, facts, d_out)


def _rank_in(rank: i64, ranks: list[int]) -> tuple:
    """Conditions that ``rank`` is one of ``ranks``."""
    low, high = min(ranks), max(ranks)
    if low == high:
        return (rank == i64(low),)
    return (rank >= i64(low), rank <= i64(high), *(ne(rank).to(i64(r)) for r in range(low, high) if r not in ranks))


@attention_grad.family
def reshaped_softmax_backward():
    """Softmax's backward taken on a reshape of the scores that keeps rows whole (`softmax_reshape`:
    grouped-query code merges the group axis into the heads for the softmax; HF BLOOM splits its
    one [B·H] batch axis into [B, H] for the mask and the softmax), at the reshaped dP = do · Vᵀ
    (jax.nn.softmax's VJP, `softmax_vjp`): reshaped back, it is the cotangent of the scores themselves
    (a reshape moves no value). So also for scores transposed with the keys kept last before the
    reshape (`scores_transpose`: Gemma's GQA), reshaped and transposed back."""
    soft_shape, scores_shape, inv = var("soft_shape", IntVec), var("scores_shape", IntVec), var("inv", IntVec)
    soft_in, soft_rank, spelling = var("soft_in", Term), var("soft_rank", i64), var("spelling", i64)
    keys_last = (p[p.length() - 1] == p.length() - 1,)
    inverse = eq(answer("inverse", p, NONE, NONE, NONE, i64(0))).to(inv)
    for n_batch, n_free in RANK_CASES:
        rank = n_batch + n_free + 1
        batch = perm_range(n_batch)
        facts = (_scores(sf_, q, k, sc0, cap, m, mk, fl, causal, i64(n_batch)), shape(v).length() == i64(n_batch + 2))
        d_out = Term.dot(do_, v, ivec([rank - 1]), ivec([n_batch + 1]), batch, batch, dt, pr)
        views = (  # (transposed, the scores as the softmax reads them, dP read alike, the cotangent viewed back, conditions)
            (False, sf_, d_out, lambda t: Term.reshape(t, scores_shape), (shape(sf_) == scores_shape,)),
            (True, Term.transpose(sf_, p), Term.transpose(d_out, p),
             lambda t: Term.transpose(Term.reshape(t, scores_shape), inv), (*keys_last, inverse,
                                                                             shape(Term.transpose(sf_, p)) == scores_shape)),
        )
        for transposed, scores_view, d_view, back, view_conds in views:
            soft_ranks = _reshaped_softmax_ranks(n_batch, n_free, transposed)
            if not soft_ranks:
                continue
            vjp = (softmax_vjp(e, soft_in, dp_, soft_rank, spelling), spelling <= i64(VJP_POWER_QUOTIENT),
                   *_rank_in(soft_rank, soft_ranks), soft_shape.length() == soft_rank,
                   eq(soft_in).to(Term.reshape(scores_view, soft_shape)))
            d_reshaped = Term.reshape(d_view, soft_shape)
            for d_probs in (d_reshaped, Term.convert(d_reshaped, String("float32"))):
                yield rl(*vjp, eq(dp_).to(d_probs), *facts, *view_conds)(scores_cot(back(e), sf_, sf_, do_, v))
            if transposed:  # the inverse permutation, asked where such a softmax is
                yield rl(eq(e).to(Term.softmax(Term.reshape(scores_view, soft_shape))), *facts, *keys_last)(
                    ask("inverse", p, NONE, NONE, NONE))


@attention_grad.family
def scores_backward():
    """The cotangent of scores carries back through their modifications as jax.grad transposes
    them: a scalar factor multiplies it again, a float32 widening is undone, an additive bias
    passes it unchanged, and a where-mask zeroes it where the fill was taken."""
    staged = (scores_cot(g_, s_, sf_, do_, v), _scores(x, q, k, sc0, cap, m, mk, fl, causal, nb))
    view_shape, inv, mask_view, cot_view = var("view_shape", IntVec), var("inv", IntVec), var("mask_view", Term), var("cot_view", Term)
    scalings = (lambda t, n: Term.binary("mul", t, scalar(c, dt2, n)), lambda t, n: Term.binary("mul", scalar(c, dt2, n), t),
                lambda t, n: Term.binary("div", t, scalar(c, dt2, n)))
    for (form, _), scaled in zip(_scaled(x), scalings):
        yield rl(eq(s_).to(form), eq(e).to(scaled(g_, s1)), *staged)(scores_cot(e, x, sf_, do_, v))
        # the cotangent a view of one scaled before the view (jnp.matmul's unit axis: `unit_axis_sum`)
        yield rl(eq(s_).to(form), eq(g_).to(Term.reshape(cot_view, view_shape)),
                 eq(e).to(Term.reshape(scaled(cot_view, s2), view_shape)), *staged)(scores_cot(e, x, sf_, do_, v))
    yield rl(eq(s_).to(Term.convert(x, String("float32"))), eq(e).to(Term.convert(g_, dt)), dtype(x) == dt, *staged)(
        scores_cot(e, x, sf_, do_, v)
    )
    for form in (Term.binary("add", x, z), Term.binary("add", z, x), Term.binary("sub", x, z)):
        yield rl(eq(s_).to(form), *staged)(scores_cot(g_, x, sf_, do_, v))
    # where(keep, s, fill) passes the cotangent where it keeps s; where(hide, fill, s) where it hides not
    yield rl(eq(s_).to(Term.select(y, scalar(fl2, dt2, s1), x)), eq(e).to(Term.select(y, scalar(0.0, dt3, s2), g_)),
             *staged)(scores_cot(e, x, sf_, do_, v))
    yield rl(eq(s_).to(Term.select(y, x, scalar(fl2, dt2, s1))), eq(e).to(Term.select(y, g_, scalar(0.0, dt3, s2))),
             *staged)(scores_cot(e, x, sf_, do_, v))
    # the same where applied to a view of the scores (reshaped, or transposed and reshaped:
    # `scores_reshape`, `scores_transpose`: grouped heads merged, BLOOM's [B·H] product viewed as
    # [B, H, S, S]), the mask and the cotangent viewed back alike (a view moves no value)
    for back in (lambda t: Term.reshape(t, view_shape), lambda t: Term.transpose(Term.reshape(t, view_shape), inv)):
        viewed = (eq(g_).to(back(cot_view)), *staged)
        yield rl(eq(s_).to(Term.select(back(mask_view), scalar(fl2, dt2, s1), x)),
                 eq(e).to(Term.select(mask_view, scalar(0.0, dt3, s2), cot_view)), *viewed)(scores_cot(back(e), x, sf_, do_, v))
        yield rl(eq(s_).to(Term.select(back(mask_view), x, scalar(fl2, dt2, s1))),
                 eq(e).to(Term.select(mask_view, cot_view, scalar(0.0, dt3, s2))), *viewed)(scores_cot(back(e), x, sf_, do_, v))


def _gradient_views(n_batch: int, n_free: int, swapped: bool):
    """(do4, q_back, scores_back): the output cotangent viewed as the op's [B, H, Sq, Dv], and the
    op's [B, H, Sq, D] gradient of Q and [B, H, Sq, Sk] gradient of a bias viewed back as
    canonical Q and as the product Q·Kᵀ (``swapped``: Q's free axes are (Sq, G))."""
    b, _, heads, s_q, _, _, d_v = _op_dims(n_batch, n_free)
    if not swapped:
        product = IntVec(*[ss[i] for i in range(n_batch + n_free)], sk_[n_batch + 1])
        return ((lambda t: Term.reshape(t, IntVec(b, heads, s_q, d_v))), (lambda t: Term.reshape(t, ss)),
                (lambda t: Term.reshape(t, product)))
    into, back = _swapped_views(n_batch)
    return into(sv[n_batch + 1]), back(ss[n_batch + 2]), back(sk_[n_batch + 1])


def _gradient_ops_case(n_batch, n_free, swapped, q4, k4, v4, mask4, do4, q_back, scores_back, shapes, compute: str):
    """`gradient_ops`' rules for one rank case and the op's compute dtype ("" or "float32")."""
    flag = i64(0) if swapped or n_free == 0 else causal  # as in `attention`: none over (Sq, G) or one row
    for kind in ("none", "bias", "bool", "bias+bool"):
        mask_fact, mask_term = _mask_operand(kind, mask4)
        facts = (_scores(sf_, q, k, sc0, cap, mask_fact, String(kind), fl, flag, i64(n_batch)), *shapes)

        def grad(wrt: int, kind=kind, mask_term=mask_term) -> Term:
            return Term.attention_vjp(q4(q), k4(k), v4(v), do4(do_), mask_term, BHSD, K_TRANSPOSED, BHSD, BHSD,
                                      sc0, flag, String(kind), String(compute), fl, cap, i64(wrt))

        with_bias = kind in ("bias", "bias+bool")
        yield rl(scores_cot(g_, sf_, sf_, do_, v), *facts)(
            grad_op(sf_, q, k, v, do_, q_back(grad(0)), grad(1), grad(2), scores_back(grad(3 if with_bias else 0)))
        )
        if with_bias:  # the cotangent where the bias was added (full-shaped there) is its gradient
            bias = m if kind == "bias" else bias_
            for form in (Term.binary("add", x, bias), Term.binary("add", bias, x)):
                yield rl(eq(s_).to(form), scores_cot(g_, s_, sf_, do_, v), shape(bias) == s3, dtype(bias) == dtq,
                         *facts)(union(g_).with_(Term.reshape(scores_back(grad(3)), s3)))


@attention_grad.family
def gradient_ops():
    """The cotangent of scores s at output cotangent do (`scores_cot`) names the op's gradients
    of the attention s defines (`grad_op`: `Term.attention_vjp` for Q, K, V and an additive bias,
    over every rank case's operands viewed as the op's, as the forward raising views them; Q's
    and the bias's viewed back as the program's, since one product may be read in two views); and
    the cotangent where a bias was added is the bias's gradient."""
    cases = [(n_batch, n_free, False) for n_batch, n_free in GRAD_CASES]
    cases += [(n_batch, n_free, True) for n_batch, n_free in RANK_CASES if n_free == 2]
    for n_batch, n_free, swapped in cases:
        rank = n_batch + n_free + 1
        q4, k4, v4, mask4, _ = _attention_4d(n_batch, n_free, swapped)
        do4, q_back, scores_back = _gradient_views(n_batch, n_free, swapped)
        operands = (shape(q) == ss, ss.length() == i64(rank), shape(k) == sk_, shape(v) == sv,
                    sv.length() == i64(n_batch + 2), dtype(q) == dtq, dtype(k) == dtq, dtype(v) == dtq)
        # the cotangent in the operands' dtype; or half-precision operands whose output was float32
        # (P left float32 and multiplied by a half V, as flax's force_fp32_for_softmax writes it; the
        # forward raises it computing in float32): the op computing in float32, its gradients
        # rounded once to the operands' dtype (lower.attention_gradients differentiates that cast)
        for compute, do_dtype in (("", (dtype(do_) == dtq,)),
                                  ("float32", (dtype(do_) == String("float32"), ne(dtq).to(String("float32"))))):
            yield from _gradient_ops_case(n_batch, n_free, swapped, q4, k4, v4, mask4, do4, q_back, scores_back,
                                          (*operands, *do_dtype), compute)


@attention_grad.family
def viewed_cotangent():
    """A scores cotangent known only on a view (`reshaped_softmax_backward` records the program's
    cotangent g reshaped to the scores' shape) is that view reshaped back: a reshape is a bijection
    between the two shapes, so g is ``reshape(reshape(g, view), shape(g))`` (the `canonical`
    reshape rules fold that to g and to the op's gradient viewed alike). Swin with one head sums
    its relative bias's cotangent on the [B·nW, 1, N, N] view the softmax read."""
    cot_view, view_shape = var("cot_view", Term), var("view_shape", IntVec)
    yield rl(scores_cot(g_, x, sf_, do_, v), eq(g_).to(Term.reshape(cot_view, view_shape)), shape(cot_view) == s3)(
        union(cot_view).with_(Term.reshape(g_, s3)))


def _rounded(chain, product: Term):
    """(form, conditions): a gradient ``chain(product)`` as a program writes it, or with the product
    accumulated in float32 and rounded to Q's dtype (``dtq``) before or after the chain, as jax.grad
    writes the transpose of a half-precision dot with float32 results (the op's backward
    accumulates in float32 and rounds once)."""
    yield chain(product), ()
    wide = (dtype(product) == String("float32"),)
    yield chain(Term.convert(product, dtq)), wide
    if chain(x) is not x:  # a scale's factor: rounded after it as well
        yield Term.convert(chain(product), dtq), wide


@attention_grad.family
def attention_gradients():
    """Where the cotangent reaches Q·Kᵀ itself: g · K is Q's gradient (times the factor when Q was
    scaled before the product), gᵀ · Q is K's, and Pᵀ · do is V's: the op's (`grad_op`). (A decode
    step's squeezed query has no free axis: gᵀ · Q and Pᵀ · do are outer products.)"""
    dq_, dk_, dv_, db_ = (var(n, Term) for n in ("dq_", "dk_", "dv_", "db_"))
    gdt, gpr = var("gdt", String), var("gpr", String)  # a gradient product's own dtype and precision
    for n_batch, n_free in GRAD_CASES:
        rank = n_batch + n_free + 1
        batch, free = perm_range(n_batch), ivec(range(n_batch, n_batch + n_free))
        swap_k = ivec([*range(n_batch), n_batch + 1, n_batch])  # Kᵀ [batch.., D, Sk] <-> K [batch.., Sk, D]
        known = (grad_op(sf_, q, k, v, do_, dq_, dk_, dv_, db_), shape(q) == ss, ss.length() == i64(rank),
                 shape(k) == sk_, shape(v) == sv, sv.length() == i64(n_batch + 2), dtype(q) == dtq, dtype(e) == dtq)

        def d_query(form: Term) -> Term:
            return Term.dot(g_, form, ivec([rank - 1]), ivec([n_batch]), batch, batch, gdt, gpr)

        # Q as given, or multiplied or divided by a scalar before the product (the scale's factor)
        q_forms = [(q, lambda t: t)]
        q_forms += [
            (Term.binary("mul", q, scalar(c, dt2, s1)), lambda t: Term.binary("mul", t, scalar(c, dt2, s1))),
            (Term.binary("mul", scalar(c, dt2, s1), q), lambda t: Term.binary("mul", scalar(c, dt2, s1), t)),
            (Term.binary("div", q, scalar(c, dt2, s1)), lambda t: Term.binary("div", t, scalar(c, dt2, s1))),
        ]
        for q_form, chain in q_forms:
            at_product = (scores_cot(g_, x, sf_, do_, v), eq(x).to(_canonical_qk(q_form, k, n_batch, rank)), *known)
            # Q's gradient: g · K (K as given, or Kᵀ contracted over its last axis)
            for form, conds in _rounded(chain, d_query(kk_)):
                yield rl(eq(e).to(form), *conds, eq(k).to(Term.transpose(kk_, swap_k)), *at_product)(union(e).with_(dq_))
            for form, conds in _rounded(chain, Term.dot(g_, k, ivec([rank - 1]), ivec([n_batch + 1]), batch, batch, gdt, gpr)):
                yield rl(eq(e).to(form), *conds, *at_product)(union(e).with_(dq_))
            # K's gradient: gᵀ · Q summed over Q's free axes, in K's layout or in Kᵀ's
            for form, conds in _rounded(lambda t: t, Term.dot(g_, q_form, free, free, batch, batch, gdt, gpr)):
                yield rl(eq(e).to(form), *conds, *at_product)(union(e).with_(Term.transpose(Term.reshape(dk_, sk_), swap_k)))
            for form, conds in _rounded(lambda t: t, Term.dot(q_form, g_, free, free, batch, batch, gdt, gpr)):
                yield rl(eq(e).to(form), *conds, *at_product)(union(e).with_(Term.reshape(dk_, sk_)))
        # V's gradient: Pᵀ · do (P possibly cast to V's dtype), as [batch.., Sk, Dv] or transposed,
        # with do as the scores' cotangent read it or in another layout (do = transpose(w, perm))
        # (the free axes contracted in either order when there are two)
        # (with P cast to V's dtype, the product may be accumulated in float32 and rounded to it)
        d_value, d_value_t = Term.reshape(dv_, sv), Term.transpose(Term.reshape(dv_, sv), swap_k)
        for cast, probs in enumerate((Term.softmax(sf_), Term.convert(Term.softmax(sf_), dtq))):
            for axes in {tuple(range(n_batch, n_batch + n_free)), tuple(reversed(range(n_batch, n_batch + n_free)))}:
                pairs = ivec(axes)
                moved = (eq(do_).to(Term.transpose(w_, pv_)), rc_ == pairs.map(lambda i: pv_[i]),
                         rb_ == batch.map(lambda i: pv_[i]))
                for product, conds, result in (
                    (Term.dot(probs, do_, pairs, pairs, batch, batch, dt, pr), (), d_value),
                    (Term.dot(do_, probs, pairs, pairs, batch, batch, dt, pr), (), d_value_t),
                    (Term.dot(probs, w_, pairs, rc_, batch, rb_, dt, pr), moved, d_value),
                    (Term.dot(w_, probs, rc_, pairs, rb_, batch, dt, pr), moved, d_value_t),
                ):
                    forms = _rounded(lambda t: t, product)
                    for form, rounding in forms:
                        yield rl(eq(e).to(form), *rounding, *conds, *known)(union(e).with_(result))


@attention_grad.family
def shared_query_gradient():
    """The gradient of a query shared by every batch element (`shared_query`: Q [H, Sq, D]
    broadcast over the batch) is g · K contracted over the batch and the keys together: the op's
    gradient of the broadcast Q summed over the batch, the same products summed in another order."""
    dq_, dk_, dv_, db_ = (var(n, Term) for n in ("dq_", "dk_", "dv_", "db_"))
    gdt, gpr = var("gdt", String), var("gpr", String)
    n_batch, rank = 2, 4
    known = (grad_op(sf_, q, k, v, do_, dq_, dk_, dv_, db_), eq(q).to(Term.broadcast(y, ss, ivec([1, 2, 3]))),
             scores_cot(g_, x, sf_, do_, v), eq(x).to(_canonical_qk(q, k, n_batch, rank)), dtype(q) == dtq, dtype(e) == dtq)
    # K as given [B, H, Sk, D] (the canonical product reads Kᵀ), or Kᵀ contracted over its last axis
    for product, conds_k in ((Term.dot(g_, kk_, ivec([0, rank - 1]), ivec([0, n_batch]), ivec([1]), ivec([1]), gdt, gpr),
                              (eq(k).to(Term.transpose(kk_, ivec([0, 1, 3, 2]))),)),
                             (Term.dot(g_, k, ivec([0, rank - 1]), ivec([0, rank - 1]), ivec([1]), ivec([1]), gdt, gpr), ())):
        for form, conds in _rounded(lambda t: t, product):
            yield rl(eq(e).to(form), *conds, *conds_k, *known)(union(e).with_(Term.reduce("reduce_sum", dq_, ivec([0]))))


@attention_value_grad.family
def value_gradient_only():
    """Pᵀ · do over P = softmax(scores) (`attn_scores`), where Q and K are not differentiated (frozen
    or quantized: no softmax backward, so no `grad_op`; the pipeline runs this rule set only then,
    since beside dQ and dK the op's dV comes from their one backward call), is V's gradient of that
    attention: the op's dV at do, with V's place taken by zeros of V's shape (the shape of Pᵀ · do):
    dV = Pᵀ · do reads P and do only, never V (the flash backward reads V for dQ and dK alone), so
    V's values cannot change it. Equal to the program's product but for the order of its sums (and
    P's rounding to V's dtype where the program casts P, as in `attention_gradients`)."""
    for n_batch, n_free in GRAD_CASES:
        rank = n_batch + n_free + 1
        batch, pairs = perm_range(n_batch), ivec(range(n_batch, n_batch + n_free))
        q4, k4, v4, mask4, _ = _attention_4d(n_batch, n_free)
        do4, _, _ = _gradient_views(n_batch, n_free, False)
        flag = i64(0) if n_free == 0 else causal
        zeros = Term.broadcast(Term.literal(0.0, dte), sv, NONE)
        shapes = (shape(q) == ss, ss.length() == i64(rank), shape(k) == sk_, shape(e) == sv, dtype(q) == dtq,
                  dtype(k) == dtq, dtype(do_) == dte, dtype(e) == dte)
        for probs in (Term.softmax(sf_), Term.convert(Term.softmax(sf_), dte)):
            for kind in ("none", "bias", "bool", "bias+bool"):
                mask_fact, mask_term = _mask_operand(kind, mask4)
                facts = (_scores(sf_, q, k, sc0, cap, mask_fact, String(kind), fl, flag, i64(n_batch)), *shapes)
                # computed in V's dtype (the kernel casts Q and K to it: int8 Q and K; a no-op where they share it)
                d_value = Term.attention_vjp(q4(q), k4(k), v4(zeros), do4(do_), mask_term, BHSD, K_TRANSPOSED, BHSD,
                                             BHSD, sc0, flag, String(kind), dte, fl, cap, i64(2))
                yield rl(eq(e).to(Term.dot(probs, do_, pairs, pairs, batch, batch, dt, pr)), *facts)(
                    union(e).with_(Term.reshape(d_value, sv)))


# --- gradients of more forward spellings: a soft-cap, a traced scale, exp(log_softmax) and E times
# the reciprocal of its sum (with the max not under stop_gradient). Each family's docstring states
# why its cotangent is the program's.


@attention_grad.family
def softcap_backward():
    """The cotangent through Gemma's soft-cap ``c * tanh(x / c)`` of unmodified scores x (the op's
    cap c), as jax.grad writes it: ``((c * g) * (1 + t)(1 - t)) / c`` with t the tanh (tanh's
    derivative 1 - t², jax 0.12's ``one_minus_square``, which capture writes as the ops its lowering
    emits), or with h = (c * g) * (1 - t), ``(h + h * t) / c`` (the transpose of the derivative
    ``(g + g * t) * (1 - t)`` earlier jax writes), is the cotangent of x. It is the chain rule the
    program computes; the op's backward applies the same cap (tanh of the same float32 scores) to
    the same cotangent, so they differ only by the order of the products (a reassociation); a
    score at ±inf has t = ±1 and derivative 0 in both."""
    tanh_term = Term.unary("tanh", Term.binary("div", x, scalar(c, dt2, s1)))
    staged = _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb)
    derivative = Term.binary("mul", Term.binary("add", scalar(1.0, dt, s2), tanh_term),
                             Term.binary("sub", scalar(1.0, dt, s2), tanh_term))
    for capped, cap_cot in (
        (Term.binary("mul", scalar(c, dt3, s3), tanh_term), Term.binary("mul", scalar(c, dt3, s3), g_)),
        (Term.binary("mul", tanh_term, scalar(c, dt3, s3)), Term.binary("mul", g_, scalar(c, dt3, s3))),
    ):
        throughs = [Term.binary("mul", cap_cot, derivative), Term.binary("mul", derivative, cap_cot)]
        for h in (Term.binary("mul", cap_cot, Term.binary("sub", scalar(1.0, dt, s2), tanh_term)),
                  Term.binary("mul", Term.binary("sub", scalar(1.0, dt, s2), tanh_term), cap_cot)):
            for h_t in (Term.binary("mul", h, tanh_term), Term.binary("mul", tanh_term, h)):
                throughs += [Term.binary("add", h, h_t), Term.binary("add", h_t, h)]
        for through in throughs:
            yield rl(eq(s_).to(capped), eq(e).to(Term.binary("div", through, scalar(c, dt2, s1))),
                     scores_cot(g_, s_, sf_, do_, v), staged, c > f64(0.0))(scores_cot(e, x, sf_, do_, v))


def _traced_factors():
    """(the axes t_ is spread along, what t_ and its spread to a shape must satisfy) for a traced
    factor of the scores: a scalar, and one per head (constant along the keys)."""
    def scalar_facts(_spread_shape):
        return (shape(t_) == NONE,)

    def per_head_facts(spread_shape):
        return (d1.length() >= i64(1), d1[d1.length() - 1] == spread_shape.length() - 1, shape(t_) == s3,
                s3[s3.length() - 1] == i64(1))
    return ((NONE, scalar_facts), (d1, per_head_facts))


def _traced_factor_backward(dims: IntVec, factor_facts):
    """`traced_scale_backward`'s rules for a factor t_ broadcast along ``dims`` (``factor_facts(shape)``:
    what t_ and its broadcast to that shape must satisfy: the scores' s1, or Q's ss)."""
    traced_at = (*factor_facts(s1), dtype(t_) == dtq)
    scores_fact = _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb)
    spread, spread_cot = Term.broadcast(t_, s1, dims), Term.broadcast(t_, s2, dims)
    for form in (Term.binary("mul", x, spread), Term.binary("mul", spread, x)):
        for cot in (Term.binary("mul", g_, spread_cot), Term.binary("mul", spread_cot, g_)):
            yield rl(eq(s_).to(form), eq(e).to(cot), scores_cot(g_, s_, sf_, do_, v), scores_fact, dtype(x) == dtq,
                     *traced_at)(scores_cot(e, x, sf_, do_, v))
    dq_, dk_, dv_, db_, qt_ = (var(n, Term) for n in ("dq_", "dk_", "dv_", "db_", "qt_"))
    gdt, gpr = var("gdt", String), var("gpr", String)
    for n_batch, n_free in RANK_CASES:
        rank = n_batch + n_free + 1
        batch, free = perm_range(n_batch), ivec(range(n_batch, n_batch + n_free))
        swap_k = ivec([*range(n_batch), n_batch + 1, n_batch])
        spread_q = Term.broadcast(t_, ss, dims)
        at_product = (
            scores_cot(g_, x, sf_, do_, v), eq(x).to(_canonical_qk(q, k, n_batch, rank)),
            grad_op(sf_, qt_, k, v, do_, dq_, dk_, dv_, db_), eq(qt_).to(Term.binary("mul", q, spread_q)),
            shape(q) == ss, ss.length() == i64(rank), shape(k) == sk_, dtype(q) == dtq, dtype(e) == dtq,
            *factor_facts(ss), dtype(t_) == dtq,
        )  # (a gradient product in another dtype than Q's, a widened one, is not matched)
        d_query = Term.binary("mul", dq_, spread_q)  # the op's gradient for Q·t, times t
        yield rl(eq(e).to(Term.dot(g_, k, ivec([rank - 1]), ivec([n_batch + 1]), batch, batch, gdt, gpr)), *at_product)(
            union(e).with_(d_query))
        yield rl(eq(e).to(Term.dot(g_, kk_, ivec([rank - 1]), ivec([n_batch]), batch, batch, gdt, gpr)),
                 eq(k).to(Term.transpose(kk_, swap_k)), *at_product)(union(e).with_(d_query))
        yield rl(eq(e).to(Term.dot(g_, q, free, free, batch, batch, gdt, gpr)), *at_product)(
            union(e).with_(Term.transpose(Term.reshape(dk_, sk_), swap_k)))
        yield rl(eq(e).to(Term.dot(q, g_, free, free, batch, batch, gdt, gpr)), *at_product)(
            union(e).with_(Term.reshape(dk_, sk_)))


def _traced_factor_gradient(dims: IntVec, factor_facts):
    """The gradient of a traced factor t that multiplies the scores x (= Q·Kᵀ times the op's constant
    scale c) along ``dims`` (``factor_facts`` as in `_traced_factor_backward`), which jax.grad writes
    as ``sum(g ⊙ x)`` over the axes t was spread along (the keys' among them; g the cotangent of the
    scaled scores), is that sum of ``Q ⊙ dQ'`` over the same axes (the keys' axis is Q's D), dQ' the
    op's gradient for its operand Q' = Q·t: dQ' = c·g·K, so both sum g_ij · c · q_id · k_jd over j
    and d in real numbers. The sums are grouped the other way round, across the op's boundary (over
    d inside x, over j inside dQ'), so either intermediate can overflow or cancel where the other
    does not: q = (1, 1), k_j = (1e30, -1e30) gives x_ij = 0 and dQ' = ±inf for a large g. Fast math
    only (`traced_factor_gradient`). Float32 only: in half precision the program rounds each
    product, and the reordered sum is not compared to it."""
    dq_, dk_, dv_, db_, qt_ = (var(n, Term) for n in ("dq_", "dk_", "dv_", "db_", "qt_"))
    f32, summed = String("float32"), var("summed", IntVec)
    for n_batch, n_free in RANK_CASES:
        rank = n_batch + n_free + 1  # x a product [batch.., free.., Sk] of Q-shaped [batch.., free.., D]
        facts = (
            scores_cot(g_, s_, sf_, do_, v), _scores(x, q, k, sc0, f64(0.0), NO_MASK, String("none"), fl, i64(0), nb),
            eq(x).to(_canonical_qk(y, z, n_batch, rank)),
            grad_op(sf_, qt_, k, v, do_, dq_, dk_, dv_, db_), eq(qt_).to(Term.binary("mul", q, Term.broadcast(t_, ss, dims))),
            shape(q) == ss, ss.length() == i64(rank), summed[summed.length() - 1] == i64(rank - 1),
            *factor_facts(s1), dtype(t_) == f32, dtype(q) == f32, dtype(x) == f32,
        )
        spread = Term.broadcast(t_, s1, dims)
        for scaled in (Term.binary("mul", x, spread), Term.binary("mul", spread, x)):
            for product in (Term.binary("mul", x, g_), Term.binary("mul", g_, x)):
                yield rl(eq(s_).to(scaled), eq(e).to(Term.reduce("reduce_sum", product, summed)), *facts)(
                    union(e).with_(Term.reduce("reduce_sum", Term.binary("mul", q, dq_), summed)))


@attention_grad.family
def traced_scale_backward():
    """A traced scalar factor t of the scores (`scores_traced_scale`: the op reads Q·t) multiplies
    their cotangent again (g·t, the chain rule, as for a constant scale); where that cotangent
    reaches Q·Kᵀ (Q unscaled), Q's gradient (g·t)·K is t times the op's gradient for its operand
    Q·t, and K's, (g·t)ᵀ·Q, is the op's (both products equal in real numbers: they differ by where
    t is multiplied in, a reassociation; at t = 0 the sign of a zero gradient may differ). The same
    for a traced per-head factor (`scores_per_head_scale`: constant along the keys, spread over Q
    along the same axes), elementwise. The factor's own gradient (CLIP's scalar and Swin-v2's
    per-head learned `logit_scale`) is raised only under fast math (`traced_factor_gradient`)."""
    for dims, factor_facts in _traced_factors():
        yield from _traced_factor_backward(dims, factor_facts)


@attention_grad.family
def max_backward():
    """jax.grad of ``exp(s - max(s))`` with the max not under stop_gradient adds the max's cotangent,
    ``sum(-g) / count`` at each row's maxima (count of them), to the cotangent g of the shifted
    scores. For g softmax's backward (`scores_cot` of the softmax's own input) that row sum is zero
    in real numbers (softmax does not change when its input is shifted), so g plus it is still the
    scores' cotangent, different only by the rounding of a sum whose exact value is 0; a row whose
    max is NaN or ±inf is NaN in P, in g and in the op's backward alike."""
    sx_ = var("sx_", IntVec)
    for rank in sorted({n_batch + n_free + 1 for n_batch, n_free in RANK_CASES}):  # scores of every rank case
        last, keep = ivec([rank - 1]), perm_range(rank - 1)
        row_max = Term.reduce("reduce_max", sf_, last)
        spread_maxes = (Term.broadcast(Term.reshape(row_max, s3), s2, perm_range(rank)), Term.broadcast(row_max, s2, keep))
        for spread_max in spread_maxes:
            at_max = Term.convert(Term.binary("eq", sf_, spread_max), dt)
            count = Term.reduce("reduce_sum", at_max, last)
            negated = Term.reduce("reduce_sum", Term.unary("neg", g_), last)
            for max_cot in (negated, Term.reduce("reduce_sum", Term.reshape(negated, s3), last)):
                # reduce_max's transpose as jax writes it: the share times the indicator
                term = Term.binary("mul", Term.broadcast(Term.binary("div", max_cot, count), s1, keep), at_max)
                for form in (Term.binary("add", g_, term), Term.binary("add", term, g_)):
                    yield rl(eq(e).to(form), scores_cot(g_, sf_, sf_, do_, v), shape(sf_) == sx_,
                             sx_.length() == i64(rank), s3 == sx_.set(rank - 1, i64(1)))(
                        scores_cot(e, sf_, sf_, do_, v))


# --- fast math (``ea.optimize(precision="fast_math")``): raisings equal to the program except where
# it meets an Inf or a NaN (overflow included), a value beyond ±1e30, the sign of a zero, or the
# rounding of exp (the op's stable softmax is the more accurate). Never run under "exact".

attention_fast_math = RuleSet(
    "attention_fast_math",
    "Raise softmax spellings equal to attention up to Inf/NaN, signed zeros and exp's rounding (precision=\"fast_math\").",
    phase="raise",
)
FAR_FILL = -1e38  # a fill at or below this absorbs any bias of magnitude below 1e30: fill + b rounds to fill
FAST_MATH_RANKS = range(2, 7)  # the ranks of attention's scores (`RANK_CASES`; [X,B,H,S,D] scores are rank 5)


@attention_fast_math.family
def half_scores():
    """A float16 Q·Kᵀ is attention's scores, computed in float32 by the op: equal but where the
    program's float16 scores (or a bias added to them) overflow to ±inf past 65504."""
    yield from _matmul_scores(dtype(e) == String("float16"))


@attention_fast_math.family
def softmax_unshifted():
    """exp(x) / sum(exp(x)) over the last axis (no max subtracted, in every spelling the stable
    softmax has) is softmax(x), and normalising it after P·V too: equal in real numbers; the program
    overflows to NaN where a score passes 88 and loses digits where a row's scores are all below
    -87, where the op's stable softmax does neither."""
    for rank in FAST_MATH_RANKS:
        for _, form in _stable_softmax_forms(x, rank, _unshifted_exps):
            yield rw(form, Term.softmax(x), shape(x).length() == i64(rank))
    yield from _deferred_normalisations(_unshifted_exps)


@attention_fast_math.family
def log_sum_exp():
    """``exp(x - logsumexp(x))`` as `jax.nn.logsumexp` writes it is exp(x - max) / sum(exp(x - max)):
    its guard ``where(is_finite(max), max, 0)`` is max wherever max is finite (a row holding +inf
    differs: NaN in softmax, zeros and a NaN here); |sum of exps| is the sum; and
    exp(x - (log(t) + m)) is exp(x - m) / t, for t a sum of exponentials, up to exp's rounding."""
    # the guard is read only inside the softmax it guards, and only the log of a sum of exponentials
    # is split: a program's own NaN guard or log elsewhere is left as written
    d3, sy = var("d3", IntVec), var("sy", IntVec)
    inner_guard = Term.select(Term.unary("is_finite", y), scalar(0.0, dt, sy), y)
    yield rw(_finite_or_zero(Term.broadcast(y, s2, d2)), Term.broadcast(inner_guard, s2, d2), shape(y) == sy)
    for rank in FAST_MATH_RANKS:  # the split below writes the quotient: only that form is needed
        for _, ex, total in _shifted_exps(x, rank, guarded=True):
            form = Term.binary("div", ex, Term.broadcast(total, s2, perm_range(rank - 1)))
            yield rw(form, Term.softmax(x), shape(x).length() == i64(rank))
    total = Term.reduce("reduce_sum", Term.unary("exp", t_), d1)
    spread_total = Term.broadcast(total, s1, d3)
    yield rw(Term.unary("abs", spread_total), spread_total)
    yield rw(Term.unary("abs", total), total)
    for y_ in (total, spread_total):
        for lse in (Term.binary("add", Term.unary("log", y_), z), Term.binary("add", z, Term.unary("log", y_))):
            yield rw(
                Term.unary("exp", Term.binary("sub", x, Term.broadcast(lse, s2, d2))),
                Term.binary("div", Term.unary("exp", Term.binary("sub", x, Term.broadcast(z, s2, d2))),
                            Term.broadcast(y_, s2, d2)),
            )


@attention_fast_math.family
def multiplicative_causal_mask():
    """GPT-2's ``w * b - C * (1 - b)`` with b the 0/1 causal indicator is causal scores filled with -C:
    ``w * b`` is ``where(causal, w, 0)`` unless w is Inf or NaN where b hides it (or for the sign of
    a hidden zero), and subtracting ``C * (1 - b)`` (0 where b keeps, C where it hides) from scores
    filled with 0 moves the fill to -C exactly. ``+ (1 - b) * C`` fills with C likewise."""
    for kind in ("none", "bias"):
        unmasked = _scores(x, q, k, sc0, cap, m, String(kind), fl, i64(0), nb)
        for form in (Term.binary("mul", x, y), Term.binary("mul", y, x)):
            yield rl(eq(e).to(form), causal_mask(y), dtype(y) != String("bool"), unmasked)(
                _scores(e, q, k, sc0, cap, m, String(kind), f64(0.0), i64(1), nb)
            )
        zero_filled = _scores(x, q, k, sc0, cap, m, String(kind), f64(0.0), i64(1), nb)
        hidden = Term.binary("sub", scalar(1.0, dt, s1), y)
        for fill_term in (Term.binary("mul", scalar(c, dt2, s2), hidden), Term.binary("mul", hidden, scalar(c, dt2, s2))):
            for spread in (fill_term, Term.broadcast(fill_term, s3, d2)):
                for op, fill in (("sub", f64(0.0) - c), ("add", c)):
                    yield rl(eq(e).to(Term.binary(op, x, spread)), causal_mask(y), zero_filled)(
                        _scores(e, q, k, sc0, cap, m, String(kind), fill, i64(1), nb)
                    )


@attention_fast_math.family
def traced_factor_gradient():
    """A learned scale's gradient (CLIP's scalar and Swin-v2's per-head `logit_scale`),
    ``sum(g ⊙ x)``, read from the op's dQ as ``sum(Q ⊙ dQ')``: equal in real numbers, but its
    products are summed in another grouping, across the op's boundary, so one side can overflow
    (or cancel to a finite value) where the other does not (`_traced_factor_gradient`)."""
    for dims, factor_facts in _traced_factors():
        yield from _traced_factor_gradient(dims, factor_facts)


@attention_fast_math.family
def bias_after_where():
    """``where(m, s, fill) + b`` over scores with fill -inf (or at most `FAR_FILL`, as finfo.min) is
    ``where(m, s + b, fill)``: fill + b is fill unless b is +inf or NaN where m hides it (or, for
    finfo.min, |b| reaches 1e30)."""
    masked = Term.select(m, scalar(fl, dt2, s1), x)
    scores_fact = _scores(x, q, k, sc0, cap, y, mk, fl2, causal, nb)
    for form in (Term.binary("add", masked, z), Term.binary("add", z, masked)):
        yield rw(form, Term.select(m, scalar(fl, dt2, s1), Term.binary("add", x, z)), scores_fact, fl <= f64(FAR_FILL))


@attention_fast_math.family
def additive_mask():
    """Scores plus ``where(m, 0, fill)`` (an additive 0/-inf mask, or finfo.min: fill at most
    `FAR_FILL`) are ``where(m, s, fill)``, so a causal one sets the causal flag and the kernel skips
    the tiles it hides: ``s + fill`` is fill unless s is +inf or NaN there (or, for finfo.min,
    |s| reaches 1e30), and ``s + 0`` is s but for the sign of a zero."""
    additive = Term.select(m, scalar(fl, dt2, s1), scalar(0.0, dt2, s2))
    unmasked = _scores(x, q, k, sc0, cap, NO_MASK, String("none"), fl2, i64(0), nb)
    for bias in (additive, Term.broadcast(additive, s3, d2)):
        spread = m if bias is additive else Term.broadcast(m, s3, d2)
        for form in (Term.binary("add", x, bias), Term.binary("add", bias, x)):
            yield rw(form, Term.select(spread, scalar(fl, dt2, s3 if bias is not additive else s1), x), unmasked,
                     fl <= f64(FAR_FILL))


@attention_fast_math.family
def probabilities_times_row_factor():
    """``(P * f) · V`` with f constant along the keys (a per-head mask, HF's head_mask) is
    ``(P · V) * f``: equal but for rounding, the sign of zeros and Inf/NaN."""
    factor, so = var("factor", Term), var("so", IntVec)
    for rank in range(2, 6):  # P of every rank case
        for n_batch in range(rank - 1):  # P's leading axes are the batch: its others keep their place in P · V
            batch = perm_range(n_batch)
            for probs, _ in _probabilities(x):
                spread = Term.broadcast(factor, s1, d1)
                for scaled in (Term.binary("mul", probs, spread), Term.binary("mul", spread, probs)):
                    yield rl(
                        eq(e).to(Term.dot(scaled, v, ivec([rank - 1]), d2, batch, lb, dt3, pr)),
                        shape(x).length() == i64(rank), d1.not_contains(i64(rank - 1)), shape(e) == so,
                        dtype(factor) == dtype(e),
                    )(union(e).with_(Term.binary("mul", Term.dot(probs, v, ivec([rank - 1]), d2, batch, lb, dt3, pr),
                                                 Term.broadcast(factor, so, d1))))


@attention_fast_math.family
def zeroed_where_probabilities():
    """``where(keep, softmax(where(keep, s, -inf)), 0)`` (jax.nn.softmax(s, where=keep)'s P) is the
    softmax itself when keep keeps a key in every row (`rows_kept`): a hidden entry of the softmax
    is +0 unless its row is NaN (a NaN or an infinite score meeting another), so V's gradient
    Pᵀ·dO reads the op's P (equal but for Inf/NaN; a mask that can hide a whole row is not
    rewritten: that row is 0 in the program and NaN in the op)."""
    keep_, dt5, s5, s6 = var("keep_", Term), var("dt5", String), var("s5", IntVec), var("s6", IntVec)
    yield rw(Term.select(keep_, scalar(0.0, dt5, s5), Term.softmax(x)), Term.softmax(x),
             rows_kept(keep_), eq(x).to(Term.select(keep_, scalar(float("-inf"), dt5, s6), y)))
