"""Kernel choice for the Attention op: Pallas flash attention on GPU (the decode kernel for a few
queries against a long cache), plain JAX elsewhere."""

from __future__ import annotations

import jax

from .alibi import Alibi
from .decode_attention import decode_attention, takes_decode
from .flash_attention import flash_attention
from .reference import MASK_VALUE, attention_reference, kernel_layout_error, kernel_supports_layouts, pallas_takes_scores

__all__ = ["KERNELS", "attention", "chosen_kernel", "kernel_layout_error", "kernel_supports_layouts",
           "pallas_available", "pallas_takes_scores"]

KERNELS = ("auto", "pallas", "reference")


def pallas_available() -> bool:
    """True when the default backend is a GPU, where the Pallas Triton kernel compiles."""
    return jax.default_backend() == "gpu"


def chosen_kernel(kernel: str, *, exact_on_pallas: bool = True) -> str:
    """Resolve "auto" / "pallas" / "reference" to the kernel actually run: "pallas" or "reference".

    `exact_on_pallas`: `pallas_takes_scores` of the call (else the reference runs it).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not exact_on_pallas:
        return "reference"
    if kernel == "auto":
        return "pallas" if pallas_available() else "reference"
    return kernel


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    v_layout: str = "BHSD",
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    kernel: str = "auto",
    q_layout: str = "BHSD",
    k_layout: str = "BHSD",
    o_layout: str = "BHSD",
    compute_dtype: str | None = None,
    mask_fill: float = MASK_VALUE,
    softcap: float = 0.0,
    alibi: Alibi | None = None,
) -> jax.Array:
    """The Attention op (semantics: `attention_reference`) on the chosen kernel.

    Each operand is in its own layout (a permutation of "BHSD"); the result is in ``o_layout``.
    "pallas" runs in interpret mode off-GPU and reads the layouts in place when
    `kernel_supports_layouts` says so (else it raises ValueError: transpose first); the reference
    takes any layouts. A boolean `mask`, an additive bias, ``softcap`` and ``mask_fill`` are kernel
    inputs (masked calls run guarded: see `flash_attention`); a NaN or +inf fill runs the
    reference. ``compute_dtype``: q, k and v are cast to it inside the kernel (the Pallas kernel
    casts each loaded tile), result in that dtype. On "pallas", a decode-shaped call without a
    bias (`decode_attention.takes_decode`: Sq <= 16, Sk >= 1024, read off the static shapes) runs
    the decode kernel, the rest the flash kernel; both compute the op's values. ``alibi``
    (`alibi.Alibi`, instead of ``bias``): an additive bias given by static per-head slopes, which
    the flash kernel computes on Mosaic GPU; the other kernels get it materialised (the same values).
    """
    layouts = dict(q_layout=q_layout, k_layout=k_layout, v_layout=v_layout, o_layout=o_layout,
                   compute_dtype=compute_dtype)
    exact = pallas_takes_scores(has_mask=mask is not None, causal=causal, mask_fill=mask_fill, softcap=softcap)
    if chosen_kernel(kernel, exact_on_pallas=exact) == "pallas":
        sq, sk = q.shape[q_layout.index("S")], k.shape[k_layout.index("S")]
        if alibi is not None:
            return flash_attention(q, k, v, scale=scale, causal=causal, alibi=alibi, mask=mask,
                                   mask_fill=mask_fill, softcap=softcap, **layouts)
        if takes_decode(sq, sk, has_bias=bias is not None):
            return decode_attention(q, k, v, scale=scale, causal=causal, mask=mask, mask_fill=mask_fill,
                                    softcap=softcap, **layouts)
        return flash_attention(q, k, v, scale=scale, causal=causal, bias=bias, mask=mask, mask_fill=mask_fill,
                               softcap=softcap, **layouts)
    if alibi is not None:
        if bias is not None:
            raise ValueError("pass a bias or ALiBi slopes (alibi=), not both")
        bias = alibi.bias(q.shape[q_layout.index("S")], k.shape[k_layout.index("S")])
    return attention_reference(q, k, v, scale=scale, causal=causal, bias=bias, mask=mask, mask_fill=mask_fill,
                               softcap=softcap, **layouts)
