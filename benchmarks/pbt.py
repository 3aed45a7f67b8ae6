"""A learned schedule against the best static blend, on seeds neither search trained.

At the CPU scale of experiment 2, on the embedded default (a local Ray, sqlite MLflow stores
in a temp folder), one after the other:

1. the blend grid, `examples/paper/cpu/2_blend.yaml` (polynomial shares 0 to 0.75, seeds 0,
   1, 2), and the PBT search over the share, `examples/paper/cpu/pbt_blend.yaml` (8
   members, seed 0); each search's ``search/flops_trained``, so that PBT's total training
   compute can be checked to be no larger than the grid's;
2. `iterhead export` of each: the grid's best configuration (by its median over seeds) and
   PBT's best lineage;
3. each exported file re-trained on held-out seeds (default 3 to 7, used by neither search)
   with the options its header names (threads, precision, budget) and ``--seeds``, the two
   re-trainings side by side, one torch thread each.

Prints and writes (replaces) its section of BENCHMARKS.md: per schedule, what it is, its
search's compute, how many held-out seeds reached the target, the median compute_to_target
(censored seeds at the penalty) and each seed's value, and an exact two-sided Mann-Whitney
test of the two samples (`precision.mann_whitney_exact`).

    python benchmarks/pbt.py [--seeds 3,4,5,6,7] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from iterhead.search.export import export
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown import cpu_model, replace_section  # noqa: E402  (beside this script)
from precision import mann_whitney_exact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## A learned schedule (PBT) against the best static blend, on held-out seeds"
GRID, PBT = "examples/paper/cpu/2_blend.yaml", "examples/paper/cpu/pbt_blend.yaml"


def smoke_copy(spec: str, folder: Path) -> Path:
    """The spec and its base in `folder`, the target lowered so that smoke-size trials reach it."""
    source = ROOT / spec
    data = yaml.safe_load(source.read_text())
    base = yaml.safe_load((source.parent / data["base"]).read_text())
    base["target"]["accuracy"] = 0.01
    (folder / data["base"]).write_text(yaml.safe_dump(base))
    (folder / source.name).write_text(yaml.safe_dump(data))
    return folder / source.name


def search(spec: str, folder: Path, smoke: bool) -> dict[str, Any]:
    """Run one search to the end and export its best; what the comparison needs of it."""
    loaded = load_search(smoke_copy(spec, folder) if smoke else ROOT / spec)
    uri = f"sqlite:///{folder}/mlflow.db"
    start = time.perf_counter()
    log = io.StringIO()
    rows = run_search(loaded, SearchOptions(uri=uri, storage_path=str(folder / "ray"), smoke=smoke), out=log)
    wall = time.perf_counter() - start
    (folder / "search.log").write_text(log.getvalue())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(loaded.spec.name).experiment_id
    (parent,) = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    (path,) = export(client, loaded.spec.name, folder / "best.yaml")
    text = path.read_text()
    command = next(line for line in text.splitlines() if line.startswith("# reproduce")).split(": ", 1)[1].split()
    options = list(command[3:])
    if "--seeds" in options:  # the grid's header re-trains its search seeds; the held-out ones replace them
        i = options.index("--seeds")
        del options[i:i + 2]
    print(f"{spec}: {len(rows)} rows, search/flops_trained {parent.data.metrics[r.FLOPS_TRAINED]:.3e}, "
          f"{wall:.0f} s", flush=True)
    return {"spec": spec, "file": path, "options": options, "wall": wall,
            "trained": parent.data.metrics[r.FLOPS_TRAINED], "curriculum": yaml.safe_load(text)}


def retrain(found: dict[str, Any], seeds: list[int], folder: Path) -> subprocess.Popen:
    """`iterhead train` of the exported file on the held-out seeds, in its own process (its
    output in retrain.log beside the file)."""
    iterhead = str(Path(sys.executable).parent / "iterhead")
    with open(folder / "retrain.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen([iterhead, "train", str(found["file"]), "--seeds", ",".join(map(str, seeds)),
                                 *found["options"], "--tracking-uri", f"sqlite:///{folder}/retrain.db",
                                 "--experiment", "retrain"], stdout=log, stderr=subprocess.STDOUT)


def outcomes(folder: Path) -> list[tuple[int, bool, float]]:
    """(seed, reached, compute_to_target) of every re-trained seed."""
    client = MlflowClient(f"sqlite:///{folder}/retrain.db")
    runs = client.search_runs([client.get_experiment_by_name("retrain").experiment_id])
    return sorted((int(run.data.params["seed"]), run.data.metrics[r.REACHED] == 1.0,
                   run.data.metrics[r.COMPUTE_TO_TARGET]) for run in runs)


def describe(curriculum: dict[str, Any], task: str = "polynomial") -> str:
    """A schedule in words: each training stage's share of `task` and its epochs."""
    parts = []
    for stage in curriculum["stages"]:
        if stage["epochs"]:
            share = stage["mix"].get(task, 0.0) / sum(stage["mix"].values())
            parts.append(f"{share:.2f} for {stage['epochs']} epochs")
    return f"{task} share " + ", then ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="3,4,5,6,7", help="held-out seeds to re-train both schedules on")
    ap.add_argument("--smoke", action="store_true",
                    help="smoke-size searches with a target they reach: a quick check of this script")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="iterhead-bench-pbt-") as tmp:
        found = {}
        for name, spec in (("grid", GRID), ("pbt", PBT)):
            (Path(tmp) / name).mkdir()
            found[name] = search(spec, Path(tmp) / name, args.smoke)
        jobs = {name: retrain(f, seeds, Path(tmp) / name) for name, f in found.items()}
        for name, job in jobs.items():
            if job.wait() != 0:
                raise SystemExit(f"re-training {name} failed: {(Path(tmp) / name / 'retrain.log').read_text()[-2000:]}")
        held = {name: outcomes(Path(tmp) / name) for name in found}
    u, p = mann_whitney_exact([c for _, _, c in held["grid"]], [c for _, _, c in held["pbt"]])
    flag = " --smoke" if args.smoke else ""
    lines = ["", HEADING, "",
             f"`python benchmarks/pbt.py --seeds {args.seeds}{flag}` on {time.strftime('%Y-%m-%d')}: {cpu_model()}, "
             f"the embedded default with all CPUs. The grid (`{GRID}`, seeds 0, 1, 2) and PBT (`{PBT}`, seed 0) "
             "each searched, their bests were exported, and each exported file was re-trained on the held-out "
             f"seeds {args.seeds} with its header's options (one torch thread; the two at once). compute_to_target "
             "in FLOPs, censored seeds at the penalty (twice the 6e12 budget).", "",
             "| schedule | its search trained (FLOPs, wall s) | held-out seeds reached | median compute_to_target "
             "| per seed |", "|---|---|---|---|---|"]
    for name, label in (("grid", "grid's best static blend"), ("pbt", "PBT's best lineage")):
        f, rows = found[name], held[name]
        per_seed = ", ".join(f"{s}: {c:.2e}" + ("" if ok else " (censored)") for s, ok, c in rows)
        lines.append(f"| {label}: {describe(f['curriculum'])} | {f['trained']:.3e} ({f['wall']:.0f} s) | "
                     f"{sum(ok for _, ok, _ in rows)} of {len(rows)} | "
                     f"{statistics.median_low([c for _, _, c in rows]):.3e} | {per_seed} |")
    fair = found["pbt"]["trained"] <= found["grid"]["trained"]
    lines += ["", f"Exact two-sided Mann-Whitney test of the two held-out samples: U = {u:g}, p = {p:.3f}. "
              f"PBT's search trained {found['pbt']['trained'] / found['grid']['trained']:.2f}x the grid's FLOPs"
              + ("." if fair else " (more than the grid: the comparison favours PBT).")]
    print("\n".join(lines))
    if not args.smoke:
        replace_section(ROOT / "BENCHMARKS.md", HEADING, lines)


if __name__ == "__main__":
    main()
