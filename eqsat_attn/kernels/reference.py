"""Plain-JAX attention: the semantics of the project's Attention op.

Every kernel in this package is tested against `attention_reference`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

#: Score given to masked-out (mask=False or causal) positions. Finite, so a fully masked row
#: becomes a uniform average instead of NaN (as in jax.nn.dot_product_attention).
MASK_VALUE: float = -0.7 * float(np.finfo(np.float32).max)

V_LAYOUTS = ("BHSD", "BHDS")  # the canonical pair; any permutation of "BHSD" is accepted
CANONICAL = "BHSD"


def check_layout(name: str, layout: object) -> str:
    """`layout` if it is a permutation of "BHSD" (the physical axis order of an operand)."""
    if not isinstance(layout, str) or sorted(layout) != sorted(CANONICAL):
        raise ValueError(f"{name} must be a permutation of 'BHSD' (physical axis order), got {layout!r}")
    return layout


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, v_layout: str = "BHSD", *,
                 q_layout: str = "BHSD", k_layout: str = "BHSD",
                 ) -> tuple[int, int, int, int, int, int, int]:
    """Validate operand shapes in their layouts; return (B, H, Hkv, Sq, Sk, D, Dv)."""
    for name, layout in (("q_layout", q_layout), ("k_layout", k_layout), ("v_layout", v_layout)):
        check_layout(name, layout)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    b, h, sq, d = (q.shape[q_layout.index(a)] for a in "BHSD")
    bk, hkv, sk, dk = (k.shape[k_layout.index(a)] for a in "BHSD")
    bv, hv, sv, dv = (v.shape[v_layout.index(a)] for a in "BHSD")
    if bk != b or bv != b or dk != d or hv != hkv or sv != sk:
        raise ValueError(f"inconsistent shapes q={q.shape} ({q_layout}) k={k.shape} ({k_layout}) "
                         f"v={v.shape} ({v_layout})")
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    return b, h, hkv, sq, sk, d, dv


def kernel_layout_error(q_layout: str = CANONICAL, k_layout: str = CANONICAL,
                        v_layout: str = CANONICAL, o_layout: str = CANONICAL) -> str | None:
    """Why the Pallas kernels cannot read these operand layouts in place, or None if they can.

    Each layout must be a permutation of "BHSD"; q, k and o need D as their minor (last) axis;
    v needs D (standard) or S (transposed V) minor. B and H may sit anywhere.
    """
    for name, layout, minors in (("q_layout", q_layout, "D"), ("k_layout", k_layout, "D"),
                                 ("v_layout", v_layout, "DS"), ("o_layout", o_layout, "D")):
        try:
            check_layout(name, layout)
        except ValueError as err:
            return str(err)
        if layout[-1] not in minors:
            wanted = "D" if minors == "D" else "D (standard) or S (transposed V)"
            return (f"the Pallas kernels read {name}={layout!r} only with {wanted} as its minor "
                    f"(last) axis; transpose the operand first")
    return None


def kernel_supports_layouts(q_layout: str = CANONICAL, k_layout: str = CANONICAL,
                            v_layout: str = CANONICAL, o_layout: str = CANONICAL) -> bool:
    """True when the Pallas kernels read and write these layouts in place (no transposes)."""
    return kernel_layout_error(q_layout, k_layout, v_layout, o_layout) is None


def layout_shape(layout: str, sizes: dict[str, int]) -> tuple[int, ...]:
    """The physical shape of an array in `layout` with the given per-axis sizes."""
    return tuple(sizes[a] for a in layout)


def pallas_takes_scores(*, has_mask: bool = False, causal: bool = False, mask_fill: float = MASK_VALUE,
                        softcap: float = 0.0) -> bool:
    """Whether the Pallas (Triton) kernels compute these score modifications with the op's exact
    values. They take a boolean mask, the soft-cap and any fill but NaN and +inf: a mask, or a
    causal fill above their own, runs guarded (`flash_attention.GUARD_MARGIN`: where skipping
    hidden scores might not be exact, the whole call falls back to `attention_reference`)."""
    del has_mask, causal, softcap  # every mask and soft-cap is a kernel input now
    return not math.isnan(mask_fill) and mask_fill != math.inf


def node_takes_pallas(params) -> bool:
    """`pallas_takes_scores` of an IR attention node's params."""
    return pallas_takes_scores(has_mask=params.get("mask_kind") in ("bool", "bias+bool"), causal=bool(params.get("causal")),
                               mask_fill=float(params.get("mask_fill", MASK_VALUE)),
                               softcap=float(params.get("softcap", 0.0)))


