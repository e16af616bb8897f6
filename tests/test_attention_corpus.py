"""The attention corpus (tests/attention_corpus.py): positives are raised to attention with the
original values, negatives keep their values and are not raised. Known gaps are strict xfails:
a positive in ``KNOWN_UNRAISED`` or a negative in ``KNOWN_RAISED_NEGATIVES`` that starts behaving
fails until it is removed from its list. Values must be equal in every case, listed or not."""

from __future__ import annotations

import pytest

import numpy as np

from attention_corpus import (
    CASES, FAST_MATH_RAISED, FAST_MATH_RAISED_NEGATIVES, KNOWN_RAISED_NEGATIVES, KNOWN_UNRAISED, SLOW, Case, excess_error, evaluate,
)


PARAMS = [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW else []) for c in CASES]


@pytest.mark.parametrize("case", PARAMS)
def test_attention_corpus(case: Case):
    outcome = evaluate(case)
    assert not outcome.fallbacks, f"{case.name}: optimization fell back to the original: {outcome.fallbacks}"
    assert outcome.saturated, f"{case.name}: saturation stopped at a limit ({outcome.notes})"
    assert outcome.values_equal, (
        f"{case.name}: values changed (worst excess error {outcome.max_error:.3g})\n{outcome.after}")
    if case.positive:
        if case.name in KNOWN_UNRAISED:
            if outcome.fully_raised:
                pytest.fail(f"{case.name} is raised now: remove it from KNOWN_UNRAISED in tests/attention_corpus.py")
            if case.name in FAST_MATH_RAISED:  # the report says why, and what would raise it
                assert any('precision="fast_math"' in r for r in outcome.reasons), outcome.reasons
            pytest.xfail(f"{case.name}: not raised: {KNOWN_UNRAISED[case.name]}")
        assert outcome.fully_raised, f"{case.name} ({case.source}) was not raised to attention:\n{outcome.after}"
    else:
        if case.name in KNOWN_RAISED_NEGATIVES:
            if not outcome.raised:
                pytest.fail(f"{case.name} is left alone now: remove it from KNOWN_RAISED_NEGATIVES")
            pytest.xfail(f"{case.name}: raised with equal values: {KNOWN_RAISED_NEGATIVES[case.name]} ({case.source})")
        assert outcome.raised == 0, f"{case.name} is not attention but was raised:\n{outcome.after}"


@pytest.mark.parametrize("case", [c for c in CASES if not c.positive], ids=lambda c: c.name)
def test_fast_math_leaves_negatives_alone(case: Case):
    """fast_math's rules raise nothing that is not attention: each negative keeps its values and,
    but for the known ones (`KNOWN_RAISED_NEGATIVES`, `FAST_MATH_RAISED_NEGATIVES`), stays unraised."""
    outcome = evaluate(case, precision="fast_math")
    assert outcome.values_equal, f"{case.name}: worst excess error {outcome.max_error:.3g}"
    known = KNOWN_RAISED_NEGATIVES.keys() | FAST_MATH_RAISED_NEGATIVES.keys()
    assert case.name in known or outcome.raised == 0, f"{case.name} raised:\n{outcome.after}"


def test_value_comparison_rejects_nan_inf_and_shape_mismatches():
    want = np.array([1.0, np.nan, np.inf, -2.0], np.float32)
    assert excess_error(want + np.float32(1e-6), want, 2e-5) <= 0
    assert excess_error(want + np.float32(1e-3), want, 2e-5) > 0
    assert excess_error(np.array([1.0, 0.0, np.inf, -2.0]), want, 2e-5) == np.inf  # NaN lost
    assert excess_error(np.array([1.0, np.nan, -np.inf, -2.0]), want, 2e-5) == np.inf  # Inf sign
    assert excess_error(np.array([1.0, np.nan, 3.0, -2.0]), want, 2e-5) == np.inf  # Inf lost
    assert excess_error(want[:3], want[:3].reshape(3, 1), 2e-5) == np.inf
