"""`iterhead report`: a search's results as one self-contained HTML page, from MLflow alone.

The page (figures embedded, no external files) and its figures, also logged on the search's
parent run under ``report/``: a table of medians over seeds per configuration (also written
as ``medians.md`` beside the page), compute_to_target against each searched parameter (median and
spread over seeds, censored trials marked), the fraction of trials at target against
compute, the best trial's accuracy at each length against compute, its attention maps and
iteration-head probe scores, and a table of every trial.
"""

from __future__ import annotations

import base64
import html
import tempfile
import time
from pathlib import Path
from typing import Any

from iterhead.curricula.errors import ConfigError
from iterhead.search import report
from iterhead.search.export import ExportError, find_candidates


def trial_rows(client: Any, experiment: str, parent: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The searched keys and one row per trial run of the search."""
    exp = client.get_experiment_by_name(experiment)
    parent_run = client.get_run(parent)
    keys = [k[len("space."):] for k in parent_run.data.params if k.startswith("space.")]
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                              max_results=50_000)
    rows = []
    for r in runs:
        m = r.data.metrics
        row = {"trial_id": r.data.tags.get("iterhead.trial_id", r.info.run_id), "run_id": r.info.run_id,
               "status": r.info.status, "reached": m.get("reached", 0.0), "diverged": m.get("diverged", 0.0),
               "compute_to_target": m.get("compute_to_target", float("nan")),
               "target_acc": m.get("target_acc", float("nan")), "compute/flops": m.get("compute/flops", float("nan"))}
        row.update({k: _value(r.data.params.get(k)) for k in keys})
        rows.append(row)
    return keys, rows


def best_trial_figures(client: Any, run_id: str, folder: Path) -> tuple[list[Path], dict[str, float]]:
    """Length curves and attention maps of one trial, and its final probe scores."""
    run = client.get_run(run_id)
    target = run.data.params.get("target.task", "")
    flops = [m.value for m in sorted(client.get_metric_history(run_id, "compute/flops"), key=lambda m: m.step)]
    per_length: dict[int, list[float]] = {}
    for key in run.data.metrics:
        if key.startswith(f"acc/{target}/len_"):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            per_length[int(key.rsplit("_", 1)[1])] = [m.value for m in history]
    figures = [report.plot_length_curves(folder / "best_accuracy_by_length.png", flops, per_length,
                                         f"best trial: acc/{target} at each length")]
    names = {a.path for a in client.list_artifacts(run_id)}
    if "attention.png" in names:
        figures.append(Path(client.download_artifacts(run_id, "attention.png", str(folder))))
    probes = {k: v for k, v in run.data.metrics.items() if k.startswith("probe/")}
    return figures, probes


def build(client: Any, experiment: str, out: Path, parent_run_id: str | None = None) -> Path:
    """Write the page into folder `out`, log its figures on the parent run; returns the page."""
    try:
        parent, reached = find_candidates(client, experiment, parent_run_id)
    except ExportError:
        parent, reached = parent_run_id, []
    keys, rows = trial_rows(client, experiment, parent)
    if not rows:
        raise ConfigError(f"the search {experiment!r} has no trial runs yet", field="--experiment")
    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r["compute_to_target"] == r["compute_to_target"]]
    with tempfile.TemporaryDirectory(prefix="iterhead-report-") as tmp:
        folder = Path(tmp)
        figures = [report.plot_medians(folder / f"compute_to_target_vs_{_safe(k)}.png", scored, k)
                   for k in keys if k != "seed"]
        figures.append(report.plot_fraction_reached(folder / "fraction_reached.png", scored))
        probes: dict[str, float] = {}
        if reached:
            best_figures, probes = best_trial_figures(client, reached[0].run_id, folder)
            figures += best_figures
        page = out / "report.html"
        medians = report.seed_medians(rows, keys)
        page.write_text(render(experiment, parent, keys, rows, figures, probes,
                               reached[0].trial_id if reached else None, medians))
        (out / "medians.md").write_text(report.medians_text(medians, keys) + "\n")
        client.log_artifacts(parent, str(folder), "report")
        client.log_artifact(parent, str(page), "report")
    return page


def render(experiment: str, parent: str, keys: list[str], rows: list[dict[str, Any]], figures: list[Path],
           probes: dict[str, float], best: str | None, medians: list[dict[str, Any]]) -> str:
    n_reached = sum(1 for r in rows if r["reached"] == 1.0)
    imgs = "\n".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}'
                     "</figcaption></figure>" for p in figures)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *keys, "reached", "compute_to_target",
                                                            "target accuracy", "status"])
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(report.short(v))}</td>" for v in [
            r["trial_id"], *(r.get(k) for k in keys),
            "diverged" if r["diverged"] == 1.0 else ("yes" if r["reached"] == 1.0 else "no (censored)"),
            f"{r['compute_to_target']:.3e}", f"{r['target_acc']:.3f}", r["status"]]) + "</tr>"
        for r in sorted(rows, key=lambda r: (r["reached"] != 1.0, r["compute_to_target"])))
    others = [k for k in keys if k != "seed"]
    med_head = "".join(f"<th>{html.escape(h)}</th>" for h in [*others, "trials", "reached",
                                                                "median compute_to_target", "min", "max"])
    med_body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in [
            *(report.short(g[k]) for k in others), str(g["trials"]), str(g["reached"]),
            f"{g['median']:.3e}" + (" (censored)" if g["censored"] else ""), f"{g['min']:.3e}",
            f"{g['max']:.3e}"]) + "</tr>" for g in medians)
    probe_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in sorted(probes.items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>iterhead: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}figure{{display:inline-block;margin:.5em}}
img{{max-width:520px}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
</style></head><body>
<h1>Search {html.escape(experiment)}</h1>
<p>Parent run {html.escape(parent)}; {len(rows)} trials, {n_reached} reached the target, {len(rows) - n_reached}
censored (drawn as crosses at their penalty, never dropped). Written {time.strftime('%Y-%m-%d %H:%M')}.</p>
<h2>Median over seeds</h2>
<p>One row per configuration (every searched value but the seed). Censored trials count at
their penalty; a median is censored when at least half its trials are.</p>
<table><tr>{med_head}</tr>
{med_body}
</table>
<h2>Figures</h2>
{imgs}
<h2>Best trial{': ' + html.escape(best) if best else ''}: iteration-head probes</h2>
<p>Mean attention from chain-of-thought positions to EoI (cot_to_eoi) and from the position
predicting s_t to x_t (iteration), per layer and head, at the last evaluation.</p>
<table><tr><th>probe</th><th>score</th></tr>{probe_rows or '<tr><td colspan=2>no trial reached the target</td></tr>'}</table>
<h2>Every trial</h2>
<table><tr>{head}</tr>
{body}
</table></body></html>
"""


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
