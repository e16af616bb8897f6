"""Fusion: a tree of elementwise ops (with the broadcasts, casts and transposes inside it, and a
matmul at its root as the region's prologue) is also one fused region over its real inputs,
priced as one kernel that reads its inputs and writes its output once; a transpose of a region
is the region writing the other layout, so the transpose of V bubbles into an elementwise
producer (bias add, rotary embedding, scale, cast) as it does into a projection matmul. The
unfused ops stay in the e-graph; extraction chooses. A scale on attention's Q or K folds into
the attention scale, a scale on V moves to its output, and a cast of Q, K or V to a float type
folds into the attention's compute dtype (the kernel casts its tiles).

Regions grow from their inputs towards their consumers: a region's inputs are values no
region computes (program inputs, constants, matmuls, reductions, reshapes, softmax,
attention, selects, opaque results), so each op gets one region per combination of its
operands' regions, and a region has at most `MAX_REGION_INPUTS` distinct inputs (a repeated
input is read once). Region bodies are texts built with egglog string operations
(`eqsat_attn.region` documents the language)."""

from __future__ import annotations

from egglog import String, eq, f64, function, i64, ne, relation, set_, union, var

from eqsat_attn.egraph.language import MAX_REGION_INPUTS, IntVec, Term, TermList, dtype, fused, shape
from eqsat_attn.egraph.rulesets import RuleSet, rl, rw

fusion = RuleSet("fusion", " ".join(__doc__.split("\n\n")[0].split()))

region_input = relation("fusion_region_input", Term)
"""The e-class holds a value that is not computed by an elementwise op (a region reads it)."""

vec_seen = relation("fusion_vec_seen", IntVec)


@function
def vec_text(v: IntVec) -> String:
    """``Vec(0, 2, 1)`` as ``"0,2,1"`` (region bodies spell permutations and shapes so)."""


e, x, y, a, b, c, k, v, m = (var(n, Term) for n in ("e", "x", "y", "a", "b", "c", "k", "v", "m"))
p, s, d, lc, rc, lb, rb = (var(n, IntVec) for n in ("p", "s", "d", "lc", "rc", "lb", "rb"))
qa, ka, va, oa, s2 = (var(n, IntVec) for n in ("qa", "ka", "va", "oa", "s2"))
op, dt, dt2, mk, pt, st, dtx, cd = (var(n, String) for n in ("op", "dt", "dt2", "mk", "pt", "st", "dtx", "cd"))
ba, bb = var("ba", String), var("bb", String)
pr = var("pr", String)  # a matmul's precision
n_pow, causal = var("n_pow", i64), var("causal", i64)
val, scale, cval = var("val", f64), var("scale", f64), var("cval", f64)
fl, cap = var("fl", f64), var("cap", f64)  # attention's mask fill and soft-cap, carried through
NONE = IntVec.empty()
MAX_RANK = 8


def _text(*parts) -> String:
    out = String(parts[0]) if isinstance(parts[0], str) else parts[0]
    for part in parts[1:]:
        out = out + (String(part) if isinstance(part, str) else part)
    return out


def _shift(body: String, by: int, n: int) -> String:
    """``body`` with its inputs $0..$n-1 renumbered $by..$by+n-1 (highest first: no clashes)."""
    for i in reversed(range(n)):
        if by:
            body = body.replace(String(f"${i}"), String(f"${i + by}"))
    return body


def _inputs(prefix: str, n: int) -> list[Term]:
    return [var(f"{prefix}{i}", Term) for i in range(n)]


@fusion.family
def region_inputs():
    """Program inputs, constants, matmuls, reductions, reshapes, slices, concatenations, softmax,
    attention (every form), selects and opaque results are values a region reads (its inputs),
    never computes."""
    i = var("i", i64)
    parts = var("parts", TermList)
    q8s = [var(f"q8_{j}", Term) for j in range(3)]
    forms = [
        Term.input(i), Term.constant(i), Term.iota(dt, s, i), Term.dot(a, b, lc, rc, lb, rb, dt, pr),
        Term.reduce(op, x, s), Term.reshape(x, s), Term.softmax(x), Term.select(a, b, c),
        Term.attention(a, b, c, m, qa, ka, va, oa, scale, causal, mk, cd, fl, cap), Term.output(x, i),
        Term.slice(x, s, s2), Term.concat(parts, i),
        Term.packed_attention(x, m, qa, oa, scale, causal, mk),
        Term.attention_fp8(a, b, c, *q8s, qa, ka, va, oa, scale, causal, dt),
    ]
    for form in forms:
        yield rl(eq(e).to(form))(region_input(e))


