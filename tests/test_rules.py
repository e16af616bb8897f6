"""Every rule family of the shipped `transpose` and `canonical` rule sets fires on a program made
for it, and the optimized program computes the same values; extraction under different cost
models picks different, equally valued programs; user rule files load by path."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from egglog import EGraph

from cost_models import ArbitraryCost, PenaliseTransposes, PreferTransposes
from eqsat_attn import ir
from eqsat_attn.cost import MaterializedBytes
from eqsat_attn.egraph import encode, extract_program, resolve, run_rulesets
from eqsat_attn.lower import lower
from eqsat_attn.pipeline import Limits, OptimizeOptions, optimize_program
from work_limits import SAFETY_NET_S

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent fallback to the original

F32 = "float32"
LIMITS = Limits(iterations=8, nodes=50_000, seconds=SAFETY_NET_S)


# ----------------------------------------------------------------------------- helpers


class B:
    """A ProgramBuilder with type inference for brevity."""

    def __init__(self) -> None:
        self.b = ir.ProgramBuilder()

    def input(self, *shape: int, dtype: str = F32) -> int:
        return self.b.input(ir.TensorType(tuple(shape), dtype))

    def op(self, op: str, *ins: int, **params) -> int:
        t = ir.infer_type(op, params, [self.b.type_of(i) for i in ins])
        return self.b.add(op, ins, t, **params)

    def t(self, x: int, *perm: int) -> int:
        return self.op("transpose", x, perm=tuple(perm))

    def reshape(self, x: int, *shape: int) -> int:
        return self.b.add("reshape", (x,), ir.TensorType(tuple(shape), self.b.type_of(x).dtype))

    def broadcast(self, x: int, shape: tuple[int, ...], dims: tuple[int, ...]) -> int:
        return self.b.add("broadcast_in_dim", (x,), ir.TensorType(shape, self.b.type_of(x).dtype), broadcast_dimensions=dims)

    def literal(self, value: float, dtype: str = F32) -> int:
        return self.b.add("literal", (), ir.TensorType((), dtype), value=value)

    def dot(self, a: int, b: int, lc=(), rc=(), lb=(), rb=()) -> int:
        return self.op(
            "dot_general", a, b, lhs_contract=tuple(lc), rhs_contract=tuple(rc), lhs_batch=tuple(lb),
            rhs_batch=tuple(rb), preferred_element_type=None,
        )

    def build(self, *outs: int) -> ir.Program:
        return self.b.build(outs)


def random_inputs(program: ir.Program, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(t.shape).astype(t.dtype) for t in program.input_types]


def assert_same_values(original: ir.Program, candidate: ir.Program, rtol=1e-5, atol=1e-6, seed=0) -> None:
    args = random_inputs(original, seed)
    want = lower(original)(*args)
    got = lower(candidate)(*args)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert np.shape(w) == np.shape(g) and np.asarray(w).dtype == np.asarray(g).dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=f"\n{original}\n->\n{candidate}")


# ----------------------------------------------------------------------------- one program per family


def p_compose():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.op("exp", b.t(b.t(x, 1, 2, 0), 0, 2, 1)))


def p_identity():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.op("tanh", b.t(x, 0, 1, 2)))


def p_unary():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.t(b.op("exp", x), 2, 0, 1))


def p_binary():
    b = B(); x = b.input(3, 4, 2); y = b.input(2, 3, 4); z = b.input(4)
    bias = b.broadcast(z, (2, 3, 4), (2,))
    return b.build(b.op("sub", b.t(x, 2, 0, 1), bias), b.t(b.op("mul", y, y), 1, 2, 0))


def p_select():
    b = B(); x = b.input(2, 3, 4); y = b.input(2, 3, 4)
    return b.build(b.t(b.op("select_n", b.op("lt", x, y), x, y), 1, 2, 0))


def p_broadcast():
    b = B(); x = b.input(3, 4)
    return b.build(b.op("neg", b.t(b.broadcast(x, (2, 3, 4), (1, 2)), 2, 0, 1)))


def p_reduce():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.op("reduce_sum", b.t(x, 2, 0, 1), axes=(1,)), b.op("reduce_max", b.t(x, 1, 2, 0), axes=(0, 2)))


def p_reshape():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.op("exp", b.t(b.reshape(x, 6, 4), 1, 0)), b.reshape(b.t(x, 2, 0, 1), 4, 6))


def p_dot_output():
    b = B(); a = b.input(3, 4, 5); w = b.input(5, 2)
    return b.build(b.t(b.dot(a, w, lc=(2,), rc=(0,)), 1, 0, 2))


def p_dot_operand():
    b = B(); a = b.input(5, 3); w = b.input(2, 5)
    return b.build(b.dot(b.t(a, 1, 0), b.t(w, 1, 0), lc=(1,), rc=(0,)))


def p_concatenate():
    """A transposed concatenation (sinks) and a concatenation of transposes (bubbles)."""
    b = B(); a = b.input(2, 3, 4); c = b.input(2, 5, 4); d = b.input(2, 2, 4)
    sunk = b.t(b.op("concatenate", a, c, dimension=1), 2, 0, 1)
    bubbled = b.op("concatenate", b.t(a, 2, 0, 1), b.t(c, 2, 0, 1), b.t(d, 2, 0, 1), dimension=2)
    return b.build(b.op("exp", sunk), bubbled)


def p_batched_dot():
    b = B(); q = b.input(2, 3, 4); k = b.input(2, 5, 4)
    return b.build(b.dot(q, k, lc=(2,), rc=(2,), lb=(0,), rb=(0,)))


def p_reshape_reshape():
    b = B(); x = b.input(2, 3, 4)
    return b.build(b.op("exp", b.reshape(b.reshape(x, 6, 4), 2, 3, 4)), b.reshape(b.reshape(x, 24), 4, 6))


def p_convert():
    b = B(); x = b.input(2, 3)
    return b.build(b.op("exp", b.op("convert_element_type", x, new_dtype=F32)))


FAMILY_PROGRAMS = {
    "transpose.compose": p_compose,
    "transpose.identity": p_identity,
    "transpose.unary": p_unary,
    "transpose.binary": p_binary,
    "transpose.select": p_select,
    "transpose.broadcast": p_broadcast,
    "transpose.reduce": p_reduce,
    "transpose.reshape": p_reshape,
    "transpose.dot_output": p_dot_output,
    "transpose.dot_operand": p_dot_operand,
    "transpose.concatenate": p_concatenate,
    "canonical.dot_canonical": p_batched_dot,
    "canonical.dot_commute": p_batched_dot,
    "canonical.reshape": p_reshape_reshape,
    "canonical.convert": p_convert,
}


def test_every_shipped_family_has_a_program():
    families = {f.name for rs in resolve(["transpose", "canonical"]) for f in rs.families}
    assert families == set(FAMILY_PROGRAMS), "add a program for each new rule family"
    for rs in resolve(["transpose", "canonical"]):
        assert rs.doc
        for f in rs.families:
            assert f.doc and f.rules


@pytest.mark.parametrize("family", sorted(FAMILY_PROGRAMS))
@pytest.mark.parametrize("rules", [["transpose", "canonical"], "own"])
def test_family_fires_and_keeps_values(family, rules):
    program = FAMILY_PROGRAMS[family]()
    rules = [family.split(".")[0]] if rules == "own" else rules
    result = optimize_program(program, OptimizeOptions(rules=rules, limits=LIMITS))
    assert not result.warnings or result.saturated is False
    assert result.rules_fired.get(family, 0) > 0, result.rules_fired
    assert result.program.output_types == program.output_types
    assert_same_values(program, result.program)


def test_transpose_rules_remove_transposes():
    """A cancelling pair through an elementwise op disappears (bytes model)."""
    b = B(); x = b.input(2, 3, 4)
    program = b.build(b.t(b.op("exp", b.t(x, 1, 2, 0)), 2, 0, 1))
    result = optimize_program(program, OptimizeOptions(rules=["transpose"], limits=LIMITS))
    assert result.program.count("transpose") == 0
    assert result.cost_after < result.cost_before
    assert_same_values(program, result.program)


def test_transpose_inside_a_broadcast_cancels_from_outside():
    """Transposes only sink into a broadcast (none bubbles out of one): one applied to the
    broadcast of a transposed input still meets that transpose and cancels it (bytes model)."""
    b = B(); x = b.input(3, 4); y = b.input(2, 3, 4)
    inner = b.broadcast(b.t(x, 1, 0), (2, 4, 3), (1, 2))
    program = b.build(b.t(b.op("exp", inner), 0, 2, 1), b.op("add", y, b.t(inner, 0, 2, 1)))
    result = optimize_program(program, OptimizeOptions(rules=["transpose"], limits=LIMITS))
    assert result.program.count("transpose") == 0
    assert result.cost_after < result.cost_before
    assert_same_values(program, result.program)


def test_transposed_broadcast_scalar_takes_the_permuted_shape_without_a_question():
    """A transpose of a broadcast scalar is the scalar broadcast to the permuted shape, found in
    egglog itself: no broadcast_sink question is asked for it, and no transpose is left."""
    from eqsat_attn.egraph.driver import table_rows
    from eqsat_attn.egraph.language import ask

    b = B(); x = b.input(4, 2, 3)
    fill = b.broadcast(b.literal(-3.5), (2, 3, 4), ())
    program = b.build(b.t(b.op("max", b.t(x, 1, 2, 0), fill), 2, 0, 1))
    egraph = EGraph()
    encode(program, egraph)
    run = run_rulesets(egraph, resolve(["transpose"]), LIMITS)
    assert run.saturated and run.rules_fired.get("transpose.broadcast")
    assert not [row for row in table_rows(egraph, ask) if row[0] == "broadcast_sink"]
    result = optimize_program(program, OptimizeOptions(rules=["transpose"], limits=LIMITS))
    assert result.program.count("transpose") == 0
    assert_same_values(program, result.program)


def test_captured_function_optimizes_to_same_values():
    import jax.numpy as jnp

    from eqsat_attn.capture import capture

    def f(x, w):
        h = jnp.tanh(jnp.swapaxes(x, 1, 2))  # [2, 4, 3]
        return jnp.einsum("bij,jk->bik", jnp.swapaxes(h, 1, 2), w).sum(axis=1)

    rng = np.random.default_rng(3)
    args = (rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32))
    program = capture(f, *args).program
    result = optimize_program(program, OptimizeOptions(rules=["transpose", "canonical"], limits=LIMITS))
    assert result.rules_fired
    assert_same_values(program, result.program)
    np.testing.assert_allclose(np.asarray(lower(result.program)(*args)[0]), np.asarray(f(*args)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("narrow", ["bfloat16", "float16"])
def test_widened_and_cast_back_is_the_value_bit_for_bit(narrow):
    """``x.astype(f32).astype(narrow)`` is x and ``max(x.astype(f32)).astype(narrow)`` is max(x)
    (`canonical.convert`): the optimized program drops the casts and keeps every bit, ±0,
    denormals, ±inf, the largest finite values and NaN included."""
    import jax
    import jax.numpy as jnp

    import eqsat_attn as ea

    def round_trip(x):
        return x.astype(jnp.float32).astype(x.dtype) * 2, jnp.max(x.astype(jnp.float32), -1).astype(x.dtype)

    info = jnp.finfo(narrow)
    special = [0.0, -0.0, float(info.smallest_subnormal), -float(info.smallest_subnormal), float(info.max),
               -float(info.max), np.inf, -np.inf, np.nan, 1.5]
    x = jnp.asarray(np.array(special * 3, np.float32).reshape(3, 10)).astype(narrow).at[2, 8].set(1.0)
    optimized = ea.optimize(round_trip, rules=["canonical"])
    after = optimized.explain(x).after
    assert after.count("convert_element_type") == 0, after
    for got, want in zip(optimized(x), round_trip(x)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint16)),
                                      np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint16)))


# ----------------------------------------------------------------------------- extraction under several models





COST_MODELS = [MaterializedBytes(), PreferTransposes(), PenaliseTransposes(), ArbitraryCost(1), ArbitraryCost(2)]
CORPUS = [p_compose, p_unary, p_binary, p_broadcast, p_reduce, p_reshape, p_dot_output, p_dot_operand, p_batched_dot]


def test_extracted_programs_differ_and_agree():
    distinct: set[str] = set()
    changed = 0
    for make in CORPUS:
        program = make()
        egraph = EGraph()
        enc = encode(program, egraph)
        run_rulesets(egraph, resolve(["transpose", "canonical"]), LIMITS)
        seen_here = set()
        for model in COST_MODELS:
            chosen, cost = extract_program(egraph, enc, model)
            assert chosen.output_types == program.output_types
            assert_same_values(program, chosen)
            text = ir.pretty(chosen)
            seen_here.add(text)
            distinct.add(text)
        changed += len(seen_here) > 1
    assert changed >= 3, "cost models should pick different members on several programs"
    assert len(distinct) >= 2


# ----------------------------------------------------------------------------- rule files and names


def test_user_rule_file_by_path(tmp_path):
    rule_file = tmp_path / "my_rules.py"
    rule_file.write_text(
        textwrap.dedent(
            '''
            """A user rule file."""
            from egglog import String, f64, var
            from eqsat_attn.egraph.language import IntVec, Term
            from eqsat_attn.egraph.rulesets import RuleSet, rw

            mine = RuleSet("user_mul_one", "Multiplying by one is the identity.")
            x = var("x", Term)
            s, d = var("s", IntVec), var("d", IntVec)
            dt = var("dt", String)

            @mine.family
            def mul_one():
                """x * broadcast(1) is x."""
                yield rw(Term.binary("mul", x, Term.broadcast(Term.literal(f64(1.0), dt), s, d)), x)
            '''
        )
    )
    b = B(); x = b.input(2, 3)
    one = b.broadcast(b.literal(1.0), (2, 3), ())
    program = b.build(b.op("exp", b.op("mul", x, one)))
    result = optimize_program(program, OptimizeOptions(rules=[str(rule_file)], limits=LIMITS))
    assert result.rules_fired.get("user_mul_one.mul_one", 0) > 0, result.rules_fired
    assert result.program.count("mul") == 0
    assert_same_values(program, result.program)
    # with the shipped sets as well
    result = optimize_program(program, OptimizeOptions(rules=["transpose", str(rule_file)], limits=LIMITS))
    assert result.rules_fired.get("user_mul_one.mul_one", 0) > 0
    assert_same_values(program, result.program)


def test_unknown_rule_set_name():
    with pytest.raises(KeyError) as info:
        resolve(["transpose", "no_such_rules"])
    message = str(info.value)
    assert "no_such_rules" in message and "transpose" in message and "canonical" in message


def test_missing_rule_file():
    with pytest.raises(FileNotFoundError):
        resolve(["/nonexistent/rules.py"])


def test_default_rules_include_shipped_sets():
    names = [r.name for r in resolve(None)]
    assert "transpose" in names and "canonical" in names


def test_a_rule_set_comes_after_the_set_whose_facts_it_reads():
    """`READS_FROM`: attention_grad reads softmax's VJP from attention_grad_vjp, which must run just
    before it in each round, named or not, and only once."""
    assert [r.name for r in resolve(["attention_grad"])] == ["attention_grad_vjp", "attention_grad"]
    names = [r.name for r in resolve(["transpose", "attention_grad_vjp", "attention_grad"])]
    assert names == ["transpose", "attention_grad_vjp", "attention_grad"]
