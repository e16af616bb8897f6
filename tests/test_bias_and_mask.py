"""Attention with an additive bias and a boolean mask together (mask kind "bias+bool", the scores
``where(keep, s + bias, fill)``): raised from `jax.nn.dot_product_attention`, Flax linen and
hand-written forms with the original values and gradients, on extreme inputs (±0, denormals,
large magnitudes, NaN and ±inf in the bias where the mask hides it and where it keeps it, rows
with every key hidden); the IR round trip, both extractors and the cost views; the Triton kernels
in interpret mode against float64."""

from __future__ import annotations

import importlib

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn import ir
from eqsat_attn.capture import capture
from eqsat_attn.cost import for_device, program_cost
from eqsat_attn.egraph.extract import OPERATION_TIE_BREAK, extract_program, op_view
from eqsat_attn.egraph.ilp import extract_program_ilp
from eqsat_attn.kernels import attention_reference, flash_attention
from eqsat_attn.lower import attention_mask_args, lower
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program, saturate
from test_kernel_masks import assert_close, np_attention, unbroadcast
from work_limits import SAFETY_NET_S

fa = importlib.import_module("eqsat_attn.kernels.flash_attention")
B, H, S, D = 2, 2, 8, 16
H100 = for_device("h100")
MIN32 = float(np.finfo(np.float32).min)


# --- inputs ---------------------------------------------------------------------------------

