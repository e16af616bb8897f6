"""The cost-model protocol: price one node from its op, static parameters and types.

The same model prices IR nodes (`program_cost`) and e-nodes during extraction, so the
predicted cost of an extracted program is the cost extraction minimised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .. import ir


@dataclass(frozen=True)
class OpView:
    """What a cost model sees of one node."""

    op: str
    params: Mapping[str, Any]
    inputs: tuple[ir.TensorType, ...]
    output: ir.TensorType


@runtime_checkable
class CostModel(Protocol):
    """Predicted seconds (or any additive unit) of running one node."""

    name: str

    def node_cost(self, node: OpView) -> float: ...


FREE_OPS = frozenset({"input", "literal", "constant", "opaque_output", "reshape", "stop_gradient"})


class MaterializedBytes:
    """Counts bytes written by every node that materialises its output (reshapes are views)."""

    name = "bytes"

    def node_cost(self, node: OpView) -> float:
        if node.op in FREE_OPS:
            return 0.0
        return float(node.output.nbytes)


def view_of(program: ir.Program, node_id: int) -> OpView | None:
    """The OpView of an IR node (None for nodes without a single output type)."""
    node = program.nodes[node_id]
    if node.type is None:
        return None
    return OpView(node.op, node.params, tuple(program.type_of(j) for j in node.inputs if program.nodes[j].type is not None), node.type)


def program_cost(program: ir.Program, model: CostModel) -> float:
    """Sum of node costs over the live nodes (a shared node is paid once)."""
    total = 0.0
    for i in program.live_nodes():
        view = view_of(program, i)
        if view is not None:
            total += model.node_cost(view)
    return total
