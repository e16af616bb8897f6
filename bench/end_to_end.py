"""End-to-end transformer blocks on a GPU (issue 6): jax.jit vs eqsat_attn.optimize vs cuDNN.

    python bench/end_to_end.py                       # GPU: B4 S4096 E4096 H32 bf16, writes bench/results/end-to-end-<device>-<date>.md
    python bench/end_to_end.py --cpu-smoke [--out F] # tiny f32 shapes on CPU: checks the script only
    eqsat-attn bench end-to-end [...]

Rows (forward pass, median of --reps timed calls after warm-up; "max err" against the jax.jit row):
- flax: a Flax linen pre-norm block (nn.MultiHeadDotProductAttention, causal mask, gelu MLP)
  under jax.jit, and under jax.jit(eqsat_attn.optimize(...)).
- hand-written: `examples.transformer_block` (einsum attention, causal) under jax.jit and under
  jax.jit(eqsat_attn.optimize(...)), and the same block with jax.nn.dot_product_attention(
  implementation="cudnn") (the tuned-kernel ceiling; "xla" in --cpu-smoke runs).
The optimizer column also reports the chosen V layout and the optimizer's own time.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import device_tag, header, median_seconds, require_gpu, write_results  # noqa: E402

import eqsat_attn as ea  # noqa: E402
from eqsat_attn import examples  # noqa: E402

GPU_SHAPE = examples.BlockShape(batch=4, seq=4096, embed=4096, heads=32)
SMOKE_SHAPE = examples.BlockShape(batch=1, seq=16, embed=32, heads=2)


def cudnn_block(params: dict[str, jax.Array], x: jax.Array, heads: int, implementation: str) -> jax.Array:
    """`examples.transformer_block` with jax.nn.dot_product_attention in [B, S, H, D] layout."""
    b, s, e = x.shape
    d = e // heads
    h = examples._layer_norm(x, params["ln1"])
    q, k, v = ((h @ params[n]).reshape(b, s, heads, d) for n in ("wq", "wk", "wv"))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation).reshape(b, s, e)
    x = x + out @ params["wo"]
    h = examples._layer_norm(x, params["ln2"])
    return x + jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def flax_block(shape: examples.BlockShape, dtype: Any) -> tuple[Any, Any]:
    import flax.linen as nn

    class Block(nn.Module):
        heads: int
        embed: int

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.LayerNorm(dtype=dtype)(x)
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2], dtype=jnp.int32))
            h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=dtype, param_dtype=dtype)(h, h, mask=mask)
            x = x + h
            h = nn.LayerNorm(dtype=dtype)(x)
            h = nn.Dense(4 * self.embed, dtype=dtype, param_dtype=dtype)(h)
            return x + nn.Dense(self.embed, dtype=dtype, param_dtype=dtype)(nn.gelu(h))

    return Block(shape.heads, shape.embed), None


def run(shape: examples.BlockShape, dtype: Any, reps: int, smoke: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    x = jax.random.normal(jax.random.PRNGKey(1), (shape.batch, shape.seq, shape.embed)).astype(dtype)

    def add(group: str, name: str, fn: Any, args: tuple, reference: Any = None, report: Any = None) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        first = time.perf_counter() - start
        t = median_seconds(fn, args, reps)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32)))) if reference is not None else 0.0
        rows.append({"group": group, "variant": name, "seconds": t, "first_call": first, "err": err,
                     "v_layouts": ", ".join(a.v_layout for a in report.attention) if report else "",
                     "optimizer_s": report.timings.get("optimize", 0.0) if report else 0.0})
        return out

    # Flax linen
    module, _ = flax_block(shape, dtype)
    variables = module.init(jax.random.PRNGKey(0), x)
    apply = lambda variables, x: module.apply(variables, x)  # noqa: E731
    ref = add("flax", "jax.jit", jax.jit(apply), (variables, x))
    opt = ea.optimize(apply)
    add("flax", "jax.jit(ea.optimize)", jax.jit(opt), (variables, x), ref, opt.explain(variables, x))

    # hand-written
    params = examples.block_params(shape, 0, dtype)
    block = lambda params, x: examples.transformer_block(params, x, shape.heads)  # noqa: E731
    ref = add("hand-written", "jax.jit", jax.jit(block), (params, x))
    opt = ea.optimize(block)
    add("hand-written", "jax.jit(ea.optimize)", jax.jit(opt), (params, x), ref, opt.explain(params, x))
    impl = "xla" if smoke else "cudnn"
    add("hand-written", f"dot_product_attention({impl})",
        jax.jit(lambda p, x: cudnn_block(p, x, shape.heads, impl)), (params, x), ref)
    return rows


def render(rows: list[dict[str, Any]], shape: examples.BlockShape, dtype: Any, command: str) -> str:
    lines = header("End-to-end transformer block", command)
    lines += [f"shape B{shape.batch} S{shape.seq} E{shape.embed} H{shape.heads} {jnp.dtype(dtype).name}, causal, forward", "",
              "| block | variant | median ms | vs jax.jit | first call s | max err | V layout chosen | optimizer s |",
              "|:---|:---|---:|---:|---:|---:|:---|---:|"]
    base = {r["group"]: r["seconds"] for r in rows if r["variant"] == "jax.jit"}
    for r in rows:
        lines.append(f"| {r['group']} | {r['variant']} | {r['seconds'] * 1e3:.3f} | {base[r['group']] / r['seconds']:.2f}x | "
                     f"{r['first_call']:.2f} | {r['err']:.3g} | {r['v_layouts'] or '-'} | {r['optimizer_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny f32 shapes on CPU (checks the script only)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    ns = parser.parse_args(argv)
    require_gpu("bench/end_to_end.py", ns.cpu_smoke)
    smoke = ns.cpu_smoke and not jax.devices()[0].platform == "gpu"
    shape, dtype = (SMOKE_SHAPE, jnp.float32) if ns.cpu_smoke else (GPU_SHAPE, jnp.bfloat16)
    reps = ns.reps or (3 if ns.cpu_smoke else 20)
    command = "python bench/end_to_end.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"end-to-end blocks, {reps} repetitions each..."):
        rows = run(shape, dtype, reps, smoke)
    text = render(rows, shape, dtype, command.strip())
    print(text)
    default = None if ns.cpu_smoke else f"end-to-end-{device_tag()}-{time.strftime('%Y-%m-%d')}.md"
    write_results(text, ns.out, default, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
