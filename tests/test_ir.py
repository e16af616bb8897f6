"""The Program IR: hash-consing, structural equality, pretty-printing, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqsat_attn as ea
from eqsat_attn.ir import ConstValue, Node, Params, Program, ProgramBuilder, TensorType

F32_2x4 = TensorType((2, 4), "float32")


def test_builder_shares_structurally_equal_nodes() -> None:
    b = ProgramBuilder()
    x = b.input(F32_2x4)
    e1 = b.add("exp", [x], F32_2x4)
    e2 = b.add("exp", [x], F32_2x4)
    t = b.add("transpose", [x], TensorType((4, 2), "float32"), perm=(1, 0))
    assert e1 == e2
    assert t != e1
    assert b.add("transpose", [x], TensorType((4, 2), "float32"), perm=(1, 0)) == t
    assert b.add("transpose", [x], TensorType((4, 2), "float32"), perm=(0, 1)) != t
    # inputs are never shared, even with equal types
    assert b.input(F32_2x4) != x
    program = b.build([e1, t])
    assert len(program) == 5 and program.inputs == (0, 4)


def test_params_and_const_values_hash_by_content() -> None:
    assert Params({"a": 1, "b": (2, 3)}) == Params([("b", (2, 3)), ("a", 1)])
    assert hash(Params({"a": 1})) == hash(Params({"a": 1}))
    c1 = ConstValue(np.arange(6, dtype=np.float32).reshape(2, 3))
    c2 = ConstValue(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert c1 == c2 and hash(c1) == hash(c2)
    assert c1 != ConstValue(np.arange(6, dtype=np.int32).reshape(2, 3))


def _block(x, w):
    h = jnp.tanh(x @ w)
    return jax.nn.softmax(h, axis=-1) * 0.5


def test_two_captures_of_the_same_function_are_equal() -> None:
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, 4))
    w = jax.random.normal(jax.random.fold_in(key, 1), (4, 5))
    p1 = ea.capture(_block, x, w).program
    p2 = ea.capture(_block, x + 1.0, w * 2.0).program  # values differ, structure does not
    assert p1 == p2 and hash(p1) == hash(p2)
    p3 = ea.capture(_block, x[:2], w).program
    assert p1 != p3


def test_pretty_printer_shows_types_ops_and_params() -> None:
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    text = str(ea.capture(lambda x: jnp.transpose(x, (0, 2, 1)).sum(axis=1), x).program)
    assert text.startswith("program(%0: f32[2,3,4])")
    assert "transpose[perm=(0,2,1)]" in text
    assert "reduce_sum[axes=(1)]" in text
    assert "f32[2,3]" in text
    assert text.rstrip().endswith("}")


def test_program_rejects_forward_references() -> None:
    nodes = (
        Node("input", (), Params({"index": 0}), F32_2x4),
        Node("exp", (2,), Params(), F32_2x4),
        Node("neg", (0,), Params(), F32_2x4),
    )
    with pytest.raises(ValueError, match="not an earlier node"):
        Program(nodes, (0,), (1,))


def test_live_nodes_and_count_ignore_dead_code() -> None:
    b = ProgramBuilder()
    x = b.input(F32_2x4)
    dead = b.add("exp", [x], F32_2x4)
    out = b.add("tanh", [x], F32_2x4)
    program = b.build([out])
    assert dead not in program.live_nodes()
    assert program.count("exp") == 0 and program.count("tanh") == 1


def test_signed_zero_literals_stay_distinct():
    from eqsat_attn.ir import ProgramBuilder, TensorType

    b = ProgramBuilder()
    t = TensorType((), "float32")
    pos = b.add("literal", (), t, value=0.0)
    neg = b.add("literal", (), t, value=-0.0)
    assert pos != neg
    assert b.add("literal", (), t, value=float("nan")) == b.add("literal", (), t, value=float("nan"))
