"""Attention kernels: reference semantics, Pallas flash attention (interpret mode), dispatcher,
and the benchmark's CPU smoke path. Expected values come from an independent float64 numpy
implementation (forward and analytic backward) written here."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqsat_attn.kernels import (
    attention,
    attention_reference,
    chosen_kernel,
    flash_attention,
    pallas_available,
    pallas_takes_scores,
)
from eqsat_attn.kernels.flash_attention import BLOCK_TABLE, TUNED_BLOCKS, block_sizes
from eqsat_attn.kernels.reference import layout_shape
from bench_scripts import load_bench
from test_kernel_masks import np_attention as masks_reference

pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")

NEG = -0.7 * float(np.finfo(np.float32).max)
ROOT = pathlib.Path(__file__).resolve().parents[1]
on_gpu = jax.default_backend() == "gpu"


def np_attention(q, k, v, do, *, scale, causal, v_layout="BHSD", bias=None, mask=None):
    """float64 forward o and gradients of sum(o * do) w.r.t. q, k, v, bias (`test_kernel_masks`'
    reference, with V and its gradient in ``v_layout``)."""
    transposed = v_layout == "BHDS"
    o, dq, dk, dv, ds = masks_reference(q, k, np.swapaxes(np.asarray(v), 2, 3) if transposed else v, do,
                                        scale=scale, causal=causal, bias=bias, mask=mask, fill=NEG)
    return o, dq, dk, np.swapaxes(dv, 2, 3) if transposed else dv, ds


def rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def make_inputs(seed, b, h, hkv, sq, sk, d, dv, v_layout, dtype):
    rng = np.random.default_rng(seed)
    q = rand(rng, (b, h, sq, d), dtype)
    k = rand(rng, (b, hkv, sk, d), dtype)
    vshape = (b, hkv, sk, dv) if v_layout == "BHSD" else (b, hkv, dv, sk)
    v = rand(rng, vshape, dtype)
    do = rand(rng, (b, h, sq, dv), dtype)
    return rng, q, k, v, do


def assert_close(got, want, tol, what):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max()
    bound = tol * (1.0 + np.abs(want).max())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


# --- reference semantics -------------------------------------------------------------------

@pytest.mark.parametrize(
    "h,hkv,sq,sk,causal,v_layout,extra",
    [
        (4, 2, 7, 11, True, "BHSD", "bias"),  # causal with Sq < Sk, GQA, bias
        (4, 1, 9, 5, True, "BHDS", "mask"),  # causal with Sq > Sk, MQA, transposed V, mask
        (2, 2, 6, 6, False, "BHSD", "both"),
        (6, 3, 5, 8, False, "BHDS", "none"),
    ],
)
def test_reference_matches_numpy(h, hkv, sq, sk, causal, v_layout, extra):
    rng, q, k, v, do = make_inputs(1, 2, h, hkv, sq, sk, 8, 12, v_layout, jnp.float32)
    bias = rand(rng, (1, h, sq, sk)) if extra in ("bias", "both") else None
    mask = jnp.asarray(rng.random((2, 1, sq, sk)) > 0.3) if extra in ("mask", "both") else None
    if mask is not None:  # one fully masked row: must be a uniform average, not NaN
        mask = mask.at[0, 0, 0, :].set(False)
    scale = 0.37
    fn = lambda q, k, v: attention_reference(q, k, v, scale=scale, causal=causal,
                                             v_layout=v_layout, bias=bias, mask=mask)
    o, vjp = jax.vjp(fn, q, k, v)
    want = np_attention(q, k, v, do, scale=scale, causal=causal, v_layout=v_layout,
                        bias=bias, mask=mask)
    assert_close(o, want[0], 1e-5, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")
    assert o.dtype == q.dtype and o.shape == (2, h, sq, 12)


def test_reference_rejects_bad_shapes():
    q = jnp.ones((1, 3, 4, 8))
    k = jnp.ones((1, 2, 4, 8))
    with pytest.raises(ValueError, match="multiple"):
        attention_reference(q, k, k, scale=1.0, causal=False)
    with pytest.raises(ValueError, match="v_layout"):
        attention_reference(q, q, q, scale=1.0, causal=False, v_layout="BSHX")
    with pytest.raises(ValueError, match="inconsistent"):  # BSHD is a layout; these shapes disagree
        attention_reference(q, q, q, scale=1.0, causal=False, v_layout="BSHD")


def test_reference_bf16_returns_q_dtype():
    _, q, k, v, do = make_inputs(2, 1, 2, 2, 8, 8, 16, 16, "BHSD", jnp.bfloat16)
    o = attention_reference(q, k, v, scale=0.25, causal=True)
    want = np_attention(q, k, v, do, scale=0.25, causal=True)[0]
    assert o.dtype == jnp.bfloat16
    assert_close(o, want, 2e-2, "o")


# --- Pallas flash attention, interpret mode ------------------------------------------------

FLASH_CASES = [
    # v_layout, causal, h, hkv, sq, sk, d, dtype, blocks
    ("BHSD", False, 4, 2, 40, 40, 16, jnp.float32, (16, 16)),  # ragged tail, GQA
    ("BHSD", True, 4, 2, 40, 56, 32, jnp.float32, (16, 16)),  # causal, Sq < Sk
    ("BHDS", True, 2, 1, 56, 40, 16, jnp.float32, (32, 16)),  # Sq > Sk, block_q != block_k
    ("BHDS", True, 2, 2, 64, 64, 64, jnp.float32, (None, None)),  # D=64, table blocks
    ("BHSD", True, 4, 2, 40, 40, 32, jnp.bfloat16, (16, 16)),
    ("BHDS", False, 4, 2, 40, 24, 32, jnp.bfloat16, (16, 16)),  # Sq > Sk
]


@pytest.mark.parametrize("v_layout,causal,h,hkv,sq,sk,d,dtype,blocks", FLASH_CASES)
def test_flash_forward_and_grad(v_layout, causal, h, hkv, sq, sk, d, dtype, blocks):
    _, q, k, v, do = make_inputs(3, 1, h, hkv, sq, sk, d, d, v_layout, dtype)
    scale = 1.0 / np.sqrt(d)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, v_layout=v_layout,
                                         block_q=blocks[0], block_k=blocks[1], interpret=True)
    o, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(do)
    want = np_attention(q, k, v, do, scale=scale, causal=causal, v_layout=v_layout)
    ftol, gtol = (2e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 3e-2)
    assert o.dtype == dtype
    assert_close(o, want[0], ftol, "o")
    for name, got, w, x in zip("qkv", grads, want[1:4], (q, k, v)):
        assert got.dtype == x.dtype
        assert_close(got, w, gtol, f"d{name}")


def test_flash_bias_and_grad():
    _, q, k, v, do = make_inputs(4, 2, 4, 2, 24, 40, 16, 16, "BHDS", jnp.float32)
    bias = rand(np.random.default_rng(5), (4, 24, 1))  # broadcasts over B and keys
    fn = lambda q, k, v, bias: flash_attention(q, k, v, scale=0.3, causal=True, v_layout="BHDS",
                                               bias=bias, block_q=16, block_k=16)
    o, vjp = jax.vjp(fn, q, k, v, bias)
    dq, dk, dv, dbias = vjp(do)
    want = np_attention(q, k, v, do, scale=0.3, causal=True, v_layout="BHDS", bias=bias)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", (dq, dk, dv), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")
    assert dbias.shape == bias.shape
    assert_close(dbias, want[4].sum(axis=(0, 3))[..., None], 1e-4, "dbias")


def test_flash_transposed_v_never_transposes(layout="BHDS"):
    """BHDS: no transpose of V outside the kernel, and P·V contracts the key axis of V^T."""
    _, q, k, v, _ = make_inputs(6, 1, 2, 2, 32, 32, 16, 16, layout, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v: flash_attention(
        q, k, v, scale=0.5, causal=False, v_layout=layout, interpret=True))(q, k, v)

    outside = list(_walk(jaxpr.jaxpr, into_kernels=False))
    assert "transpose" not in [e.primitive.name for e in outside]
    (call,) = [e for e in outside if e.primitive.name == "pallas_call"]
    kernel = call.params["jaxpr"]
    kernel = getattr(kernel, "jaxpr", kernel)
    found = [tuple(map(tuple, e.params["dimension_numbers"][0]))
             for e in _walk(kernel, into_kernels=True) if e.primitive.name == "dot_general"]
    assert "transpose" not in [e.primitive.name for e in _walk(kernel, into_kernels=True)]
    assert len(found) == 4 and all(c == ((1,), (1,)) for c in found), found  # QK^T, PV x 2 loops


def test_flash_rejects_bad_block():
    _, q, k, v, _ = make_inputs(7, 1, 1, 1, 16, 16, 16, 16, "BHSD", jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, scale=1.0, causal=False, block_q=24)


def test_block_table():
    assert block_sizes(4096, 4096, 128)[:2] == BLOCK_TABLE[128][:2]
    assert block_sizes(4096, 4096, 64) == BLOCK_TABLE[64]
    assert block_sizes(4096, 4096, 64, causal=True, v_transposed=True) == TUNED_BLOCKS[(64, True, True)]
    assert block_sizes(40, 24, 32)[:2] == (64, 32)  # clamped to short sequences
    assert block_sizes(8, 8, 8)[:2] == (16, 16)


# --- dispatcher ------------------------------------------------------------------------------

def test_dispatcher_kernels_agree():
    _, q, k, v, do = make_inputs(8, 1, 4, 2, 24, 24, 16, 16, "BHSD", jnp.float32)
    kw = dict(scale=0.25, causal=True)
    ref = attention(q, k, v, kernel="reference", **kw)
    pal = attention(q, k, v, kernel="pallas", **kw)
    assert_close(pal, ref, 2e-5, "pallas vs reference")
    assert_close(ref, np_attention(q, k, v, do, **kw)[0], 2e-5, "reference")
    with pytest.raises(ValueError):
        chosen_kernel("triton")


def test_dispatcher_mask_runs_pallas():
    _, q, k, v, do = make_inputs(9, 1, 2, 2, 8, 8, 16, 16, "BHSD", jnp.float32)
    mask = jnp.asarray(np.random.default_rng(9).random((8, 8)) > 0.5)
    assert chosen_kernel("pallas", exact_on_pallas=pallas_takes_scores(has_mask=True)) == "pallas"
    assert chosen_kernel("pallas", exact_on_pallas=pallas_takes_scores(mask_fill=float("nan"))) == "reference"
    got = attention(q, k, v, scale=0.5, causal=False, mask=mask, kernel="pallas")
    assert_close(got, np_attention(q, k, v, do, scale=0.5, causal=False, mask=mask)[0], 2e-5, "o")


@pytest.mark.skipif(on_gpu, reason="CPU behaviour")
def test_auto_is_reference_on_cpu():
    assert not pallas_available()
    assert chosen_kernel("auto") == "reference"
    assert chosen_kernel("pallas") == "pallas"


# --- Triton lowering without a GPU -------------------------------------------------------

def _pretend_hopper(monkeypatch):
    """Let the Pallas Triton lowering run on CPU by answering its GPU query (private jax API)."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError:
        pytest.skip("Pallas Triton lowering not importable")
    info = getattr(reg, "gpu_info_lib", None)
    if info is None or not hasattr(info, "get_gpu_info"):
        pytest.skip("this jax queries the GPU differently; lowering check runs on GPU only")
    monkeypatch.setattr(info, "get_gpu_info", lambda: type("Info", (), {"compute_capability": 90})())