def causal_mask(sq: int, sk: int) -> jax.Array:
    """[Sq, Sk] bool, True where query i may attend key j (j <= i, top-left aligned)."""
    return jnp.arange(sq)[:, None] >= jnp.arange(sk)[None, :]


def _subscripts(layout: str, letters: dict[str, str]) -> str:
    return "".join(letters[a] for a in layout)


#: the op's static attributes: one trace per combination of them and of the operands' shapes
#: (a model's layers lower the same attention once, not once per layer)
_STATIC = ("scale", "causal", "v_layout", "q_layout", "k_layout", "o_layout", "compute_dtype", "mask_fill", "softcap")


@functools.partial(jax.jit, static_argnames=_STATIC)
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
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    compute_dtype: str | None = None,
    mask_fill: float = MASK_VALUE,
    softcap: float = 0.0,
) -> jax.Array:
    """softmax(softcap((q @ k^T) * scale) + bias, masked) @ v, returned in ``o_layout`` in q.dtype.

    ``softcap`` > 0 caps the scaled scores as ``softcap * tanh(s / softcap)`` (before the bias);
    every position the boolean ``mask`` or the causal flag hides gets exactly ``mask_fill`` (the
    program's ``where(keep, s, fill)``): with a finite fill a row whose keys are all hidden averages
    V uniformly, with -inf it is NaN, as in the program the op was raised from.

    ``compute_dtype`` (a folded cast prologue): q, k and v are first cast to it, exactly as
    ``attention_reference(q.astype(dt), k.astype(dt), v.astype(dt))``; the result has that dtype.

    Each operand is stored in its own layout, a permutation of "BHSD" giving its physical axis
    order: q [B,H,Sq,D] and k [B,Hkv,Sk,D] by default; v [B,Hkv,Sk,Dv] ("BHSD") or [B,Hkv,Dv,Sk]
    ("BHDS", transposed V) or any other order; the result [B,H,Sq,Dv] by default.
    Query head h reads kv head h // (H // Hkv). Scores and softmax are float32; `bias` is
    additive and `mask` boolean (True = keep), both broadcastable to [B,H,Sq,Sk] (logical order,
    whatever the operand layouts). Plain JAX: layouts are einsum subscripts, no explicit copies.
    float32 operands are multiplied at ``Precision.HIGHEST`` (as the Pallas kernels do): at least
    as precise as the program raised, whatever precision its matmuls asked for (a GPU's default
    float32 matmul is TF32).
    """
    check_layout("o_layout", o_layout)
    if compute_dtype is not None:
        q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    b, h, hkv, sq, sk, d, dv = check_shapes(q, k, v, v_layout, q_layout=q_layout, k_layout=k_layout)
    g = h // hkv
    hq = q_layout.index("H")  # split query heads into (kv head, group) in place
    qg = q.reshape(q.shape[:hq] + (hkv, g) + q.shape[hq + 1:])
    q_sub = _subscripts(q_layout, {"B": "b", "H": "kg", "S": "q", "D": "d"})
    k_sub = _subscripts(k_layout, {"B": "b", "H": "k", "S": "s", "D": "d"})
    precision = lax.Precision.HIGHEST if jnp.float32 in (q.dtype, k.dtype, v.dtype) else None
    s = jnp.einsum(f"{q_sub},{k_sub}->bkgqs", qg, k, precision=precision, preferred_element_type=jnp.float32)
    s = s.reshape(b, h, sq, sk) * jnp.float32(scale)
    if softcap:
        s = jnp.float32(softcap) * jnp.tanh(s / jnp.float32(softcap))
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    keep = None
    if mask is not None:
        keep = jnp.broadcast_to(mask.astype(bool), s.shape)
    if causal:
        cm = causal_mask(sq, sk)
        keep = cm if keep is None else keep & cm
    if keep is not None:
        s = jnp.where(keep, s, jnp.float32(mask_fill))
    p = jax.nn.softmax(s, axis=-1).reshape(b, hkv, g, sq, sk)
    v_sub = _subscripts(v_layout, {"B": "b", "H": "k", "S": "s", "D": "e"})
    o_sub = _subscripts(o_layout, {"B": "b", "H": "kg", "S": "q", "D": "e"})
    o = jnp.einsum(f"bkgqs,{v_sub}->{o_sub}", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
    return o.reshape(layout_shape(o_layout, {"B": b, "H": h, "S": sq, "D": dv})).astype(q.dtype)
