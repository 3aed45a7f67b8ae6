"""`iterhead report`: a search's results as one self-contained HTML page, from MLflow alone.

The page (figures embedded, no external files) and its figures, also logged on the search's
parent run under ``report/``: a table of medians over seeds per configuration (also written
as ``medians.md`` beside the page), compute_to_target against each searched parameter (median and
spread over seeds, censored trials marked), the fraction of trials at target against
compute, the best trial's accuracy at each length against compute, its attention maps and
iteration-head probe scores, and a table of every trial.

Both files begin with a line that says a report wrote them (`REPORTED`); a later report
replaces only such files, never a page or notes of the user's (the rule export follows,
`export.check_own_file`), and checks every path before it writes any.

A PBT search has member runs: the page then has a Population section instead of the medians,
the best member's schedule (its lineage's settings against compute) first among the figures.

A search with ``seeds:`` has configuration runs where others have trial runs: each row is
then a configuration with its own score over its seeds, the median table takes the range
from its seed runs, and the "best trial" is the best configuration's median seed (the seed
whose run holds that median: the lower median is always one seed's value), since only seed
runs hold accuracy curves and attention maps.
"""

from __future__ import annotations

import base64
import html
import tempfile
import time
from pathlib import Path
from typing import Any

from iterhead.curricula.errors import ConfigError
from iterhead.search import report, sharing
from iterhead.search.export import Candidate, check_own_file, child_runs, find_candidates, seed_runs
from iterhead.search.folder import writable_folder
from iterhead.trainable import results as r
from iterhead.trainable.checkpoint import write_atomic


REPORTED = "<!-- written by iterhead report"  # the first line of each file a report writes (`marked`)
OUTPUTS = ("report.html", "medians.md")  # what a report writes in its folder -o
UNMARKED_PAGE = '<!doctype html>\n<html><head><meta charset="utf-8"><title>iterhead: '  # before the mark


def marked(text: str) -> str:
    """`text` under the line that says iterhead's report wrote it (an HTML comment, hidden in the
    page and in rendered Markdown): the next report replaces only files that begin with it."""
    return f"{REPORTED} -->\n{text}"


def unmarked(text: str) -> str:
    """A file the report wrote, without its first line (`marked`)."""
    return text.split("\n", 1)[1] if text.startswith(REPORTED) else text


def check_outputs(out: Path) -> None:
    """`ConfigError` where any file the report would write in `out` exists and is not one an
    earlier report wrote: the user's own page or notes would be replaced for good. Every path is
    checked before any is written, so a refusal leaves the folder as it was."""
    older = {name: () for name in OUTPUTS}  # what reports wrote before they marked their files
    page = out / OUTPUTS[0]
    if page.is_file() and _head(page, len(UNMARKED_PAGE)) == UNMARKED_PAGE.encode():
        older = {OUTPUTS[0]: (UNMARKED_PAGE,), OUTPUTS[1]: ("| ",)}  # the page, and the table beside it
    for name in OUTPUTS:
        check_own_file(out / name, f"{REPORTED} ", "one that iterhead report wrote", "give another -o folder",
                       *older[name])


def _head(path: Path, n: int) -> bytes:
    """The first `n` bytes of `path` (a page holds its figures: megabytes)."""
    with path.open("rb") as f:
        return f.read(n)


