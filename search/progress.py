"""What a search says on the terminal as it runs: trials (or PBT members) starting and ending,
each PBT generation as its last trial ends, and a status line. Lines only; the search's
callback (`search.callback`) prints them as Tune reports."""

from __future__ import annotations

import math
from typing import Any

from iterhead.search.report import short
from iterhead.trainable import results as r


def member_of(trial) -> dict[str, Any] | None:
    """A PBT trial's member config (`search.population.Population.config`); None for other trials."""
    return trial.config.get("pbt")


def trial_started(trial, invalid: str | None) -> list[str]:
    """A trial's sampled values, and why it will fail if they make no valid curriculum; a PBT
    member's first generation, or the member it copies."""
    member = member_of(trial)
    if member is not None:
        settings = ", ".join(f"{k}={short(v)}" for k, v in member["segments"][-1]["settings"].items())
        if member["generation"] == 0:
            return [f"member {member['member']} started: {settings}"]
        if member["donor"] is None:
            return []
        return [f"member {member['member']} copies member {member['donor']} at epoch "
                f"{member['segments'][-1]['start']} of stage {member['stage']} (generation "
                f"{member['generation']}) and goes on with {settings}"]
    values = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
    lines = [f"trial {trial.trial_id} started{': ' + values if values else ''}"]
    if invalid is not None:
        lines.append(f"trial {trial.trial_id}: these values make an invalid curriculum ({invalid}); it will fail, "
                     "and the search goes on")
    return lines


def trial_finished(trial, seeds: list[int] | None) -> str:
    """How a trial (a PBT member: its training) ended."""
    last = trial.last_result or {}
    if last.get(r.DIVERGED):
        how = "diverged (the loss, weights or probes became NaN or infinite; censored)"
    elif last.get(r.REACHED):
        how = f"reached the target at {last[r.COMPUTE_TO_TARGET]:.3e} FLOP"
    else:
        how = f"censored (did not reach the target; {last.get(r.FLOPS, 0):.3e} FLOP spent)"
    if seeds:
        how = f"{int(last.get(r.SEEDS_REACHED, 0))} of {len(seeds)} seeds reached the target; median {how}"
    member = member_of(trial)
    who = f"member {member['member']}" if member is not None else f"trial {trial.trial_id}"
    return f"{who} finished: {how}"


def generation_trained(trials, trial, failed: bool = False) -> str | None:
    """As `trial`, the last of its PBT generation, ends (`failed`: with an error), the line that
    says so with its best member as the population ranks them (`search.population`: the target
    accuracy, then the training loss, then the member); None for any other trial."""
    member = member_of(trial)
    if member is None:
        return None
    same = [t for t in trials if (member_of(t) or {}).get("generation") == member["generation"]]
    if any(t.status not in ("TERMINATED", "ERROR") for t in same if t is not trial):
        return None  # Tune marks a trial ended after its callbacks: `trial` itself still runs
    scored = [(-float(t.last_result.get(r.TARGET_ACC, 0.0)), float(t.last_result.get(r.LOSS, math.inf)),
               member_of(t)["member"]) for t in same
              if t.last_result and t.status != "ERROR" and not (failed and t is trial)]
    best = f": best target accuracy {-min(scored)[0]:.1%} (member {min(scored)[2]})" if scored else ""
    return f"generation {member['generation']} trained{best}"


def status_line(trials) -> str:
    """How many trials are in each state, how many reached the target, the best running one."""
    states: dict[str, int] = {}
    for t in trials:
        states[t.status] = states.get(t.status, 0) + 1
    reached = sum(1 for t in trials if (t.last_result or {}).get(r.REACHED))
    running = [t for t in trials if t.status == "RUNNING" and t.last_result]
    best = max((t.last_result.get(r.TARGET_ACC, 0.0) for t in running), default=None)
    line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
    extra = f"; best running target accuracy {best:.1%}" if best is not None else ""
    return f"[status] {line}; {reached} reached the target{extra}"
