"""The egglog language of tensor terms.

One sort, `Term`, holds every tensor value. Static parameters are egglog primitives:
permutations, shapes and axes are `Vec[i64]`; op names and dtypes are `String`; scalars are
`f64`. Attention layouts are `Vec[i64]` *axis positions*: entry a is the physical axis that
holds logical axis a of (B, H, S, D), so "BHDS" (transposed V) is ``Vec(0, 1, 3, 2)``.
Storing positions (not orders) lets a rule fold a transpose into a layout with one `map`.

Every tensor e-class gets its shape and dtype from the analysis functions `shape` and
`dtype`, filled by the `analysis` rule set (leaves are set when a program is encoded).

Index arithmetic that egglog primitives cannot express (inverse permutations, how a
reshape regroups axes, dot_general dimension numbers) is answered by Python between
rule rounds: a rule records a question with `ask(kind, a, b, c, d)`, the driver computes it
(`eqsat_attn.egraph.index_math`) and sets `answer(kind, a, b, c, d, k)` for each output k, and
the rule's second half fires on the answer.
"""

from __future__ import annotations

import numpy as np
from egglog import Expr, String, StringLike, Vec, f64, f64Like, function, i64, i64Like, relation

IntVec = Vec[i64]

KERNEL_FILL = -0.7 * float(np.finfo(np.float32).max)
"""The score the Pallas kernels give a masked position (kernels.reference.MASK_VALUE): an attention
whose ``fill`` is at or below it runs on them with the same values (exp underflows to 0 either way)."""


