"""Shared prefixes: what a search trains with and without sharing, against the ideal.

For each search spec, runs the whole search twice on the embedded default (a local Ray, a
sqlite MLflow store in a temp folder), with sharing and with `--no-share`, one after the
other on this machine, and prints per spec:

- ``search/flops_trained`` and ``search/flops_curricula`` (the parent run's metrics),
- the ideal: each distinct prefix trained once plus every trial's own remainder, from the
  trials' curricula and where each seed stopped (every epoch costs the same FLOPs, so a
  seed's final ``compute/flops`` says how many epochs it trained; its epochs are named by
  their prefix keys, `trainable.prefix.describe`, and each distinct (seed, prefix) counts once),
- the wall time of each search, and whether every trial's ``compute_to_target`` is the same
  both ways.

Writes (or replaces) its section of BENCHMARKS.md.

    python benchmarks/sharing.py [SPEC ...] [--num-cpus N] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from iterhead.curricula.trial import trial_curriculum
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.prefix import describe, digest
from iterhead.trainable.summary import planned_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown import cpu_model, replace_section  # noqa: E402  (beside this script)

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Shared prefixes: FLOPs trained by a search, with and without sharing"
SPECS = ["examples/paper/cpu/1_transfer.yaml", "examples/paper/cpu/3_finetune_mlp.yaml",
         "examples/paper/cpu/finetune_settings.yaml"]


def run(spec: str, share: bool, smoke: bool, num_cpus: int | None) -> dict[str, Any]:
    """One whole search; its parent metrics, its trials' outcomes and each seed's final FLOPs."""
    loaded = load_search(ROOT / spec)
    with tempfile.TemporaryDirectory(prefix="iterhead-bench-sharing-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        start = time.perf_counter()
        rows = run_search(loaded, SearchOptions(uri=uri, storage_path=f"{tmp}/ray", smoke=smoke, share=share,
                                                num_cpus=num_cpus), out=io.StringIO())
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(loaded.spec.name).experiment_id
        (parent,) = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
        seeds = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEED}'", max_results=10_000)
        keys = list(loaded.spec.space)
        configs = {row["run_id"]: {k: row[k] for k in keys} for row in rows}
        stops = [(configs[run.data.tags[r.PARENT_RUN]], int(run.data.tags[r.SEED]), run.data.metrics[r.FLOPS])
                 for run in seeds]
    outcomes = {tuple(str(row[k]) for k in keys): (row[r.REACHED], row[r.COMPUTE_TO_TARGET]) for row in rows}
    return {"wall": wall, "parent": parent.data.metrics, "stops": stops, "outcomes": outcomes, "loaded": loaded}


def ideal(result: dict[str, Any], smoke: bool) -> float:
    """Each distinct (seed, prefix) epoch once: the FLOPs a perfect sharing trains."""
    base = result["loaded"].base.model_dump(mode="json")
    seen, total = set(), 0.0
    for config, seed, final in result["stops"]:
        cur = trial_curriculum(base, config, smoke).model_copy(update={"seed": seed})
        per_epoch = planned_flops(cur) / sum(s.epochs for s in cur.stages)
        for stage, epoch in _epochs(cur)[:round(final / per_epoch)]:
            key = (seed, digest(describe(cur, stage, epoch)))
            if key not in seen:
                seen.add(key)
                total += per_epoch
    return total


def _epochs(cur) -> list[tuple[int, int]]:
    return [(i, e) for i, s in enumerate(cur.stages) for e in range(1, s.epochs + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="smoke-size searches: a quick check of this script")
    args = ap.parse_args()
    lines = ["", HEADING, "",
             f"`python benchmarks/sharing.py{' --smoke' if args.smoke else ''}` on {time.strftime('%Y-%m-%d')}: "
             f"{cpu_model()}, the embedded default with {args.num_cpus or 'all'} CPUs, each search run with "
             "sharing and then with `--no-share`. FLOPs are training FLOPs summed over every trial and seed; "
             "the ideal trains each distinct prefix once plus every trial's own remainder.", "",
             "| search | sharing | search/flops_trained | search/flops_curricula | ideal | trained / ideal "
             "| wall s | compute_to_target per trial |", "|---|---|---|---|---|---|---|---|"]
    for spec in args.specs:
        shared = run(spec, True, args.smoke, args.num_cpus)
        plain = run(spec, False, args.smoke, args.num_cpus)
        best = ideal(shared, args.smoke)
        same = "identical both ways" if shared["outcomes"] == plain["outcomes"] else "DIFFERENT"
        for name, res in (("on", shared), ("off (`--no-share`)", plain)):
            m = res["parent"]
            lines.append(f"| `{spec}` | {name} | {m[r.FLOPS_TRAINED]:.3e} | {m[r.FLOPS_CURRICULA]:.3e} | "
                         f"{best:.3e} | {m[r.FLOPS_TRAINED] / best:.3f} | {res['wall']:.0f} | {same} |")
        print("\n".join(lines[-2:]), flush=True)
    print("\n".join(lines))
    if not args.smoke:
        replace_section(ROOT / "BENCHMARKS.md", HEADING, lines)


if __name__ == "__main__":
    main()
