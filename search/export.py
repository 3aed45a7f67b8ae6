"""`iterhead export`: the best trials of a search as curriculum YAML that re-runs to the same result.

Best = lowest compute_to_target among the trials that reached the target, ties broken by
the higher final target accuracy, then by trial id (so the choice is always the same). Each file is the trial's resolved curriculum in the input
schema, read back from its MLflow artifact and validated, under a comment header saying
where it came from and how to reproduce it exactly (CPU results depend on the torch thread
count, which the header names).

Writes are confined and atomic: one file for ``--top-k 1`` (OUT is that file), otherwise a
folder OUT of files named after rank and trial, with every name sanitised and checked to
stay inside OUT; each file goes to a temporary name in its folder and is renamed into place
only once complete, so an interrupted export never leaves half a file or spoils an old one.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from iterhead.curricula.errors import ConfigError
from iterhead.curricula.io import dump_curriculum, parse_curriculum, parse_yaml_mapping
from iterhead.trainable.checkpoint import write_atomic


@dataclass
class Candidate:
    run_id: str
    trial_id: str
    metrics: dict[str, float]
    tags: dict[str, str]


class ExportError(RuntimeError):
    """Nothing to export (no trial reached the target); exit code 1."""


def find_candidates(client: Any, experiment: str, parent_run_id: str | None) -> tuple[str, list[Candidate]]:
    """The parent run id and its child runs that reached the target, best first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no experiment named {experiment!r} in the tracking store", field="--experiment")
    if parent_run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", parent_run_id):
        raise ConfigError(f"{parent_run_id!r} is not an MLflow run id (32 hex digits)", field="--run")
    if parent_run_id is None:
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`iterhead.kind` = 'search'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ExportError(f"experiment {experiment!r} holds no search (no parent run); give --run")
        parent_run_id = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=50_000)
    if not children:
        raise ConfigError(f"run {parent_run_id} of {experiment!r} has no trial runs; give a search's "
                          "parent run", field="--run")
    reached = [Candidate(r.info.run_id, r.data.tags.get("iterhead.trial_id", r.info.run_id),
                         dict(r.data.metrics), dict(r.data.tags))
               for r in children if r.data.metrics.get("reached") == 1.0 and not r.data.metrics.get("diverged")]
    reached.sort(key=lambda c: (c.metrics["compute_to_target"], -c.metrics.get("target_acc", 0.0), c.trial_id))
    return parent_run_id, reached


def header(c: Candidate, experiment: str, parent: str, rank: int, file: str) -> str:
    threads = c.tags.get("iterhead.torch_threads", "1")
    m = c.metrics
    lines = [
        f"exported by iterhead {version('iterhead')} on {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"search {experiment!r}, parent run {parent}, rank {rank} by compute_to_target",
        f"trial {c.trial_id}, MLflow run {c.run_id}",
        f"compute_to_target {m['compute_to_target']:.6e} FLOP, examples_to_target "
        f"{m.get('examples_to_target', float('nan')):.0f}, target accuracy {m.get('target_acc', float('nan')):.4f}",
        f"reproduce exactly on CPU: iterhead train {file} --threads {threads}",
    ]
    return "".join(f"# {line}\n" for line in lines)


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._")
    return name[:80] or "trial"


def targets(out: Path, chosen: list[Candidate]) -> list[Path]:
    """Where each chosen trial goes: OUT itself for one, OUT/<rank>-<trial>.yaml otherwise."""
    if len(chosen) == 1 and out.suffix in (".yaml", ".yml"):
        return [out]
    root = out.resolve()
    paths = []
    for rank, c in enumerate(chosen, 1):
        path = (root / f"{rank:02d}-{safe_name(c.trial_id)}.yaml").resolve()
        if path.parent != root:
            raise ConfigError(f"refusing to write {path} outside {root}", field="-o")
        paths.append(path)
    return paths


def export(client: Any, experiment: str, out: Path, *, top_k: int = 1,
           parent_run_id: str | None = None) -> list[Path]:
    """Write the `top_k` best reached trials of the search; returns the files written."""
    if top_k == 1 and out.suffix not in (".yaml", ".yml"):
        raise ConfigError("with --top-k 1, give a file name ending in .yaml", field="-o")
    if top_k > 1 and out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; --top-k above 1 writes a folder", field="-o")
    if not out.parent.is_dir():
        raise ConfigError(f"the folder {str(out.parent)!r} does not exist", field="-o")
    parent, reached = find_candidates(client, experiment, parent_run_id)
    if not reached:
        raise ExportError(f"no trial of {experiment!r} reached its target; nothing to export")
    chosen = reached[:top_k]
    paths = targets(out, chosen)
    texts = []
    for rank, (c, path) in enumerate(zip(chosen, paths), 1):
        with tempfile.TemporaryDirectory(prefix="iterhead-export-") as tmp:
            local = client.download_artifacts(c.run_id, "curriculum.yaml", tmp)
            cur = parse_curriculum(parse_yaml_mapping(Path(local).read_text(), file=local), file=local)
        texts.append(header(c, experiment, parent, rank, path.name) + dump_curriculum(cur))
    if len(paths) > 1 or paths[0] != out:
        out.mkdir(exist_ok=True)
    for path, text in zip(paths, texts):
        write_atomic(path, lambda f, text=text: f.write(text.encode()))
    return paths