class Term(Expr):
    """A tensor value (or, for `opaque`, a tuple of them read by `output`)."""

    @classmethod
    def input(cls, index: i64Like) -> Term: ...

    @classmethod
    def literal(cls, value: f64Like, dtype: StringLike) -> Term:
        """A rank-0 constant; integers and booleans are stored exactly as f64."""

    @classmethod
    def constant(cls, index: i64Like) -> Term:
        """The index-th closed-over array of the encoded program."""

    @classmethod
    def iota(cls, dtype: StringLike, shape: IntVec, dimension: i64Like) -> Term: ...

    @classmethod
    def unary(cls, op: StringLike, x: Term) -> Term: ...

    @classmethod
    def binary(cls, op: StringLike, a: Term, b: Term) -> Term: ...

    @classmethod
    def integer_pow(cls, x: Term, y: i64Like) -> Term: ...

    @classmethod
    def convert(cls, x: Term, dtype: StringLike) -> Term: ...

    @classmethod
    def select(cls, pred: Term, on_false: Term, on_true: Term) -> Term: ...

    @classmethod
    def softmax(cls, x: Term) -> Term:
        """The numerically stable softmax over the last axis."""

    @classmethod
    def transpose(cls, x: Term, perm: IntVec) -> Term: ...

    @classmethod
    def reshape(cls, x: Term, shape: IntVec) -> Term: ...

    @classmethod
    def broadcast(cls, x: Term, shape: IntVec, dims: IntVec) -> Term: ...

    @classmethod
    def reduce(cls, op: StringLike, x: Term, axes: IntVec) -> Term: ...

    @classmethod
    def dot(
        cls, a: Term, b: Term, lhs_contract: IntVec, rhs_contract: IntVec,
        lhs_batch: IntVec, rhs_batch: IntVec, out_dtype: StringLike, precision: StringLike = String(""),
    ) -> Term:
        """dot_general; ``out_dtype`` is the preferred element type ("" for the default);
        ``precision`` "" is JAX's default and "highest" ``Precision.HIGHEST`` (float32 products in
        full float32, where the default may run TF32 on a GPU); "bf16_bf16_f32" and "f16_f16_f32"
        are those presets over a mixed pair (`ir`). A pattern that leaves it out
        matches default-precision matmuls only."""

    @classmethod
    def attention(
        cls, q: Term, k: Term, v: Term, mask: Term, q_axes: IntVec, k_axes: IntVec,
        v_axes: IntVec, o_axes: IntVec, scale: f64Like, causal: i64Like, mask_kind: StringLike,
        compute_dtype: StringLike, fill: f64Like, softcap: f64Like,
    ) -> Term:
        """Scaled dot-product attention; ``*_axes`` are axis positions of (B, H, S, D).

        Scores, in float32: ``s = scale * q kᵀ``; ``s = softcap * tanh(s / softcap)`` when
        ``softcap`` > 0; ``s = s + mask`` for ``mask_kind`` "bias"; then every position a boolean
        ``mask`` ("bool": True keeps) or the causal flag hides is set to ``fill`` exactly (as the
        program's ``where(keep, s, fill)`` does); softmax over the keys; P (cast to V's dtype) · V.
        ``mask_kind`` "bias+bool": ``mask`` is ``mask_pair(bias, keep)`` and the scores are
        ``where(keep, s + bias, fill)`` (a bias hidden by keep or the causal flag never shows, even
        NaN or inf).
        ``compute_dtype`` "" computes in the operands' dtype; a dtype name casts q, k and v to it
        inside the kernel (a cast prologue folded in, rules/fusion.py), which is the result's dtype."""

    @classmethod
    def attention_vjp(
        cls, q: Term, k: Term, v: Term, do: Term, mask: Term, q_axes: IntVec, k_axes: IntVec,
        v_axes: IntVec, o_axes: IntVec, scale: f64Like, causal: i64Like, mask_kind: StringLike,
        compute_dtype: StringLike, fill: f64Like, softcap: f64Like, wrt: i64Like,
    ) -> Term:
        """The gradient of ``sum(attention(q, k, v, mask, ...) * do)`` with respect to q, k, v or
        the mask operand when it is an additive bias (``wrt`` 0, 1, 2, 3): attention's vector-Jacobian product at the cotangent ``do`` (o's layout),
        in the layout of the operand it differentiates. The attention's arguments are those of
        `attention`; the three gradients of one attention run as one backward kernel call."""

    @classmethod
    def attention_fp8(
        cls, q: Term, k: Term, v: Term, q_scale: Term, k_scale: Term, v_scale: Term, q_axes: IntVec,
        k_axes: IntVec, v_axes: IntVec, o_axes: IntVec, scale: f64Like, causal: i64Like, out_dtype: StringLike,
    ) -> Term:
        """Attention over fp8 q, k, v dequantized by their rank-0 scales (x8 · s), in ``out_dtype``."""

    @classmethod
    def slice(cls, x: Term, start: IntVec, limit: IntVec) -> Term:
        """Static slice ``x[start:limit]`` (stride 1)."""

    @classmethod
    def concat(cls, parts: TermList, axis: i64Like) -> Term:
        """Concatenation of the operands along ``axis``."""

    @classmethod
    def packed_attention(
        cls, qkv: Term, mask: Term, packed_axes: IntVec, o_axes: IntVec, scale: f64Like, causal: i64Like,
        mask_kind: StringLike,
    ) -> Term:
        """Attention whose Q, K, V are entries 0, 1, 2 of one packed array; ``packed_axes`` are
        the positions of (B, H, S, D, packed) in it."""

    @classmethod
    def no_mask(cls) -> Term:
        """The mask operand of an attention without an explicit mask tensor."""

    @classmethod
    def mask_pair(cls, bias: Term, keep: Term) -> Term:
        """The mask operand of an attention with ``mask_kind`` "bias+bool": an additive ``bias``
        and a boolean ``keep`` of one shape. Not a tensor: only an attention reads it (its
        analysis type is the bias's, so the cost models see both operands' bytes)."""

    @classmethod
    def opaque(cls, index: i64Like, args: TermList) -> Term:
        """The index-th node the rules do not model, applied to its operands; never rewritten."""

    @classmethod
    def output(cls, call: Term, index: i64Like) -> Term:
        """The index-th result of a multi-output opaque node."""

    # --- fused regions (issue 7, rules/fusion.py): ``body`` is a region body text over $0..$n-1
    # (eqsat_attn.region); the operands are the region's real inputs. One constructor per arity.
    @classmethod
    def fused0(cls, body: StringLike) -> Term:
        """A region of constants only (a broadcast literal)."""

    @classmethod
    def fused1(cls, body: StringLike, a: Term) -> Term:
        """One fused kernel computing ``body`` from one input."""

    @classmethod
    def fused2(cls, body: StringLike, a: Term, b: Term) -> Term: ...

    @classmethod
    def fused3(cls, body: StringLike, a: Term, b: Term, c: Term) -> Term: ...

    @classmethod
    def fused4(cls, body: StringLike, a: Term, b: Term, c: Term, d: Term) -> Term: ...

    @classmethod
    def fused5(cls, body: StringLike, a: Term, b: Term, c: Term, d: Term, e: Term) -> Term: ...

    @classmethod
    def fused6(cls, body: StringLike, a: Term, b: Term, c: Term, d: Term, e: Term, f: Term) -> Term: ...


class TermList(Expr):
    """Operands of an opaque node or a concatenation, as a cons list (`term_list`)."""

    @classmethod
    def nil(cls) -> TermList: ...

    @classmethod
    def cons(cls, head: Term, tail: TermList) -> TermList: ...


def term_list(items) -> TermList:
    """The cons list of ``items`` (Term expressions), in order: a concatenation's operands."""
    out = TermList.nil()
    for t in reversed(list(items)):
        out = TermList.cons(t, out)
    return out


@function
def shape(x: Term) -> IntVec:
    """Shape analysis."""


@function
def dtype(x: Term) -> String:
    """Dtype analysis (NumPy dtype names)."""


@function(merge=lambda old, new: old.min(new))
def program_order(x: Term) -> i64:
    """Position of the earliest encoded program node in the e-class (set at encode time): a total
    order on a program's values, so rules over sibling groups match each group once."""


@function
def concat_extent(parts: TermList, axis: i64Like) -> i64:
    """Summed size along ``axis`` of the operands of a concatenation."""


@function
def concat_shape(parts: TermList, axis: i64Like) -> IntVec:
    """Shape of the concatenation of the operands along ``axis`` (read by cost models)."""


@function
def list_dtype(parts: TermList) -> String:
    """Dtype of a concatenation's operands."""