@fusion.family
def vector_text():
    """Permutations, shapes, broadcast dimensions and matmul dimension numbers get their text."""
    yield rl(eq(e).to(Term.transpose(x, p)))(vec_seen(p))
    yield rl(eq(e).to(Term.broadcast(x, s, d)))(vec_seen(s), vec_seen(d))
    yield rl(eq(e).to(Term.dot(a, b, lc, rc, lb, rb, dt, pr)))(vec_seen(lc), vec_seen(rc), vec_seen(lb), vec_seen(rb))
    for r in range(MAX_RANK + 1):
        parts: list = []
        for j in range(r):
            parts += ([","] if j else []) + [p[j].to_string()]
        yield rl(vec_seen(p), p.length() == i64(r))(set_(vec_text(p)).to(_text("", *parts)))


@fusion.family
def leaves():
    """A transpose or broadcast of a region input is a region reading it in another layout or
    shape; a literal (or a broadcast one) is a region of constants."""
    yield rl(eq(e).to(Term.transpose(x, p)), region_input(x), eq(vec_text(p)).to(pt))(
        union(e).with_(fused(_text("T[", pt, "]($0)"), x))
    )
    yield rl(eq(e).to(Term.broadcast(x, s, d)), region_input(x), eq(vec_text(s)).to(st), eq(vec_text(d)).to(dtx))(
        union(e).with_(fused(_text("B[", st, ";", dtx, "]($0)"), x))
    )
    yield rw(Term.literal(val, dt), fused(_text("L[", val.to_string(), ";", dt, "]")))


def _wrappers():
    """(pattern over an operand, body text around the operand's body, conditions) of one-operand ops."""
    yield lambda t: Term.unary(op, t), lambda body: _text(op, "(", body, ")"), []
    yield lambda t: Term.convert(t, dt), lambda body: _text("convert[", dt, "](", body, ")"), []
    yield lambda t: Term.integer_pow(t, n_pow), lambda body: _text("ipow[", n_pow.to_string(), "](", body, ")"), []
    yield (
        lambda t: Term.broadcast(t, s, d), lambda body: _text("B[", st, ";", dtx, "](", body, ")"),
        [eq(vec_text(s)).to(st), eq(vec_text(d)).to(dtx)],
    )
    # the region writes the other layout: it ends there (W: a transpose no op consumes in-region)
    yield lambda t: Term.transpose(t, p), lambda body: _text("W[", pt, "](", body, ")"), [eq(vec_text(p)).to(pt)]


def _lacks(body: String, marker: str):
    return body.replace(String(marker), String("")) == body


def _operand_forms(t: Term, prefix: str, body_var):
    """Ways an operand class ``t`` enters a region: (is an input, #inputs, facts, body, inputs).

    By its own region only if that region is open (does not write a transposed layout) and
    reads distinct inputs (`shared_inputs` makes such a region first)."""
    yield True, 1, [region_input(t)], String("$0"), [t]
    for n in range(MAX_REGION_INPUTS + 1):
        xs = _inputs(prefix, n)
        distinct = [ne(xs[i]).to(xs[j]) for i in range(n) for j in range(i + 1, n)]
        yield False, n, [eq(t).to(fused(body_var, *xs)), _lacks(body_var, "W["), *distinct], body_var, xs


@fusion.family
def unary():
    """An elementwise op, cast, integer power or broadcast of a region (or of a region input, for
    the elementwise ones) is a region with the op in its body; a transpose of a region is the
    region writing the other layout. (An op equal to its own operand, such as a cast to the
    operand's dtype, adds nothing: growing through it would never end.)"""
    for k, (pattern, wrap, conditions) in enumerate(_wrappers()):
        for is_input, _, facts, body, xs in _operand_forms(x, "x", ba):
            if is_input and k >= 3:
                continue  # transposes and broadcasts of inputs are `leaves`
            yield rl(eq(e).to(pattern(x)), ne(e).to(x), *facts, *conditions)(union(e).with_(fused(wrap(body), *xs)))


@fusion.family
def binary():
    """A binary elementwise op of two regions (or region inputs) is one region over both
    regions' inputs, when they are at most `MAX_REGION_INPUTS` and hold at most one matmul."""
    for in_a, na, facts_a, body_a, xs in _operand_forms(a, "x", ba):
        for in_b, nb, facts_b, body_b, ys in _operand_forms(b, "y", bb):
            if na + nb > MAX_REGION_INPUTS:
                continue
            body = _text(op, "(", body_a, ",", _shift(body_b, na, nb), ")")
            one_matmul = [[]] if in_a or in_b else [[_lacks(ba, "D[")], [_lacks(bb, "D[")]]
            for extra in one_matmul:
                yield rl(eq(e).to(Term.binary(op, a, b)), ne(e).to(a), ne(e).to(b), *facts_a, *facts_b, *extra)(
                    union(e).with_(fused(body, *xs, *ys))
                )