@pytest.mark.skipif(on_gpu, reason="the GPU tests compile the real kernels")
@pytest.mark.parametrize("v_layout,causal,d,dtype,qko", [
    ("BHSD", False, 128, jnp.bfloat16, "BHSD"), ("BHSD", True, 64, jnp.float16, "BHSD"),
    ("BHDS", False, 64, jnp.float32, "BHSD"), ("BHDS", True, 256, jnp.bfloat16, "BHSD"),
    ("HDBS", True, 64, jnp.bfloat16, "BSHD"),  # strided tiles: q, k, o [B,S,H,D], V^T [H,D,B,S]
])
def test_kernels_lower_to_triton(monkeypatch, v_layout, causal, d, dtype, qko):
    """Forward and both backward kernels lower to Triton IR (ragged length, GQA)."""
    _pretend_hopper(monkeypatch)
    sizes = lambda hh: {"B": 1, "H": hh, "S": 1000, "D": d}
    q = jax.ShapeDtypeStruct(layout_shape(qko, sizes(4)), dtype)
    k = jax.ShapeDtypeStruct(layout_shape(qko, sizes(2)), dtype)
    v = jax.ShapeDtypeStruct(layout_shape(v_layout, sizes(2)), dtype)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.1, causal=causal, v_layout=v_layout,
                                         q_layout=qko, k_layout=qko, o_layout=qko, interpret=False)
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ


