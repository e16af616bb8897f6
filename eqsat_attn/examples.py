"""Built-in example programs for the demo, the explorer and the benchmarks."""

from __future__ import annotations

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
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d).astype(np.float32)
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, -1e9)
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
