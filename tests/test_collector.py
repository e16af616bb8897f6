"""The cyclic garbage collector is paused while an optimization runs and restored after, as it was."""

from __future__ import annotations

import gc
import threading

import jax.numpy as jnp
import numpy as np

import eqsat_attn as ea
from eqsat_attn.collector import collection_paused


def test_nested_and_concurrent_pauses_restore_the_collector_once_the_last_ends():
    assert gc.isenabled()
    inner_done, outer_may_end = threading.Event(), threading.Event()

    def other_thread():
        with collection_paused():
            inner_done.set()
            outer_may_end.wait(10)

    with collection_paused():
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
        worker = threading.Thread(target=other_thread)
        worker.start()
        inner_done.wait(10)
    assert not gc.isenabled()  # the other thread's pause is still open
    outer_may_end.set()
    worker.join()
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off():
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_optimize_pauses_the_collector_while_tracing_and_restores_it():
    seen = []

    def f(x):
        seen.append(gc.isenabled())
        return jnp.tanh(x) * 2.0

    x = np.linspace(-3, 3, 8, dtype=np.float32)
    got = ea.optimize(f)(x)
    assert seen and not any(seen) and gc.isenabled()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.tanh(x) * 2.0))
