"""What a search ends with: one row per trial, the parent run's summary, the terminal table.

Rows are read from Tune's result grid and matched to their MLflow runs by trial id (a PBT
search's rows are its members, `population.member_rows`). The parent run gets the trial
counts, the search's accounting of what it trained (`sharing.accounting`), `trials.csv` and
the summary plots; the terminal gets the trials ranked by `compute_to_target`, reached first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, TextIO

from iterhead.search.report import short
from iterhead.search.tracking import RunWriter, all_runs, store_error
from iterhead.trainable import results


def ended(last_result: dict[str, Any] | None, errored: bool) -> bool:
    """Whether a trial ended (or failed), from its last result. Not Tune's trial state: after a
    graceful stop (Ctrl-C, SIGTERM) Tune holds the trials it stopped as TERMINATED. A trial's
    last report says it ended (`results.TRIAL_ENDS`); Tune marks a last result done where its
    scheduler stopped the trial, and where a trial returned, but that mark can miss the saved
    state a resume restores (made in place, after the last report was saved)."""
    last = last_result or {}
    return errored or bool(last.get("done")) or bool(last.get(results.TRIAL_ENDS))


def trial_rows(grid, writer: RunWriter, experiment: str, parent: str, keys: list[str],
               pbt: bool = False, finished: set[str] = frozenset(), stopping: bool = False) -> list[dict[str, Any]]:
    """One row per trial: its searched values, outcome and MLflow run (PBT: one per member); a
    trial in `finished` ended before a resume (`folder.ended_before`). A search `stopping` whose
    store does not answer has rows without runs: the writer's close says the store's error."""
    def children() -> dict[str, str]:
        exp = writer.experiment_id(experiment)
        runs = all_runs(writer.client, exp, f"tags.`{results.PARENT_RUN}` = '{parent}'")
        return {run.data.tags.get(results.TRIAL_ID, ""): run.info.run_id for run in runs}

    try:
        run_ids = writer.submit(children).result()
    except Exception as err:
        if not stopping or not store_error(err):
            raise
        run_ids = {}
    if pbt:
        from iterhead.search.population import member_rows

        return member_rows(grid, run_ids, keys, finished)
    rows = []
    for result, trial in zip(grid, _trials(grid)):
        m = result.metrics or {}
        trial_id = m.get("trial_id") or (trial.trial_id if trial else Path(result.path).name)
        status = "ERROR" if result.error else "TERMINATED" if ended(m, False) or trial_id in finished else "UNFINISHED"
        row = {"trial_id": trial_id, "status": status, "run_id": run_ids.get(trial_id, "")}
        config = result.config or (trial.config if trial else {})
        row.update({k: config.get(k) for k in keys})
        for k in (results.REACHED, results.COMPUTE_TO_TARGET, results.TARGET_ACC, results.FLOPS,
                  results.SEEDS_REACHED):
            row[k] = m.get(k, float("nan"))
        for k in (results.FLOPS_SEEDS, results.FLOPS_FORKED):  # what it trained, for the search's accounting
            row[k] = m.get(k, 0.0)
        row["forked_from"] = m.get(results.PREFIX_SOURCE, "")
        row["reports"] = m.get("training_iteration", 0)
        rows.append(row)
    return rows


def ran_to_end(rows: list[dict[str, Any]]) -> bool:
    """Whether a search whose trials all ended (`trials_ended`) also ran to its end: no row is
    unfinished. PBT members between generations have no trial running while the searcher has the
    next ones to propose: a Ctrl-C there left every trial ended, and the search was summarised and
    marked finished (never to be resumed) with its population half trained."""
    return all(row["status"] != "UNFINISHED" for row in rows)


def trials_ended(grid, finished: set[str] = frozenset()) -> bool:
    """Whether every trial of Tune's result grid ended (`ended`), or had before a resume."""
    return all(ended(res.metrics, res.error is not None) or (res.metrics or {}).get("trial_id") in finished
               for res in grid)


def _trials(grid) -> list[Any]:
    """Tune's trial of each result, in the grid's order, or Nones where Ray hides them. A trial
    that never reported (still pending when a search was stopped) has neither config nor trial
    id in its `Result` (Ray 2.60 reads both from the last reported result); its trial has."""
    trials = list(getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [])
    return trials if len(trials) == len(grid) else [None] * len(grid)


def log_summary(writer: RunWriter, parent: str, rows: list[dict[str, Any]], keys: list[str],
                flops: dict[str, float]) -> None:
    """Trial counts, the search's FLOPs accounting, `trials.csv` and the plots, on the parent run."""
    from iterhead.search import report

    scored = [row for row in rows  # what a trial that ended scored: not a failed one's last penalty, nor NaN
              if row["status"] == "TERMINATED" and row[results.COMPUTE_TO_TARGET] == row[results.COMPUTE_TO_TARGET]]
    with tempfile.TemporaryDirectory(prefix="iterhead-summary-") as tmp:
        folder = Path(tmp)
        report.write_table(folder / "trials.csv", rows, keys)
        report.plot_against_params(folder / "compute_to_target.png", scored, keys)
        report.plot_fraction_reached(folder / "fraction_reached.png", scored, len(rows))
        n_reached = sum(1 for row in scored if row[results.REACHED] == 1.0)
        writer.submit(writer.log_metrics, parent, {results.TRIALS: len(rows), results.TRIALS_REACHED: n_reached,
                                                   **flops}, 0)
        writer.submit(lambda: writer.client.log_artifacts(parent, str(folder)))
        writer.flush()


def print_summary(rows: list[dict[str, Any]], keys: list[str], out: TextIO,
                  seeds: list[int] | None = None, what: str | None = None) -> None:
    """The trials (or `what`) ranked by compute_to_target, reached first, censored marked."""
    if not rows:
        return
    reached = [row for row in rows if row[results.REACHED] == 1.0]
    seeds = seeds or []
    what = what or ("configurations (median over their seeds)" if seeds else "trials")
    unfinished = sum(1 for row in rows if row["status"] == "UNFINISHED")  # neither censored nor failed: cut short
    print(f"\n{len(reached)} of {len(rows)} {what} reached the target ({len(rows) - len(reached) - unfinished} "
          f"censored or failed{f', {unfinished} unfinished' if unfinished else ''}); by compute_to_target:", file=out)
    print("  " + " | ".join(["trial", *keys, *(["seeds reached"] if seeds else []), "reached", "compute_to_target"]),
          file=out)
    for row in sorted(rows, key=lambda row: (-(row[results.REACHED] == 1.0), row[results.COMPUTE_TO_TARGET])):
        n = row.get(results.SEEDS_REACHED, float("nan"))
        ok = row[results.REACHED] == 1.0
        vals = [row["trial_id"], *(short(row.get(k)) for k in keys),
                *([f"{int(n)} of {len(seeds)}" if n == n else "?"] if seeds else []),
                "yes" if ok else "no",
                "unfinished" if row["status"] == "UNFINISHED" else
                "failed" if row["status"] == "ERROR" and not ok else  # its last report's penalty is no censoring
                f"{row[results.COMPUTE_TO_TARGET]:.3e}" + ("" if ok else " (censored)")]
        print("  " + " | ".join(vals), file=out)
