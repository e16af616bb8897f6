"""fp8 attention: raise attention whose Q, K and V are dequantized fp8 tensors
(``x8.astype(dt) * s`` with a rank-0 scale s, the dequantize of flax's fp8 ops and of explicit
convert_element_type code) to one fp8 Attention that takes the fp8 tensors and their scales as
operands, and relate its layouts through transposes like `attention_layout`, so the cost model
can read V transposed ([B, H, D, S], what Hopper's fp8 matrix instructions want) from a producer
that writes it: the transpose then moves through the quantize (a cast and scalar ops, which the
transpose rules commute with) into V's producer."""

from __future__ import annotations

from egglog import String, f64, i64, var

from eqsat_attn.egraph.language import IntVec, Term, dtype, ivec, shape
from eqsat_attn.egraph.rulesets import RuleSet, rw

fp8_attention = RuleSet("fp8_attention", " ".join(__doc__.split("\n\n")[0].split()))

q, k, v, m = (var(n, Term) for n in ("q", "k", "v", "m"))
qs, ks, vs = (var(n, Term) for n in ("qs", "ks", "vs"))
qa, ka, va, oa, p = (var(n, IntVec) for n in ("qa", "ka", "va", "oa", "p"))
s1, s2, s3 = (var(n, IntVec) for n in ("s1", "s2", "s3"))
dt, odt = var("dt", String), var("odt", String)
scale, causal = var("scale", f64), var("causal", i64)
NONE = IntVec.empty()
FP8 = ("float8_e4m3fn", "float8_e5m2")
BHSD = ivec([0, 1, 2, 3])
BHDS = ivec([0, 1, 3, 2])


def _dequantized(x8: Term, s: Term, out_shape: IntVec, commuted: bool) -> Term:
    scale_b = Term.broadcast(s, out_shape, NONE)
    conv = Term.convert(x8, dt)
    return Term.binary("mul", scale_b, conv) if commuted else Term.binary("mul", conv, scale_b)


@fp8_attention.family
def raise_dequantized():
    """Attention (no mask tensor) over dequantized fp8 Q, K and V, each ``x8.astype(dt) * s``
    with a rank-0 scale of dtype dt, is fp8 Attention on x8 with the scales as operands."""
    for qk_dtype in FP8:
        for v_dtype in FP8:
            for commuted in (False, True):
                lhs = Term.attention(
                    _dequantized(q, qs, s1, commuted), _dequantized(k, ks, s2, commuted),
                    _dequantized(v, vs, s3, commuted), Term.no_mask(), qa, ka, va, oa, scale, causal,
                    String("none"))
                yield rw(
                    lhs,
                    Term.attention_fp8(q, k, v, qs, ks, vs, qa, ka, va, oa, scale, causal, dt),
                    dtype(q) == String(qk_dtype), dtype(k) == String(qk_dtype), dtype(v) == String(v_dtype),
                    shape(qs) == NONE, shape(ks) == NONE, shape(vs) == NONE,
                    dtype(qs) == dt, dtype(ks) == dt, dtype(vs) == dt,
                )


@fp8_attention.family
def fold_operand_transpose():
    """A transposed fp8 Q, K or V is the same operand read in another layout, when the kernel
    reads that layout in place (D minor for Q and K; D or S minor for V)."""
    args = dict(q=q, k=k, v=v)
    axes = {"q": qa, "k": ka, "v": va}
    for name in ("q", "k", "v"):
        moved = {n: (Term.transpose(t, p) if n == name else t) for n, t in args.items()}
        new_axes = {n: (a.map(lambda i: p[i]) if n == name else a) for n, a in axes.items()}
        for minor in ((3, 2) if name == "v" else (3,)):
            yield rw(
                Term.attention_fp8(moved["q"], moved["k"], moved["v"], qs, ks, vs, qa, ka, va, oa, scale, causal, odt),
                Term.attention_fp8(q, k, v, qs, ks, vs, new_axes["q"], new_axes["k"], new_axes["v"], oa, scale,
                                   causal, odt),
                p[axes[name][minor]] == i64(3),
            )


@fp8_attention.family
def expose_v_layouts():
    """fp8 Attention reading V in any layout is fp8 Attention reading a transposed V in the
    standard ([B, H, S, D]) or transposed-V ([B, H, D, S]) layout; the transpose can then fold
    back or move into V's producer."""
    for target, order in ((BHSD, ivec([0, 1, 2, 3])), (BHDS, ivec([0, 1, 3, 2]))):
        yield rw(
            Term.attention_fp8(q, k, v, qs, ks, vs, qa, ka, va, oa, scale, causal, odt),
            Term.attention_fp8(q, k, Term.transpose(v, order.map(lambda a: va[a])), qs, ks, vs, qa, ka, target,
                               oa, scale, causal, odt),
        )
