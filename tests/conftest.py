"""Shared pytest options."""

from __future__ import annotations

import jax
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--soundness-examples",
        action="store",
        type=int,
        default=300,
        help="number of random programs the soundness sweep (tests/test_soundness_random.py) checks",
    )


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """Tests compare against float64 references: on a GPU, run float32 matmuls at full precision
    (XLA's default there is TF32, ~1e-3 relative error). bf16 and fp8 paths are unaffected."""
    with jax.default_matmul_precision("float32"):
        yield
