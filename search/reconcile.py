"""`iterhead reconcile`: mark runs a crash left RUNNING as KILLED, never a live search's.

A run is live while its heartbeat (the ``iterhead.heartbeat`` tag, refreshed every 30 s by
`iterhead train` and by a search's driver on its parent run) is fresh. A RUNNING run of
iterhead's whose heartbeat (or, without one, whose start) is older than `stale_after`
seconds is marked KILLED, and so are the RUNNING trial runs of such a search (and the
configuration and seed runs of a search with ``seeds:``, whose heartbeat is the search's).
Runs of a live search are never touched. A later `--resume` sets a search's runs RUNNING again.
Each new search reconciles its own experiment before it starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from iterhead.curricula.errors import ConfigError
from iterhead.search.tracking import all_runs, every_page
from iterhead.trainable import results as r

STALE_AFTER_S = 300.0
MARKS = (r.KIND, r.CURRICULUM_TAG, r.TRIAL_ID)


@dataclass
class Marked:
    run_id: str
    experiment: str
    what: str
    idle_s: float


def last_sign_of_life(run: Any) -> float:
    """Unix seconds of the run's last heartbeat, or of its start."""
    beat = run.data.tags.get(r.HEARTBEAT_TAG)
    return float(beat) if beat else run.info.start_time / 1000.0


def all_experiments(client: Any, page: int = 1000) -> list[Any]:
    """Every experiment of the store, page by page (one search gives at most a page: 1000 by default)."""
    return every_page(lambda n, token: client.search_experiments(max_results=n, page_token=token), page)


def reconcile(client: Any, experiments: list[str] | None = None, stale_after: float = STALE_AFTER_S,
              now: float | None = None) -> list[Marked]:
    """Mark stale RUNNING iterhead runs KILLED; returns what was marked."""
    now = now or time.time()
    if experiments is None:
        exps = all_experiments(client)
    else:
        exps = [client.get_experiment_by_name(n) for n in experiments]
        missing = [n for n, e in zip(experiments, exps) if e is None]
        if missing:
            raise ConfigError(f"no experiment named {missing[0]!r} in the tracking store", field="--experiment")
    marked: list[Marked] = []
    for exp in exps:
        running = all_runs(client, exp.experiment_id, "attributes.status = 'RUNNING'")
        ours = [run for run in running if any(k in run.data.tags for k in MARKS)]
        by_id = {run.info.run_id: run for run in running}
        for run in ours:
            owner = heartbeat_owner(run, by_id)
            if owner is None:  # the search run already ended: its trial (or seed) run is an orphan
                idle = now - last_sign_of_life(run)
                stale = True
            else:
                idle = now - last_sign_of_life(owner)
                stale = idle > stale_after
            if stale:
                client.set_terminated(run.info.run_id, "KILLED")
                parent_id = run.data.tags.get(r.PARENT_RUN)
                what = run.data.tags.get(r.KIND) or (r.KIND_TRIAL if parent_id else "train")
                marked.append(Marked(run.info.run_id, exp.name, what, idle))
    return marked


def heartbeat_owner(run: Any, running: dict[str, Any]) -> Any | None:
    """The run whose heartbeat speaks for `run`: its topmost ancestor (a search's parent run,
    above configuration and seed runs), or None when an ancestor is no longer RUNNING."""
    while True:
        parent_id = run.data.tags.get(r.PARENT_RUN)
        if not parent_id:
            return run
        run = running.get(parent_id)
        if run is None:
            return None
