"""float64 attention under ``jax_enable_x64``: raised, and computed at float32 precision (issue 19 probe).

    python bench/probe_attention_x64.py

Prints, for the forward and ``jax.grad`` (w.r.t. q, k, v) of plain softmax attention over float64
inputs, how many attention ops were raised and the largest |optimized - program| (float64 rounding
is about 1e-16; float32's about 1e-7). A probe, not a test: it asserts nothing.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqsat_attn as ea  # noqa: E402
from eqsat_attn.cost import for_device  # noqa: E402


def attention(q, k, v):
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.35, -1), v)


def loss_grad(q, k, v, cot):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)


def main() -> None:
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.standard_normal((2, 4, 16, 8))) for _ in range(4))
    for name, fn, args in (("forward", attention, (q, k, v)), ("jax.grad", loss_grad, (q, k, v, cot))):
        opt = ea.optimize(fn, cost_model=for_device("h100"))
        raised = len(opt.explain(*args).attention)
        err = max(float(jnp.abs(g - w).max()) for g, w in zip(jax.tree.leaves(opt(*args)), jax.tree.leaves(fn(*args))))
        print(f"float64 {name:8s} attention ops={raised} max|optimized - program|={err:.3g} "
              f"(dtype {jax.tree.leaves(opt(*args))[0].dtype})")


if __name__ == "__main__":
    main()
