"""Shared pytest options."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption(
        "--soundness-examples",
        action="store",
        type=int,
        default=300,
        help="number of random programs the soundness sweep (tests/test_soundness_random.py) checks",
    )
