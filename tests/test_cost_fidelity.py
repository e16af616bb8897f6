"""Issue 23, the cost model ranks right: `why` finds attention wherever the rules put it, the
roofline prices under-tile attention and bitcast transposes as they run, the CPU row's measured
split-heads slowdown, and the CPU fidelity benchmark's timing helpers (CPU, small, no timings)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn import examples, ir
from eqsat_attn.capture import capture
from eqsat_attn.cost import RooflineModel, for_device, program_cost
from eqsat_attn.cost.model import OpView
from eqsat_attn.cost.roofline import BITCAST_TIE_BREAK, dot_ready, gemm_copy_keeps_minor, moves_only_unit_axes
from eqsat_attn.kernels.decode_attention import DECODE_MIN_KEYS
from eqsat_attn.lower import lower

from bench_scripts import load_bench

LIMITS = ea.Limits(iterations=30)


def _extreme(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values with large-but-finite, tiny, denormal and signed-zero entries mixed in."""
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(8, flat.size), replace=False)
    flat[picks] = np.array([30.0, -30.0, 1e-30, -1e-30, 1e-40, -0.0, 0.0, 3.0], np.float32)[:picks.size]
    return x


def _explained(fn, *args):
    ex = ea.explore(fn, *args)
    ex.run(limits=LIMITS)
    return ex, ex.why("attention", "roofline-h100")


def _check_why_finds_every_attention_class(ex, why):
    view, pricing = ex.view(), ex.pricing("roofline-h100")
    focus = view.resolve_focus("attention")
    assert focus, "the rules raised no attention"
    assert len(why.classes) == len(focus), str(why)
    assert "no e-class" not in str(why)
    for cls in why.classes:
        attention = [a for a in cls.alternatives if a.description.startswith(("attention", "packed_attention"))]
        assert attention, cls.label
        assert all(math.isfinite(a.total) and a.own_cost > 0 for a in attention)
        # the cheapest alternative is what the e-class costs in the e-graph's pricing
        assert any(cls.best.total == pytest.approx(pricing.class_cost[c], rel=1e-9) for c in focus)


def test_why_finds_gqa_attention_of_dot_product_attention_under_reshapes():
    """jax.nn.dot_product_attention (xla) with 4 query heads over 2 K/V heads: the rules raise
    attention inside reshapes that no program node names; why lists and prices it."""
    b, s, d = 2, 8, 4
    rng = np.random.default_rng(23)
    q = jnp.asarray(_extreme(rng, (b, s, 4, d)))
    k, v = (jnp.asarray(_extreme(rng, (b, s, 2, d))) for _ in range(2))

    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    ex, why = _explained(f, q, k, v)
    _check_why_finds_every_attention_class(ex, why)
    assert any(" under %" in c.label for c in why.classes), [c.label for c in why.classes]
    kv_heads = {a.layouts["k"] for c in why.classes for a in c.alternatives if a.layouts}
    assert kv_heads, str(why)


