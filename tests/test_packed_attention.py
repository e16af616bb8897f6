"""Packed-QKV attention: the Pallas kernel (interpret mode) reads Q, K, V tiles straight from one
packed array, forward and gradient equal to a float64 reference, with no split copy; the
reference path and the IR lowering agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn import ir
from eqsat_attn.kernels.packed import packed_attention_reference, packed_flash_attention
from eqsat_attn.lower import lower
from test_kernels import _relayout, _walk, assert_close, np_attention

pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")

CASES = [("BS3HD", True, 2, 2, 40, 16), ("BSH3D", False, 1, 4, 32, 32), ("3BHSD", True, 2, 1, 24, 16)]


def _packed_inputs(seed, layout, b, h, s, d):
    rng = np.random.default_rng(seed)
    sizes = {"B": b, "H": h, "S": s, "D": d, "3": 3}
    qkv = jnp.asarray(rng.normal(size=tuple(sizes[c] for c in layout)), jnp.float32)
    do = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)  # o written as BSHD
    return qkv, do


def _expected(qkv, do, layout, **kw):
    own = layout.replace("3", "")
    axis = layout.index("3")
    q, k, v = (_relayout(np.take(np.asarray(qkv), i, axis=axis), own, "BHSD") for i in range(3))
    o, dq, dk, dv, _ = np_attention(q, k, v, _relayout(np.asarray(do), "BSHD", "BHSD"), **kw)
    dqkv = np.stack([_relayout(g, "BHSD", own) for g in (dq, dk, dv)], axis=axis)
    return _relayout(o, "BHSD", "BSHD"), dqkv


@pytest.mark.parametrize("layout,causal,b,h,s,d", CASES)
def test_packed_kernel_forward_and_grad(layout, causal, b, h, s, d):
    qkv, do = _packed_inputs(3, layout, b, h, s, d)
    scale = d ** -0.5
    o_want, g_want = _expected(qkv, do, layout, scale=scale, causal=causal)
    fn = lambda x: packed_flash_attention(x, packed_layout=layout, scale=scale, causal=causal, o_layout="BSHD",
                                          interpret=True)
    o, vjp = jax.vjp(fn, qkv)
    assert_close(o, o_want, 2e-5, "o")
    assert_close(vjp(do)[0], g_want, 1e-4, "dqkv")
    ref = packed_attention_reference(qkv, packed_layout=layout, scale=scale, causal=causal, o_layout="BSHD")
    assert_close(ref, o_want, 2e-5, "reference o")


def test_packed_kernel_reads_in_place():
    """The forward is one pallas_call on the packed array itself: no slice, gather or transpose."""
    qkv, _ = _packed_inputs(4, "BS3HD", 1, 2, 32, 16)
    fn = lambda x: packed_flash_attention(x, packed_layout="BS3HD", scale=0.25, causal=True, interpret=True)
    jaxpr = jax.make_jaxpr(fn)(qkv)
    outside = [e.primitive.name for e in _walk(jaxpr.jaxpr, into_kernels=False)]
    assert outside.count("pallas_call") == 1
    assert not {"slice", "gather", "transpose", "dynamic_slice", "split", "squeeze"} & set(outside), outside


def test_packed_rejects_bad_layouts():
    qkv, _ = _packed_inputs(5, "BS3HD", 1, 2, 16, 16)
    with pytest.raises(ValueError, match="BHSD3"):
        packed_flash_attention(qkv, packed_layout="BSHD", scale=1.0, causal=False)
    with pytest.raises(ValueError, match="D minor"):
        packed_flash_attention(jnp.swapaxes(qkv, 3, 4), packed_layout="BS3DH", scale=1.0, causal=False)


@pytest.mark.parametrize("kernel", ["reference", "pallas"])
def test_lowered_packed_attention_node(kernel):
    b = ir.ProgramBuilder()
    t = ir.TensorType((2, 24, 3, 2, 16), "float32")
    x = b.input(t)
    params = dict(packed_layout="BS3HD", o_layout="BSHD", scale=0.25, causal=True, mask_kind="none")
    out = b.add("packed_attention", (x,), ir.infer_type("packed_attention", params, [t]), **params)
    program = b.build([out])
    assert program.type_of(out).shape == (2, 24, 2, 16)
    qkv, do = _packed_inputs(6, "BS3HD", 2, 2, 24, 16)
    want, _ = _expected(qkv, do, "BS3HD", scale=0.25, causal=True)
    assert_close(lower(program, attention_kernel=kernel)(qkv)[0], want, 2e-5, "lowered o")
