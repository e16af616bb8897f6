"""Attention inside ``lax.scan`` over layers and inside ``jax.checkpoint``: the bodies are
optimized as programs of their own (eqsat_attn/nested.py), the calls around them unchanged."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqsat_attn as ea
from eqsat_attn import nested
from eqsat_attn.cost import for_device
from eqsat_attn.nested import NestedCall
from work_limits import SAFETY_NET_S

B, H, S, D = 2, 2, 8, 4
E = H * D
LAYERS = 2
#: enough search to raise attention in one layer's body, small enough to stay fast
LIMITS = ea.Limits(iterations=10, nodes=50_000, seconds=SAFETY_NET_S)


def attention(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


def heads(x):
    return x.reshape(B, S, H, D).transpose(0, 2, 1, 3)


def layer(x, w):
    """One transformer-ish layer: Q/K/V projections, attention, a residual."""
    o = attention(heads(x @ w[0]), heads(x @ w[1]), heads(x @ w[2]))
    return x + jnp.tanh(o.transpose(0, 2, 1, 3).reshape(B, S, E))


def scan_stack(ws, x):
    y, _ = lax.scan(lambda c, w: (layer(c, w), None), x, ws, unroll=2)
    return y


def checkpointed(w, x):
    return jax.checkpoint(layer, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)(x, w)


def weights(seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (LAYERS, 3, E, E)) / np.sqrt(E)


def activations(seed: int = 1) -> jax.Array:
    """Random activations with extreme values in batch 1 (±0, denormals, near-overflow, inf,
    nan); batch 0 stays finite, so its values are compared as numbers."""
    x = np.array(jax.random.normal(jax.random.key(seed), (B, S, E)))
    x[0, 0, :4] = [0.0, -0.0, 1e-40, -1e-42]
    x[1, 0, :4] = [3e38, -3e38, np.inf, np.nan]
    x[1, 1, :2] = [-np.inf, 1e-45]
    return jnp.asarray(x, jnp.float32)


def fresh(fn):
    return ea.optimize(fn, cost_model=for_device("h100"), backend="reference", limits=LIMITS)


@functools.cache
def optimized(fn):
    """One optimized function per original, shared by the tests (its cache too)."""
    return fresh(fn)


def assert_close(got, want) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, equal_nan=True)


def body_calls(program) -> list:
    return [n["call"] for n in program.nodes if n.op == "opaque"]


def assert_same_call_but_body(before, after, name: str) -> None:
    """``after`` re-binds ``before``'s primitive with the same parameters except the body, whose
    input and output avals (weak types included) are the original's."""
    assert isinstance(after, NestedCall) and not isinstance(before, NestedCall)
    assert after.primitive is before.primitive and after.out_types == before.out_types
    assert {k: v for k, v in after.params.items() if k != "jaxpr"} == {k: v for k, v in before.params.items() if k != "jaxpr"}
    old, new = before.params["jaxpr"], after.params["jaxpr"]
    assert type(old) is type(new) and new is not old
    for side in ("invars", "outvars"):
        assert nested._avals(getattr(new, side)) == nested._avals(getattr(old, side))
    assert after.where == f"{name} body"


def test_attention_inside_a_scan_over_layers_is_raised() -> None:
    ws, x = weights(), activations()
    fn = optimized(scan_stack)
    report = fn.explain(ws, x)
    (info,) = report.attention
    assert info.inside == "scan body" and str(info).startswith("in scan body: attention ")
    assert "in scan body: attention" in report.summary()
    assert "\n\nafter, scan body:\nprogram(" in str(report)
    assert report.cost_before > report.cost_after > 0  # the body's costs, times its length
    assert report.rules_fired.get("attention_raise.attention", 0) >= 1
    (before,), (after,) = body_calls(report.before), body_calls(report.after)
    assert_same_call_but_body(before, after, "scan")
    assert after.params["unroll"] == 2 and after.runs == LAYERS
    assert after.body.count("attention") + after.body.count("packed_attention") == 1
    assert_close(fn(ws, x), scan_stack(ws, x))
    assert_close(jax.jit(fn)(ws, x), scan_stack(ws, x))


