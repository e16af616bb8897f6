"""The attention corpus (tests/attention_corpus.py): positives are raised to attention with the
original values, negatives keep their values and are not raised. Known gaps are strict xfails:
a positive in ``KNOWN_UNRAISED`` or a negative in ``KNOWN_RAISED_NEGATIVES`` that starts behaving
fails until it is removed from its list. Values must be equal in every case, listed or not."""

from __future__ import annotations

import pytest

from attention_corpus import CASES, KNOWN_RAISED_NEGATIVES, KNOWN_UNRAISED, SLOW, Case, evaluate


def _params():
    for case in CASES:
        marks = [pytest.mark.slow] if case.name in SLOW else []
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", _params())
def test_attention_corpus(case: Case):
    outcome = evaluate(case)
    assert not outcome.fallbacks, f"{case.name}: optimization fell back to the original: {outcome.fallbacks}"
    assert outcome.values_equal, (
        f"{case.name}: values changed (worst excess error {outcome.max_error:.3g})\n{outcome.after}")
    if case.positive:
        if case.name in KNOWN_UNRAISED:
            if outcome.raised:
                pytest.fail(f"{case.name} is raised now: remove it from KNOWN_UNRAISED in tests/attention_corpus.py")
            pytest.xfail(f"{case.name}: not raised by the current rules ({case.source})")
        assert outcome.raised >= 1, f"{case.name} ({case.source}) was not raised to attention:\n{outcome.after}"
    else:
        if case.name in KNOWN_RAISED_NEGATIVES:
            if not outcome.raised:
                pytest.fail(f"{case.name} is left alone now: remove it from KNOWN_RAISED_NEGATIVES")
            pytest.xfail(f"{case.name}: raised with equal values, though P is computed anyway ({case.source})")
        assert outcome.raised == 0, f"{case.name} is not attention but was raised:\n{outcome.after}"