concat_need = relation("concat_need", TermList, i64)
"""A concatenation asks for its operand list's `concat_extent` along an axis."""

attn_scores = relation("attn_scores", Term, Term, Term, f64, f64, Term, String, f64, i64, i64)
"""Score analysis: ``attn_scores(e, q, k, scale, softcap, mask, mask_kind, fill, causal, nb)`` says
e is attention's pre-softmax scores over the canonical matmul operands q ([batch.., free.., D]) and
kᵀ ([batch.., D, Sk]) with nb batch axes, with the Attention op's score semantics (scale,
soft-cap, additive or boolean mask, fill, causal flag). Rules in rules/attention.py derive it from
every spelling libraries use; the raising rule reads it, so spellings and forms compose."""

scores_cot = relation("scores_cot", Term, Term, Term, Term, Term)
"""Gradient analysis: ``scores_cot(g, x, s, do, v)`` says g is the cotangent of x, a stage of the
scores s (x is s, or what s was computed from: before its scale, bias, where-mask or widening),
in ``sum((softmax(s) · v) * do)``: g is what a jax.grad program computes for x when the output
cotangent is do. The gradient rules (rules/attention.py) derive it from the softmax's backward and
carry it back through the score modifications to Q·Kᵀ, where Q's and K's gradients become
`Term.attention_vjp`."""

softmax_vjp = relation("softmax_vjp", Term, Term, Term, i64, i64)
"""Softmax's backward: ``softmax_vjp(e, x, dp, rank, spelling)`` says e is the vector-Jacobian
product of softmax(x) (x of rank ``rank``, the softmax over its last axis) at the cotangent dp,
``P * dP - P * rowsum(P * dP)`` for P = softmax(x), as jax.grad writes it in the spelling
numbered ``spelling`` (rules/attention.py, `VJP_SPELLINGS`: each equal to that in real numbers,
rounded its own way). Matched on the VJP alone; the gradient rules read it with what x and dp
are (the scores, dO·Vᵀ) to find `scores_cot`."""

where_softmax_vjp = relation("where_softmax_vjp", Term, Term, Term, Term, i64)
"""``where_softmax_vjp(e, keep, x, dp, rank)``: e is ``jax.nn.softmax(x, where=keep)``'s VJP as
jax.grad writes it (x of rank ``rank``): `softmax_vjp`'s custom-JVP spellings at
P = ``where(keep, softmax(x), 0)`` and dP = ``where(keep, dp, 0)``, the broadcast row sum zeroed
where keep hides too."""

grad_op = relation("grad_op", Term, Term, Term, Term, Term, Term, Term, Term, Term)
"""``grad_op(s, q, k, v, do, dq, dk, dv, dbias)``: the op's gradients (`Term.attention_vjp`, wrt
0..3) of the attention the scores s define over canonical q, kᵀ and v, at the output cotangent
do; dbias is dq's term where there is no bias. The rules that find where a program computes each
gradient read it, so a form is matched once, whatever mask the scores carry."""

causal_mask = relation("causal_mask", Term)
"""Mask analysis: the term is a causal mask over its last two axes (query i keeps keys j <= i),
as booleans or as a 0/1 indicator, broadcast over any leading axes."""

rows_kept = relation("rows_kept", Term)
"""Mask analysis: the term is a boolean mask that keeps at least one key (True) in every row along
its last axis, so a softmax masked by it to -inf has a finite-or-NaN row sum, never 0/0 from the
mask alone (a causal mask keeps key 0; a window keeps the diagonal; a key-padding mask may hide
a whole row and holds no such fact)."""

ask = relation("ask", String, IntVec, IntVec, IntVec, IntVec)


@function
def answer(kind: StringLike, a: IntVec, b: IntVec, c: IntVec, d: IntVec, k: i64Like) -> IntVec:
    """Output k of the index-math question ``kind(a, b, c, d)``, set by the driver."""


def ivec(values) -> IntVec:
    """A `Vec[i64]` literal from Python ints."""
    items = [i64(int(v)) for v in values]
    return Vec(*items) if items else Vec[i64].empty()


def perm_range(rank: int) -> IntVec:
    return ivec(range(rank))


MAX_REGION_INPUTS = 6  # Term.fused0 .. Term.fused6


def fused(body, *inputs) -> Term:
    """``Term.fused<n>(body, *inputs)`` for n = len(inputs)."""
    if len(inputs) > MAX_REGION_INPUTS:
        raise ValueError(f"a fused region has at most {MAX_REGION_INPUTS} inputs, got {len(inputs)}")
    return getattr(Term, f"fused{len(inputs)}")(body, *inputs)


__all__ = [
    "IntVec", "KERNEL_FILL", "MAX_REGION_INPUTS", "Term", "TermList", "answer", "ask", "attn_scores", "causal_mask", "grad_op", "rows_kept", "scores_cot", "softmax_vjp", "where_softmax_vjp", "concat_extent", "concat_need",
    "concat_shape", "dtype", "f64", "fused", "ivec", "list_dtype", "perm_range", "program_order", "shape",
]