def test_gradients_through_an_optimized_scan_body_are_the_originals() -> None:
    ws, x = weights(2), activations(3)[:1].repeat(B, axis=0)  # finite: gradients compared as numbers
    fn = optimized(scan_stack)

    def loss(f):
        return lambda ws, x: jnp.sum(f(ws, x) ** 2)

    want = jax.jit(jax.grad(loss(scan_stack), argnums=(0, 1)))(ws, x)
    assert_close(jax.grad(loss(fn), argnums=(0, 1))(ws, x), want)
    assert_close(jax.jit(jax.grad(loss(fn)))(ws, x), want[0])


def test_the_report_says_why_a_softmax_in_a_scan_body_stays() -> None:
    """jax.grad of a scan without jax.checkpoint: the forward scan's body returns P as a residual
    for the backward scan, so it stays a softmax there, and the report says so for that body."""
    ws, x = weights(6), activations(7)[:1].repeat(B, axis=0)
    grad = jax.grad(lambda ws, x: jnp.sum(scan_stack(ws, x) ** 2))
    report = fresh(grad).explain(ws, x)
    in_body = [why for why in report.not_attention if why.startswith("in scan body: softmax")]
    assert in_body and all("residual the forward scan saves" in why for why in in_body), report.not_attention


def test_attention_under_checkpoint_is_raised_and_policy_kept() -> None:
    w, x = weights(4)[0], activations(5)
    fn = optimized(checkpointed)
    report = fn.explain(w, x)
    (info,) = report.attention
    assert info.inside == "checkpoint body"
    (before,), (after,) = body_calls(report.before), body_calls(report.after)
    assert_same_call_but_body(before, after, "checkpoint")
    assert after.params["prevent_cse"] is False
    assert after.params["policy"] is jax.checkpoint_policies.nothing_saveable
    assert_close(fn(w, x), checkpointed(w, x))
    assert_close(jax.jit(fn)(w, x), checkpointed(w, x))
    finite = x[:1].repeat(B, axis=0)
    assert_close(jax.grad(lambda w: jnp.sum(jnp.sin(fn(w, finite))))(w),
                 jax.grad(lambda w: jnp.sum(jnp.sin(checkpointed(w, finite))))(w))


def nested_stack(ws, x):
    """A scan whose body checkpoints a scan over two layers (reversed)."""
    def outer(c, w_pair):
        inner = jax.checkpoint(lambda c, w: lax.scan(lambda c, w: (layer(c, w), None), c, w, reverse=True)[0])
        return inner(c, w_pair), None

    return lax.scan(outer, x, ws)[0]


def test_scan_inside_checkpoint_inside_scan() -> None:
    ws = weights(6).reshape(1, LAYERS, 3, E, E)
    x = activations(7)
    fn = optimized(nested_stack)
    report = fn.explain(ws, x)
    (info,) = report.attention
    assert info.inside == "scan body > checkpoint body > scan body"
    assert [where for where, _ in ea.report.optimized_bodies(report.after)] == [
        "scan body", "scan body > checkpoint body", "scan body > checkpoint body > scan body"]
    (outer,) = body_calls(report.after)
    (remat,) = body_calls(outer.body)
    (inner,) = body_calls(remat.body)
    assert isinstance(remat, NestedCall) and isinstance(inner, NestedCall) and inner.params["reverse"] is True
    assert_close(fn(ws, x), nested_stack(ws, x))
    finite = x[:1].repeat(B, axis=0)
    assert_close(jax.grad(lambda ws: jnp.sum(fn(ws, finite)))(ws), jax.grad(lambda ws: jnp.sum(nested_stack(ws, finite)))(ws))


def test_a_body_with_unknown_primitives_stays_working() -> None:
    def cumulative(ws, x):
        def body(c, w):
            y = layer(c, w)
            return lax.cumsum(jnp.sort(y, axis=-1), axis=1), lax.cummax(y.T, axis=0).T
        return lax.scan(body, x, ws)

    ws, x = weights(8), activations(9)
    fn = optimized(cumulative)
    report = fn.explain(ws, x)
    (after,) = body_calls(report.after)
    assert {c.name for c in body_calls(after.body)} >= {"cumsum", "sort", "cummax"}
    assert [info.inside for info in report.attention] == ["scan body"]
    assert_close(fn(ws, x), cumulative(ws, x))


