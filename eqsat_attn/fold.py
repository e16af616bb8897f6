"""Scalar constant folding at capture: rank-0 arithmetic on literals becomes one literal.

Programs spell a scale as ``1 / jnp.sqrt(D)``, ``lax.rsqrt(float(D))`` or ``s / sqrt(D)`` with
the square root traced; XLA folds such constants on the host when it compiles. Folding them the
same way here (the equation's own primitive, evaluated on the CPU in the output's dtype) makes
every spelling one literal, so rules see ``s * 0.125`` whatever the program wrote, and values are
those the compiled program would compute.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from . import ir

FOLDABLE = (ir.UNARY_OPS | ir.BINARY_OPS | {"integer_pow", "convert_element_type"}) - {"stop_gradient"}


def folded_scalar(eqn: Any, literals: list[ir.Node], out: ir.TensorType) -> Any | None:
    """The value of a rank-0 equation over literal operands (a NumPy scalar of ``out``'s dtype),
    or None when it is not foldable (not elementwise, not rank 0, or evaluation fails)."""
    name = eqn.primitive.name
    if out.shape != () or name not in FOLDABLE or not literals:
        return None
    try:
        operands = [np.asarray(n.params["value"], n.type.dtype) for n in literals]
        with jax.default_device(jax.devices("cpu")[0]), jax.ensure_compile_time_eval():
            value = eqn.primitive.bind(*operands, **eqn.params)
        value = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything unusual stays an op; folding is only a convenience
        return None
    if value.shape != () or value.dtype != np.dtype(out.dtype):
        return None
    return value


__all__ = ["FOLDABLE", "folded_scalar"]