def test_why_finds_rank3_attention():
    """[B*H, S, D] einsum attention (rank 3): attention is built as a 4-D op under reshapes."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(_extreme(rng, (6, 8, 4))) for _ in range(3))

    def f(q, k, v):
        return jnp.einsum("nqk,nkd->nqd", jax.nn.softmax(jnp.einsum("nqd,nkd->nqk", q, k) / 2.0, axis=-1), v)

    ex, why = _explained(f, q, k, v)
    _check_why_finds_every_attention_class(ex, why)
    best = ex.extract("roofline-h100")
    assert best.attention, best.program
    got = lower(best.program, attention_kernel="reference")(*ex.captured.flat_args(q, k, v))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(f)(q, k, v)), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ under-tile attention, bitcasts
def _attention(q: tuple, kv: tuple, dtype: str, q_layout: str = "BHSD", o_layout: str = "BHSD") -> OpView:
    t = lambda shape: ir.TensorType(shape, dtype)  # noqa: E731
    params = dict(q_layout=q_layout, k_layout="BHSD", v_layout="BHSD", o_layout=o_layout, scale=0.25,
                  causal=False, mask_kind="none")
    out = q if o_layout == q_layout else tuple(q[q_layout.index(c)] for c in o_layout)
    return OpView("attention", params, (t(q), t(kv), t(kv)), t(out))


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("seq", [64, 1024])
def test_queries_read_as_heads_cost_their_padded_tiles(device, dtype, seq):
    """The same math as [B, H, S, D] and as [B, H*S, 1, D] (one query per "head", grouped over the
    H K/V heads): on the flash kernel each (batch, head) program pads its one query up to the
    kernel's 16-row tile, so the second does 16x the work (and costs more); from the decode
    kernel's cache length on it runs there instead (the group's queries are its rows: the same
    work), and still costs more than the plain form (split partials and a second launch)."""
    model = for_device(device)
    b, h, d = 2, 4, 16
    normal = model.breakdown(_attention((b, h, seq, d), (b, h, seq, d), dtype))
    as_heads = model.breakdown(_attention((b, h * seq, 1, d), (b, h, seq, d), dtype))
    if seq >= DECODE_MIN_KEYS:
        assert as_heads.variant == "decode" and as_heads.flops == normal.flops
    else:
        assert as_heads.flops == 16 * normal.flops
        assert normal.bytes == as_heads.bytes
    assert normal.seconds < as_heads.seconds


def test_transposes_that_move_only_unit_axes_cost_only_a_tie_break():
    model = for_device("h100")
    x = ir.TensorType((2, 64, 4, 1, 16), "float32")
    unit = OpView("transpose", {"perm": (0, 2, 3, 1, 4)}, (ir.TensorType((2, 4, 64, 1, 16), "float32"),),
                  ir.TensorType((2, 1, 4, 64, 16), "float32"))
    moving = OpView("transpose", {"perm": (0, 2, 1, 3, 4)}, (x,), ir.TensorType((2, 4, 64, 1, 16), "float32"))
    assert moves_only_unit_axes((2, 4, 64, 1, 16), (0, 3, 1, 2, 4))
    assert not moves_only_unit_axes((2, 64, 4, 1, 16), (0, 2, 1, 3, 4))
    bitcast = model.node_cost(OpView("transpose", {"perm": (0, 3, 1, 2, 4)}, unit.inputs,
                                     ir.TensorType((2, 1, 4, 64, 16), "float32")))
    assert 0.0 < bitcast == BITCAST_TIE_BREAK < 1e-6 < model.node_cost(moving)  # a tie-break against reshapes
    # an attention operand whose D is minor up to length-1 axes is read in place: no relayout
    in_place = model.breakdown(_attention((2, 4, 1, 16), (2, 4, 64, 16), "float32", q_layout="BHSD"))
    d_then_unit = model.breakdown(_attention((2, 4, 16, 1), (2, 4, 64, 16), "float32", q_layout="BHDS",
                                             o_layout="BHSD"))
    assert d_then_unit.extra_s == in_place.extra_s == 0.0


@pytest.mark.parametrize("cost_model", ["roofline-h100", "roofline-h200"])
def test_the_rules_choose_the_normal_form_of_a_grouped_5d_einsum(cost_model):
    """Q [B, S, H, 1, D] contracted as 'bqhgd,bkhd->bhqgk' (flax.nnx's grouped form): its free axes
    read as (G=S, Sq=1) give 4*S one-query "heads"; read as (Sq=S, G=1) the normal [B, H, S, D]
    attention, whose unit-axis transposes are bitcasts. The normal form is chosen."""
    b, s, h, d = 2, 64, 4, 16
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(_extreme(rng, (b, s, h, d))) for _ in range(3))

    def f(q, k, v):
        qg = q.reshape(b, s, h, 1, d)
        p = jax.nn.softmax(jnp.einsum("bqhgd,bkhd->bhqgk", qg, k) / 4.0, axis=-1)
        return jnp.einsum("bhqgk,bkhd->bqhgd", p, v).reshape(b, s, h * d)

    ex = ea.explore(f, q, k, v)
    ex.run(limits=LIMITS)
    seqs = {ex.view().types[c].shape[2] for c in ex.view().resolve_focus("attention")
            if len(ex.view().types[c].shape) == 4}
    assert {1, s} <= seqs, seqs  # both readings are in the e-graph
    best = ex.extract(cost_model)
    nodes = [n for n in best.program.nodes if n.op == "attention"]
    assert len(nodes) == 1, best.program
    q_type = best.program.type_of(nodes[0].inputs[0])
    assert q_type.shape[str(nodes[0].params["q_layout"]).index("S")] == s, best.program
    got = lower(best.program, attention_kernel="reference")(*ex.captured.flat_args(q, k, v))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(f)(q, k, v)), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ the CPU row
def test_cpu_prices_split_heads_reference_attention_above_the_gemm_layout():
    """On the CPU (reference einsums) a Q laid out [B, S, H, D] runs the contractions as loops
    (measured); on the GPU models the kernel reads it in place at the same rate."""
    shape = (2, 4, 256, 32)
    bshd = tuple(shape[i] for i in (0, 2, 1, 3))
    for device, dearer in (("cpu", True), ("h100", False)):
        model = for_device(device)
        normal = model.breakdown(_attention(shape, shape, "float32"))
        split = model.breakdown(_attention(bshd, shape, "float32", q_layout="BSHD", o_layout="BHSD"))
        assert (split.compute_s > normal.compute_s) is dearer, device
    # one query: S has length 1, no split to loop over
    model = for_device("cpu")
    one = model.breakdown(_attention((2, 1, 4, 32), shape, "float32", q_layout="BSHD", o_layout="BHSD"))
    same = model.breakdown(_attention((2, 4, 1, 32), shape, "float32"))
    assert one.compute_s == same.compute_s


def test_dot_ready_takes_batch_major_operands_with_one_contracting_block_at_either_end():
    assert dot_ready((2, 4, 256, 32), (0, 1), (3,))  # [B, H, S, D] . D
    assert dot_ready((2, 4, 256, 32), (0, 1), (2,))  # [B, H, S, D] . S (contracting block first)
    assert not dot_ready((2, 256, 4, 32), (0, 2), (3,))  # [B, S, H, D]: batch axes not major
    assert dot_ready((2, 1, 4, 32), (0, 2), (3,))  # ... unless what sits between them has length 1
    assert not dot_ready((4, 128, 32), (), (1,))  # [H, E, F] . E: free axes H and F split
    assert dot_ready((128, 4, 32), (), (0,))  # [E, H, F] . E
    assert not dot_ready((2, 8, 4, 16), (0,), (1, 3))  # contracting axes not one block


def test_cpu_prices_the_relayout_of_a_cache_read_as_stored():
    """A decode step's scores from a K cache stored [B, S, H, D] as a dot's rhs: XLA:CPU copies the
    cache into the GEMM's rhs form [B, H, D, S] (HLO; D leaves minor: a transpose), so the CPU
    model charges that transpose; the GPU models do not (cuBLAS takes strided batches). The same
    cache as P.V's rhs ([B, H, S, D], D stays minor) is a copy at the copy rate."""
    t = lambda shape: ir.TensorType(shape, "float32")  # noqa: E731
    dims = dict(lhs_contract=(3,), rhs_contract=(3,), lhs_batch=(0, 1), preferred_element_type=None)
    q = t((4, 8, 1, 32))
    stored = OpView("dot_general", {**dims, "rhs_batch": (0, 2)}, (q, t((4, 1024, 8, 32))), t((4, 8, 1, 1024)))
    moved = OpView("dot_general", {**dims, "rhs_batch": (0, 1)}, (q, t((4, 8, 1024, 32))), t((4, 8, 1, 1024)))
    cpu = for_device("cpu")
    cache = 2 * 4 * 1024 * 8 * 32 * 4 / cpu.device.bandwidth
    transpose = cache / cpu.device.transpose_bandwidth_fraction + cpu.device.launch_overhead
    copy = cache / cpu.device.copy_bandwidth_fraction + cpu.device.launch_overhead
    assert transpose > copy
    assert cpu.breakdown(stored).seconds - cpu.breakdown(moved).seconds == pytest.approx(transpose, rel=1e-6)
    p = t((4, 8, 1, 1024))
    pv = dict(lhs_contract=(3,), rhs_contract=(1,), lhs_batch=(0, 1), rhs_batch=(0, 2), preferred_element_type=None)
    pv_moved = {**pv, "rhs_contract": (2,), "rhs_batch": (0, 1)}
    pv_stored = cpu.breakdown(OpView("dot_general", pv, (p, t((4, 1024, 8, 32))), q)).seconds
    pv_in_place = cpu.breakdown(OpView("dot_general", pv_moved, (p, t((4, 8, 1024, 32))), q)).seconds
    assert pv_stored - pv_in_place == pytest.approx(copy, abs=2e-9)  # 1 ns: the orientation tie-break
    h100 = for_device("h100")
    assert h100.breakdown(stored).seconds == pytest.approx(h100.breakdown(moved).seconds, rel=1e-6)
    # the reference attention reading the same cache as K [B, S, H, D] pays one copy more than
    # reading it [B, H, S, D] (either way XLA:CPU copies K into [B, H, D, S], q.Kᵀ's rhs: HLO; the
    # transpose that laid K out [B, H, S, D] is that copy, so that layout pays only the difference)
    att = lambda kl: OpView("attention", dict(q_layout="BHSD", k_layout=kl, v_layout="BHSD", o_layout="BHSD",  # noqa: E731
                                              scale=0.2, causal=False, mask_kind="none"),
                            (q, t((4, 1024, 8, 32)) if kl == "BSHD" else t((4, 8, 1024, 32)), t((4, 8, 1024, 32))), q)
    relaid = cpu.breakdown(att("BSHD")).extra_s - cpu.breakdown(att("BHSD")).extra_s
    assert relaid == pytest.approx(copy, rel=1e-9)


@pytest.mark.parametrize("q_layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("operand", ["k", "v"])
@pytest.mark.parametrize("layout", ["BHSD", "BHDS", "BSHD", "HDBS"])
def test_cpu_reference_attention_operand_copy_composes_with_its_transpose(q_layout, operand, layout):
    """XLA:CPU copies the reference attention's K and V into their GEMM forms (K [B, H, D, S] when
    q has H before S, else [B, H, S, D]; V [B, H, S, D]) and folds the transpose that laid the
    operand out into that copy: a transpose from the projection's [B, S, H, D] to a layout with B
    then H major, then the attention, costs what the attention reading [B, S, H, D] costs. A
    layout without (a weight-first projection's [H, D, B, S]) is copied as it is: a transpose, as
    its minor axis is S, into a form with D minor."""
    b, s, h, d = 2, 256, 4, 32
    length = dict(B=b, S=s, H=h, D=d)
    t = lambda lay: ir.TensorType(tuple(length[c] for c in lay), "float32")  # noqa: E731
    q_type = t(q_layout)

    def attention(lay: str) -> OpView:
        layouts = {"k_layout": "BHSD", "v_layout": "BHSD", f"{operand}_layout": lay}
        kv = {name: t(layouts[f"{name}_layout"]) for name in "kv"}
        return OpView("attention", dict(q_layout=q_layout, o_layout="BHSD", scale=0.2, causal=False, mask_kind="none",
                                        **layouts), (q_type, kv["k"], kv["v"]), t("BHSD"))

    cpu = for_device("cpu")
    if layout == "HDBS":
        form = "BHDS" if operand == "k" and q_layout == "BHSD" else "BHSD"
        moved = 2 * b * s * h * d * 4 / cpu.device.bandwidth
        fraction = cpu.device.copy_bandwidth_fraction if form == "BHDS" else cpu.device.transpose_bandwidth_fraction
        copied = cpu.node_cost(attention(layout)) - cpu.node_cost(attention(form))
        assert copied == pytest.approx(moved / fraction + cpu.device.launch_overhead, rel=1e-9)
        return
    perm = tuple("BSHD".index(c) for c in layout)
    transpose = OpView("transpose", {"perm": perm}, (t("BSHD"),), t(layout))
    laid_out = cpu.node_cost(transpose) if perm != (0, 1, 2, 3) else 0.0
    assert laid_out + cpu.node_cost(attention(layout)) == pytest.approx(cpu.node_cost(attention("BSHD")), rel=1e-9)
    h100 = for_device("h100")  # a GPU kernel reads its operands through strides: no such copies
    assert h100.breakdown(attention("BHSD")).extra_s == 0.0


def test_gemm_copy_keeps_minor_follows_the_canonical_gemm_forms():
    assert not gemm_copy_keeps_minor((4, 1024, 8, 32), (0, 2), (3,), rhs=True)  # K as rhs -> [B, H, D, S]
    assert gemm_copy_keeps_minor((4, 1024, 8, 32), (0, 2), (3,), rhs=False)  # K as lhs -> [B, H, S, D]
    assert gemm_copy_keeps_minor((4, 1024, 8, 32), (0, 2), (1,), rhs=True)  # V as rhs -> [B, H, S, D]
    assert not gemm_copy_keeps_minor((4, 1024, 8, 32), (0, 2), (1,), rhs=False)  # V as lhs -> [B, H, D, S]
    assert gemm_copy_keeps_minor((1, 1, 1), (), (0,), rhs=True)  # all length 1: nothing moves


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_cpu_formulations_compute_the_block(kind):
    """The experiment's hand-written equivalents: each one's captured program, lowered, gives the
    block's values on inputs with extreme entries."""
    bench = load_bench("cost_model_experiment", "cost_model_experiment_for_fidelity")
    forms = load_bench("cpu_formulations", "cpu_formulations_for_fidelity")
    heads, head_dim = 2, 4
    if kind == "prefill":
        fn, args = examples.attention_vt_example(batch=2, heads=heads, seq=8, head_dim=head_dim)
        table = forms.prefill_formulations(heads, head_dim)
    else:
        fn, args = bench.decode_example(batch=2, heads=heads, seq=16, head_dim=head_dim)
        table = forms.decode_formulations(heads, head_dim)
    rng = np.random.default_rng(9)
    args = tuple(jnp.asarray(_extreme(rng, a.shape) * (0.25 if i else 1.0)) for i, a in enumerate(args))
    want = np.asarray(jax.jit(fn)(*args))
    assert len(table) >= 4
    calls = []
    for name, form in table.items():
        captured = capture(form, *args)
        assert all(n.op != "opaque" for n in captured.program.nodes), name  # priced, not carried opaque
        calls.append((lower(captured.program, attention_kernel="reference"), captured.flat_args(*args)))
    got = jax.jit(lambda flats: [call(*flat)[0] for (call, _), flat in zip(calls, flats)])([f for _, f in calls])
    for name, out in zip(table, got):  # one compilation for all
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_calibrate_cpu_recovers_constants_that_produced_the_times():
    """The fit of bench/calibrate_cpu.py: times made by a known spec, fitted from the table's
    values, are explained (loss near 0) and rank as they were made."""
    cal = load_bench("calibrate_cpu", "calibrate_cpu_for_fidelity")
    forms = load_bench("cpu_formulations", "cpu_formulations_for_fidelity")
    from eqsat_attn.cost.devices import device_spec

    fn, args = examples.attention_vt_example(batch=1, heads=2, seq=64, head_dim=16)
    table = forms.prefill_formulations(2, 16)
    picked = (fn, table["heads [B,S,H,D]"], table["K^T materialised"], table["values (P x) Wv"])
    programs = [capture(f, *args).program for f in picked]  # GEMMs, copies, transposes, softmax passes
    base = device_spec("cpu", calibrated=False)
    truth = cal.spec_with(base, {**cal.current(base), "bandwidth": base.bandwidth / 3, "matmul_efficiency": 0.1,
                                 "launch_overhead": base.launch_overhead * 4})
    model = RooflineModel(truth, "reference")
    rows = [{"workload": "w", "label": str(i), "measured": program_cost(p, model), "program": p, "run": "r"}
            for i, p in enumerate(programs)]
    assert cal.loss(rows, base) > 0.01
    fitted = cal.spec_with(base, cal.fit(rows, base, sweeps=2))
    assert cal.loss(rows, fitted) < 0.1 * cal.loss(rows, base)


def _softmax_forms(b: int, h: int, s: int):
    """A scaled softmax over [B, H, S, S] scores, captured as jax.nn.softmax writes it (its nodes
    one by one) and as the rules raise it (one `softmax` node), and the attention that holds it."""
    rng = np.random.default_rng(5)
    scores = jnp.asarray(_extreme(rng, (b, h, s, s)))
    explicit = capture(lambda x: jax.nn.softmax(x, axis=-1), scores).program
    t = ir.TensorType((b, h, s, s), "float32")
    return explicit, OpView("softmax", {}, (t,), t)


def test_cpu_prices_a_softmax_node_as_its_passes_written_out():
    """On the CPU a `softmax` node costs what jax.nn.softmax's own nodes cost (XLA runs the same
    passes; their row broadcasts fuse), so neither form wins extraction by how it is written;
    the H100 row keeps pricing broadcasts as writes (GPU rows unchanged)."""
    explicit, node = _softmax_forms(2, 4, 64)
    cpu, h100 = for_device("cpu"), for_device("h100")
    assert program_cost(explicit, cpu) == pytest.approx(cpu.node_cost(node), rel=1e-9)
    assert cpu.node_cost(node) > 0
    assert any(n.op == "broadcast_in_dim" for n in explicit.nodes)
    row = ir.TensorType((2, 4, 64, 1), "float32")
    full = ir.TensorType((2, 4, 64, 64), "float32")
    broadcast = OpView("broadcast_in_dim", {"shape": full.shape, "broadcast_dimensions": (0, 1, 2, 3)}, (row,), full)
    assert cpu.node_cost(broadcast) == 0.0 and h100.node_cost(broadcast) > 0.0


def test_cpu_reference_attention_pays_the_softmax_passes_over_its_scores():
    """The CPU's attention (XLA's einsums) costs its GEMMs plus the scale and softmax passes over
    the [B, H, Sq, Sk] scores (and, q having H before S, K's copy on to [B, H, D, S]): doubling the
    keys doubles the passes; a GPU kernel keeps them on chip."""
    cpu = for_device("cpu")
    short, long = (2, 4, 64, 32), (2, 4, 128, 32)
    base = cpu.breakdown(_attention(short, short, "float32"))
    longer = cpu.breakdown(_attention(short, long, "float32"))
    passes = cpu.softmax_passes_seconds(ir.TensorType((2, 4, 1, 64, 64), "float32"), scaled=True)

    def k_relaid(kv: tuple) -> float:  # K [B, H, S, D] goes on to [B, H, D, S]: a transpose, not a copy
        moved = 2 * math.prod(kv) * 4 / cpu.device.bandwidth
        return moved / cpu.device.transpose_bandwidth_fraction - moved / cpu.device.copy_bandwidth_fraction

    assert passes > 0 and base.extra_s == pytest.approx(passes + k_relaid(short), rel=1e-9)
    long_passes = cpu.softmax_passes_seconds(ir.TensorType((2, 4, 1, 64, 128), "float32"), scaled=True)
    assert longer.extra_s == pytest.approx(long_passes + k_relaid(long), rel=1e-9)
    assert longer.extra_s > 1.5 * passes
    h100 = for_device("h100")
    assert h100.breakdown(_attention(short, short, "float32")).extra_s == 0.0


# ------------------------------------------------------------------ the CPU benchmark's helpers
def test_interleaved_timing_helpers():
    bench = load_bench("cost_model_experiment", "cost_model_experiment_for_fidelity")
    calls = [(jax.jit(lambda x: x + 1), (jnp.ones(4),)), (jax.jit(lambda x: x * 2), (jnp.ones(4),))]
    times = bench.interleaved_seconds(calls, rounds=4, inner=2)
    assert [len(t) for t in times] == [4, 4] and all(x > 0 for t in times for x in t)
    runs = bench.interleaved_runs(calls, rounds=3, inner=2)
    assert [[len(r) for r in per_call] for per_call in runs] == [[2, 2, 2], [2, 2, 2]]
    # a round's time is its fastest run, by CPU time (index 1) or wall clock (index 0)
    made = [[(3.0, 2.0), (1.0, 5.0)], [(2.0, 4.0), (6.0, 1.0)]]
    assert bench.round_seconds(made, "wall") == [1.0, 2.0] and bench.round_seconds(made, "cpu") == [2.0, 1.0]
    assert bench.single_threaded(["--cpu", "--rounds", "3"]) and not bench.single_threaded(["--cpu", "--multi-thread"])
    assert not bench.single_threaded(["--cpu-smoke"])
    assert "--xla_cpu_multi_thread_eigen=false" in bench.SINGLE_THREAD_FLAGS
    assert bench.spread([1.0, 1.0, 1.0, 1.0]) == 0.0 and bench.spread([1.0, 2.0, 3.0, 4.0]) > 0
    fn, args = bench.decode_example(batch=1, heads=2, seq=8, head_dim=4)
    assert fn(*args).shape == (1, 2, 1, 4)
    assert {"prefill S256", "prefill S512", "decode S1024"} == set(bench.CPU_WORKLOADS)


def test_flax_nnx_attention_at_s64_is_chosen_in_its_normal_form():
    """The case of issue 23: flax.nnx MultiHeadAttention at S64 was raised as 256 one-query "heads"
    ([2, 256, 1, 16]); under the H100 model the chosen attention now has its 64 queries per head."""
    from flax import nnx

    module = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False, rngs=nnx.Rngs(0))
    graph, state = nnx.split(module)

    def f(state, x):
        return nnx.merge(graph, state)(x)

    x = jnp.asarray(_extreme(np.random.default_rng(64), (2, 64, 64)))
    ex = ea.explore(f, state, x)
    ex.run(limits=LIMITS)
    best = ex.extract("roofline-h100")
    (node,) = [n for n in best.program.nodes if n.op == "attention"]
    q_type = best.program.type_of(node.inputs[0])
    assert q_type.shape[str(node.params["q_layout"]).index("S")] == 64, best.program
    flat = ex.captured.flat_args(state, x)
    got = lower(best.program, attention_kernel="reference")(*flat)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(f)(state, x)), rtol=2e-5, atol=2e-5)
