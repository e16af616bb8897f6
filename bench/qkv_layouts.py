"""Projection layouts side by side (issue 9): (a) fused QKV + standard/packed attention, (b) fused
QKV + materialised Vᵀ + transposed-V attention, (c) fused QK + a V projection writing Vᵀ.

For each configuration, a Llama-style block (three projection weights as arguments) is optimised
once; the three variants are extracted from the same e-graph (`qkv_layouts.VariantModel`), the
default cost model's pick too, and all are timed in one run. The table says whether the pick was
the fastest. Configurations: prefill bf16 B4 S4096 E4096 H32, and decode-like B32 S1 attending
over a cache of 4096 (K and V are the cache concatenated with the new token's projections).
The pick is timed as a program of its own (it may be none of the three, e.g. three separate
projections). Decode caches are stored [B, H, S, D]: transposed-V attention then transposes the
whole V cache every step, in (b) and in (c) alike (`transpose.concatenate` moves the transpose
through the cache concatenation; in (c) the V projection writes the new token's Vᵀ as
[H, D, B, 1] and the cache is transposed to [H, D, B, S] to match). A variant extraction cannot
reach is shown as the form it fell back to, marked "variant not reached".

    python bench/qkv_layouts.py                 # GPU: writes bench/results/qkv-layouts-<device>-<date>.md
    python bench/qkv_layouts.py --cpu-smoke     # tiny CPU run: values of every variant agree
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):  # runnable as `python bench/qkv_layouts.py` from a checkout
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from common import device_tag, header, median_seconds, require_gpu, write_results  # noqa: E402

from eqsat_attn.capture import capture  # noqa: E402
from eqsat_attn.cost import current_device_model, program_cost  # noqa: E402
from eqsat_attn.lower import lower  # noqa: E402
from eqsat_attn.pipeline import Limits, OptimizeOptions, saturate  # noqa: E402
from eqsat_attn.qkv_layouts import VARIANTS, VariantModel, classify, extract_variant  # noqa: E402


def _heads(t, h):
    b, s, e = t.shape
    return t.reshape(b, s, h, e // h).transpose(0, 2, 1, 3)


def _attend(q, k, v):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)


def prefill_block(h):
    def block(x, wq, wk, wv):
        return _attend(_heads(x @ wq, h), _heads(x @ wk, h), _heads(x @ wv, h))
    return block


def decode_block(h):
    def block(x, wq, wk, wv, k_cache, v_cache):  # caches [B, H, S_cache, D]
        k = jnp.concatenate([k_cache, _heads(x @ wk, h)], axis=2)
        v = jnp.concatenate([v_cache, _heads(x @ wv, h)], axis=2)
        return _attend(_heads(x @ wq, h), k, v)
    return block


CONFIGS = {
    # name: (block factory, B, S, E, H, cache)
    "prefill B4 S4096 E4096 H32": (prefill_block, 4, 4096, 4096, 32, 0),
    "decode B32 S1 cache4096 E4096 H32": (decode_block, 32, 1, 4096, 32, 4096),
}
SMOKE = {
    "prefill (smoke) B2 S16 E32 H4": (prefill_block, 2, 16, 32, 4, 0),
    "decode (smoke) B2 S1 cache16 E32 H4": (decode_block, 2, 1, 32, 4, 16),
}


def make_args(b, s, e, h, cache, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, s, e)), dtype)
    ws = [jnp.asarray(rng.standard_normal((e, e)) / np.sqrt(e), dtype) for _ in range(3)]
    caches = [jnp.asarray(rng.standard_normal((b, h, cache, e // h)), dtype) for _ in range(2)] if cache else []
    return [x, *ws, *caches]


def run_config(name, spec, dtype, reps, console_lines):
    factory, b, s, e, h, cache = spec
    args = make_args(b, s, e, h, cache, dtype)
    program = capture(factory(h), *args).program
    model = current_device_model()
    egraph, enc, _ = saturate(program, OptimizeOptions(limits=Limits(iterations=30, nodes=200_000, seconds=60)))
    picked = extract_variant(egraph, enc, model)
    candidates = {f"({v})": extract_variant(egraph, enc, VariantModel.for_program(model, v, program)) for v in VARIANTS}
    candidates["pick"] = picked
    rows, outs, times = [], {}, {}
    for label, prog in candidates.items():
        fn = jax.jit(lambda *a, _f=lower(prog): _f(*a)[0])
        outs[label] = np.asarray(fn(*args), np.float32)
        times[label] = median_seconds(fn, args, reps)
        rows.append((label, classify(prog), program_cost(prog, model), times[label]))
    ref = outs["pick"]
    ok = all(np.allclose(o, ref, rtol=5e-2, atol=5e-2) for o in outs.values())
    # a variant the e-graph does not hold comes back as another form: shown, not compared
    reached = [r for r in rows if r[0] == "pick" or r[0] == f"({r[1]})"]
    fastest = min(reached, key=lambda r: r[3])
    pick_class = classify(picked)
    lines = [f"## {name} ({jnp.dtype(dtype).name})", "",
             "| program | variant | predicted (us) | measured (us) |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1] if r in reached else f'{r[1]} (variant not reached)'} | {r[2] * 1e6:.1f} | "
              f"{r[3] * 1e6:.1f} |" for r in rows]
    verdict = "yes" if fastest[1] == pick_class else f"no (fastest: {fastest[0]} {fastest[1]})"
    lines += ["", f"- cost model picked: {pick_class}; pick was the fastest program: {verdict}",
              f"- values agree across programs: {'ok' if ok else 'FAIL'}", ""]
    console_lines.extend(lines)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny float32 shapes on CPU (checks only)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    opts = parser.parse_args(argv)
    require_gpu("bench/qkv_layouts.py", opts.cpu_smoke)
    if importlib.util.find_spec("highspy") is None:  # (b), (c) are extracted exactly (extract_variant)
        raise SystemExit("bench/qkv_layouts.py needs highspy (the ILP extractor): install it, or on the device "
                         "machine carry its wheel in .whl/ (bench/results/README.md, 'Owed')")
    configs, dtype = (SMOKE, jnp.float32) if opts.cpu_smoke else (CONFIGS, jnp.bfloat16)
    reps = 2 if opts.cpu_smoke else opts.reps
    command = "python bench/qkv_layouts.py" + (" --cpu-smoke" if opts.cpu_smoke else "")
    lines = header("Projection layouts: fused QKV vs transposed V (issue 9)", command)
    ok = True
    for name, spec in configs.items():
        ok &= run_config(name, spec, dtype, reps, lines)
    text = "\n".join(lines) + "\n"

    print(text)
    default = None if opts.cpu_smoke else f"qkv-layouts-{device_tag()}-{dt.date.today():%Y-%m-%d}.md"
    write_results(text, opts.out, default)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