@fusion.family
def shared_inputs():
    """A region reading one value through two inputs reads it once."""
    for n in range(2, MAX_REGION_INPUTS + 1):
        for i in range(n):
            for j in range(i + 1, n):
                xs = _inputs("x", n)
                xs[j] = xs[i]
                body = ba.replace(String(f"${j}"), String(f"${i}"))
                for later in range(j + 1, n):
                    body = body.replace(String(f"${later}"), String(f"${later - 1}"))
                kept = [t for pos, t in enumerate(xs) if pos != j]
                yield rw(fused(ba, *xs), fused(body, *kept))


@fusion.family
def epilogue():
    """A matmul is a region whose consumers (bias add, activation, scale, cast, transpose) can
    join it as its epilogue."""
    facts = [eq(vec_text(t)).to(var(f"t{i}", String)) for i, t in enumerate((lc, rc, lb, rb))]
    texts = [var(f"t{i}", String) for i in range(4)]
    yield rl(eq(e).to(Term.dot(a, b, lc, rc, lb, rb, dt, pr)), *facts)(
        union(e).with_(fused(_text("D[", texts[0], ";", texts[1], ";", texts[2], ";", texts[3], ";", dt, ";", pr, "]($0,$1)"), a, b))
    )


def _scalar(value, dtype, shape_) -> Term:
    return Term.broadcast(Term.literal(value, dtype), shape_, NONE)


@fusion.family
def attention_prologue():
    """Attention of Q or K multiplied or divided by a scalar is attention with that factor in its
    scale; attention of V multiplied by a scalar is the scaled attention output."""
    def attn(q_, k_, v_, sc, compute=cd):
        return Term.attention(q_, k_, v_, m, qa, ka, va, oa, sc, causal, mk, compute, fl, cap)

    q = var("q", Term)
    for side in ("q", "k"):
        for form, factor in (
            (Term.binary("mul", x, _scalar(cval, dt2, s)), cval),
            (Term.binary("mul", _scalar(cval, dt2, s), x), cval),
            (Term.binary("div", x, _scalar(cval, dt2, s)), f64(1.0) / cval),
        ):
            lhs = attn(form, k, v, scale) if side == "q" else attn(q, form, v, scale)
            rhs = attn(x, k, v, scale * factor) if side == "q" else attn(q, x, v, scale * factor)
            yield rw(lhs, rhs)
    # (V's scale moves out only without a cast prologue: the output must stay in V's dtype)
    for form in (Term.binary("mul", x, _scalar(cval, dt2, s)), Term.binary("mul", _scalar(cval, dt2, s), x)):
        yield rl(eq(e).to(attn(q, k, form, scale, String(""))), shape(e) == s2)(
            union(e).with_(Term.binary("mul", attn(q, k, x, scale, String("")), _scalar(cval, dt2, s2)))
        )


CAST_DTYPES = ("float32", "bfloat16", "float16")
"""Float types a folded cast may read and compute in (the kernels cast tiles between them)."""


@fusion.family
def attention_cast_prologue():
    """Attention of Q, K or V cast to a float type is attention over the un-cast operand that
    casts it to that type inside the kernel (its compute dtype), before the matmuls, so the values
    are the same and the convert kernel and its intermediate write disappear; every operand of an
    attention with a compute dtype is cast to it, so the first fold needs the other two already in
    that dtype."""
    q = var("q", Term)
    operands = {"q": q, "k": k, "v": v}

    def attn(args, compute):
        return Term.attention(args["q"], args["k"], args["v"], m, qa, ka, va, oa, scale, causal, mk, compute, fl, cap)

    for src in CAST_DTYPES:
        for dst in CAST_DTYPES:
            if src == dst:
                continue
            target = String(dst)
            for name in operands:
                cast = {n: (Term.convert(x, target) if n == name else t) for n, t in operands.items()}
                folded = {n: (x if n == name else t) for n, t in operands.items()}
                others = [dtype(t) == target for n, t in operands.items() if n != name]
                # the first fold (no compute dtype yet: the other operands are already in dst) ...
                yield rw(attn(cast, String("")), attn(folded, target), dtype(x) == String(src), *others)
                # ... and the next ones (the compute dtype already casts every operand to dst)
                yield rw(attn(cast, target), attn(folded, target), dtype(x) == String(src))