def test_a_failed_body_keeps_its_original_jaxpr(monkeypatch) -> None:
    def refuse(original, new):
        raise ValueError("refused for the test")

    monkeypatch.setattr(nested, "_check_same_signature", refuse)
    ws, x = weights(10), activations(11)
    fn = fresh(scan_stack)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fn.explain(ws, x)
    assert any("optimizing a scan body failed (ValueError: refused for the test)" in str(w.message) for w in caught)
    assert any("running its original body" in w for w in report.warnings)
    (before,), (after,) = body_calls(report.before), body_calls(report.after)
    assert after is before and report.attention == []
    assert_close(fn(ws, x), scan_stack(ws, x))


def test_a_body_left_unchanged_keeps_its_original_jaxpr() -> None:
    def running_max(xs):
        return lax.scan(lambda c, x: (jnp.maximum(c, x), c + x), jnp.zeros(4), xs)

    xs = jnp.asarray(np.array([[0.0, -0.0, np.nan, 3e38], [1e-45, np.inf, -np.inf, 1.0]], np.float32))
    fn = optimized(running_max)
    report = fn.explain(xs)
    (before,), (after,) = body_calls(report.before), body_calls(report.after)
    assert after is before
    assert_close(fn(xs), running_max(xs))


@pytest.mark.parametrize("name", ["scan", "checkpoint"])
def test_body_parameters_are_known_for_this_jax(name: str) -> None:
    """The primitive names and body parameter of BODY_PARAMS match what this JAX emits."""
    fn = (lambda x: lax.scan(lambda c, _: (c * 2, None), x, None, length=2)[0]) if name == "scan" \
        else jax.checkpoint(lambda x: x * 2)
    (eqn,) = jax.make_jaxpr(fn)(jnp.ones(3)).eqns
    param, where = nested.BODY_PARAMS[eqn.primitive.name]
    assert where == name and param in eqn.params


def test_weak_typed_body_outputs_stay_weak() -> None:
    """A Python scalar into a checkpoint gives weak-typed body outputs; the new body keeps them."""
    def scaled(c, x):
        return jax.checkpoint(lambda c, x: (c * 2.0, jnp.tanh(x.T).T * c))(c, x)

    x = jnp.asarray(np.array([[0.0, -0.0, 1e-45, 3e38], [np.inf, -np.inf, np.nan, -1.5]], np.float32))
    fn = optimized(scaled)
    report = fn.explain(0.5, x)
    (before,), (after,) = body_calls(report.before), body_calls(report.after)
    assert_same_call_but_body(before, after, "checkpoint")
    assert [weak for _, _, weak in nested._avals(after.params["jaxpr"].outvars)] == [True, False]
    got, want = fn(0.5, x), scaled(0.5, x)
    assert [jax.typeof(g).weak_type for g in got] == [jax.typeof(w).weak_type for w in want] == [True, False]
    assert_close(got, want)


@jax.custom_vjp
def clip_gradient(x):
    return x


clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.01, 0.01),))


def test_custom_vjp_in_a_body_keeps_its_backward() -> None:
    """custom_vjp calls stay opaque inside bodies too: the clipped gradient survives."""
    def clipped_stack(ws, x):
        return lax.scan(lambda c, w: (clip_gradient(layer(c, w)), None), x, ws)[0]

    ws, x = weights(12), activations(13)[:1].repeat(B, axis=0)
    fn = optimized(clipped_stack)
    (after,) = body_calls(fn.explain(ws, x).after)
    assert "custom_vjp_call" in {c.name for c in body_calls(after.body)}
    assert [info.inside for info in fn.explain(ws, x).attention] == ["scan body"]
    grad = jax.grad(lambda x: jnp.sum(fn(ws, x) * 100.0))(x)
    assert_close(grad, jax.grad(lambda x: jnp.sum(clipped_stack(ws, x) * 100.0))(x))
    unclipped = jax.grad(lambda x: jnp.sum(scan_stack(ws, x) * 100.0))(x)
    assert float(jnp.max(jnp.abs(grad - unclipped))) > 1.0  # the clipping is what the values show