# --- GPU only: compiled Triton kernels ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU backend")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_compiled_matches_reference(v_layout, causal, d):
    _, q, k, v, do = make_inputs(10, 2, 8, 2, 1000, 1000, d, d, v_layout, jnp.bfloat16)
    scale = d ** -0.5
    assert chosen_kernel("auto") == "pallas"
    fn = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, v_layout=v_layout)
    o, vjp = jax.vjp(jax.jit(fn), q, k, v)
    want = np_attention(q, k, v, do, scale=scale, causal=causal, v_layout=v_layout)
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:4]):
        assert_close(got, w, 3e-2, f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a GPU backend")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_compiled_cast_prologue_matches_reference(v_layout, d):
    """The cast prologue compiled: f32 operands cast to bf16 tile by tile inside the kernels
    (the f32 tiles at D128 must fit in shared memory), forward and gradients."""
    _, q, k, v, do = make_inputs(12, 2, 8, 2, 1000, 1000, d, d, v_layout, jnp.float32)
    scale = d ** -0.5
    fn = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=True, v_layout=v_layout,  # noqa: E731
                                         compute_dtype="bfloat16")
    o, vjp = jax.vjp(jax.jit(fn), q, k, v)
    assert o.dtype == jnp.bfloat16
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]  # what the kernel computes on
    want = np_attention(*bf16, scale=scale, causal=True, v_layout=v_layout)
    assert_close(o, want[0], 2e-2, "o")
    for name, got, w in zip("qkv", vjp(do.astype(jnp.bfloat16)), want[1:4]):
        assert got.dtype == jnp.float32
        assert_close(got, w, 3e-2, f"d{name}")


