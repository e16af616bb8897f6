"""fp8 attention over operands rounded to fp8 in the same program, differentiated straight
through the rounding.

JAX gives a value of an fp8 dtype an fp8 cotangent, so differentiating ``attention_fp8(y.astype(
e4m3), ...)`` op by op rounds the gradient of each operand to e4m3 (3 mantissa bits, no scale):
every entry below 2^-9 becomes zero, which with a mean loss is every entry. Here the rounding
and the attention are one `jax.custom_vjp` over the unrounded ``y``: the forward rounds ``y``
exactly as ``convert_element_type`` does and runs the same fp8 attention (identical values), and
the backward passes the attention's gradient of the dequantized operand ``y8 · s`` back to ``y``
as ``g · s`` in ``y``'s own dtype (the straight-through estimator fp8 training recipes use;
flax's ``in_qdq`` does the same), and to each scale as ``sum(g · y8)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .fp8_attention import FP8_DTYPES, attention_reference_fp8, dequantize, flash_attention_fp8, flash_attention_fp8_vjp
from .reference import attention_reference


def attention_fp8_straight_through(y: Sequence[jax.Array], scales: Sequence[Any], fp8_dtypes: Sequence[str], *,
                                   pallas: bool, **kw: Any) -> jax.Array:
    """fp8 attention over ``y[i].astype(fp8_dtypes[i])`` with descales ``scales``; ``pallas``: the
    Pallas kernel (else the reference); ``kw``: `attention_reference_fp8`'s keywords."""
    for dt in fp8_dtypes:
        if dt not in FP8_DTYPES:
            raise ValueError(f"fp8_dtypes must be among {FP8_DTYPES}, got {dt!r}")
    dtypes = tuple(jnp.dtype(dt) for dt in fp8_dtypes)

    def rounded(ys):
        return [lax.convert_element_type(v, dt) for v, dt in zip(ys, dtypes)]

    def attention(x8, s):
        return (flash_attention_fp8 if pallas else attention_reference_fp8)(*x8, *s, **kw)

    def grads(x8, s, do):  # gradients w.r.t. the dequantized operands x8 · s
        if pallas:
            return flash_attention_fp8_vjp(*x8, *s, do, **kw)[1]
        ref_kw = {k: v for k, v in kw.items() if k != "out_dtype"}
        deq = [dequantize(x, sc) for x, sc in zip(x8, s)]
        _, pull = jax.vjp(lambda a, b, c: attention_reference(a, b, c, **ref_kw), *deq)
        return pull(do.astype(jnp.float32))

    @jax.custom_vjp
    def run(yq, yk, yv, sq, sk, sv):
        return attention(rounded((yq, yk, yv)), (sq, sk, sv))

    def fwd(yq, yk, yv, sq, sk, sv):
        ys, s = (yq, yk, yv), (sq, sk, sv)
        x8 = rounded(ys)
        zeros = tuple(jnp.zeros((), v.dtype) for v in ys)  # carry y's dtypes as residuals
        return attention(x8, s), (x8, s, zeros)

    def bwd(res, do):
        x8, s, zeros = res
        g = grads(x8, s, do)
        f32 = jnp.float32
        dy = tuple((gi.astype(f32) * jnp.asarray(si, f32)).astype(z.dtype) for gi, si, z in zip(g, s, zeros))
        ds = tuple(jnp.sum(gi.astype(f32) * xi.astype(f32)).reshape(jnp.shape(si)).astype(jnp.result_type(si))
                   for gi, xi, si in zip(g, x8, s))
        return dy + ds

    run.defvjp(fwd, bwd)
    return run(*y, *scales)
