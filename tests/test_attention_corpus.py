"""The attention corpus (tests/attention_corpus.py): positives are raised to attention with the
original values, negatives keep their values and are not raised. Positives the rules do not raise
yet are listed in ``KNOWN_UNRAISED`` and xfail; one that starts being raised fails until removed."""

from __future__ import annotations

import pytest

from attention_corpus import CASES, KNOWN_UNRAISED, Case, evaluate


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attention_corpus(case: Case):
    outcome = evaluate(case)
    assert not outcome.warnings, f"optimization fell back or warned: {outcome.warnings}"
    assert outcome.values_equal, (
        f"{case.name}: values changed (worst excess error {outcome.max_error:.3g})\n{outcome.after}")
    if not case.positive:
        assert outcome.raised == 0, f"{case.name} is not attention but was raised:\n{outcome.after}"
        return
    if case.name in KNOWN_UNRAISED:
        if outcome.raised:
            pytest.fail(f"{case.name} is raised now: remove it from KNOWN_UNRAISED in tests/attention_corpus.py")
        pytest.xfail(f"{case.name}: not raised by the current rules ({case.source})")
    assert outcome.raised >= 1, f"{case.name} ({case.source}) was not raised to attention:\n{outcome.after}"