# --- benchmark smoke ---------------------------------------------------------------------------

def test_bench_cpu_smoke(tmp_path):
    mod = load_bench("attention", "bench_attention")
    if not on_gpu:
        with pytest.raises(SystemExit, match="GPU"):
            mod.main(["--out", str(tmp_path / "x.md")])
    out = tmp_path / "smoke.md"
    mod.main(["--cpu-smoke", "--out", str(out)])
    text = out.read_text()
    assert "transposed-V" in text and "| ok" in text
    assert "FAIL" not in text
    mosaic_ok = [line for line in text.splitlines() if "ours Mosaic GPU" in line and line.endswith("| ok |")]
    # standard and transposed-V in both schedules, [B,S,H,D] in place: D64 smoke shape (interpreted)
    assert len(mosaic_ok) == 5 and sum("overlapped schedule" in line for line in mosaic_ok) == 2
    mods_ok = [line for line in text.splitlines() if any(w in line for w in ("boolean mask", "key lengths", "soft-cap"))
               and line.endswith("| ok |")]
    assert len(mods_ok) == 3  # the masked, key-length and soft-capped rows check out (S64 only)


def test_bench_times_the_rows_of_a_shape_in_interleaved_rounds():
    """Each round calls every row in turn, so a clock drift during the run reaches all rows alike;
    rows that failed to compile are skipped; each row gets reps calls in all."""
    mod = load_bench("attention", "bench_attention_rounds")
    calls = []
    make = lambda name: (lambda args: calls.append(name))  # noqa: E731
    prepared = [({"kernel": "a"}, make("a")), ({"kernel": "failed"}, None), ({"kernel": "b"}, make("b"))]
    mod.time_rows(prepared, mod.Shape(1, 1, 64, 64, False), None, reps=5, rounds=3)
    assert calls == ["a", "a", "b", "b", "a", "a", "b", "b", "a", "b"]
    assert prepared[0][0]["ms"] > 0 and prepared[2][0]["tflops"] > 0 and "ms" not in prepared[1][0]


