"""Canonical forms: every dot_general is related to one canonical batched form (lhs as
[batch, free, contract], rhs as [batch, contract, free]) and to its commuted form, and
reshapes compose, so later rules (attention) match one shape of program whatever library
wrote it."""

from __future__ import annotations

from egglog import String, var

from eqsat_attn.egraph.language import IntVec, Term, dtype, shape
from eqsat_attn.egraph.rulesets import RuleSet, asking, rw

canonical = RuleSet("canonical", " ".join(__doc__.split("\n\n")[0].split()))

x, a, b = (var(n, Term) for n in "xab")
s, s1, lc, rc, lb, rb, sa, sb = (var(n, IntVec) for n in ("s", "s1", "lc", "rc", "lb", "rb", "sa", "sb"))
dt, pr = var("dt", String), var("pr", String)
NONE = IntVec.empty()


def _dims(contract, batch):
    return IntVec(contract.length()).append(contract).append(batch)


@canonical.family
def dot_canonical():
    """A dot_general equals the canonical batched dot_general of transposed operands."""
    yield from asking(
        Term.dot(a, b, lc, rc, lb, rb, dt, pr), [shape(a) == sa, shape(b) == sb], "dot_canonical",
        (IntVec(sa.length(), sb.length()), _dims(lc, lb), _dims(rc, rb), NONE), 6,
        lambda qa, qb, lc2, rc2, lb2, rb2: Term.dot(Term.transpose(a, qa), Term.transpose(b, qb), lc2, rc2, lb2, rb2, dt, pr),
    )


@canonical.family
def dot_commute():
    """dot(a, b) is a transpose of dot(b, a)."""
    yield from asking(
        Term.dot(a, b, lc, rc, lb, rb, dt, pr), [shape(a) == sa, shape(b) == sb], "dot_commute",
        (IntVec(lb.length(), sa.length() - lc.length() - lb.length(), sb.length() - rc.length() - rb.length()), NONE, NONE, NONE), 1,
        lambda p: Term.transpose(Term.dot(b, a, rc, lc, rb, lb, dt, pr), p),
    )


#: (narrow, wide) float pairs where every value of ``narrow`` (±0, denormals, ±inf, NaN included) is
#: a value of ``wide``: widening is exact, and narrowing such a value back returns it unchanged
EXACT_WIDENINGS = (("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "float64"),
                   ("float16", "float64"), ("float32", "float64"))


@canonical.family
def convert():
    """A cast to the operand's own dtype is the operand; a value widened and cast back to its own
    dtype is the value (T5 in torch writes ``score.float().type_as(query)``); the max or min of
    widened values cast back is the max or min of the values (it is one of them, or NaN: XLA's
    and jax's bf16/f16 softmax reduce the max in float32)."""
    yield rw(Term.convert(x, dt), x, dtype(x) == dt)
    for narrow, wide in EXACT_WIDENINGS:
        yield rw(Term.convert(Term.convert(x, String(wide)), String(narrow)), x, dtype(x) == String(narrow))
        for op in ("reduce_max", "reduce_min"):
            yield rw(Term.convert(Term.reduce(op, Term.convert(x, String(wide)), s), String(narrow)),
                     Term.reduce(op, x, s), dtype(x) == String(narrow))


@canonical.family
def reshape():
    """Consecutive reshapes are one reshape; a reshape to the operand's own shape is the operand."""
    yield rw(Term.reshape(Term.reshape(x, s1), s), Term.reshape(x, s))
    yield rw(Term.reshape(x, s), x, shape(x) == s)
