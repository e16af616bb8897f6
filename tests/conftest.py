"""Shared pytest options."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

# Built rule sets are cached on disk by default (eqsat_attn.egraph.rule_cache); the suite uses a
# fresh directory of its own, so no test depends on (or fills) a user's warm cache.
_RULE_CACHE_DIR = tempfile.mkdtemp(prefix="eqsat-attn-test-rules-")
os.environ["EQSAT_ATTN_RULE_CACHE_DIR"] = _RULE_CACHE_DIR


def pytest_unconfigure(config):
    shutil.rmtree(_RULE_CACHE_DIR, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption(
        "--soundness-examples",
        action="store",
        type=int,
        default=300,  # CI budget (the suite runs ~15 min of its 30 on 2 workers); `./dev soundness N` for deep runs
        help="number of random programs the soundness sweep (tests/test_soundness_random.py) checks",
    )


def pytest_collection_modifyitems(config, items):
    """Long sweeps (marked ``slow``) run first, so that parallel workers (pytest-xdist, as
    ``./dev test`` runs the suite) do not end with one of them running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def full_f32_matmuls_on_gpu():
    """For kernel tests that compare against float64 references: on a GPU, run float32 matmuls at
    full precision (XLA's default there is TF32, ~1e-3 relative error). A no-op on CPU, where the
    default is already full float32 and a precision context would change captured jaxprs.
    Use with ``pytestmark = pytest.mark.usefixtures("full_f32_matmuls_on_gpu")``."""
    if jax.default_backend() != "gpu":
        yield
        return
    with jax.default_matmul_precision("float32"):
        yield
