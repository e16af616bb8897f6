"""Attention under a device mesh (eqsat_attn/kernels/partitioned.py): batch- and head-sharded
inputs run per shard, with no all-gather, and the same values as jax.jit of the original.

Each check runs in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before jax
starts). On CPU the reference attention is plain JAX; the Pallas path runs in interpret mode,
so the custom_partitioning wrapper itself is compiled and run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    import os, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import eqsat_attn as ea
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def extreme(shape, seed):
        # normals with ±0, a denormal and large scores mixed in (finite: softmax of ±inf is NaN)
        values = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32).ravel()
        values[:6] = [0.0, -0.0, 1e-45, -1e-45, 30.0, -30.0]
        return values.reshape(shape)

    def sharded(x, spec):
        return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))

    def compiled(fn, *args):
        # (the compiled function, its all-gather instructions)
        exe = jax.jit(fn).lower(*args).compile()
        return exe, [line for line in exe.as_text().splitlines() if re.search(r"all-gather(-start)?\\(", line)]

    def gathers(fn, *args):
        return compiled(fn, *args)[1]

    def close(got, want, tol=2e-5):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
""")


def run_on_8_devices(body: str) -> str:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


def test_optimized_attention_under_a_mesh_needs_no_all_gather():
    """Data and tensor parallel (batch over "data", heads over "model"): the decorated function
    under jit, with the reference (plain JAX) and with Pallas (interpret mode) attention."""
    out = run_on_8_devices("""
        def mha(q, k, v):  # [B, S, H, D] each
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

        spec = P("data", None, "model", None)
        q, k, v = (sharded(extreme((8, 32, 4, 16), seed), spec) for seed in range(3))
        want = jax.jit(mha)(q, k, v)
        assert gathers(mha, q, k, v) == []
        for backend in ("reference", "pallas"):
            # priced for an H100, which takes attention at these shapes (the CPU row's reference
            # attention is within 0.3% of the einsums here): this test is about the mesh
            f = ea.optimize(mha, backend=backend, cost_model="roofline-h100")
            assert f.explain(q, k, v).after.count("attention") == 1
            got = jax.jit(f)(q, k, v)
            close(got, want)
            assert got.sharding.spec[:3] == ("data", None, "model"), got.sharding
            assert gathers(f, q, k, v) == [], backend
            uses_wrapper = "CustomSPMDPartitioning" in jax.jit(f).lower(q, k, v).as_text()
            assert uses_wrapper == (backend == "pallas"), backend
            print(backend, "ok")
    """)
    assert out.split() == ["reference", "ok", "pallas", "ok"]


def test_pallas_wrapper_keeps_grad_vmap_and_gqa():
    """The partitioned Pallas kernel: gradients, vmap (its axis sharded too) and grouped KV heads
    split with the query heads, and the packed-QKV kernel, each with no all-gather and the
    reference's values."""
    out = run_on_8_devices("""
        import functools
        from eqsat_attn.kernels import attention
        from eqsat_attn.kernels.partitioned import shard_attention

        layouts = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHDS", o_layout="BHSD")
        kern = functools.partial(attention, scale=0.25, causal=True, kernel="pallas", **layouts)
        ref = functools.partial(attention, scale=0.25, causal=True, kernel="reference", **layouts)
        f = lambda q, k, v: shard_attention(kern, q, k, v, **layouts)
        spec = P("data", "model", None, None)
        q = sharded(extreme((8, 4, 16, 16), 0), spec)
        k = sharded(extreme((8, 2, 16, 16), 1), spec)  # grouped: 2 query heads per kv head
        v = sharded(extreme((8, 2, 16, 16), 2), spec)
        exe, gathered = compiled(f, q, k, v)
        assert gathered == []
        close(exe(q, k, v), ref(q, k, v))
        loss = lambda fn: jax.grad(lambda *xs: (fn(*xs) ** 2).sum(), argnums=(0, 1, 2))
        exe, gathered = compiled(loss(f), q, k, v)
        assert gathered == []
        for got, want in zip(exe(q, k, v), loss(ref)(q, k, v)):
            close(got, want, 1e-4)
        print("grad ok")
        # without the wrapper the interpret-mode kernel is gathered onto every device
        assert len(gathers(kern, q, k, v)) > 0
        stack = lambda x: sharded(jnp.stack([x, -x]), P("model", "data"))
        qs, ks, vs = stack(q), stack(k), stack(v)
        exe, gathered = compiled(jax.vmap(f), qs, ks, vs)
        assert gathered == []
        close(exe(qs, ks, vs), jax.vmap(ref)(qs, ks, vs))
        print("vmap ok")

        from eqsat_attn.kernels.packed import packed_attention_reference, packed_flash_attention
        from eqsat_attn.kernels.partitioned import shard_packed_attention

        packed = dict(packed_layout="BS3HD", scale=0.25, causal=False, o_layout="BSHD")
        g = lambda qkv: shard_packed_attention(lambda x: packed_flash_attention(x, **packed), qkv,
                                               packed_layout="BS3HD", o_layout="BSHD")
        qkv = sharded(extreme((8, 16, 3, 4, 16), 3), P("data", None, None, "model"))
        exe, gathered = compiled(g, qkv)
        assert gathered == []
        close(exe(qkv), packed_attention_reference(qkv, **packed))
        print("packed ok")
    """)
    assert out.split() == ["grad", "ok", "vmap", "ok", "packed", "ok"]


