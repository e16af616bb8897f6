"""Plain-JAX attention: the semantics of the project's Attention op.

Every kernel in this package is tested against `attention_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: Score given to masked-out (mask=False or causal) positions. Finite, so a fully masked row
#: becomes a uniform average instead of NaN (as in jax.nn.dot_product_attention).
MASK_VALUE: float = -0.7 * float(np.finfo(np.float32).max)

V_LAYOUTS = ("BHSD", "BHDS")


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, v_layout: str) -> tuple[int, int, int, int, int, int, int]:
    """Validate operand shapes; return (B, H, Hkv, Sq, Sk, D, Dv)."""
    if v_layout not in V_LAYOUTS:
        raise ValueError(f"v_layout must be one of {V_LAYOUTS}, got {v_layout!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    b, h, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if v_layout == "BHSD":
        bv, hv, sv, dv = v.shape
    else:
        bv, hv, dv, sv = v.shape
    if bk != b or bv != b or dk != d or hv != hkv or sv != sk:
        raise ValueError(f"inconsistent shapes q={q.shape} k={k.shape} v={v.shape} ({v_layout})")
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    return b, h, hkv, sq, sk, d, dv


def causal_mask(sq: int, sk: int) -> jax.Array:
    """[Sq, Sk] bool, True where query i may attend key j (j <= i, top-left aligned)."""
    return jnp.arange(sq)[:, None] >= jnp.arange(sk)[None, :]


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """softmax((q @ k^T) * scale + bias, masked) @ v, returned as [B, H, Sq, Dv] in q.dtype.

    q [B,H,Sq,D]; k [B,Hkv,Sk,D]; v [B,Hkv,Sk,Dv] ("BHSD") or [B,Hkv,Dv,Sk] ("BHDS").
    Query head h reads kv head h // (H // Hkv). Scores and softmax are float32; `bias` is
    additive and `mask` boolean (True = keep), both broadcastable to [B,H,Sq,Sk].
    """
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout)
    g = h // hkv
    qg = q.reshape(b, hkv, g, sq, d)
    s = jnp.einsum("bkgqd,bksd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, h, sq, sk) * jnp.float32(scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    keep = None
    if mask is not None:
        keep = jnp.broadcast_to(mask.astype(bool), s.shape)
    if causal:
        cm = causal_mask(sq, sk)
        keep = cm if keep is None else keep & cm
    if keep is not None:
        s = jnp.where(keep, s, jnp.float32(MASK_VALUE))
    p = jax.nn.softmax(s, axis=-1).reshape(b, hkv, g, sq, sk)
    eq = "bkgqs,bksd->bkgqd" if v_layout == "BHSD" else "bkgqs,bkds->bkgqd"
    o = jnp.einsum(eq, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, h, sq, dv).astype(q.dtype)
