"""Import a script of bench/ as a module (the benchmarks are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str, module_name: str) -> ModuleType:
    """bench/<script>.py as ``module_name`` (registered in sys.modules: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