def test_masked_and_biased_attention_is_split_with_its_mask():
    """A BERT-style key-padding mask ([B, Sk], sharded with the batch) and a bias broadcast over the
    batch ([1, H, Sq, Sk], sharded with the heads) travel with their attention's shards: the
    optimized function (Pallas in interpret mode) and its gradients (the bias's included) need no
    all-gather and give jax.jit's values."""
    out = run_on_8_devices("""
        def bert(q, k, v, keep, bias):  # q, k, v [B, S, H, D]
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25 + bias
            s = jnp.where(keep[:, None, None, :], s, -1e9)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

        spec = P("data", None, "model", None)
        q, k, v = (sharded(extreme((8, 32, 4, 16), seed), spec) for seed in range(3))
        keep = np.array(jax.random.uniform(jax.random.key(3), (8, 32)) > 0.3)
        keep[1] = False  # a padded-out sequence: every key hidden, the finite fill averages V
        keep = sharded(keep, P("data", None))
        bias = sharded(extreme((1, 4, 32, 32), 4), P(None, "model", None, None))
        f = ea.optimize(bert, backend="pallas")
        assert f.explain(q, k, v, keep, bias).after.count("attention") == 1
        close(jax.jit(f)(q, k, v, keep, bias), jax.jit(bert)(q, k, v, keep, bias))
        assert gathers(f, q, k, v, keep, bias) == []
        print("forward ok")
        loss = lambda fn: jax.grad(lambda *xs: (fn(*xs) ** 2).sum(), argnums=(0, 1, 2, 4))
        assert gathers(loss(f), q, k, v, keep, bias) == []
        for got, want in zip(jax.jit(loss(f))(q, k, v, keep, bias), jax.jit(loss(bert))(q, k, v, keep, bias)):
            close(got, want, 1e-4)
        print("grad ok")
    """)
    assert out.split() == ["forward", "ok", "grad", "ok"]


def test_a_bias_broadcast_over_batch_gets_its_gradient_summed_over_shards():
    """A bias given to the partitioned kernel with unit batch and head axes ([1, 1, Sq, Sk]) and
    one with no leading axes ([Sq, Sk]), batch and heads sharded: the bias's gradient is the sum
    over every shard's batch and heads (the reference's), with no all-gather of Q, K or V."""
    out = run_on_8_devices("""
        import functools
        from eqsat_attn.kernels import attention
        from eqsat_attn.kernels.partitioned import shard_attention

        layouts = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD")
        kern = lambda q, k, v, b: attention(q, k, v, scale=0.25, causal=False, kernel="pallas", bias=b, **layouts)
        ref = lambda q, k, v, b: attention(q, k, v, scale=0.25, causal=False, kernel="reference", bias=b, **layouts)
        f = lambda q, k, v, b: shard_attention(kern, q, k, v, b, **layouts)
        spec = P("data", "model", None, None)
        q, k, v = (sharded(extreme((8, 4, 16, 16), seed), spec) for seed in range(3))
        loss = lambda fn: jax.grad(lambda *xs: (fn(*xs) ** 2).sum(), argnums=(0, 1, 2, 3))
        for bias in (sharded(extreme((1, 1, 16, 16), 3), P()), sharded(extreme((16, 16), 4), P())):
            close(jax.jit(f)(q, k, v, bias), ref(q, k, v, bias))
            exe, gathered = compiled(loss(f), q, k, v, bias)
            qkv_gathers = [line for line in gathered if "f32[8,4,16,16]" in line]
            assert qkv_gathers == [], qkv_gathers
            # against the same kernel unsplit (gathered): equal up to the order of the bias's sums;
            # against the reference as the kernel's own tests compare (scores up to ±225 here)
            for got, same, want in zip(exe(q, k, v, bias), jax.jit(loss(kern))(q, k, v, bias), loss(ref)(q, k, v, bias)):
                close(got, same, 2e-5)
                close(got, want, 1e-2)
            print(bias.ndim, "ok")
    """)
    assert out.split() == ["4", "ok", "2", "ok"]
