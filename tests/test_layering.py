"""The package's import structure (README, "Architecture"): parsed with `ast`, never imported.

Three claims: the module-level import graph of eqsat_attn (rules/ included, as eqsat_attn.rules)
has no cycle; every module-level import points to the importer's layer or one below it; and no
function imports a package module unless `LOCAL_IMPORTS_ALLOWED` says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "eqsat_attn"
SOURCES = {PACKAGE: ROOT / "eqsat_attn", f"{PACKAGE}.rules": ROOT / "rules"}

# Layers, lowest first (README, "Architecture"). A module may import its own layer and those
# below it. A name ending in "." stands for every module under that package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("eqsat_attn.kernels", "eqsat_attn.kernels.")),
    ("ir", ("eqsat_attn.op_types", "eqsat_attn.region", "eqsat_attn.ir", "eqsat_attn.fold", "eqsat_attn.capture",
            "eqsat_attn.blocks", "eqsat_attn.static_values")),
    ("e-graph", ("eqsat_attn.limits", "eqsat_attn.egraph.language", "eqsat_attn.egraph.analysis",
                 "eqsat_attn.egraph.index_math", "eqsat_attn.egraph.qkv_math", "eqsat_attn.egraph.rule_cache",
                 "eqsat_attn.egraph.egglog_batch", "eqsat_attn.egraph.rulesets", "eqsat_attn.egraph.relevance",
                 "eqsat_attn.egraph.encode", "eqsat_attn.egraph.ctors", "eqsat_attn.egraph.decode",
                 "eqsat_attn.egraph.driver", "eqsat_attn.rules", "eqsat_attn.rules.")),
    ("cost", ("eqsat_attn.cost", "eqsat_attn.cost.")),
    ("extraction", ("eqsat_attn.egraph", "eqsat_attn.egraph.extract", "eqsat_attn.egraph.ilp",
                    "eqsat_attn.egraph.refine", "eqsat_attn.qkv_layouts", "eqsat_attn.attention_misses")),
    ("lowering", ("eqsat_attn.lower", "eqsat_attn.mask_kinds", "eqsat_attn.alibi_bias")),
    ("pipeline", ("eqsat_attn.nested", "eqsat_attn.choices", "eqsat_attn.pipeline", "eqsat_attn.disk_cache")),
    ("front", ("eqsat_attn", "eqsat_attn.optimize", "eqsat_attn.report", "eqsat_attn.explore",
               "eqsat_attn.explore_graph", "eqsat_attn.explore_draw", "eqsat_attn.explore_charts",
               "eqsat_attn.examples", "eqsat_attn.cli", "eqsat_attn.collector")),
)

# (importing module, imported module) -> why that import sits inside a function. Only a heavy
# or genuinely optional import belongs here, never one that dodges a cycle (fix the layering).
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package's __init__)."""
    out = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            inner = parts[:-1] if is_package else parts
            out[".".join((prefix, *inner))] = (path, is_package)
    return out


MODULES = _modules()


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement names (a ``from P import name`` of a non-module
    name names P itself)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    return [name for name in dict.fromkeys(names) if name in MODULES]


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def imports_of(importer: str, is_package: bool, source: str) -> tuple[set[str], set[str]]:
    """(modules imported when ``importer`` runs, modules imported inside its functions).
    Imports under ``if TYPE_CHECKING:`` never run and count as neither."""
    module_level: set[str] = set()
    local: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for branch in child.orelse:
                    visit(branch, in_function)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                (local if in_function else module_level).update(
                    t for t in _targets(importer, is_package, child) if t != importer)
            else:
                visit(child, in_function)

    visit(ast.parse(source), False)
    return module_level, local


def _read(name: str) -> tuple[set[str], set[str]]:
    path, is_package = MODULES[name]
    return imports_of(name, is_package, path.read_text(encoding="utf-8"))


def _runs_first(importer: str, target: str) -> set[str]:
    """``target`` and the packages Python initialises before it (``a.b.c`` runs ``a.b`` first),
    less the importer's own enclosing packages (already initialising when it runs)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = {".".join(importer.split(".")[:i]) for i in range(1, len(importer.split(".")))}
    return {m for m in chain if m in MODULES and m != importer and m not in own} | {target}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules importing it runs (module-level imports, with the package
    __init__ files they run on the way)."""
    graph = {}
    for name in MODULES:
        explicit, _ = _read(name)
        graph[name] = set().union(*(_runs_first(name, t) for t in explicit)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)) is not None:
            return found
    return None


def layer_of(module: str) -> int | None:
    for index, (_, members) in enumerate(LAYERS):
        if module in members or any(m.endswith(".") and module.startswith(m) for m in members):
            return index
    return None


