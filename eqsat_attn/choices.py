"""The user's choices by name (cost models, extractors, attention backends, rule sets), checked
where they are given: by ``ea.optimize(...)``, the explorer and the command line alike.

Each check raises a ValueError or TypeError that names the option, the value given and the
accepted ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .cost import MaterializedBytes, current_device_model, for_device
from .cost.model import CostModel
from .egraph.rulesets import resolve, rule_names
from .limits import Limits

EXTRACTORS = ("greedy-dag", "tree", "ilp")  # greedy over the DAG; egglog's tree costs; exact (small graphs)
BACKENDS = ("auto", "pallas", "reference")  # how the Attention op is lowered (kernels.dispatch.KERNELS)
COST_MODEL_NAMES = (
    "default", "bytes", "roofline-h100", "roofline-h200", "roofline-cpu",
    "roofline-h100-reference", "roofline-h200-reference", "roofline-cpu-reference",
)


def cost_model_from_name(name: str | CostModel | None, backend: str = "auto") -> CostModel:
    """A cost model from a name: "bytes", "roofline-<h100|h200|cpu>[-reference]", "default".

    A model object is returned as is; None and "default" give the current device's roofline
    (pricing attention as plain XLA when ``backend`` is "reference").
    """
    if name is None or name == "default":
        return current_device_model("reference" if backend == "reference" else "pallas")
    if not isinstance(name, str):
        return check_cost_model(name)
    check_choice("cost_model", name, COST_MODEL_NAMES)
    if name == "bytes":
        return MaterializedBytes()
    rest, kernel = name.removeprefix("roofline-"), "pallas"
    if rest.endswith("-reference"):
        rest, kernel = rest.removesuffix("-reference"), "reference"
    return for_device(rest, kernel)


def check_cost_model(model: Any) -> Any:
    """``model`` if it is a cost model object (it has ``node_cost``); TypeError otherwise."""
    if not callable(getattr(model, "node_cost", None)):
        raise TypeError(
            f"cost_model must be a name ({', '.join(COST_MODEL_NAMES)}) or a cost model object with "
            f"`name` and `node_cost(node)` (eqsat_attn.cost.CostModel), got {model!r}")
    return model


def check_choice(option: str, value: Any, accepted: Sequence[str]) -> str:
    """``value`` if it is one of ``accepted``; a ValueError (TypeError for a non-string) naming them."""
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a string, one of {', '.join(map(repr, accepted))}; got {value!r}")
    if value not in accepted:
        raise ValueError(f"unknown {option.replace('_', ' ')} {value!r}; accepted: {', '.join(map(repr, accepted))}")
    return value


def check_limits(limits: Any) -> Any:
    """``limits`` if it is an `eqsat_attn.Limits` (None: the defaults); TypeError otherwise."""
    if limits is None:
        return Limits()
    if not isinstance(limits, Limits):
        raise TypeError(
            f"limits must be an eqsat_attn.Limits, e.g. ea.Limits(iterations=10, seconds=5.0), got {limits!r}")
    return limits


def check_rules(rules: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str] | None:
    """Rule-set names and rule-file paths as a list (one name counts as a list of one), each
    one resolved now, so an unknown name or a broken rule file is an error here, not at the
    first call. None (the default list) loads nothing."""
    if rules is None:
        return None
    names = rule_names(rules)
    resolve(names)
    return names
