"""Cost models for tests: each makes extraction pick a different member of an e-class."""

from __future__ import annotations

import zlib

from eqsat_attn.cost import OpView


class PreferTransposes:
    """Transposes are free, matmuls very dear: extraction moves work into transposes."""

    name = "prefer-transposes"

    def node_cost(self, node: OpView) -> float:
        if node.op == "transpose":
            return 0.0
        if node.op == "dot_general":
            return 1e6 * node.output.nbytes
        return float(node.output.nbytes)


class PenaliseTransposes:
    name = "penalise-transposes"

    def node_cost(self, node: OpView) -> float:
        return (1e6 if node.op == "transpose" else 1.0) * max(node.output.nbytes, 1)


class ArbitraryCost:
    """A fixed pseudo-random price per (op, params, types): picks an arbitrary member."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.name = f"arbitrary-{seed}"

    def node_cost(self, node: OpView) -> float:
        key = repr((self.seed, node.op, sorted(node.params.items()), node.inputs, node.output))
        return 1.0 + zlib.crc32(key.encode()) % 1000


class PreferFused:
    """Fused regions (rules/fusion.py) cost a tenth of their output; everything else its output:
    extraction picks regions wherever the e-graph has them."""

    name = "prefer-fused"

    def node_cost(self, node: OpView) -> float:
        scale = 0.1 if node.op == "fused" else 1.0
        return scale * max(node.output.nbytes, 1) if node.op not in ("reshape", "literal") else 0.0


class PreferTransposedV:
    """A base model plus a large penalty on attention that reads V with D minor (standard layout),
    so extraction takes the transposed-V form whenever the e-graph has it."""

    def __init__(self, base) -> None:
        self.base = base
        self.name = f"{base.name}+prefer-transposed-v"

    def node_cost(self, node: OpView) -> float:
        cost = self.base.node_cost(node)
        if node.op == "attention" and str(node.params["v_layout"]).endswith("D"):
            cost += 1.0
        return cost
