"""Built-in example programs for the demo, the explorer and the benchmarks."""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class BlockShape:
    batch: int = 2
    seq: int = 64
    embed: int = 128
    heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads


def _layer_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale


def transformer_block(params: dict[str, jax.Array], x: jax.Array, heads: int = 4) -> jax.Array:
    """A pre-norm transformer block written the way libraries write it: projections,
    head split by reshape + transpose, softmax attention, head merge, gelu MLP."""
    b, s, e = x.shape
    d = e // heads
    h = _layer_norm(x, params["ln1"])

    def split(t: jax.Array) -> jax.Array:  # [B,S,E] -> [B,H,S,D]
        return t.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    q, k, v = (split(h @ params[n]) for n in ("wq", "wk", "wv"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)  # a Python float keeps bf16 bf16
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    # finfo.min, as Flax masks (bf16, f32): the Mosaic GPU kernel's masking gives these values exactly;
    # a finite fill above -0.7 * float32 max (-1e9) runs the guarded Triton kernel instead
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, s, e)
    x = x + out @ params["wo"]
    h = _layer_norm(x, params["ln2"])
    return x + jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def block_params(shape: BlockShape, seed: int = 0, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    e = shape.embed
    init = lambda k, *s: (jax.random.normal(k, s) / np.sqrt(s[0])).astype(dtype)  # noqa: E731
    return {
        "wq": init(keys[0], e, e), "wk": init(keys[1], e, e), "wv": init(keys[2], e, e),
        "wo": init(keys[3], e, e), "w1": init(keys[4], e, 4 * e), "w2": init(keys[5], 4 * e, e),
        "ln1": (1.0 + 0.1 * jax.random.normal(keys[6], (e,))).astype(dtype),
        "ln2": (1.0 - 0.1 * jax.random.normal(keys[6], (e,))).astype(dtype),
    }


def block_example(shape: BlockShape = BlockShape(), seed: int = 0) -> tuple[Callable[..., jax.Array], tuple[Any, ...]]:
    """The demo's function and arguments: (fn, (params, x))."""
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (shape.batch, shape.seq, shape.embed))
    return (lambda params, x: transformer_block(params, x, shape.heads)), (block_params(shape, seed), x)


EXAMPLES: dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
    "block": block_example,
}


def stacked_blocks(params_list: list[dict[str, jax.Array]], x: jax.Array, heads: int = 4) -> jax.Array:
    """``len(params_list)`` transformer blocks applied one after another (same shapes, own weights)."""
    for params in params_list:
        x = transformer_block(params, x, heads)
    return x


def stacked_example(
    layers: int, shape: BlockShape = BlockShape(), seed: int = 0, dtype: Any = jnp.float32
) -> tuple[Callable[..., jax.Array], tuple[Any, ...]]:
    """A ``layers``-deep stack of transformer blocks: (fn, (params_list, x)) (the scaling benchmark's)."""
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (shape.batch, shape.seq, shape.embed)).astype(dtype)
    params = [block_params(shape, seed + 1000 * i, dtype) for i in range(layers)]
    return (lambda params, x: stacked_blocks(params, x, shape.heads)), (params, x)


def attention_example(
    batch: int = 2, heads: int = 4, seq: int = 16, head_dim: int = 8, seed: int = 0, dtype: Any = jnp.float32
) -> tuple[Callable[..., jax.Array], tuple[Any, ...]]:
    """Hand-written einsum attention (the rules raise it to one attention op): (fn, (q, k, v))."""

    def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = (jax.random.normal(kk, (batch, heads, seq, head_dim)).astype(dtype) for kk in keys)
    return attention, (q, k, v)


def attention_vt_example(
    batch: int = 2, heads: int = 4, seq: int = 16, head_dim: int = 8, seed: int = 0, dtype: Any = jnp.float32
) -> tuple[Callable[..., jax.Array], tuple[Any, ...]]:
    """Attention whose V is produced by a projection (V = x @ wv, split into heads): the case where
    the transpose to V^T can be folded into V's producer. (fn, (x, wq, wk, wv))."""
    embed = heads * head_dim

    def block(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        split = lambda t: t.reshape(b, s, heads, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
        sc = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(head_dim)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(sc, axis=-1), v)

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(keys[0], (batch, seq, embed)).astype(dtype)
    ws = [(jax.random.normal(kk, (embed, embed)) / np.sqrt(embed)).astype(dtype) for kk in keys[1:]]
    return block, (x, *ws)


EXAMPLES.update({
    "attention": attention_example,
    "attention_vt": attention_vt_example,
    "stack2": lambda: stacked_example(2),
})
