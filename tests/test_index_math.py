"""Every index-math question (`eqsat_attn.egraph.index_math.QUESTIONS`) against NumPy semantics.

Each question answers "what parameters make the right side of a rewrite equal its left side";
these tests evaluate both sides on random arrays and compare them exactly (float64, pure
data movement or exact-in-float64 sums of small integers).
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqsat_attn.egraph import index_math
from eqsat_attn.egraph.index_math import QUESTIONS, inverse, solve

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
RNG = np.random.default_rng(1234)


def rand(shape):
    # small integers: every reduction and dot is exact in float64
    return RNG.integers(-4, 5, size=shape).astype(np.float64)


def broadcast_in_dim(x, shape, dims):
    """lax.broadcast_in_dim semantics (dims strictly increasing, size 1 or equal)."""
    assert list(dims) == sorted(set(dims)), dims
    expanded = [1] * len(shape)
    for k, d in enumerate(dims):
        assert x.shape[k] in (1, shape[d])
        expanded[d] = x.shape[k]
    return np.broadcast_to(x.reshape(expanded), shape)


def dot_general(a, b, lc, rc, lb, rb):
    """lax.dot_general semantics via einsum: output is [batch, lhs free, rhs free]."""
    letters = iter(string.ascii_letters)
    la = [None] * a.ndim
    lb_ = [None] * b.ndim
    for i, j in zip(lb, rb):
        la[i] = lb_[j] = next(letters)
    for i, j in zip(lc, rc):
        la[i] = lb_[j] = next(letters)
    for i in range(a.ndim):
        if la[i] is None:
            la[i] = next(letters)
    for j in range(b.ndim):
        if lb_[j] is None:
            lb_[j] = next(letters)
    out = [la[i] for i in lb]
    out += [la[i] for i in range(a.ndim) if i not in lc and i not in lb]
    out += [lb_[j] for j in range(b.ndim) if j not in rc and j not in rb]
    return np.einsum(f"{''.join(la)},{''.join(lb_)}->{''.join(out)}", a, b)


def dims_arg(contract, batch):
    return (len(contract), *contract, *batch)


def test_every_question_is_tested():
    tested = {
        "inverse", "reduce_bubble", "reduce_sink", "reshape_sink", "reshape_bubble", "broadcast_sink",
        "broadcast_bubble", "dot_shape", "dot_commute", "dot_out_sink", "dot_operand_fold", "dot_canonical",
        "attention_out_fold", "unit_broadcast", "unit_reduce",
    }
    from eqsat_attn.egraph import qkv_math  # tested in tests/test_qkv.py::test_packed_index_math

    tested |= {"packed_split", "packed_attention"}
    assert qkv_math.QUESTIONS is QUESTIONS
    assert set(QUESTIONS) == tested


# ----------------------------------------------------------------------------- strategies

dims = st.integers(1, 4)


@st.composite
def shapes(draw, min_rank=1, max_rank=5):
    return tuple(draw(st.lists(dims, min_size=min_rank, max_size=max_rank)))


@st.composite
def perms(draw, rank):
    return tuple(draw(st.permutations(list(range(rank)))))


@st.composite
def shape_and_perm(draw, min_rank=1, max_rank=5):
    s = draw(shapes(min_rank, max_rank))
    return s, draw(perms(len(s)))


@st.composite
def factorizations(draw, shape):
    """A reshape target of ``shape``: merge runs of axes and split some axes into factors."""
    out = []
    i = 0
    while i < len(shape):
        run = draw(st.integers(1, len(shape) - i))
        size = int(np.prod(shape[i:i + run]))
        i += run
        # split size into factors
        factors = []
        rest = size
        for f in (2, 3, 2, 2):
            if rest % f == 0 and rest > f and draw(st.booleans()):
                factors.append(f)
                rest //= f
        factors.append(rest)
        out.extend(draw(st.permutations(factors)))
    if draw(st.booleans()) and len(out) < 6:
        out.insert(draw(st.integers(0, len(out))), 1)  # a unit axis
    return tuple(out)


@st.composite
def dot_problem(draw, max_rank=5):
    """Random dot_general operands: (a_shape, b_shape, lc, rc, lb, rb)."""
    nb = draw(st.integers(0, 2))
    nc = draw(st.integers(0, 2))
    naf = draw(st.integers(0, max(0, min(2, max_rank - nb - nc))))
    nbf = draw(st.integers(0, max(0, min(2, max_rank - nb - nc))))
    batch = [draw(dims) for _ in range(nb)]
    contract = [draw(dims) for _ in range(nc)]
    af = [draw(dims) for _ in range(naf)]
    bf = [draw(dims) for _ in range(nbf)]
    ra, rb_ = nb + nc + naf, nb + nc + nbf
    pa = draw(perms(ra))  # position of each logical axis (batch, contract, free) in a
    pb = draw(perms(rb_))
    a_shape = [0] * ra
    for logical, size in enumerate(batch + contract + af):
        a_shape[pa[logical]] = size
    b_shape = [0] * rb_
    for logical, size in enumerate(batch + contract + bf):
        b_shape[pb[logical]] = size
    lb = tuple(pa[:nb])
    lc = tuple(pa[nb:nb + nc])
    rb = tuple(pb[:nb])
    rc = tuple(pb[nb:nb + nc])
    return tuple(a_shape), tuple(b_shape), lc, rc, lb, rb


# ----------------------------------------------------------------------------- inverse


@SETTINGS
@given(shape_and_perm())
def test_inverse(sp):
    s, p = sp
    (inv,) = solve("inverse", p, (), (), ())
    x = rand(s)
    np.testing.assert_array_equal(np.transpose(np.transpose(x, p), inv), x)
    assert inverse(p) == inv


# ----------------------------------------------------------------------------- reductions


@SETTINGS
@given(shape_and_perm(), st.data())
def test_reduce_bubble(sp, data):
    """reduce(transpose(x, p), axes) == transpose(reduce(x, axes2), q)."""
    s, p = sp
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(s) - 1)))))
    ans = solve("reduce_bubble", p, axes, (), ())
    assert ans is not None
    axes2, q = ans
    x = rand(s)
    for reduce in (np.sum, np.max):
        lhs = reduce(np.transpose(x, p), axis=axes)
        rhs = np.transpose(reduce(x, axis=axes2), q)
        np.testing.assert_array_equal(lhs, rhs)
    assert list(axes2) == sorted(axes2)


@SETTINGS
@given(shapes(), st.data())
def test_reduce_sink(s, data):
    """transpose(reduce(x, axes), q) == reduce(transpose(x, p), axes)."""
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(s) - 1)))))
    q = data.draw(perms(len(s) - len(axes)))
    (p,) = solve("reduce_sink", axes, q, (len(s),), ())
    x = rand(s)
    for reduce in (np.sum, np.min):
        lhs = np.transpose(reduce(x, axis=axes), q)
        rhs = reduce(np.transpose(x, p), axis=axes)
        np.testing.assert_array_equal(lhs, rhs)


# ----------------------------------------------------------------------------- reshapes


@SETTINGS
@given(shapes(), st.data())
def test_reshape_sink(src, data):
    """transpose(reshape(x, dst), p) == reshape(transpose(x, p2), s2), x of shape src."""
    dst = data.draw(factorizations(src))
    p = data.draw(perms(len(dst)))
    ans = solve("reshape_sink", src, dst, p, ())
    x = rand(src)
    if ans is None:
        return
    p2, s2 = ans
    assert sorted(p2) == list(range(len(src)))
    np.testing.assert_array_equal(np.transpose(x.reshape(dst), p), np.transpose(x, p2).reshape(s2))


@SETTINGS
@given(shapes(), st.data())
def test_reshape_sink_group_preserving_perm_always_applies(src, data):
    """A permutation of whole reshape groups always has an answer."""
    dst = data.draw(factorizations(src))
    groups = index_math.reshape_groups(src, dst)
    assert groups is not None
    order = data.draw(st.permutations([g for g in groups if g[1]]))
    p = tuple(a for _, gd in order for a in gd)
    ans = solve("reshape_sink", src, dst, p, ())
    assert ans is not None
    p2, s2 = ans
    x = rand(src)
    np.testing.assert_array_equal(np.transpose(x.reshape(dst), p), np.transpose(x, p2).reshape(s2))


@SETTINGS
@given(shape_and_perm(), st.data())
def test_reshape_bubble(sp, data):
    """reshape(transpose(x, p), dst) == transpose(reshape(x, mid), q), x of shape src."""
    src, p = sp
    t_shape = tuple(src[i] for i in p)
    dst = data.draw(factorizations(t_shape))
    ans = solve("reshape_bubble", src, p, dst, ())
    if ans is None:
        return
    mid, q = ans
    x = rand(src)
    np.testing.assert_array_equal(np.transpose(x, p).reshape(dst), np.transpose(x.reshape(mid), q))


@pytest.mark.parametrize(
    "src, dst, p",
    [
        ((2, 3), (6,), (0,)),  # rank-1 identity: applies
        ((2, 3, 4), (6, 4), (1, 0)),  # merged group moves as a whole: applies
        ((6, 4), (2, 3, 4), (2, 0, 1)),  # split group stays contiguous: applies
    ],
)
def test_reshape_sink_known_cases(src, dst, p):
    p2, s2 = solve("reshape_sink", src, dst, p, ())
    x = rand(src)
    np.testing.assert_array_equal(np.transpose(x.reshape(dst), p), np.transpose(x, p2).reshape(s2))


def test_reshape_sink_inapplicable():
    # split 6 -> (2, 3) and then swap the two halves: no transpose of x reshaped gives it
    assert solve("reshape_sink", (6, 4), (2, 3, 4), (1, 0, 2), ()) is None
    # sizes that do not regroup
    assert solve("reshape_sink", (0, 4), (4, 0), (1, 0), ()) is None


def test_reshape_bubble_inapplicable():
    # transpose swaps 2 and 3, then merging them would need them in x's order
    assert solve("reshape_bubble", (2, 3), (1, 0), (6,), ()) is None


# ----------------------------------------------------------------------------- broadcasts


@st.composite
def broadcast_problem(draw):
    """(x_shape, out_shape, dims) with dims strictly increasing (lax.broadcast_in_dim)."""
    out = draw(shapes(1, 5))
    k = draw(st.integers(0, len(out)))
    dims_ = tuple(sorted(draw(st.permutations(list(range(len(out)))))[:k]))
    x_shape = tuple(out[d] if not draw(st.booleans()) or out[d] == 1 else 1 for d in dims_)
    return x_shape, out, dims_


@SETTINGS
@given(broadcast_problem(), st.data())
def test_broadcast_sink(prob, data):
    """transpose(broadcast(x, shape, dims), p) == broadcast(transpose(x, q), shape2, dims2)."""
    x_shape, out, dims_ = prob
    p = data.draw(perms(len(out)))
    q, s2, d2 = solve("broadcast_sink", out, dims_, p, ())
    x = rand(x_shape)
    lhs = np.transpose(broadcast_in_dim(x, out, dims_), p)
    rhs = broadcast_in_dim(np.transpose(x, q), s2, d2)
    np.testing.assert_array_equal(lhs, rhs)


@pytest.mark.parametrize("x_shape, out, dims_, reshapes", [
    ((2, 8, 8), (2, 1, 8, 8), (0, 2, 3), True),  # jnp.matmul's single head
    ((2, 8, 8), (1, 2, 8, 8), (1, 2, 3), True),  # a batch of one
    ((8, 8), (1, 8, 1, 8), (1, 3), True),
    ((2, 8, 8), (2, 3, 8, 8), (0, 2, 3), False),  # a real broadcast
    ((2, 1, 8), (2, 1, 8, 8), (0, 1, 2), False),  # x's unit axis broadcast to 8
    ((8, 2), (1, 2, 8), (2, 1), False),  # dims out of order: a transpose
])
def test_unit_broadcast(x_shape, out, dims_, reshapes):
    """broadcast(x, shape, dims) == reshape(x, shape) exactly where it is answered."""
    got = solve("unit_broadcast", x_shape, out, dims_, ())
    assert (got is not None) == reshapes
    if reshapes and list(dims_) == sorted(dims_):
        x = rand(x_shape)
        np.testing.assert_array_equal(broadcast_in_dim(x, out, dims_), x.reshape(got[0]))


@pytest.mark.parametrize("x_shape, axes, reshapes", [
    ((2, 1, 8, 8), (1,), True),  # jax.grad's sum over jnp.matmul's inserted unit axis
    ((1, 2, 8, 1), (0, 3), True),
    ((2, 3, 8), (1,), False),
    ((2, 1, 8), (1, 2), False),  # one reduced axis is not a unit
    ((2, 8), (), False),
])
def test_unit_reduce(x_shape, axes, reshapes):
    """reduce_sum(x, axes) == reshape(x, shape2) where it is answered, bit for bit as XLA sums (a -0 stays -0)."""
    import jax
    import jax.numpy as jnp

    got = solve("unit_reduce", x_shape, axes, (), ())
    assert (got is not None) == reshapes
    if reshapes:
        x = rand(x_shape).astype(np.float32)
        x.reshape(-1)[0] = -0.0
        summed = np.asarray(jax.jit(lambda t: jnp.sum(t, axis=axes))(x))
        np.testing.assert_array_equal(summed, x.reshape(got[0]))
        assert np.array_equal(np.signbit(summed), np.signbit(x.reshape(got[0])))


@SETTINGS
@given(broadcast_problem(), st.data())
def test_broadcast_bubble(prob, data):
    """broadcast(transpose(x, q), shape, dims) == transpose(broadcast(x, shape2, dims), p)."""
    x_shape_t, out, dims_ = prob  # x_shape_t is the shape of transpose(x, q)
    q = data.draw(perms(len(dims_)))
    x_shape = [0] * len(dims_)
    for k, qk in enumerate(q):
        x_shape[qk] = x_shape_t[k]
    x = rand(tuple(x_shape))
    s2, p = solve("broadcast_bubble", out, dims_, q, ())
    lhs = broadcast_in_dim(np.transpose(x, q), out, dims_)
    rhs = np.transpose(broadcast_in_dim(x, s2, dims_), p)
    np.testing.assert_array_equal(lhs, rhs)


# ----------------------------------------------------------------------------- dot_general


@SETTINGS
@given(dot_problem())
def test_dot_shape(prob):
    a_shape, b_shape, lc, rc, lb, rb = prob
    (shape,) = solve("dot_shape", a_shape, b_shape, dims_arg(lc, lb), dims_arg(rc, rb))
    assert dot_general(rand(a_shape), rand(b_shape), lc, rc, lb, rb).shape == shape


def test_dot_general_helper_matches_lax():
    import jax

    a, b = rand((2, 3, 4)), rand((2, 4, 5))
    want = jax.lax.dot_general(a.astype(np.float32), b.astype(np.float32), (((2,), (1,)), ((0,), (0,))))
    np.testing.assert_allclose(dot_general(a, b, (2,), (1,), (0,), (0,)), np.asarray(want), rtol=1e-6)


@SETTINGS
@given(dot_problem())
def test_dot_commute(prob):
    """dot(a, b) == transpose(dot(b, a), p)."""
    a_shape, b_shape, lc, rc, lb, rb = prob
    nb = len(lb)
    counts = (nb, len(a_shape) - len(lc) - nb, len(b_shape) - len(rc) - nb)
    (p,) = solve("dot_commute", counts, (), (), ())
    a, b = rand(a_shape), rand(b_shape)
    np.testing.assert_array_equal(
        dot_general(a, b, lc, rc, lb, rb), np.transpose(dot_general(b, a, rc, lc, rb, lb), p)
    )


@SETTINGS
@given(dot_problem(), st.data())
def test_dot_out_sink(prob, data):
    """transpose(dot(a, b), p) == dot(transpose(a, qa), transpose(b, qb), lc, rc, lb2, rb2)."""
    a_shape, b_shape, lc, rc, lb, rb = prob
    a, b = rand(a_shape), rand(b_shape)
    out = dot_general(a, b, lc, rc, lb, rb)
    p = data.draw(perms(out.ndim))
    ans = solve("dot_out_sink", (len(a_shape), len(b_shape)), dims_arg(lc, lb), dims_arg(rc, rb), p)
    nb, naf = len(lb), len(a_shape) - len(lc) - len(lb)
    keeps_groups = all(
        sorted(p[lo:hi]) == list(range(lo, hi)) for lo, hi in ((0, nb), (nb, nb + naf), (nb + naf, out.ndim))
    )
    assert (ans is not None) == keeps_groups
    if ans is None:
        return
    qa, qb, lb2, rb2 = ans
    np.testing.assert_array_equal(
        np.transpose(out, p), dot_general(np.transpose(a, qa), np.transpose(b, qb), lc, rc, lb2, rb2)
    )


@SETTINGS
@given(dot_problem())
def test_dot_out_sink_group_preserving(prob):
    """A permutation that reverses each group (batch, lhs free, rhs free) in place always applies."""
    a_shape, b_shape, lc, rc, lb, rb = prob
    nb, naf, nbf = len(lb), len(a_shape) - len(lc) - len(lb), len(b_shape) - len(rc) - len(rb)
    p = (
        tuple(reversed(range(nb)))
        + tuple(reversed(range(nb, nb + naf)))
        + tuple(reversed(range(nb + naf, nb + naf + nbf)))
    )
    qa, qb, lb2, rb2 = solve("dot_out_sink", (len(a_shape), len(b_shape)), dims_arg(lc, lb), dims_arg(rc, rb), p)
    a, b = rand(a_shape), rand(b_shape)
    np.testing.assert_array_equal(
        np.transpose(dot_general(a, b, lc, rc, lb, rb), p),
        dot_general(np.transpose(a, qa), np.transpose(b, qb), lc, rc, lb2, rb2),
    )


def test_dot_out_sink_inapplicable():
    # matmul [m,k]x[k,n] -> [m,n]; swapping m and n mixes the lhs-free and rhs-free groups
    assert solve("dot_out_sink", (2, 2), (1, 1), (1, 0), (1, 0)) is None


@SETTINGS
@given(dot_problem(), st.data())
def test_dot_operand_fold(prob, data):
    """dot(transpose(x, q), b) == transpose(dot(x, b, q[lc], rc, q[lb], rb), r) (and the rhs side)."""
    t_a_shape, t_b_shape, lc, rc, lb, rb = prob
    side = data.draw(st.sampled_from([0, 1]))
    if side == 0:
        q = data.draw(perms(len(t_a_shape)))
        x = np.transpose(rand(t_a_shape), inverse(q))  # so that transpose(x, q) has shape t_a_shape
        b = rand(t_b_shape)
        other_free = len(t_b_shape) - len(rc) - len(rb)
        (r,) = solve("dot_operand_fold", q, dims_arg(lc, lb), (0,), (other_free,))
        lhs = dot_general(np.transpose(x, q), b, lc, rc, lb, rb)
        rhs = dot_general(x, b, tuple(q[i] for i in lc), rc, tuple(q[i] for i in lb), rb)
    else:
        q = data.draw(perms(len(t_b_shape)))
        x = np.transpose(rand(t_b_shape), inverse(q))
        a = rand(t_a_shape)
        other_free = len(t_a_shape) - len(lc) - len(lb)
        (r,) = solve("dot_operand_fold", q, dims_arg(rc, rb), (1,), (other_free,))
        lhs = dot_general(a, np.transpose(x, q), lc, rc, lb, rb)
        rhs = dot_general(a, x, lc, tuple(q[i] for i in rc), lb, tuple(q[i] for i in rb))
    np.testing.assert_array_equal(lhs, np.transpose(rhs, r))


@SETTINGS
@given(dot_problem())
def test_dot_canonical(prob):
    """dot(a, b) == dot(transpose(a, qa), transpose(b, qb)) with a as [B, F, C] and b as [B, C, F]."""
    a_shape, b_shape, lc, rc, lb, rb = prob
    qa, qb, lc2, rc2, lb2, rb2 = solve(
        "dot_canonical", (len(a_shape), len(b_shape)), dims_arg(lc, lb), dims_arg(rc, rb), ()
    )
    a, b = rand(a_shape), rand(b_shape)
    np.testing.assert_array_equal(
        dot_general(a, b, lc, rc, lb, rb), dot_general(np.transpose(a, qa), np.transpose(b, qb), lc2, rc2, lb2, rb2)
    )
    nb = len(lb)
    assert lb2 == rb2 == tuple(range(nb))
    assert rc2 == tuple(range(nb, nb + len(rc)))
    assert lc2 == tuple(range(len(a_shape) - len(lc), len(a_shape)))


# ----------------------------------------------------------------------------- attention


@SETTINGS
@given(perms(4), perms(4))
def test_attention_out_fold(o_axes, p):
    """transpose(attention(.., o_axes), p) == attention(.., o_axes2).

    ``o_axes[a]`` is the physical axis holding logical axis a of (B, H, S, D), so an output
    in that layout is ``transpose(logical, inverse(o_axes))``.
    """
    logical = rand((2, 3, 4, 5))
    (o2,) = solve("attention_out_fold", o_axes, p, (), ())
    physical = np.transpose(logical, inverse(o_axes))
    np.testing.assert_array_equal(np.transpose(physical, p), np.transpose(logical, inverse(o2)))
