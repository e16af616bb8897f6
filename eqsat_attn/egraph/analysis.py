"""Shape and dtype analysis: rules that give every tensor e-class its `shape` and `dtype`.

Leaves (inputs, constants, opaque results) get both at encode time; these rules derive the
rest, including for terms that rewrites create. Conflicting values raise in egglog, which
catches a wrong rewrite early.
"""

from __future__ import annotations

from egglog import String, eq, f64, i64, rule, ruleset, set_, var

from .language import IntVec, Term, TermList, answer, ask, concat_extent, concat_need, concat_shape, dtype, list_dtype, ivec, shape

COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
MAX_RANK = 8


def _rules():
    x, a, b, c, e, m = (var(n, Term) for n in ("x", "a", "b", "c", "e", "m"))
    s, p, axes, lc, rc, lb, rb = (var(n, IntVec) for n in ("s", "p", "axes", "lc", "rc", "lb", "rb"))
    qa, ka, va, oa, out = (var(n, IntVec) for n in ("qa", "ka", "va", "oa", "out"))
    op, dt, dt2, mk, cd, pr = (var(n, String) for n in ("op", "dt", "dt2", "mk", "cd", "pr"))
    y, dim, causal = (var(n, i64) for n in ("y", "dim", "causal"))
    val, scale = var("val", f64), var("scale", f64)
    fl, cap = var("fl", f64), var("cap", f64)

    # leaves with static shapes
    yield rule(eq(e).to(Term.literal(val, dt)), name="analysis.literal").then(
        set_(shape(e)).to(IntVec.empty()), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.iota(dt, s, dim)), name="analysis.iota").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    # elementwise: the shape of the (first) operand
    yield rule(eq(e).to(Term.unary(op, x)), shape(x) == s, dtype(x) == dt, name="analysis.unary").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.binary(op, a, b)), shape(a) == s, name="analysis.binary_shape").then(
        set_(shape(e)).to(s)
    )
    for cmp in COMPARISONS:
        yield rule(eq(e).to(Term.binary(cmp, a, b)), name=f"analysis.{cmp}_dtype").then(
            set_(dtype(e)).to(String("bool"))
        )
    yield rule(
        eq(e).to(Term.binary(op, a, b)), dtype(a) == dt,
        *[op != String(cmp) for cmp in COMPARISONS], name="analysis.binary_dtype",
    ).then(set_(dtype(e)).to(dt))
    yield rule(eq(e).to(Term.softmax(x)), shape(x) == s, dtype(x) == dt, name="analysis.softmax").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.integer_pow(x, y)), shape(x) == s, dtype(x) == dt, name="analysis.integer_pow").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.convert(x, dt)), shape(x) == s, name="analysis.convert").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.select(c, a, b)), shape(b) == s, dtype(b) == dt, name="analysis.select").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    # layout ops
    yield rule(eq(e).to(Term.transpose(x, p)), shape(x) == s, dtype(x) == dt, name="analysis.transpose").then(
        set_(shape(e)).to(p.map(lambda i: s[i])), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.reshape(x, s)), dtype(x) == dt, name="analysis.reshape").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    yield rule(eq(e).to(Term.broadcast(x, s, p)), dtype(x) == dt, name="analysis.broadcast").then(
        set_(shape(e)).to(s), set_(dtype(e)).to(dt)
    )
    # reductions drop their (sorted) axes: remove from the highest axis down
    for k in range(1, MAX_RANK + 1):
        expr = s
        for j in reversed(range(k)):
            expr = expr.remove(axes[j])
        yield rule(
            eq(e).to(Term.reduce(op, x, axes)), axes.length() == i64(k), shape(x) == s, dtype(x) == dt,
            name=f"analysis.reduce{k}",
        ).then(set_(shape(e)).to(expr), set_(dtype(e)).to(dt))
    # dot_general: [batch, lhs free, rhs free], computed by index math
    dot = Term.dot(a, b, lc, rc, lb, rb, dt, pr)
    dims_l = IntVec(lc.length()).append(lc).append(lb)
    dims_r = IntVec(rc.length()).append(rc).append(rb)
    yield rule(eq(e).to(dot), shape(a) == s, shape(b) == p, name="analysis.dot?").then(
        ask("dot_shape", s, p, dims_l, dims_r)
    )
    yield rule(
        eq(e).to(dot), shape(a) == s, shape(b) == p, eq(answer("dot_shape", s, p, dims_l, dims_r, 0)).to(out),
        name="analysis.dot",
    ).then(set_(shape(e)).to(out))
    yield rule(eq(e).to(dot), dt != String(""), name="analysis.dot_dtype").then(set_(dtype(e)).to(dt))
    yield rule(eq(e).to(Term.dot(a, b, lc, rc, lb, rb, String(""), pr)), dtype(a) == dt2, name="analysis.dot_dtype_default").then(
        set_(dtype(e)).to(dt2)
    )
    # slices and concatenations
    for r in range(1, MAX_RANK + 1):  # slice: limit - start, one rule per rank
        yield rule(
            eq(e).to(Term.slice(x, s, p)), s.length() == i64(r), dtype(x) == dt, name=f"analysis.slice{r}",
        ).then(set_(shape(e)).to(IntVec(*[p[i] - s[i] for i in range(r)])), set_(dtype(e)).to(dt))
    lst, tail = var("lst", TermList), var("tail", TermList)
    n = var("n", i64)
    yield rule(eq(e).to(Term.concat(lst, dim)), name="analysis.concat_need").then(concat_need(lst, dim))
    yield rule(concat_need(lst, dim), eq(lst).to(TermList.cons(x, tail)), name="analysis.concat_need_tail").then(
        concat_need(tail, dim)
    )
    yield rule(concat_need(lst, dim), eq(lst).to(TermList.nil()), name="analysis.concat_extent_nil").then(
        set_(concat_extent(lst, dim)).to(i64(0))
    )
    yield rule(
        concat_need(lst, dim), eq(lst).to(TermList.cons(x, tail)), shape(x) == s, eq(concat_extent(tail, dim)).to(n),
        name="analysis.concat_extent",
    ).then(set_(concat_extent(lst, dim)).to(s[dim] + n))
    yield rule(
        eq(e).to(Term.concat(lst, dim)), eq(lst).to(TermList.cons(x, tail)), shape(x) == s, dtype(x) == dt,
        eq(concat_extent(lst, dim)).to(n), name="analysis.concat",
    ).then(
        set_(shape(e)).to(s.set(dim, n)), set_(dtype(e)).to(dt),
        set_(concat_shape(lst, dim)).to(s.set(dim, n)), set_(list_dtype(lst)).to(dt),
    )
    # packed attention: [B, H, Sq, D] placed by the output layout
    yield rule(
        eq(e).to(Term.packed_attention(a, m, qa, oa, scale, causal, mk)), shape(a) == s, dtype(a) == dt,
        name="analysis.packed_attention",
    ).then(
        set_(shape(e)).to(
            ivec([0, 0, 0, 0]).set(oa[0], s[qa[0]]).set(oa[1], s[qa[1]]).set(oa[2], s[qa[2]]).set(oa[3], s[qa[3]])
        ),
        set_(dtype(e)).to(dt),
    )
    # an attention's bias and boolean mask (not a tensor): typed as its bias, when the boolean mask
    # has the bias's shape, so a "bias+bool" attention's view holds both (extract.op_view)
    yield rule(
        eq(e).to(Term.mask_pair(a, b)), shape(a) == s, shape(b) == s, dtype(a) == dt, dtype(b) == String("bool"),
        name="analysis.mask_pair",
    ).then(set_(shape(e)).to(s), set_(dtype(e)).to(dt))
    # attention: [B, H, Sq, Dv] placed by the output layout; dtype: q's, or the compute dtype
    att = Term.attention(a, b, c, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap)
    yield rule(eq(e).to(att), shape(a) == s, shape(c) == p, name="analysis.attention").then(
        set_(shape(e)).to(
            ivec([0, 0, 0, 0]).set(oa[0], s[qa[0]]).set(oa[1], s[qa[1]]).set(oa[2], s[qa[2]]).set(oa[3], p[va[3]])
        ),
    )
    plain = Term.attention(a, b, c, m, qa, ka, va, oa, scale, causal, mk, String(""), fl, cap)
    yield rule(eq(e).to(plain), dtype(a) == dt, name="analysis.attention_dtype").then(set_(dtype(e)).to(dt))
    yield rule(eq(e).to(att), cd != String(""), name="analysis.attention_compute_dtype").then(set_(dtype(e)).to(cd))
    # attention's gradients: the shape and dtype of the operand they differentiate
    do_ = var("do", Term)
    for wrt, operand in enumerate((a, b, c, m)):
        vjp = Term.attention_vjp(a, b, c, do_, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap, i64(wrt))
        yield rule(eq(e).to(vjp), shape(operand) == s, dtype(operand) == dt, name=f"analysis.attention_vjp{wrt}").then(
            set_(shape(e)).to(s), set_(dtype(e)).to(dt),
        )
    # fp8 attention: the same shape, dtype from its out_dtype
    qs, ks, vs = (var(n, Term) for n in ("qs", "ks", "vs"))
    att8 = Term.attention_fp8(a, b, c, qs, ks, vs, qa, ka, va, oa, scale, causal, mk)
    yield rule(eq(e).to(att8), shape(a) == s, shape(c) == p, name="analysis.attention_fp8").then(
        set_(shape(e)).to(
            ivec([0, 0, 0, 0]).set(oa[0], s[qa[0]]).set(oa[1], s[qa[1]]).set(oa[2], s[qa[2]]).set(oa[3], p[va[3]])
        ),
        set_(dtype(e)).to(mk),
    )


ANALYSIS_RULES = list(_rules())
analysis = ruleset(*ANALYSIS_RULES, name="analysis")

__all__ = ["analysis", "COMPARISONS", "MAX_RANK", "TermList"]