def test_flash_pallas_backward_uneven_tiles_and_jax_backward_agree():
    """Default backward tables at D=128 give different dK/dV and dQ tiles (32x64 vs 64x32);
    the Pallas backward must match numpy and the plain-JAX recomputation backward."""
    _, q, k, v, do = make_inputs(11, 1, 2, 1, 40, 36, 128, 128, "BHDS", jnp.float32)
    kw = dict(scale=128 ** -0.5, causal=True, v_layout="BHDS", interpret=True)
    fn = lambda backward: (lambda q, k, v: flash_attention(q, k, v, backward=backward, **kw))
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(fn("pallas"), *a)[1](do))(q, k, v))
    assert "flash_attention_bwd_dkv_bhds" in jaxpr and "flash_attention_bwd_dq_bhds" in jaxpr
    _, vjp = jax.vjp(fn("pallas"), q, k, v)
    _, vjp_jax = jax.vjp(fn("jax"), q, k, v)
    want = np_attention(q, k, v, do, scale=kw["scale"], causal=True, v_layout="BHDS")
    for name, got, other, w in zip("qkv", vjp(do), vjp_jax(do), want[1:4]):
        assert_close(got, w, 1e-4, f"d{name} pallas")
        assert_close(other, w, 1e-4, f"d{name} jax")


# --- operand layouts read and written in place ------------------------------------------------

def _relayout(x, source, target):
    return np.transpose(np.asarray(x), [source.index(a) for a in target])


def _walk(jp, into_kernels: bool):
    """Equations of a jaxpr and its sub-jaxprs (pallas_call bodies only if into_kernels)."""
    for e in jp.eqns:
        yield e
        if e.primitive.name == "pallas_call" and not into_kernels:
            continue
        for p in e.params.values():
            for x in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(x, "jaxpr", x)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner, into_kernels)


def _layout_inputs(seed, layouts, b, h, hkv, sq, sk, d):
    """q, k, v, dO in their layouts, plus the float64 expectation (o, dq, dk, dv) in them too."""
    ql, kl, vl, ol = layouts
    _, q, k, v, do = make_inputs(seed, b, h, hkv, sq, sk, d, d, "BHSD", jnp.float32)
    return tuple(jnp.asarray(_relayout(x, "BHSD", l)) for x, l in ((q, ql), (k, kl), (v, vl), (do, ol)))


def _expected(q, k, v, do, layouts, **kw):
    ql, kl, vl, ol = layouts
    canon = [_relayout(x, l, "BHSD") for x, l in ((q, ql), (k, kl), (v, vl), (do, ol))]
    o, dq, dk, dv, _ = np_attention(*canon, **kw)
    return [_relayout(x, "BHSD", l) for x, l in ((o, ol), (dq, ql), (dk, kl), (dv, vl))]


LAYOUT_CASES = [
    # (q, k, v, o) layouts, causal, b, h, hkv, sq, sk, d
    (("BSHD", "BSHD", "BSHD", "BSHD"), True, 2, 4, 2, 40, 24, 16),  # all [B,S,H,D], GQA, ragged
    (("BSHD", "BSHD", "HDBS", "BSHD"), True, 2, 4, 2, 24, 40, 16),  # V^T as [H,D,B,S]
    (("HBSD", "SBHD", "DBHS", "BHSD"), False, 2, 2, 1, 24, 24, 32),  # mixed, MQA
]


