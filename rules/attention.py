"""Attention: raise softmax(scale * Q Kᵀ [masked]) V to one Attention op, and relate its
operand layouts through transposes so the cost model can choose between folding a
transpose into attention and bubbling it into the operand's producer (IREE PR 19250).

`attention_raise` normalises what libraries emit (broadcast chains, the max(-inf, ·) and
stop_gradient of a stable softmax, where-masks built from iota comparisons), raises the
stable softmax over the last axis to `softmax`, and matches attention in the canonical
batched matmul form the `canonical` rule set provides. `attention_layout` folds operand
transposes into the layouts and exposes the standard and transposed-V forms."""

from __future__ import annotations

from egglog import String, eq, f64, i64, union, var

from eqsat_attn.egraph.language import IntVec, Term, causal_mask, ivec, perm_range, shape
from eqsat_attn.egraph.rulesets import RuleSet, asking, rl, rw

attention_raise = RuleSet(
    "attention_raise",
    "Raise stable softmax and softmax(scale * Q Kᵀ [masked]) V to Attention.",
    phase="raise",
)
attention_layout = RuleSet(
    "attention_layout",
    "Fold operand transposes into Attention layouts and expose the standard and transposed-V forms.",
)

x, y, z, m, q, k, v, e, s_ = (var(n, Term) for n in ("x", "y", "z", "m", "q", "k", "v", "e", "s_"))
p, d1, d2, s1, s2, qa, ka, va, oa = (var(n, IntVec) for n in ("p", "d1", "d2", "s1", "s2", "qa", "ka", "va", "oa"))
dt, dt2, dt3, mk, cd = (var(n, String) for n in ("dt", "dt2", "dt3", "mk", "cd"))
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
    casts and `!= 0` tests (closed-over constant masks are recognised when encoded)."""
    row = Term.iota(dt, s1, var("i", i64))
    col = Term.iota(dt, s1, var("j", i64))
    last_two = (var("i", i64) == s1.length() - 2, var("j", i64) == s1.length() - 1)
    yield rl(eq(e).to(Term.binary("ge", row, col)), *last_two)(causal_mask(e))
    yield rl(eq(e).to(Term.binary("le", col, row)), *last_two)(causal_mask(e))
    yield rl(
        eq(e).to(Term.broadcast(m, s2, d2)), causal_mask(m),
        d2.length() >= i64(2),
        d2[d2.length() - 1] == s2.length() - 1,
        d2[d2.length() - 2] == s2.length() - 2,
    )(causal_mask(e))
    yield rl(eq(e).to(Term.convert(m, dt)), causal_mask(m))(causal_mask(e))
    yield rl(
        eq(e).to(Term.transpose(m, p)), causal_mask(m),
        p[p.length() - 1] == p.length() - 1, p[p.length() - 2] == p.length() - 2,
    )(causal_mask(e))
    yield rl(eq(e).to(Term.binary("ne", m, scalar(0.0, dt, s1))), causal_mask(m))(causal_mask(e))


def _stable_softmax_forms(xx: Term, rank: int):
    """The stable softmax over the last axis of a rank-`rank` x, as libraries write it."""
    last = ivec([rank - 1])
    keep = perm_range(rank - 1)
    for row_max in (Term.reduce("reduce_max", xx, last), Term.unary("stop_gradient", Term.reduce("reduce_max", xx, last))):
        ex = Term.unary("exp", Term.binary("sub", xx, Term.broadcast(row_max, s1, keep)))
        yield ex, Term.binary("div", ex, Term.broadcast(Term.reduce("reduce_sum", ex, last), s2, keep))
        # half precision: the row sum is accumulated in float32 and cast back
        wide_sum = Term.convert(Term.reduce("reduce_sum", Term.convert(ex, String("float32")), last), dt)
        yield ex, Term.binary("div", ex, Term.broadcast(wide_sum, s2, keep))


@attention_raise.family
def softmax():
    """exp(x - max(x)) / sum(exp(x - max(x))) over the last axis is softmax(x) (the sum may be
    accumulated in float32 and cast back, as jax.nn.softmax does for half precision)."""
    for rank in range(1, 9):
        for _, form in _stable_softmax_forms(x, rank):
            yield rw(form, Term.softmax(x), shape(x).length() == i64(rank))


@attention_raise.family
def softmax_transpose():
    """Transposes that keep the last axis in place commute with softmax."""
    last_fixed = (p[p.length() - 1] == p.length() - 1,)
    yield rw(Term.transpose(Term.softmax(x), p), Term.softmax(Term.transpose(x, p)), *last_fixed)
    yield rw(Term.softmax(Term.transpose(x, p)), Term.transpose(Term.softmax(x), p), *last_fixed)


def _scores_forms(scores: Term):
    """Scaled scores: (form, scale) pairs for the scale on the scores; the scale on Q or K is
    moved onto the scores by `scalar_out_of_matmul`."""
    yield scores, f64(1.0)
    yield Term.binary("mul", scores, scalar(c, dt2, s2)), c
    yield Term.binary("mul", scalar(c, dt2, s2), scores), c
    yield Term.binary("div", scores, scalar(c, dt2, s2)), f64(1.0) / c


@attention_raise.family
def scalar_out_of_matmul():
    """A matmul of an operand scaled (multiplied or divided) by a scalar is the scaled matmul."""
    for side in (0, 1):
        for op in ("mul", "div"):
            scaled = Term.binary(op, x, scalar(c, dt2, s1))
            a, b = (scaled, y) if side == 0 else (y, scaled)
            dot = Term.dot(a, b, d1, d2, lb, rb, dt)
            plain = Term.dot(x, y, d1, d2, lb, rb, dt) if side == 0 else Term.dot(y, x, d1, d2, lb, rb, dt)
            # the scalar takes the product's dtype: the dot's preferred type, or the operands' ("")
            yield rl(eq(e).to(dot), shape(e) == s2, dt != String(""))(union(e).with_(Term.binary(op, plain, scalar(c, dt, s2))))
            yield rl(eq(e).to(dot), shape(e) == s2, dt == String(""))(union(e).with_(Term.binary(op, plain, scalar(c, dt2, s2))))


def _raise(rank: int, conditions: list, attn, with_bias: bool, with_causal: bool = True):
    """Rules for softmax(scores [masked]) · V with Q of the given rank (batch axes 0 and 1,
    contraction last) over Kᵀ and V in the canonical matmul form; ``attn(scale, causal, mask,
    mask_kind)`` builds the replacement."""
    batch = ivec([0, 1])
    scores = Term.dot(q, k, ivec([rank - 1]), ivec([2]), batch, batch, dt)

    def out(probs: Term) -> Term:
        return Term.dot(probs, v, ivec([rank - 1]), ivec([2]), batch, batch, dt3)

    for zz, sc in _scores_forms(scores):
        yield rl(eq(e).to(out(Term.softmax(zz))), *conditions)(union(e).with_(attn(sc, 0, Term.no_mask(), "none")))
        if with_causal:
            masked = Term.select(m, scalar(neg, dt2, s1), zz)
            yield rl(eq(e).to(out(Term.softmax(masked))), causal_mask(m), neg <= f64(MASK_THRESHOLD), *conditions)(
                union(e).with_(attn(sc, 1, Term.no_mask(), "none"))
            )
        if with_bias:
            yield rl(eq(e).to(out(Term.softmax(Term.binary("add", zz, z)))), *conditions)(
                union(e).with_(attn(sc, 0, z, "bias"))
            )


@attention_raise.family
def attention():
    """softmax(scale * Q Kᵀ [causal where-mask | additive bias]) V is Attention."""

    def attn(sc, causal_flag: int, mask: Term, kind: str) -> Term:
        return Term.attention(q, k, v, mask, BHSD, K_TRANSPOSED, BHSD, BHSD, sc, causal_flag, kind, String(""))

    yield from _raise(4, [shape(t).length() == i64(4) for t in (q, k, v)], attn, with_bias=True)


@attention_raise.family
def grouped_attention():
    """The grouped (GQA) form of jax.nn.dot_product_attention's 5-D einsum is Attention over
    Q's heads merged (h = hkv * G + g), reshaped back: with Q as [B, Hkv, G, Sq, D] (the layout
    where the query axis meets the key axis, as a causal mask needs) and, unmasked, with Q as
    [B, Hkv, Sq, G, D] (the einsum's own order)."""
    sq, sv = var("sq", IntVec), var("sv", IntVec)
    conditions = [shape(q) == sq, shape(v) == sv, sq.length() == i64(5), shape(k).length() == i64(4), sv.length() == i64(4)]
    merged = IntVec(sq[0], sq[1] * sq[2], sq[3], sq[4])  # [B, H, Sq, D]

    def attn(sc, causal_flag: int, mask: Term, kind: str) -> Term:
        o4 = Term.attention(
            Term.reshape(q, merged), k, v, mask, BHSD, K_TRANSPOSED, BHSD, BHSD, sc, causal_flag, kind, String("")
        )
        return Term.reshape(o4, IntVec(sq[0], sq[1], sq[2], sq[3], sv[3]))

    yield from _raise(5, conditions, attn, with_bias=False)

    swap = ivec([0, 1, 3, 2, 4])
    merged_swapped = IntVec(sq[0], sq[1] * sq[3], sq[2], sq[4])  # [B, H, Sq, D] from [B, Hkv, Sq, G, D]

    def attn_swapped(sc, causal_flag: int, mask: Term, kind: str) -> Term:
        q4 = Term.reshape(Term.transpose(q, swap), merged_swapped)
        o4 = Term.attention(q4, k, v, mask, BHSD, K_TRANSPOSED, BHSD, BHSD, sc, causal_flag, kind, String(""))
        return Term.transpose(Term.reshape(o4, IntVec(sq[0], sq[1], sq[3], sq[2], sv[3])), swap)

    yield from _raise(5, conditions, attn_swapped, with_bias=False, with_causal=False)


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
                Term.attention(moved["q"], moved["k"], moved["v"], m, qa, ka, va, oa, scale, causal, mk, cd),
                Term.attention(q, k, v, m, new_axes["q"], new_axes["k"], new_axes["v"], oa, scale, causal, mk, cd),
                p[axes[name][minor]] == i64(3),
            )


@attention_layout.family
def fold_output_transpose():
    """A transpose of attention's output is attention writing another layout (D minor)."""
    yield from asking(
        Term.transpose(Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd), p), [oa[3] == p[3]],
        "attention_out_fold", (oa, p, NONE, NONE), 1,
        lambda oa2: Term.attention(q, k, v, m, qa, ka, va, oa2, scale, causal, mk, cd),
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
            Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd),
            Term.attention(
                q, k, Term.transpose(v, order.map(lambda a: va[a])), m, qa, ka, target, oa, scale, causal, mk, cd
            ),
        )
    yield from asking(
        Term.attention(q, k, v, m, qa, ka, va, oa, scale, causal, mk, cd), [], "inverse", (oa, NONE, NONE, NONE), 1,
        lambda inv: Term.transpose(Term.attention(q, k, v, m, qa, ka, va, BHSD, scale, causal, mk, cd), inv),
    )
