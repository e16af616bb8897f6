"""Hand-written equivalent formulations of the cost-model experiment's blocks (--cpu).

The e-graph's variants of one block differ in layouts and transposes only, and on XLA:CPU most of
them run within a few percent of each other. These functions compute the same block with the
same arguments in ways that really differ in work and data movement, so the experiment's programs
span well over 2x: heads kept [B, S, H, D] (XLA:CPU copies operands whose batch axes are not
major), a materialised Kᵀ, projections split per head (eight small GEMMs and a stack instead of
one, or one attention per head), queries or keys in blocks (a split-key softmax merged as flash
decoding does), and the re-associations that trade a small GEMM for a large one
(scores as x · (W_q W_kᵀ) · xᵀ; P·V as (P·x)·W_v). Each is captured as it is written (no
rewriting) and priced like any other program. (Heads are joined with ``concatenate``, not
``jnp.stack``: JAX 0.12 has a ``stack`` primitive, which the IR carries as an opaque, unpriced op.)

Left out on purpose: scores as a broadcast product summed over D (``sum(q[..., None, :] * k)``).
XLA fuses the product into the reduction, so it never exists in memory, while the model prices
nodes one at a time and charges the product's write ([B, H, S, S, D]: 10x the measured time). The
optimizer never produces that form (no rule makes it), so it says nothing about its choices.

``prefill_formulations(heads, head_dim)`` matches `examples.attention_vt_example`
(fn(x, wq, wk, wv) -> [B, H, S, D]); ``decode_formulations(heads, head_dim)`` matches
`cost_model_experiment.decode_example` (fn(x_new, k_cache, v_cache, wq) -> [B, H, 1, D]).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Block = Callable[..., jax.Array]


def prefill_formulations(heads: int, head_dim: int) -> dict[str, Block]:
    """name -> an equivalent of the projected attention block (x, wq, wk, wv)."""
    scale = 1.0 / math.sqrt(head_dim)

    def proj_bshd(x: jax.Array, w: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        return (x @ w).reshape(b, s, heads, head_dim)

    def heads_bshd(x, wq, wk, wv):  # no head transposes: the einsums take [B, S, H, D]
        q, k, v = proj_bshd(x, wq), proj_bshd(x, wk), proj_bshd(x, wv)
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
        return jnp.einsum("bhqk,bkhd->bhqd", p, v)

    def k_transposed(x, wq, wk, wv):  # Kᵀ materialised as [B, H, D, S]
        q, v = (proj_bshd(x, w).transpose(0, 2, 1, 3) for w in (wq, wv))
        kt = proj_bshd(x, wk).transpose(0, 2, 3, 1)
        p = jax.nn.softmax(jnp.einsum("bhqd,bhds->bhqs", q, kt) * scale, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    def split_projections(x, wq, wk, wv):  # one GEMM per head and projection, stacked
        def per_head(w):
            return jnp.concatenate([(x @ w[:, h * head_dim:(h + 1) * head_dim])[:, None] for h in range(heads)], axis=1)

        q, k, v = per_head(wq), per_head(wk), per_head(wv)
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    def scores_via_weights(x, wq, wk, wv):  # q·kᵀ = x (W_q,h W_k,hᵀ) xᵀ: E/D times the score FLOPs
        e = x.shape[-1]
        a = jnp.einsum("ehd,fhd->hef", wq.reshape(e, heads, head_dim), wk.reshape(e, heads, head_dim))
        xa = jnp.einsum("bqe,hef->bhqf", x, a)
        p = jax.nn.softmax(jnp.einsum("bhqf,bkf->bhqk", xa, x) * scale, axis=-1)
        v = proj_bshd(x, wv).transpose(0, 2, 1, 3)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    def values_after_mix(x, wq, wk, wv):  # P·(x W_v) = (P·x) W_v: E/D times the P·V FLOPs
        e = x.shape[-1]
        q, k = (proj_bshd(x, w).transpose(0, 2, 1, 3) for w in (wq, wk))
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale, axis=-1)
        px = jnp.einsum("bhqk,bke->bhqe", p, x)
        return jnp.einsum("bhqe,ehd->bhqd", px, wv.reshape(e, heads, head_dim))

    def both_reassociated(x, wq, wk, wv):  # both of the above
        e = x.shape[-1]
        a = jnp.einsum("ehd,fhd->hef", wq.reshape(e, heads, head_dim), wk.reshape(e, heads, head_dim))
        xa = jnp.einsum("bqe,hef->bhqf", x, a)
        p = jax.nn.softmax(jnp.einsum("bhqf,bkf->bhqk", xa, x) * scale, axis=-1)
        px = jnp.einsum("bhqk,bke->bhqe", p, x)
        return jnp.einsum("bhqe,ehd->bhqd", px, wv.reshape(e, heads, head_dim))

    def query_blocks(x, wq, wk, wv, blocks=4):  # queries in blocks, one attention each, joined
        b, s, _ = x.shape
        q, k, v = (proj_bshd(x, w).transpose(0, 2, 1, 3) for w in (wq, wk, wv))
        step = s // blocks
        outs = []
        for i in range(blocks):
            p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q[:, :, i * step:(i + 1) * step], k) * scale, axis=-1)
            outs.append(jnp.einsum("bhqk,bhkd->bhqd", p, v))
        return jnp.concatenate(outs, axis=2)

    return {"heads [B,S,H,D]": heads_bshd, "queries in 4 blocks": query_blocks, "K^T materialised": k_transposed,
            "projections split per head": split_projections, "scores x(WqWk^T)x^T": scores_via_weights,
            "values (P x) Wv": values_after_mix, "both re-associated": both_reassociated}


def decode_formulations(heads: int, head_dim: int) -> dict[str, Block]:
    """name -> an equivalent of the decode step (x_new, k_cache, v_cache, wq)."""
    scale = 1.0 / math.sqrt(head_dim)

    def query(x_new, wq):
        return (x_new @ wq).reshape(x_new.shape[0], 1, heads, head_dim)  # [B, 1, H, D]

    def cache_bshd(x_new, k_cache, v_cache, wq):  # einsums read the cache as stored
        q = query(x_new, wq)
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k_cache) * scale, axis=-1)
        return jnp.einsum("bhqk,bkhd->bhqd", p, v_cache)

    def k_transposed(x_new, k_cache, v_cache, wq):  # Kᵀ materialised as [B, H, D, S]
        q = query(x_new, wq).transpose(0, 2, 1, 3)
        sc = jnp.einsum("bhqd,bhds->bhqs", q, k_cache.transpose(0, 2, 3, 1))
        p = jax.nn.softmax(sc * scale, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v_cache.transpose(0, 2, 1, 3))

    def split_heads(x_new, k_cache, v_cache, wq):  # one attention per head, stacked
        q = query(x_new, wq)
        outs = []
        for h in range(heads):
            sc = jnp.einsum("bqd,bkd->bqk", q[:, :, h], k_cache[:, :, h]) * scale
            outs.append(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(sc, axis=-1), v_cache[:, :, h])[:, None])
        return jnp.concatenate(outs, axis=1)

    def keys_chunked(x_new, k_cache, v_cache, wq, chunks=4):  # split-key softmax, merged (flash-decoding)
        q = query(x_new, wq)
        step = k_cache.shape[1] // chunks
        maxes, sums, outs = [], [], []
        for c in range(chunks):
            kc, vc = k_cache[:, c * step:(c + 1) * step], v_cache[:, c * step:(c + 1) * step]
            sc = jnp.einsum("bqhd,bkhd->bhqk", q, kc) * scale
            m = jnp.max(sc, axis=-1, keepdims=True)
            e = jnp.exp(sc - m)
            maxes.append(m)
            sums.append(jnp.sum(e, axis=-1, keepdims=True))
            outs.append(jnp.einsum("bhqk,bkhd->bhqd", e, vc))
        top = functools.reduce(jnp.maximum, maxes)
        weights = [jnp.exp(m - top) for m in maxes]
        total = sum(w * z for w, z in zip(weights, sums))
        return sum(w * o for w, o in zip(weights, outs)) / total

    def keys_via_weights(x_new, k_cache, v_cache, wq):  # q·kᵀ = x (W_q,h k_hᵀ): E/D x the score FLOPs
        e = x_new.shape[-1]
        wk = jnp.einsum("ehd,bkhd->bhek", wq.reshape(e, heads, head_dim), k_cache)
        p = jax.nn.softmax(jnp.einsum("bqe,bhek->bhqk", x_new, wk) * scale, axis=-1)
        return jnp.einsum("bhqk,bkhd->bhqd", p, v_cache)

    return {"cache [B,S,H,D] einsums": cache_bshd, "K^T materialised": k_transposed,
            "heads split": split_heads, "keys in 4 chunks": keys_chunked,
            "keys in 16 chunks": functools.partial(keys_chunked, chunks=16),
            "scores x(Wq k^T)": keys_via_weights}