@pytest.mark.parametrize("layouts,causal,b,h,hkv,sq,sk,d", LAYOUT_CASES)
def test_flash_layouts_forward_and_grad(layouts, causal, b, h, hkv, sq, sk, d):
    """Pallas and reference in non-canonical layouts vs float64; gradients in operand layouts."""
    q, k, v, do = _layout_inputs(12, layouts, b, h, hkv, sq, sk, d)
    kw = dict(zip(("q_layout", "k_layout", "v_layout", "o_layout"), layouts))
    scale = d ** -0.5
    want = _expected(q, k, v, do, layouts, scale=scale, causal=causal)
    flash = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, block_q=16,
                                            block_k=16, interpret=True, **kw)
    o, vjp = jax.vjp(flash, q, k, v)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:]):
        assert_close(got, w, 1e-4, f"d{name}")
    ref = attention(q, k, v, scale=scale, causal=causal, kernel="reference", **kw)
    assert_close(ref, want[0], 2e-5, "reference o")


@pytest.mark.parametrize("layouts", [("BSHD",) * 4, ("BSHD", "BSHD", "HDBS", "BSHD")])
def test_flash_layouts_never_transpose(layouts):
    """Forward and backward read and write the layouts in place: no transpose anywhere."""
    q, k, v, do = _layout_inputs(13, layouts, 1, 4, 2, 32, 32, 16)
    kw = dict(zip(("q_layout", "k_layout", "v_layout", "o_layout"), layouts))
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.5, causal=True, interpret=True, **kw)
    jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](do))(q, k, v)
    outside = [e.primitive.name for e in _walk(jaxpr.jaxpr, into_kernels=False)]
    assert outside.count("pallas_call") == 3 and "transpose" not in outside
    inside = [e.primitive.name for e in _walk(jaxpr.jaxpr, into_kernels=True)]
    assert "transpose" not in inside


def test_flash_rejects_layouts_it_cannot_read():
    from eqsat_attn.kernels import kernel_supports_layouts

    assert kernel_supports_layouts("BSHD", "SBHD", "HDBS", "HBSD")
    assert not kernel_supports_layouts(v_layout="BSDH") and not kernel_supports_layouts(o_layout="BHDS")
    q = jnp.ones((1, 2, 16, 16))
    with pytest.raises(ValueError, match="q_layout='BHDS'.*minor"):
        flash_attention(q, q, q, scale=1.0, causal=False, q_layout="BHDS")
    with pytest.raises(ValueError, match="permutation"):
        flash_attention(q, q, q, scale=1.0, causal=False, v_layout="BHS")


def _attention_node_program(shapes, layouts, causal=True):
    from eqsat_attn.ir import ProgramBuilder, TensorType

    b = ProgramBuilder()
    ins = [b.input(TensorType(s, "float32")) for s in shapes[:3]]
    q_layout, k_layout, v_layout, o_layout = layouts
    out = b.add("attention", ins, TensorType(shapes[3], "float32"), q_layout=q_layout,
                k_layout=k_layout, v_layout=v_layout, o_layout=o_layout, scale=0.25, causal=causal,
                mask_kind="none")
    return b.build([out])


