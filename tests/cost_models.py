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