def test_the_parser_sees_imports_at_module_level_in_functions_and_under_type_checking():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import ir\n"
        "from .egraph import encode\n"
        "try:\n    from .cost.model import OpView\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    from .pipeline import Limits\n"
        "def f():\n    from .lower import lower_node\n"
        "class C:\n    def g(self):\n        import eqsat_attn.region\n"
    )
    module_level, local = imports_of("eqsat_attn.example_module", False, source)
    assert module_level == {"eqsat_attn.ir", "eqsat_attn.egraph.encode", "eqsat_attn.cost.model"}
    assert local == {"eqsat_attn.lower", "eqsat_attn.region"}
    inside, _ = imports_of("eqsat_attn.egraph.ctors", False, "from ..region import lone_matmul\nfrom .encode import AXES\n")
    assert inside == {"eqsat_attn.region", "eqsat_attn.egraph.encode"}
    package, _ = imports_of("eqsat_attn.egraph", True, "from .driver import run_rulesets\n")
    assert package == {"eqsat_attn.egraph.driver"}


def test_the_cycle_finder_finds_a_cycle_through_a_package_init():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # importing eqsat_attn.egraph.encode from outside runs eqsat_attn.egraph/__init__.py first
    assert _runs_first("eqsat_attn.cost.roofline", "eqsat_attn.egraph.encode") == {
        "eqsat_attn.egraph", "eqsat_attn.egraph.encode"}
    assert _runs_first("eqsat_attn.egraph.ctors", "eqsat_attn.egraph.encode") == {"eqsat_attn.egraph.encode"}


def test_the_graph_covers_the_package_and_its_rules():
    graph = import_graph()
    assert {"eqsat_attn.ir", "eqsat_attn.egraph.driver", "eqsat_attn.rules.attention", "eqsat_attn.kernels.dispatch"} <= set(graph)
    assert "eqsat_attn.limits" in graph["eqsat_attn.egraph.driver"]
    assert "eqsat_attn.egraph.rulesets" in graph["eqsat_attn.rules.attention"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        "import cycle: " + " -> ".join(cycle) + ". Move what the lower module needs down (README, "
        "'Architecture'), rather than importing inside a function")


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"modules in no layer: {missing}; add each to LAYERS in {Path(__file__).name} and to README's Architecture"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_to_the_same_layer_or_below(module):
    own = layer_of(module)
    if own is None:
        pytest.fail(f"{module} is in no layer (see test_every_module_has_a_layer)")
    explicit, _ = _read(module)
    upward = sorted(t for t in explicit if (layer_of(t) or 0) > own)
    assert not upward, (
        f"{module} ({LAYERS[own][0]} layer) imports {upward} from above it "
        f"({', '.join(LAYERS[layer_of(t)][0] for t in upward)}); move the shared definition down")


def test_function_local_imports_of_package_modules_are_allowlisted():
    found = {(name, target) for name in MODULES for target in _read(name)[1]}
    unexplained = sorted(found - set(LOCAL_IMPORTS_ALLOWED))
    assert not unexplained, (
        f"imports inside functions: {unexplained}; import at module level (an import cycle means a "
        "definition belongs lower down), or add it to LOCAL_IMPORTS_ALLOWED with why it must be deferred")
    stale = sorted(set(LOCAL_IMPORTS_ALLOWED) - found)
    assert not stale, f"LOCAL_IMPORTS_ALLOWED lists imports no module makes any more: {stale}"


def test_moved_names_are_still_importable_where_they_were():
    import importlib

    import numpy as np

    import eqsat_attn as ea
    from jax import lax

    from eqsat_attn import choices, ir, op_types, pipeline, region
    from eqsat_attn.egraph import rulesets
    from eqsat_attn.limits import Limits

    # the packages' `encode` and `lower` attributes are the functions of those names
    encode, lower = (importlib.import_module(f"eqsat_attn.{m}") for m in ("egraph.encode", "lower"))

    assert ea.Limits is pipeline.Limits is Limits
    assert choices.rule_names is rulesets.rule_names
    assert ir.TensorType is op_types.TensorType and ir.UNARY_OPS is op_types.UNARY_OPS
    assert (encode.AXES, encode.PACKED_AXES) == (ir.ATTENTION_AXES, ir.PACKED_AXES) == ("BHSD", "BHSD3")
    t = ir.TensorType((2, 3), "float32")
    body = "add(exp($0),$1)"
    assert ir.infer_type("fused", {"body": body}, [t, t]) == region.region_type(body, [t, t]) == t
    with pytest.raises(ValueError, match="ir.infer_type"):
        op_types.infer_type("fused", {"body": body}, [t, t])
    x = np.array([[0.0, -0.0, 1e-45], [88.7, -1e30, np.nan]], np.float32)  # ±0, denormal, near overflow
    y = np.array([[np.inf, -np.inf, np.nan], [3.4e38, -3.4e38, 1.0]], np.float32)
    unfused = np.asarray(lax.add(lax.exp(x), y))
    np.testing.assert_array_equal(np.asarray(lower.evaluate_region(body, [x, y])), unfused)