@pytest.mark.parametrize("layouts,n_transposes", [
    (("BSHD", "BSHD", "HDBS", "BSHD"), 0),  # read in place
    (("BHDS", "BSHD", "BSDH", "BSHD"), 2),  # q without D minor, v with H minor: copied first
])
def test_lowered_attention_node_calls_kernel_in_place(layouts, n_transposes):
    """lower() of an IR attention node passes the layouts to the Pallas kernel: the only
    transposes are those of operands it cannot read, which is what the roofline model charges."""
    import eqsat_attn as ea
    from eqsat_attn.cost import H100, RooflineModel, view_of

    q, k, v, do = _layout_inputs(14, ("BSHD", "BSHD", "HDBS", "BSHD"), 1, 4, 2, 24, 24, 16)
    q, v = (jnp.asarray(_relayout(x, s, t)) for x, s, t in ((q, "BSHD", layouts[0]), (v, "HDBS", layouts[2])))
    o_shape = layout_shape(layouts[3], {"B": 1, "H": 4, "S": 24, "D": 16})
    program = _attention_node_program((q.shape, k.shape, v.shape, o_shape), layouts)
    fn = ea.lower(program, attention_kernel="pallas")
    jaxpr = jax.make_jaxpr(fn)(q, k, v)
    outside = [e.primitive.name for e in _walk(jaxpr.jaxpr, into_kernels=False)]
    assert outside.count("pallas_call") == 1 and outside.count("transpose") == n_transposes
    (got,) = fn(q, k, v)
    want = _expected(q, k, v, do, layouts, scale=0.25, causal=True)[0]
    assert_close(got, want, 2e-5, "o")
    (node_id,) = [i for i, n in enumerate(program.nodes) if n.op == "attention"]
    bd = RooflineModel(H100).breakdown(view_of(program, node_id))
    per_copy = RooflineModel(H100)._transpose_seconds
    charged = [x.nbytes for x in (q, v)] if n_transposes else []
    assert bd.extra_s == pytest.approx(sum(per_copy(n) + H100.launch_overhead for n in charged))


def test_flash_layouts_with_bias_use_the_jax_backward():
    """With a bias the plain-JAX recomputation backward runs; gradients still in operand layouts."""
    layouts = ("BSHD", "BSHD", "HDBS", "BSHD")
    q, k, v, do = _layout_inputs(15, layouts, 1, 2, 1, 16, 24, 16)
    bias = rand(np.random.default_rng(16), (2, 16, 24))
    kw = dict(zip(("q_layout", "k_layout", "v_layout", "o_layout"), layouts))
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.3, causal=False, bias=bias,
                                         interpret=True, **kw)
    o, vjp = jax.vjp(fn, q, k, v)
    want = _expected(q, k, v, do, layouts, scale=0.3, causal=False, bias=bias)
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", vjp(do), want[1:]):
        assert_close(got, w, 1e-4, f"d{name}")


# --- compute dtype: a cast prologue folded into the kernel -----------------------------------

CAST_CASES = [
    # v_layout, causal, h, hkv, sq, sk, d, cast operands (the others are given in bf16)
    ("BHSD", False, 4, 2, 40, 40, 16, "qkv"),  # ragged tail, GQA
    ("BHDS", True, 2, 1, 56, 40, 16, "qkv"),  # transposed V, causal, Sq > Sk
    ("BHDS", False, 2, 2, 32, 48, 32, "v"),  # only V read in f32
    ("BHSD", True, 2, 2, 48, 32, 16, "qk"),
]


def _cast_inputs(seed, v_layout, h, hkv, sq, sk, d, wide):
    """q, k, v with the operands named in ``wide`` in float32 (the others bfloat16), dO in bf16."""
    _, q, k, v, do = make_inputs(seed, 1, h, hkv, sq, sk, d, d, v_layout, jnp.float32)
    q, k, v = (x if n in wide else x.astype(jnp.bfloat16) for n, x in zip("qkv", (q, k, v)))
    return q, k, v, do.astype(jnp.bfloat16)


