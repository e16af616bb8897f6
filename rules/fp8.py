"""fp8 attention: raise attention whose Q, K and V are dequantized fp8 tensors
(``x8.astype(dt) * s`` with a one-element scale s, rank 0 or flax's ``(1,)``: the dequantize of
flax's fp8 ops and of explicit convert_element_type code) to one fp8 Attention that takes the fp8 tensors and their scales as
operands, and relate its layouts through transposes like `attention_layout`, so the cost model
can read V transposed ([B, H, D, S], what Hopper's fp8 matrix instructions want) from a producer
that writes it: the transpose then moves through the quantize (a cast and scalar ops, which the
transpose rules commute with) into V's producer."""

from __future__ import annotations

from egglog import String, f64, i64, var

from eqsat_attn.egraph.language import KERNEL_FILL, IntVec, Term, dtype, ivec, shape
from eqsat_attn.egraph.rulesets import RuleSet, rw

fp8_attention = RuleSet("fp8_attention", " ".join(__doc__.split("\n\n")[0].split()))

q, k, v, m, x = (var(n, Term) for n in ("q", "k", "v", "m", "x"))
qs, ks, vs = (var(n, Term) for n in ("qs", "ks", "vs"))
qa, ka, va, oa, p = (var(n, IntVec) for n in ("qa", "ka", "va", "oa", "p"))
s1, s2, s3 = (var(n, IntVec) for n in ("s1", "s2", "s3"))
fl = var("fl", f64)  # the mask fill (matters only with a causal mask)
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
def single_element_scale():
    """A broadcast of a one-element array (a ``(1,)`` scale, as flax's fp8 ops keep them) is the
    broadcast of that element as a scalar, so a dequantize by it is a dequantize by a scalar."""
    for rank in range(1, 5):
        yield rw(
            Term.broadcast(x, s1, p),
            Term.broadcast(Term.reshape(x, NONE), s1, NONE),
            shape(x) == ivec([1] * rank),
        )


@fp8_attention.family
def scalar_into_scale():
    """A dequantized fp8 tensor multiplied or divided by a rank-0 value c (flax's attention
    divides Q by sqrt(depth)) is the dequantize with its scale multiplied or divided by c."""
    c = var("c", Term)
    for fp8 in FP8:
        for commuted in (False, True):
            deq = _dequantized(x, qs, s1, commuted)
            c_b = Term.broadcast(c, s1, NONE)
            for op, lhs in (("mul", Term.binary("mul", deq, c_b)), ("mul", Term.binary("mul", c_b, deq)),
                            ("div", Term.binary("div", deq, c_b))):
                yield rw(
                    lhs,
                    Term.binary("mul", Term.convert(x, dt), Term.broadcast(Term.binary(op, qs, c), s1, NONE)),
                    dtype(x) == String(fp8), shape(qs) == NONE, shape(c) == NONE, dtype(c) == dt,
                )


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
                    String("none"), String(""), fl, f64(0.0))
                yield rw(
                    lhs,
                    Term.attention_fp8(q, k, v, qs, ks, vs, qa, ka, va, oa, scale, causal, dt),
                    dtype(q) == String(qk_dtype), dtype(k) == String(qk_dtype), dtype(v) == String(v_dtype),
                    fl <= f64(KERNEL_FILL),
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


# --- opt-in precision policy: fp8 attention where the program computes in bf16 / f16 -----------

fp8_policy = RuleSet(
    "fp8_policy",
    "Opt-in (ea.optimize(precision='fp8')): bf16/f16 Attention without a mask tensor equals fp8 "
    "Attention over Q, K and V quantized to float8_e4m3fn with per-tensor scales amax/448 "
    "computed at run time. Changes values (see README, 'Precision policy'); never on by default.",
)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 2.0 ** -100  # keeps an all-zero tensor's scale positive (its quantized values stay 0)
ALL_AXES = ivec([0, 1, 2, 3])  # Attention operands are rank 4 in every layout


def quantized(x: Term, x_shape: IntVec) -> tuple[Term, Term]:
    """(x8, s): x as float8_e4m3fn scaled into range, and its float32 dequantize scale, so that
    x ≈ x8 · s. The scale is amax(|x|) / 448 under stop_gradient (as fp8 training recipes do);
    the division runs in float32, so no element rounds past 448."""
    xf = Term.convert(x, String("float32"))
    amax = Term.reduce(String("reduce_max"), Term.unary(String("abs"), xf), ALL_AXES)
    s = Term.binary(String("max"), Term.binary(String("div"), amax, Term.literal(E4M3_MAX, String("float32"))),
                    Term.literal(MIN_SCALE, String("float32")))
    s = Term.unary(String("stop_gradient"), s)
    x8 = Term.convert(Term.binary(String("div"), xf, Term.broadcast(s, x_shape, NONE)), String("float8_e4m3fn"))
    return x8, s


@fp8_policy.family
def introduce_fp8():
    """bf16/f16 Attention (no mask tensor; Q, K, V of one dtype) equals fp8 Attention over the
    quantized operands with its result in the original dtype."""
    for half in ("bfloat16", "float16"):
        (q8, qsc), (k8, ksc), (v8, vsc) = quantized(q, s1), quantized(k, s2), quantized(v, s3)
        yield rw(
            Term.attention(q, k, v, Term.no_mask(), qa, ka, va, oa, scale, causal, String("none"), String(""), fl, f64(0.0)),
            Term.attention_fp8(q8, k8, v8, qsc, ksc, vsc, qa, ka, va, oa, scale, causal, String(half)),
            dtype(q) == String(half), dtype(k) == String(half), dtype(v) == String(half),
            shape(q) == s1, shape(k) == s2, shape(v) == s3, fl <= f64(KERNEL_FILL),
        )