def trial_rows(client: Any, experiment: str, parent: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The searched keys and one row per trial run of the search (per configuration run with
    ``seeds:``, each with its seeds' ``(reached, compute_to_target)`` as ``seed_outcomes``)."""
    exp = client.get_experiment_by_name(experiment)
    parent_run = client.get_run(parent)
    keys = [k[len("space."):] for k in parent_run.data.params if k.startswith("space.")]
    runs = child_runs(client, exp.experiment_id, parent)
    seeds = seed_runs(client, exp.experiment_id,
                      {run.info.run_id for run in runs if run.data.tags.get(r.KIND) == r.KIND_CONFIGURATION})
    rows = []
    for run in runs:
        m = run.data.metrics
        row = {"trial_id": run.data.tags.get(r.TRIAL_ID, run.info.run_id), "run_id": run.info.run_id,
               "kind": run.data.tags.get(r.KIND, r.KIND_TRIAL), "status": run.info.status,
               r.REACHED: m.get(r.REACHED, 0.0), r.DIVERGED: m.get(r.DIVERGED, 0.0),
               r.COMPUTE_TO_TARGET: m.get(r.COMPUTE_TO_TARGET, float("nan")),
               r.TARGET_ACC: m.get(r.TARGET_ACC, float("nan")), r.FLOPS: m.get(r.FLOPS, float("nan")),
               "forked_from": run.data.tags.get(r.PREFIX_TAG, "")}
        if run.info.run_id in seeds:
            own = seeds[run.info.run_id]
            row["seed_outcomes"] = [(s.reached, s.compute_to_target) for s in own]
            row[r.SEEDS_REACHED] = m.get(r.SEEDS_REACHED, sum(s.reached for s in own))
        row.update({k: _value(run.data.params.get(k)) for k in keys})
        rows.append(row)
    return keys, rows


def best_run(best: Candidate) -> tuple[str, str]:
    """The run to draw for the best trial, and its name: the trial's own run, or for a
    configuration its median seed's (the first seed whose run holds the median)."""
    median = [s for s in best.seeds if s.reached and s.compute_to_target == best.metrics[r.COMPUTE_TO_TARGET]]
    if not best.is_configuration or not median:
        return best.run_id, best.trial_id
    return median[0].run_id, f"{best.trial_id} seed {median[0].seed} (the median seed)"


def length_curves(client: Any, run: Any, folder: Path) -> Path:
    """The run's target accuracy at each length against training FLOPs, from its metric history."""
    run_id, target = run.info.run_id, run.data.params.get("target.task", "")
    flops = [m.value for m in sorted(client.get_metric_history(run_id, r.FLOPS), key=lambda m: m.step)]
    per_length: dict[int, list[float]] = {}
    for key in run.data.metrics:
        if key.startswith(f"{r.acc(target)}/len_"):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            per_length[int(key.rsplit("_", 1)[1])] = [m.value for m in history]
    return report.plot_length_curves(folder / "best_accuracy_by_length.png", flops, per_length,
                                     f"best trial: acc/{target} at each length")


def best_trial_figures(client: Any, run_id: str, folder: Path,
                       lineage: bool = False) -> tuple[list[Path], dict[str, float]]:
    """Length curves and attention maps of one trial, and its final probe scores.

    With `lineage` (a PBT member), the curves are the member's own `compute_to_accuracy.png`,
    drawn from its lineage's evaluations: the run's metric history holds, before each copy,
    the member's abandoned trajectory rather than the donor's, so it is not the lineage."""
    names = {a.path for a in client.list_artifacts(run_id)}
    run = client.get_run(run_id)
    if lineage and "compute_to_accuracy.png" in names:
        figures = [Path(client.download_artifacts(run_id, "compute_to_accuracy.png", str(folder)))]
    else:
        figures = [length_curves(client, run, folder)]
    if "attention.png" in names:
        figures.append(Path(client.download_artifacts(run_id, "attention.png", str(folder))))
    probes = {k: v for k, v in run.data.metrics.items() if k.startswith(r.PROBE_PREFIX)}
    return figures, probes


def build(client: Any, experiment: str, out: Path, parent_run_id: str | None = None) -> Path:
    """Write the page into folder `out`, log its figures on the parent run; returns the page."""
    writable_folder(out, "-o")  # before reading the store: a bad OUT must not cost a slow read first
    check_outputs(out)
    parent, reached = find_candidates(client, experiment, parent_run_id)
    keys, rows = trial_rows(client, experiment, parent)
    if not rows:
        raise ConfigError(f"the search {experiment!r} has no trial runs yet", field="--experiment")
    out.mkdir(parents=True, exist_ok=True)
    scored = [row for row in rows if is_scored(row)]  # not a running, killed or failed one's provisional penalty
    with tempfile.TemporaryDirectory(prefix="iterhead-report-") as tmp:
        folder = Path(tmp)
        figures = [report.plot_medians(folder / f"compute_to_target_vs_{_safe(k)}.png", scored, k)
                   for k in keys if k != "seed"]
        figures.append(report.plot_fraction_reached(folder / "fraction_reached.png", scored, len(rows)))
        probes: dict[str, float] = {}
        best = best_run(reached[0]) if reached else None
        if best:
            best_figures, probes = best_trial_figures(client, best[0], folder, is_population(rows))
            figures += best_figures
            if is_population(rows) and "schedule.png" in {a.path for a in client.list_artifacts(best[0])}:
                figures.insert(0, Path(client.download_artifacts(best[0], "schedule.png", str(folder))))
        page = out / OUTPUTS[0]
        medians = report.seed_medians(scored, keys)
        shared = _sharing(client.get_run(parent).data.metrics, rows, is_population(rows))
        text = render(experiment, parent, keys, rows, figures, probes, best[1] if best else None, medians, shared)
        table = (members_text(rows) if is_population(rows) else
                 report.medians_text(medians, keys, report.is_replicate(rows)))
        write_atomic(page, lambda f: f.write(marked(text).encode()))  # an interrupted report leaves no cut page
        write_atomic(out / OUTPUTS[1], lambda f: f.write(marked(table + "\n").encode()))
        try:
            client.log_artifacts(parent, str(folder), "report")
            client.log_artifact(parent, str(page), "report")
        except OSError as err:  # a store copied without its artifact folder (whose path it keeps), or read-only
            why = f"{err.filename}: {err.strerror}" if err.filename else str(err)
            raise NotLogged(f"wrote {page}, but its figures cannot be logged on the search's parent run {parent}: "
                            f"{why}") from None
    return page


class NotLogged(RuntimeError):
    """The page is written, but the parent run's artifact folder refused its figures; exit 1."""


def members_text(rows: list[dict[str, Any]]) -> str:
    """A PBT search's members as a markdown table, best first (what `iterhead report` prints)."""
    lines = ["| member | reached | compute_to_target | target accuracy |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (row[r.REACHED] != 1.0, row[r.COMPUTE_TO_TARGET], -row[r.TARGET_ACC],
                                             row["trial_id"])):  # the order export ranks by
        lines.append(f"| {row['trial_id']} | {_outcome(row)} | {row[r.COMPUTE_TO_TARGET]:.3e} "
                     f"| {row[r.TARGET_ACC]:.3f} |")
    return "\n".join(lines)


def is_population(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows are the members of a PBT search."""
    return any(row.get("kind") == r.KIND_MEMBER for row in rows)


POPULATION_RULE = (
    "Population Based Training: every member trained the base curriculum's seed; at each comparison the "
    "worst members copied the state of one of the best and perturbed their settings, so a member's lineage "
    "(its <code>curriculum.yaml</code>; its segments in <code>lineage.yaml</code>) holds the stages it "
    "trained, copies included. The first figure is the best lineage's settings against its training "
    "compute. The population ends with the comparison at which a member first reaches the target, since "
    "no later lineage can need less compute; the others are then censored. A schedule learned on one seed "
    "can be lucky: re-train the exported lineage on other seeds (<code>iterhead train FILE --seeds ...</code>) "
    "before trusting it.")


def render(experiment: str, parent: str, keys: list[str], rows: list[dict[str, Any]], figures: list[Path],
           probes: dict[str, float], best: str | None, medians: list[dict[str, Any]], shared: str = "") -> str:
    replicates = report.is_replicate(rows)
    population = is_population(rows)
    one, what = (("configuration", "configurations") if replicates else ("member", "members") if population
                 else ("trial", "trials"))
    n_reached = sum(1 for row in rows if is_scored(row) and row[r.REACHED] == 1.0)
    n_censored = sum(1 for row in rows if is_scored(row)) - n_reached
    n_failed = sum(1 for row in rows if row["status"] == "FAILED")
    n_open = len(rows) - n_reached - n_censored - n_failed
    others = "".join(f", {n} {word}" for n, word in ((n_failed, "failed"), (n_open, "unfinished")) if n)
    imgs = "\n".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}'
                     "</figcaption></figure>" for p in figures)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [one, *keys, "reached", "compute_to_target",
                                                            "target accuracy", "status"])
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(report.short(v))}</td>" for v in [
            row["trial_id"], *(row.get(k) for k in keys), _outcome(row),
            f"{row[r.COMPUTE_TO_TARGET]:.3e}", f"{row[r.TARGET_ACC]:.3f}", row["status"]]) + "</tr>"
        for row in sorted(rows, key=lambda row: (row[r.REACHED] != 1.0, row[r.COMPUTE_TO_TARGET])))
    med_head = "".join(f"<th>{html.escape(h)}</th>" for h in report.median_columns(keys, replicates))
    med_body = "\n".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in report.median_cells(g, keys, ".3e"))
                         + "</tr>" for g in medians)
    if replicates:
        rule = ("One row per configuration, over its seeds (the spec's <code>seeds:</code>): its median is the "
                "lower median of its seeds' compute_to_target, censored seeds at their penalty, so it is "
                "always one seed's value, and it is censored when fewer than half the seeds reached the "
                "target; min and max over its seed runs.")
    else:
        rule = ("One row per configuration (every searched value but the seed). Censored trials count at "
                "their penalty; the median is the lower median (with an even count, the lower of the two "
                "middle values, so always one trial's), and it is censored when fewer than half its trials "
                "reached the target.")
    summary = (f"<h2>Population</h2>\n<p>{POPULATION_RULE}</p>" if population else
               f"<h2>Median over seeds</h2>\n<p>{rule}</p>\n<table><tr>{med_head}</tr>\n{med_body}\n</table>")
    probe_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in sorted(probes.items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>iterhead: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}figure{{display:inline-block;margin:.5em}}
img{{max-width:520px}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
</style></head><body>
<h1>Search {html.escape(experiment)}</h1>
<p>Parent run {html.escape(parent)}; {len(rows)} {what}, {n_reached} reached the target, {n_censored}
censored (drawn as crosses at their penalty, never dropped){others}. Written {time.strftime('%Y-%m-%d %H:%M')}.</p>
<p>{html.escape(shared)}</p>
{summary}
<h2>Figures</h2>
{imgs}
<h2>Best {one}{': ' + html.escape(best) if best else ''}: iteration-head probes</h2>
<p>Mean attention from chain-of-thought positions to EoI (cot_to_eoi) and from the position
predicting s_t to x_t (iteration), per layer and head, at the last evaluation.</p>
<table><tr><th>probe</th><th>score</th></tr>{probe_rows or '<tr><td colspan=2>no trial reached the target</td></tr>'}</table>
<h2>Every {one}</h2>
<table><tr>{head}</tr>
{body}
</table></body></html>
"""


def _sharing(metrics: dict[str, float], rows: list[dict[str, Any]], population: bool = False) -> str:
    """What shared prefixes saved, from the parent run's ``search/flops_*`` (a search that ended);
    for a PBT search what the population trained in all."""
    if r.FLOPS_TRAINED not in metrics:
        return ""
    flops = {k: metrics[k] for k in (r.FLOPS_TRAINED, r.FLOPS_CURRICULA)}
    if population:
        return f"The population trained {flops[r.FLOPS_TRAINED]:.3e} FLOPs in all, every member and generation."
    return "Shared prefixes: " + sharing.summary_line(flops, sum(1 for row in rows if row["forked_from"])) + "."


def is_scored(row: dict[str, Any]) -> bool:
    """Whether a row's run ended with a result: its last report's compute_to_target is its score.
    A running or killed run reports the censoring penalty until it reaches, and a failed one's
    last report holds it too: neither was censored."""
    return row["status"] == "FINISHED" and row[r.COMPUTE_TO_TARGET] == row[r.COMPUTE_TO_TARGET]  # and not NaN


def _outcome(row: dict[str, Any]) -> str:
    """A row's outcome in words; a configuration's with how many of its seeds reached."""
    if not is_scored(row):
        return "failed" if row["status"] == "FAILED" else "unfinished" if row["status"] != "FINISHED" else "no report"
    word = "diverged" if row[r.DIVERGED] == 1.0 else ("yes" if row[r.REACHED] == 1.0 else "no (censored)")
    if "seed_outcomes" in row:
        word += f" ({row[r.SEEDS_REACHED]:.0f} of {len(row['seed_outcomes'])} seeds)"
    return word


def _value(text: str | None) -> Any:
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)