@pytest.mark.parametrize("v_layout,causal,h,hkv,sq,sk,d,wide", CAST_CASES)
def test_flash_compute_dtype_casts_tiles_in_kernel(v_layout, causal, h, hkv, sq, sk, d, wide):
    """flash_attention(q, k, v, compute_dtype=bf16) on f32 operands computes exactly what the
    kernel computes on the operands cast first (forward bit for bit); its gradients match the
    cast-first program's and the float64 expectation on the bf16-rounded operands, in the
    operands' own dtypes."""
    q, k, v, do = _cast_inputs(11, v_layout, h, hkv, sq, sk, d, wide)
    kw = dict(scale=d ** -0.5, causal=causal, v_layout=v_layout, block_q=16, block_k=16, interpret=True)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    fused = lambda q, k, v: flash_attention(q, k, v, compute_dtype="bfloat16", **kw)  # noqa: E731
    cast_first = lambda q, k, v: flash_attention(bf(q), bf(k), bf(v), **kw)  # noqa: E731
    o, vjp = jax.vjp(fused, q, k, v)
    o_ref, vjp_ref = jax.vjp(cast_first, q, k, v)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_ref, np.float32))
    ref = attention_reference(q, k, v, scale=kw["scale"], causal=causal, v_layout=v_layout, compute_dtype="bfloat16")
    assert ref.dtype == jnp.bfloat16
    assert_close(o, np.asarray(ref, np.float32), 2e-2, "o vs reference")
    want = np_attention(*(np.asarray(bf(x), np.float32) for x in (q, k, v, do)), scale=kw["scale"], causal=causal,
                        v_layout=v_layout)
    for name, got, same, w, x in zip("qkv", vjp(do), vjp_ref(do), want[1:4], (q, k, v)):
        assert got.dtype == x.dtype, name
        assert_close(got, np.asarray(jnp.asarray(same, jnp.float32)), 3e-2, f"d{name} vs cast first")
        assert_close(got, w, 3e-2, f"d{name}")


def test_flash_compute_dtype_reads_operands_without_converting_them():
    """The f32 operands go into the kernel as they are: no convert outside it."""
    q, k, v, _ = _cast_inputs(12, "BHDS", 2, 2, 32, 32, 16, "qkv")
    jaxpr = jax.make_jaxpr(lambda q, k, v: flash_attention(
        q, k, v, scale=0.5, causal=False, v_layout="BHDS", compute_dtype="bfloat16", interpret=True))(q, k, v)
    outside = [e.primitive.name for e in _walk(jaxpr.jaxpr, into_kernels=False)]
    assert "convert_element_type" not in outside and outside.count("pallas_call") == 1
    (call,) = [e for e in _walk(jaxpr.jaxpr, into_kernels=False) if e.primitive.name == "pallas_call"]
    assert [str(x.aval.dtype) for x in call.invars] == ["float32"] * 3


def test_flash_compute_dtype_with_bias_uses_the_jax_backward():
    q, k, v, do = _cast_inputs(13, "BHSD", 2, 1, 24, 40, 16, "qkv")
    bias = rand(np.random.default_rng(14), (2, 24, 1))
    kw = dict(scale=0.3, causal=True, bias=bias, block_q=16, block_k=16, interpret=True)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, compute_dtype="bfloat16", **kw), q, k, v)
    o_ref, vjp_ref = jax.vjp(lambda q, k, v: flash_attention(bf(q), bf(k), bf(v), **kw), q, k, v)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_ref, np.float32))
    for name, got, want, x in zip("qkv", vjp(do), vjp_ref(do), (q, k, v)):
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"d{name}")


@pytest.mark.skipif(on_gpu, reason="the GPU tests compile the real kernels")
@pytest.mark.parametrize("v_layout", ["BHSD", "BHDS"])
def test_compute_dtype_kernels_lower_to_triton(monkeypatch, v_layout):
    """The forward and both backward kernels with f32 operands cast to bf16 in-kernel lower to
    Triton IR (tiles are loaded as f32 and cast before the matmuls)."""
    _pretend_hopper(monkeypatch)
    sizes = lambda hh: {"B": 1, "H": hh, "S": 1000, "D": 64}  # noqa: E731
    q = jax.ShapeDtypeStruct(layout_shape("BHSD", sizes(4)), jnp.float32)
    k = jax.ShapeDtypeStruct(layout_shape("BHSD", sizes(2)), jnp.float32)
    v = jax.ShapeDtypeStruct(layout_shape(v_layout, sizes(2)), jnp.float32)
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.1, causal=True, v_layout=v_layout,  # noqa: E731
                                         compute_dtype="bfloat16", interpret=False)
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
