"""The search's terminal table: each trial's outcome in words a reader cannot misread."""

from __future__ import annotations

import io

from iterhead.search.outcome import print_summary
from iterhead.trainable import results as r


def row(trial: str, status: str, reached: float, c2t: float) -> dict:
    return {"trial_id": trial, "status": status, r.REACHED: reached, r.COMPUTE_TO_TARGET: c2t}


def test_failed_trials_say_failed_even_after_reporting_the_penalty():
    """A trial (or PBT member) that failed after some reports carries the censoring penalty in
    its last one: it failed, it was not censored."""
    out = io.StringIO()
    print_summary([row("a", "TERMINATED", 1.0, 2.0e9), row("b", "TERMINATED", 0.0, 1.0e12),
                   row("c", "ERROR", 0.0, 1.0e12), row("d", "ERROR", 0.0, float("nan")),
                   row("e", "UNFINISHED", 0.0, 1.0e12)], [], out)
    head, *table = out.getvalue().splitlines()[1:]
    assert head.startswith("1 of 5 trials reached the target (3 censored or failed, 1 unfinished)")  # not 4 censored
    lines = {line.split(" | ")[0].strip(): line.split(" | ")[-1] for line in table[1:]}
    assert lines == {"a": "2.000e+09", "b": "1.000e+12 (censored)", "c": "failed", "d": "failed", "e": "unfinished"}
