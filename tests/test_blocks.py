"""Repeated blocks (eqsat_attn.blocks): identical layers are cut at the residual stream,
optimized once and spliced back; values never change and the chosen program is the one the
whole-program optimization chooses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqsat_attn import examples, ir
from eqsat_attn.blocks import MIN_UNIT_NODES, splice, split_repeated, union, unpack
from eqsat_attn.capture import capture
from eqsat_attn.lower import lower
from eqsat_attn.pipeline import OptimizeOptions, optimize_program


def random_inputs(program: ir.Program, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(t.shape).astype(t.dtype) for t in program.input_types]


def assert_same_values(original: ir.Program, candidate: ir.Program) -> None:
    assert candidate.inputs and len(candidate.inputs) == len(original.inputs)
    assert candidate.output_types == original.output_types
    args = random_inputs(original)
    for want, got in zip(lower(original)(*args), lower(candidate)(*args)):
        want, got = np.asarray(want), np.asarray(got)
        scale = max(1.0, float(np.max(np.abs(want))))  # random unscaled weights: large values
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def canonical(program: ir.Program) -> tuple:
    """The live DAG of a program independent of node numbering (inputs by position)."""
    ids: dict[int, int] = {}
    table: dict[tuple, int] = {}
    for i in program.live_nodes():
        n = program.nodes[i]
        key = (("input", program.inputs.index(i), n.type) if n.op == "input"
               else (n.op, n.params, n.type, tuple(ids[j] for j in n.inputs)))
        ids[i] = table.setdefault(key, len(table))
    return tuple(ids[o] for o in program.outputs), len(table)


def stacked_program(layers: int) -> ir.Program:
    fn, args = examples.stacked_example(layers)
    return capture(fn, *args).program


def test_stacked_layers_are_one_unit_each() -> None:
    program = stacked_program(3)
    split = split_repeated(program)
    assert split is not None and split.repeats == 3 and len(split.parts) == 3
    assert len(split.distinct) == 1
    # each layer reads the residual stream and its own eight weights
    assert [len(p.interface) for p in split.parts] == [9, 9, 9]
    assert split.parts[0].interface[0] == program.inputs[-1]  # x, the model's input
    assert split.parts[1].interface[0] == split.parts[0].outputs[0]  # the residual stream
    same = splice(program, split, {p: p for p in split.distinct})
    assert canonical(same) == canonical(program)
    assert_same_values(program, same)


def test_reuse_chooses_what_the_whole_program_chooses() -> None:
    program = stacked_program(2)
    whole = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    reused = optimize_program(program, OptimizeOptions())
    assert whole.repeated_blocks == 0 and reused.repeated_blocks == 2
    assert not whole.warnings and not reused.warnings
    assert canonical(reused.program) == canonical(whole.program)
    assert reused.cost_after == pytest.approx(whole.cost_after, rel=1e-12) and reused.cost_after < reused.cost_before
    assert reused.program.count("attention") == 2
    assert_same_values(program, reused.program)


def test_values_read_by_every_layer_cross_the_cuts() -> None:
    """Weights read by every layer stay live across the residual stream; they are let across the
    cuts as interface values of each part, so the layers are still reused, values unchanged."""
    shape = examples.BlockShape()
    params = examples.block_params(shape)
    x = jax.random.normal(jax.random.PRNGKey(3), (shape.batch, shape.seq, shape.embed))
    program = capture(lambda p, x: examples.stacked_blocks([p, p, p], x), params, x).program
    split = split_repeated(program)
    # capture shares the weights' broadcasts among the layers: they are computed before the
    # first layer, which then reads them as the others do
    assert split is not None and split.repeats == 3 and len(split.distinct) == 2
    assert split.parts[0].program.count("dot_general") == 0  # the part before: broadcasts only
    assert all(set(program.inputs[:4]) & set(p.interface) for p in split.parts[1:])  # the shared weights
    assert_same_values(program, splice(program, split, {p: p for p in split.distinct}))
    whole = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    reused = optimize_program(program)
    assert reused.repeated_blocks == 3 and reused.program.count("attention") == 3
    assert reused.cost_after == pytest.approx(whole.cost_after, rel=1e-9)
    assert_same_values(program, reused.program)


def test_layers_of_different_shapes_are_not_shared() -> None:
    shape = examples.BlockShape()
    x = jax.random.normal(jax.random.PRNGKey(3), (shape.batch, shape.seq, shape.embed))
    p1, p2 = examples.block_params(shape, 1), examples.block_params(shape, 2)

    def two_kinds(p1, p2, x):  # four heads, then two heads: same weights' shapes, other ops
        x = examples.transformer_block(p1, x, heads=4)
        return examples.transformer_block(p2, x, heads=2)

    assert split_repeated(capture(two_kinds, p1, p2, x).program) is None


def test_short_repeated_chains_are_optimized_whole() -> None:
    def chain(x):
        for _ in range(3 * MIN_UNIT_NODES):
            x = jnp.tanh(jnp.transpose(x, (1, 0)))
        return x

    program = capture(chain, jnp.ones((4, 6))).program
    assert split_repeated(program) is None


def _opaque_stack(unmodelled):
    """A program of three residual blocks, each with one op the rules do not model."""
    def block(w, x):
        h = jnp.tanh(x @ w) * 0.5 + x
        h = unmodelled(h)  # an opaque node per layer
        for _ in range(MIN_UNIT_NODES):
            h = jnp.sin(h) + x
        return h

    def model(ws, x):
        for w in ws:
            x = block(w, x)
        return x

    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((8, 8)), jnp.float32) for _ in range(3)]
    program = capture(model, ws, jnp.ones((4, 8))).program
    assert program.count("opaque") == 3
    return program


def test_parts_holding_opaque_calls_with_functions_are_never_shared() -> None:
    def host_cumsum(h):  # a callback: its parameters hold a Python function
        return jax.pure_callback(lambda a: np.cumsum(a, axis=1), jax.ShapeDtypeStruct(h.shape, h.dtype), h)

    program = _opaque_stack(host_cumsum)
    split = split_repeated(program)
    if split is not None:
        shared = [p for p in split.distinct if any(n.op == "opaque" for n in p.nodes)]
        assert all(sum(q.program == p for q in split.parts) == 1 for p in shared)


def test_opaque_calls_of_one_plain_primitive_are_shared() -> None:
    """cumsum(axis=1) in every layer (parameters all plain data): the layers are one unit."""
    program = _opaque_stack(lambda h: jax.lax.cumsum(h, axis=1))
    split = split_repeated(program)
    assert split is not None and split.repeats == 3 and len(split.distinct) == 1
    assert_same_values(program, splice(program, split, {p: p for p in split.distinct}))
    reused = optimize_program(program)
    assert reused.repeated_blocks == 3 and reused.program.count("opaque") == 3
    assert_same_values(program, reused.program)


ELEMENTWISE = (jnp.tanh, jnp.sin, lambda h: h * 0.5, lambda h: h - 1.0, jnp.exp, jax.nn.relu)


@st.composite
def residual_stacks(draw):
    """(fn, args): a prefix op, n identical random residual blocks with own weights, a suffix op."""
    ops = draw(st.lists(st.integers(0, len(ELEMENTWISE) - 1), min_size=MIN_UNIT_NODES // 2, max_size=MIN_UNIT_NODES))
    transposed = draw(st.booleans())
    layers = draw(st.integers(1, 4))

    def block(w, x):
        h = x @ w
        if transposed:
            h = jnp.transpose(h, (1, 0))
        for k in ops:
            h = ELEMENTWISE[k](h) * 0.25
        if transposed:
            h = jnp.transpose(h, (1, 0))
        return x + h

    def model(ws, x):
        x = jnp.tanh(x)
        for w in ws:
            x = block(w, x)
        return x * jnp.tanh(x)  # reads the last block's output twice: a cut before it

    rng = np.random.default_rng(draw(st.integers(0, 100)))
    ws = [jnp.asarray(rng.standard_normal((6, 6)) / 3, jnp.float32) for _ in range(layers)]
    return model, (ws, jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)), layers


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(residual_stacks())
def test_random_stacks_split_and_splice_keep_values(stack) -> None:
    fn, args, layers = stack
    program = capture(fn, *args).program
    split = split_repeated(program)
    assert (split is None) == (layers == 1)  # a block has no cut inside: x is read at its end
    if split is None:
        return
    assert split.repeats == layers and len(split.parts) == layers + 2 and len(split.distinct) == 3
    spliced = splice(program, split, {p: p for p in split.distinct})
    assert canonical(spliced) == canonical(program)
    assert_same_values(program, spliced)


def test_prepared_egraphs_are_reverted_between_runs() -> None:
    """Optimizations share a prepared e-graph (rules registered once per process, egglog
    push/pop): a run, even one that fails half-way, leaves nothing behind for the next."""
    from eqsat_attn.egraph import encode, resolve
    from eqsat_attn.egraph.driver import egraph_size, prepared_egraph

    fn, args = examples.attention_vt_example()
    program = capture(fn, *args).program
    first = optimize_program(program)
    rulesets = resolve(None)
    with prepared_egraph(rulesets) as egraph:
        empty = egraph_size(egraph)
    with pytest.raises(RuntimeError, match="half-way"):
        with prepared_egraph(rulesets) as egraph:
            encode(program, egraph)
            assert egraph_size(egraph) > empty
            raise RuntimeError("failed half-way")
    with prepared_egraph(rulesets) as egraph:
        assert egraph_size(egraph) == empty
    again = optimize_program(program)
    assert canonical(again.program) == canonical(first.program)
    assert again.egraph_nodes == first.egraph_nodes and again.rules_fired == first.rules_fired
    # attention raised once (the CPU row takes the merged Q/K/V projection with packed attention:
    # one GEMM, two launches fewer; the unmerged pick measured alike at this size)
    assert again.program.count("attention") + again.program.count("packed_attention") == 1
    assert again.cost_after < again.cost_before


def test_flax_layers_are_reused_with_the_whole_program_choice() -> None:
    """Flax linen blocks (LayerNorm, MultiHeadDotProductAttention with a causal mask, MLP)."""
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h, mask=mask)
            h = nn.LayerNorm()(x)
            return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = Block()(x)
            return x

    model = Stack()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 64))
    params = model.init(jax.random.PRNGKey(1), x)
    program = capture(lambda params, x: model.apply(params, x), params, x).program
    split = split_repeated(program)
    assert split is not None and split.repeats == 3 and len(split.distinct) == 1
    whole = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    reused = optimize_program(program)
    assert reused.repeated_blocks == 3 and reused.program.count("attention") == 3
    assert canonical(reused.program) == canonical(whole.program)
    assert_same_values(program, reused.program)


def test_parts_around_the_run_are_optimized_together_and_cut_back() -> None:
    """The parts before and after the repeated layers (an embedding-like head, a tied-weight
    tail) share one e-graph run: `union` then `unpack` gives each part back, same values."""
    shape = examples.BlockShape()
    params = [examples.block_params(shape, seed) for seed in range(3)]
    x = jax.random.normal(jax.random.PRNGKey(3), (shape.batch, shape.seq, shape.embed))
    w = jax.random.normal(jax.random.PRNGKey(4), (shape.embed, shape.embed))

    def model(params, w, x):
        h = jnp.tanh(x @ w) * 0.5 - 0.25  # head, reading w
        h = examples.stacked_blocks(params, h)
        h = h * jax.nn.sigmoid(h)  # the tail reads the last residual twice (a cut is found there)
        return jnp.transpose(jax.nn.softmax(h @ w.T), (0, 2, 1))  # tail, reading w again

    program = capture(model, params, w, x).program
    split = split_repeated(program)
    assert split is not None and split.repeats == 3
    once = [p for p in split.distinct if sum(q.program == p for q in split.parts) == 1]
    assert len(once) == 2
    joined = union(once)
    assert len(joined.inputs) == sum(len(p.inputs) for p in once)
    pieces = unpack(joined, once)
    assert pieces is not None and [canonical(p) for p in pieces] == [canonical(p) for p in once]
    whole = optimize_program(program, OptimizeOptions(reuse_blocks=False))
    reused = optimize_program(program)
    assert reused.repeated_blocks == 3 and not reused.warnings
    assert reused.cost_after == pytest.approx(whole.cost_after, rel=1e-9) and reused.cost_after < reused.cost_before
    assert_same_values(program, reused.program)


def test_unpack_refuses_a_part_reading_another_parts_input() -> None:
    b = ir.ProgramBuilder()
    t = ir.TensorType((2, 3), "float32")
    x, y = b.input(t), b.input(t)
    crossed = b.build([b.add("tanh", (x,), t), b.add("add", (x, y), t)])  # the second part reads x

    def one_input_part() -> ir.Program:
        p = ir.ProgramBuilder()
        return p.build([p.add("tanh", (p.input(t),), t)])

    assert unpack(crossed, [one_input_part(), one_input_part()]) is None
    assert unpack(union([one_input_part(), one_input_part()]), [one_input_part(), one_input_part()]) is not None


def test_plain_opaque_calls_are_one_object_only_when_their_parameters_match() -> None:
    """Equal plain parameters (a float by its bits: -0.0 is not 0.0) make one call object;
    node ids and everything else stay as they were."""
    from eqsat_attn.blocks import share_plain_opaque_calls

    t = ir.TensorType((4,), "float32")
    b = ir.ProgramBuilder()
    x = b.input(t)
    outs = []
    for scale in (0.0, 0.0, -0.0, float("nan"), float("nan"), jnp.tanh, jnp.tanh):  # a function: never shared
        call = ir.OpaqueCall(jax.lax.cumsum_p, {"axis": 0, "reverse": False, "scale": scale}, (t,))
        node = b.add("opaque", (x,), None, call=call)
        outs.append(b.add("opaque_output", (node,), t, index=0))
    program = b.build(outs)
    shared = share_plain_opaque_calls(program)
    calls = [n.params["call"] for n in shared.nodes if n.op == "opaque"]
    assert calls[0] is calls[1] and calls[2] is not calls[0] and calls[3] is calls[4] and calls[3] is not calls[0]
    assert calls[5] is not calls[6] and calls[5:] == [n.params["call"] for n in program.nodes if n.op == "opaque"][5:]
    assert [n.op for n in shared.nodes] == [n.op for n in program.nodes] and shared.outputs == program.outputs
