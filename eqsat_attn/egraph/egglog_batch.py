"""egglog commands sent to egglog in one call instead of one call each.

egglog-python registers a rule set by converting each rule and sending each resulting command to
egglog in a call of its own (~750 calls for the default rule sets). Sending the same commands, in
the same order, in one call saves egglog's per-call cost: registering the default rule sets in an
empty e-graph of a warm process takes ~0.37 s instead of ~0.49 s (~0.04 s less in a fresh process).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from egglog import EGraph, bindings


@contextmanager
def commands_in_one_call(egraph: EGraph) -> Iterator[list[bindings._Command]]:
    """Inside the block, the commands egglog-python sends to ``egraph`` are kept, then sent in one
    call, in order, when the block ends without an error (nothing is sent after an error). The
    block gets the list they are kept in (complete once the block has ended).

    Only for code that never reads a command's output (registering declarations and rule sets:
    egglog-python discards those outputs); a read inside the block would see none.
    """
    state = egraph._state
    pending: list[bindings._Command] = []

    def keep(*commands: bindings._Command) -> list[bindings._CommandOutput]:
        pending.extend(commands)
        return []

    state.run_program = keep  # this e-graph only: an attribute of the instance shadows the method
    try:
        yield pending
    finally:
        del state.run_program
    state.run_program(*pending)