def extreme(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` with ±0, float32 denormals and large magnitudes at random entries."""
    flat = x.reshape(-1).copy()
    flat[rng.permutation(flat.size)[:6]] = [0.0, -0.0, 1e-40, -1e-40, 40.0, -40.0]
    return flat.reshape(x.shape)


def make_keep(rng: np.random.Generator, shape=(B, 1, S, S)) -> np.ndarray:
    """A random boolean mask with one query row hiding every key, one keeping every key (a key
    padding mask, one query row [B, 1, 1, Sk]: batch 0 hides every key)."""
    keep = rng.random(shape) < 0.6
    if shape[-2] == 1:
        keep[0] = False
        return keep
    keep[0, ..., 3, :] = False
    keep[-1, ..., 5, :] = True
    return keep


def make_bias(rng: np.random.Generator, keep: np.ndarray, shape=(B, H, S, S), kept_specials=True) -> np.ndarray:
    """Normal bias with NaN, ±inf and ±1e30 where ``keep`` hides (never seen by the op), and
    -inf, ±0, a denormal and -1e30 where it keeps (``kept_specials``)."""
    bias = rng.normal(size=shape).astype(np.float32) * 3
    full = np.broadcast_to(keep, shape)
    hidden, kept = np.argwhere(~full), np.argwhere(full)
    for n, i in enumerate(rng.permutation(len(hidden))[:12]):
        bias[tuple(hidden[i])] = [np.nan, np.inf, -np.inf, 1e30, -1e30, np.nan][n % 6]
    if kept_specials:
        for n, i in enumerate(rng.permutation(len(kept))[:5]):
            bias[tuple(kept[i])] = [-np.inf, 0.0, -0.0, 1e-40, -1e30][n]
    return bias


def qkv(rng: np.random.Generator, layout: str = "bhsd"):
    shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
    return tuple(jnp.asarray(extreme(rng.normal(size=shape).astype(np.float32), rng)) for _ in range(3))


def arguments(seed: int, layout: str = "bhsd", keep_shape=(B, 1, S, S), kept_nan: bool = False):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, layout)
    keep = make_keep(rng, keep_shape)
    bias = make_bias(rng, keep)
    if kept_nan:  # a NaN where the mask (and causality) keeps it: that row is NaN in the program and the op
        bias[-1, 0, 5, 0] = np.nan
    return q, k, v, jnp.asarray(bias), jnp.asarray(keep)


def assert_same(got, want, tol: float = 2e-5, what: str = "") -> None:
    """The same NaN and infinity positions; finite entries within tol (relative and absolute)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, what
        assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: NaN positions differ"
        assert np.array_equal(g[np.isinf(w)], w[np.isinf(w)]) and not np.isinf(g[~np.isinf(w)]).any(), what
        fin = np.isfinite(w)
        np.testing.assert_allclose(g[fin], w[fin], rtol=tol, atol=tol, err_msg=what)


def raised_kinds(optimized, *args) -> list[str]:
    return [a.mask_kind for a in optimized.explain(*args).attention]


def check_raised(fn, *arg_sets, backend: str = "auto"):
    """``fn`` optimized raises one "bias+bool" attention and keeps its values on every argument set."""
    optimized = ea.optimize(fn, cost_model=H100, backend=backend)
    for args in arg_sets:
        assert raised_kinds(optimized, *args) == ["bias+bool"], optimized.explain(*args).after
        assert_same(optimized(*args), fn(*args), what=fn.__name__)
    return optimized


# --- raising, with the program's values -----------------------------------------------------

def dpa(q, k, v, bias, keep):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep, implementation="xla")


def dpa_causal(q, k, v, bias, keep):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep, is_causal=True, implementation="xla")


@pytest.mark.parametrize("fn", [dpa, dpa_causal])
def test_jax_dot_product_attention_bias_and_mask(fn):
    check_raised(fn, arguments(0, "bshd"), arguments(1, "bshd", kept_nan=True))


def test_flax_linen_dot_product_attention_bias_and_mask():
    def flax_fn(q, k, v, bias, keep):
        return linen.dot_product_attention(q, k, v, bias=bias, mask=keep, deterministic=True)
    check_raised(flax_fn, arguments(2, "bshd"), arguments(3, "bshd", kept_nan=True))


@pytest.mark.parametrize("fill", [-1e4, -1e9, MIN32])
def test_hand_written_bhsd_with_exact_fills(fill):
    def where_biased(q, k, v, bias, keep):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, fill), axis=-1), v)
    args = arguments(4)
    low = args[:3] + (args[3] - 1e4, args[4])  # visible scores near the fill: it is not -inf
    more = [arguments(seed, kept_nan=seed % 2 == 0) for seed in range(100, 106)]  # one program, many inputs
    check_raised(where_biased, args, low, arguments(5, kept_nan=True), *more)


def causal() -> jax.Array:
    return jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]


def test_hand_written_bshd_causal_where_outside():
    """[B, S, H, D] operands, the scores divided by √D, a causal where around the boolean one."""
    def bshd(q, k, v, bias, keep):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D) - bias
        s = jnp.where(causal(), jnp.where(keep, s, -1e9), -1e9)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    check_raised(bshd, arguments(6, "bshd", keep_shape=(B, H, S, S)), arguments(7, "bshd", keep_shape=(B, H, S, S)))


def test_hand_written_causal_inside_and_conjunction():
    """The causal where inside the boolean one, and ``keep & causal`` in one where."""
    def inside(q, k, v, bias, keep):
        s = jnp.where(causal(), jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, -1e9), axis=-1), v)

    def conjunction(q, k, v, bias, keep):
        s = jnp.where(keep & causal(), jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
    for fn in (inside, conjunction):
        optimized = check_raised(fn, arguments(8))
        assert [a.causal for a in optimized.explain(*arguments(8)).attention] == [True]


def test_a_bias_added_after_the_mask_is_not_raised_as_a_pair():
    """``where(keep, s, fill) + bias`` shows the bias at hidden positions: not "bias+bool"."""
    def after(q, k, v, bias, keep):
        s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, -1e9) + bias
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
    args = arguments(9)
    optimized = ea.optimize(after, cost_model=H100)
    assert "bias+bool" not in raised_kinds(optimized, *args)
    assert_same(optimized(*args), after(*args))


def test_grad_through_the_raised_op():
    """jax.grad of the optimized function (the raised op's VJP) equals the original's, a NaN and
    ±inf bias where the mask hides included (its gradient there is exactly 0)."""
    def fn(q, k, v, bias, keep):
        s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
    args = arguments(10, keep_shape=(B, 1, 1, S))
    keep = args[4]
    w = jnp.asarray(np.random.default_rng(11).normal(size=(B, H, S, D)), jnp.float32)
    optimized = ea.optimize(fn, cost_model=H100)
    (info,) = optimized.explain(*args).attention
    assert info.mask_kind == "bias+bool" and "full+bias+bool (key padding), fill -1e+09" in str(info)

    def grads(f):
        return jax.grad(lambda q, k, v, b: jnp.sum(f(q, k, v, b, keep) * w), argnums=(0, 1, 2, 3))(*args[:4])
    got, want = grads(optimized), grads(fn)
    assert_same(got, want, tol=1e-4, what="grads")
    assert np.all(np.asarray(got[3])[~np.broadcast_to(np.asarray(keep), got[3].shape)] == 0.0)
    assert optimized.cache_info().misses == 1  # the gradient ran the optimized program


def test_pallas_backend_runs_the_pair_on_the_kernel():
    """backend="pallas" (interpret mode off-GPU) lowers the op to the Triton kernel with both."""
    def fn(q, k, v, bias, keep):
        s = jnp.where(causal(), jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, MIN32)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(keep, s, MIN32), axis=-1), v)
    optimized = check_raised(fn, arguments(12), arguments(13, kept_nan=True), backend="pallas")
    info = optimized.explain(*arguments(12)).attention[0]
    assert info.kernel == "pallas" and "causal+bias+bool (arbitrary)" in str(info)


# --- the IR, extraction and costs ----------------------------------------------------------

def _ir_attention(bias_shape, keep_shape, causal_flag: bool) -> ir.Program:
    b = ir.ProgramBuilder()
    t = ir.TensorType((B, H, S, D), "float32")
    q, k, v = (b.input(t) for _ in range(3))
    bias = b.input(ir.TensorType(bias_shape, "float32"))
    keep = b.input(ir.TensorType(keep_shape, "bool"))
    out = b.add("attention", (q, k, v, bias, keep), t, q_layout="BHSD", k_layout="BHSD", v_layout="BHSD",
                o_layout="BHSD", scale=0.25, causal=causal_flag, mask_kind="bias+bool", mask_fill=-1e9)
    return b.build([out])


def test_ir_attention_with_a_bias_and_a_mask_of_other_shapes_round_trips():
    """An IR node whose bias [1,H,S,S] and mask [B,1,S,S] differ in shape is encoded (both
    broadcast to one shape in the pair), saturated and extracted with its values."""
    program = _ir_attention((1, H, S, S), (B, 1, S, S), True)
    rng = np.random.default_rng(13)
    q, k, v = qkv(rng)
    keep = make_keep(rng)
    bias = make_bias(rng, keep.any(axis=0, keepdims=True), (1, H, S, S))  # specials where no batch keeps
    args = (q, k, v, jnp.asarray(bias), jnp.asarray(keep))
    result = optimize_program(program, OptimizeOptions(cost_model=H100))
    (node,) = [n for n in result.program.nodes if n.op == "attention"]
    assert node["mask_kind"] == "bias+bool" and len(node.inputs) == 5 and node["causal"]
    want = attention_reference(q, k, v, scale=0.25, causal=True, bias=args[3], mask=args[4], mask_fill=-1e9)
    assert_same(lower(result.program)(*args)[0], want)


def test_ir_attention_gradients_with_a_bias_and_a_mask_round_trips():
    """attention_vjp nodes with a bias and a mask (inputs q, k, v, do, bias, keep) keep both mask
    operands when encoded (as a gradient program's restart re-encodes its raised gradients), and
    their values."""
    b = ir.ProgramBuilder()
    t = ir.TensorType((B, H, S, D), "float32")
    q, k, v, do = (b.input(t) for _ in range(4))
    bias_type = ir.TensorType((B, H, S, S), "float32")
    bias, keep = b.input(bias_type), b.input(ir.TensorType((B, 1, S, S), "bool"))
    params = dict(q_layout="BHSD", k_layout="BHSD", v_layout="BHSD", o_layout="BHSD", scale=0.25, causal=False,
                  mask_kind="bias+bool", mask_fill=-1e9)
    outs = [b.add("attention_vjp", (q, k, v, do, bias, keep), bias_type if wrt == 3 else t, wrt=wrt, **params)
            for wrt in range(4)]
    result = optimize_program(b.build(outs), OptimizeOptions(cost_model=H100))
    assert [len(n.inputs) for n in result.program.nodes if n.op == "attention_vjp"] == [6] * 4
    rng = np.random.default_rng(15)
    (q_, k_, v_), do_ = qkv(rng), jnp.asarray(rng.standard_normal((B, H, S, D)).astype(np.float32))
    keep_ = make_keep(rng)
    bias_ = jnp.asarray(make_bias(rng, keep_))
    _, pullback = jax.vjp(lambda q, k, v, bias: attention_reference(q, k, v, scale=0.25, causal=False, bias=bias, mask=keep_,
                                                                    mask_fill=-1e9), q_, k_, v_, bias_)
    for got, want in zip(lower(result.program)(q_, k_, v_, do_, bias_, jnp.asarray(keep_)), pullback(do_)):
        assert_same(got, want)


def test_mask_operands_are_checked():
    with pytest.raises(ValueError, match="bias\\+bool.*got 4"):
        attention_mask_args("bias+bool", [0, 1, 2, 3])
    with pytest.raises(ValueError, match="unknown attention mask_kind"):
        attention_mask_args("bias&bool", [0, 1, 2, 3, 4])
    assert attention_mask_args("bias+bool", [0, 1, 2, 3, 4]) == {"bias": 3, "mask": 4}


def test_cost_views_price_both_operands_and_extractors_agree():
    """The pair's view holds the bias and the boolean mask (the IR node's five inputs), so greedy
    and ILP extraction price the raised op as the program cost model does."""
    pair = ir.TensorType((B, H, S, S), "float32")
    t = ir.TensorType((B, H, S, D), "float32")
    statics = [(0, 1, 2, 3), (0, 1, 3, 2), (0, 1, 2, 3), (0, 1, 2, 3), 0.25, 0, "bias+bool", "", -1e9, 0.0]
    view = op_view("attention", statics, [t, t, t, pair])
    assert [x.dtype for x in view.inputs[3:]] == ["float32", "bool"]

    def fn(q, k, v, bias, keep):
        s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
    args = arguments(14)
    egraph, enc, _ = saturate(capture(fn, *args).program, OptimizeOptions(limits=Limits(seconds=SAFETY_NET_S)))
    greedy, greedy_cost = extract_program(egraph, enc, H100)
    exact, objective = extract_program_ilp(egraph, enc, H100)
    for program, cost in ((greedy, greedy_cost), (exact, objective)):
        assert [n["mask_kind"] for n in program.nodes if n.op == "attention"] == ["bias+bool"]
        # extraction adds its tie-break per operation (extract.OPERATION_TIE_BREAK) to what the model prices
        ties = OPERATION_TIE_BREAK * len(program.nodes)
        assert cost == pytest.approx(program_cost(program, H100), rel=1e-9, abs=ties)
        assert_same(lower(program)(*args)[0], fn(*args))


# --- the Triton kernels in interpret mode, against float64 ----------------------------------

@pytest.fixture
def no_reference(monkeypatch):
    """The guard's fallback poisoned with NaN: a matching result ran the kernels' fast path."""
    real = fa._reference
    monkeypatch.setattr(fa, "_reference", lambda *a: real(*a) * jnp.nan)


@pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
@pytest.mark.parametrize("causal_flag,fill", [(False, -1e9), (True, MIN32)])
def test_kernels_hide_the_bias_where_the_mask_does(no_reference, causal_flag, fill):
    """Forward and gradients (q, k, v, bias) of the interpreted kernels with a bias and a mask:
    NaN / ±inf / ±1e30 bias entries where the mask hides them never show, a row hiding every key
    is the uniform average, and the fast path (no fallback) gives the float64 values."""
    rng = np.random.default_rng(15 + causal_flag)
    sq, sk = 32, 48
    q = jnp.asarray(extreme(rng.normal(size=(B, 2 * H, sq, D)).astype(np.float32), rng))
    k, v = (jnp.asarray(extreme(rng.normal(size=(B, H, sk, D)).astype(np.float32), rng)) for _ in range(2))
    keep = make_keep(rng, (B, 1, sq, sk))
    bias = jnp.asarray(make_bias(rng, keep, (B, 2 * H, sq, sk), kept_specials=False))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    keep = jnp.asarray(keep)

    def fn(q, k, v, bias):
        return flash_attention(q, k, v, bias=bias, mask=keep, scale=0.25, causal=causal_flag, mask_fill=fill,
                               block_q=16, block_k=16, interpret=True)
    o, vjp = jax.vjp(fn, q, k, v, bias)
    grads = vjp(do)
    want = np_attention(q, k, v, do, scale=0.25, causal=causal_flag, bias=bias, mask=keep, fill=fill)
    assert np.isfinite(np.asarray(o)).all()
    assert_close(o, want[0], 2e-5, "o")
    for name, got, w in zip("qkv", grads, want[1:4]):
        assert_close(got, w, 1e-4, f"d{name}")
    assert_close(grads[3], unbroadcast(want[4], bias.shape), 1e-4, "dbias")
    hidden = ~np.broadcast_to(np.asarray(keep), bias.shape)
    assert np.all(np.asarray(grads[3])[hidden] == 0.0)


@pytest.mark.usefixtures("full_f32_matmuls_on_gpu")
def test_kernel_with_a_nan_bias_it_keeps_matches_the_reference():
    """A NaN bias at a kept position makes that row NaN in the op: the guard runs the reference."""
    rng = np.random.default_rng(17)
    q, k, v = (jnp.asarray(rng.normal(size=(1, H, 32, D)), jnp.float32) for _ in range(3))
    keep = make_keep(rng, (1, 1, 32, 32))
    bias = make_bias(rng, keep, (1, H, 32, 32))
    bias[0, 1, 7, np.argmax(keep[0, 0, 7])] = np.nan
    kw = dict(scale=0.25, causal=False, bias=jnp.asarray(bias), mask=jnp.asarray(keep), mask_fill=-1e4)
    got = flash_attention(q, k, v, block_q=16, block_k=16, interpret=True, **kw)
    assert_same(got, attention_reference(q, k, v, **kw))
    assert np.isnan(np.asarray(got)[0, 1, 7]).all() and np.isfinite(np.asarray(got)[0, 0]).all()


def test_explorer_prices_and_draws_the_pair(tmp_path):
    """ea.explore: the "bias+bool" attention e-nodes are priced (finite, both operands) and drawn."""
    def fn(q, k, v, bias, keep):
        s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + bias, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
    ex = ea.explore(fn, *arguments(18))
    ex.saturate()
    why = ex.why("attention", "roofline-h100")
    paired = [a for c in why.classes for a in c.alternatives if "mask=bias+bool" in a.description]
    assert paired and all(np.isfinite(a.total) for a in paired), str(why)
    best = ex.extract("roofline-h100")
    assert [n["mask_kind"] for n in best.program.nodes if n.op == "attention"] == ["bias+bool"]
    svg = ex.svg(tmp_path / "pair.svg", focus="attention", fold=True)
    assert "bias+bool" in svg


def test_a_broadcast_bias_and_mask_reach_the_kernel_unbroadcast(monkeypatch):
    """A key-padding bias [B, 1, 1, Sk] and a key mask [B, Sk], spread over heads and queries by
    the program's broadcasts, reach the attention kernel as [B, 1, 1, Sk] (the kernels read them
    without materialising [B, H, Sq, Sk]), with the program's values: extreme bias entries."""
    lowering = importlib.import_module("eqsat_attn.lower")
    seen = []

    def recording(*args, **kwargs):
        seen.append({name: kwargs[name].shape for name in ("bias", "mask") if name in kwargs})
        return attention(*args, **kwargs)

    attention = lowering.attention
    monkeypatch.setattr(lowering, "attention", recording)

    def fn(q, k, v, key_bias, keys):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25 + key_bias[:, None, None, :]
        s = jnp.where(keys[:, None, None, :], s, MIN32)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    rng = np.random.default_rng(7)
    q, k, v = qkv(rng)
    keys = make_keep(rng, (B, 1, 1, S))[:, 0, 0, :]
    key_bias = make_bias(rng, keys[:, None, None, :], shape=(B, 1, 1, S))[:, 0, 0, :]
    optimized = ea.optimize(fn, cost_model=H100)
    args = (q, k, v, jnp.asarray(key_bias), jnp.asarray(keys))
    assert raised_kinds(optimized, *args) == ["bias+bool"]
    assert_same(optimized(*args), fn(*args), what="key padding")
    assert seen and all(shapes == {"bias": (B, 1, 1, S), "mask": (B, 1, 1, S)} for shapes in seen), seen
    # gradients: with respect to q, k, v the backward reads both unbroadcast too; with respect to
    # the bias as well, the bias keeps its full shape (its gradient has that shape)
    for argnums in ((0, 1, 2), (0, 1, 2, 3)):
        grad = jax.grad(lambda *a: jnp.sum(fn(*a) * v), argnums=argnums)
        seen.clear()
        optimized_grad = ea.optimize(grad, cost_model=H100)
        assert_same(optimized_grad(*args), grad(*args), what=f"grad {argnums}")
        assert seen, optimized_grad.explain(*args).after
        want = (B, 1, 1, S) if len(argnums) == 3 else (B, H, S, S)
        assert all(shapes.get("bias") == want and shapes.get("mask") == (B, 1, 1, S) for shapes in seen), seen
