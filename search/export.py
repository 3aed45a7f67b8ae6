"""`iterhead export`: the best trials of a search as curriculum YAML that re-runs to the same result.

Best = lowest compute_to_target among the trials that reached the target, ties broken by
the higher final target accuracy, then by trial id (so the choice is always the same).
Each file is the trial's resolved curriculum in the input schema, read back from its
MLflow artifact and validated, under a comment header saying where it came from and how
to reproduce it exactly (CPU results depend on the torch thread count and the training
precision, which the header names).

A search with ``seeds:`` (replicates) has configuration runs under its parent, not trial
runs, so the same ranking picks configurations by their median over seeds (their own
compute_to_target, `trainable.results.over_seeds`). The header then gives the command that
re-runs every seed (``iterhead train FILE --seeds 0,1,2 --threads N --precision P``) and each seed's
compute_to_target, read from the seed runs under the configuration run, to compare with.

A PBT search's children are member runs; a member's curriculum artifact is its lineage (the
segments it trained, as plain stages), so it exports and re-trains like a trial's.

Only `trainable.results` (names) and `trainable.checkpoint` (atomic writes) come from the
trainable side, neither importing torch: export starts in a fraction of a second, with no
torch or ray.

Writes are confined and atomic: one file for ``--top-k 1`` (OUT is that file), otherwise a
folder OUT of files named after rank and trial, with every name sanitised and checked to
stay inside OUT; each file goes to a temporary name in its folder and is renamed into place
only once complete, so an interrupted export never leaves half a file or spoils an old one.
A file OUT that exists is replaced only if it is an earlier export (its first line is the
header's), never a curriculum of the user's or a search's base file.
"""

from __future__ import annotations

import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from iterhead.curricula.errors import ConfigError, require_utf8
from iterhead.curricula.io import dump_curriculum, parse_curriculum, parse_yaml_mapping
from iterhead.search.tracking import all_runs
from iterhead.trainable import results as r
from iterhead.trainable.checkpoint import write_atomic

EXPORTED = "exported by iterhead"  # an export's first line is "# EXPORTED <version> on <time>" (`header`)


@dataclass
class SeedRun:
    """One seed's run under a configuration run (a search with ``seeds:``)."""

    seed: int
    run_id: str
    reached: bool
    compute_to_target: float  # the search's penalty when censored
    flops: float  # what it trained


@dataclass
class Candidate:
    run_id: str
    trial_id: str
    metrics: dict[str, float]
    tags: dict[str, str]
    seeds: list[SeedRun] = field(default_factory=list)  # a configuration's seed runs, by seed

    @property
    def is_configuration(self) -> bool:
        """A configuration of a replicate search, scored over `seeds`, rather than one trial."""
        return self.tags.get(r.KIND) == r.KIND_CONFIGURATION


class ExportError(RuntimeError):
    """Nothing to export (no trial reached the target), or a trial's curriculum is not where its run
    says; exit code 1."""


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The runs directly under one run: a search's trials or configurations, a configuration's seeds."""
    return all_runs(client, experiment_id, f"tags.`{r.PARENT_RUN}` = '{parent_run_id}'")


def seed_runs(client: Any, experiment_id: str, configuration_run_ids: set[str]) -> dict[str, list[SeedRun]]:
    """The seed runs under each of these configuration runs, by seed (one query for them all)."""
    out: dict[str, list[SeedRun]] = {run_id: [] for run_id in configuration_run_ids}
    if not configuration_run_ids:
        return out
    runs = all_runs(client, experiment_id, f"tags.`{r.KIND}` = '{r.KIND_SEED}'")
    for run in runs:
        parent = run.data.tags.get(r.PARENT_RUN)
        if parent in out:
            m = run.data.metrics
            out[parent].append(SeedRun(int(run.data.tags[r.SEED]), run.info.run_id, m.get(r.REACHED) == 1.0,
                                       m.get(r.COMPUTE_TO_TARGET, float("nan")), m.get(r.FLOPS, float("nan"))))
    for seeds in out.values():
        seeds.sort(key=lambda s: s.seed)
    return out


def find_candidates(client: Any, experiment: str, parent_run_id: str | None) -> tuple[str, list[Candidate]]:
    """The parent run id and its child runs that reached the target, best first.

    The children are trial runs, or for a replicate search configuration runs (whose seed runs
    sit one level further down, so they are never candidates themselves); a configuration
    comes with its seed runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no experiment named {experiment!r} in the tracking store", field="--experiment")
    if exp.lifecycle_stage == "deleted":  # its runs are hidden from searches: it read as "holds no search"
        raise ConfigError(f"the experiment {experiment!r} is deleted; restore it (mlflow experiments restore "
                          f"--experiment-id {exp.experiment_id}) to read its runs", field="--experiment")
    if parent_run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", parent_run_id):
        raise ConfigError(f"{parent_run_id!r} is not an MLflow run id (32 hex digits)", field="--run")
    given = parent_run_id is not None
    if given:
        check_search_run(client, exp.experiment_id, experiment, parent_run_id)
    if parent_run_id is None:
        parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ConfigError(f"experiment {experiment!r} holds no search (no search parent run); give --run "
                              "with a search's parent run id", field="--experiment")
        parent_run_id = parents[0].info.run_id
    children = child_runs(client, exp.experiment_id, parent_run_id)
    if not children and not given:
        raise ConfigError(f"the latest search of {experiment!r} (parent run {parent_run_id}) has no trial runs "
                          "yet; give --run with another search's parent run id", field="--experiment")
    if not children:
        raise ConfigError(f"run {parent_run_id} of {experiment!r} has no trial runs; give a search's "
                          "parent run", field="--run")
    reached = [Candidate(run.info.run_id, run.data.tags.get(r.TRIAL_ID, run.info.run_id),
                         dict(run.data.metrics), dict(run.data.tags))
               for run in children if run.data.metrics.get(r.REACHED) == 1.0 and not run.data.metrics.get(r.DIVERGED)]
    reached.sort(key=lambda c: (c.metrics[r.COMPUTE_TO_TARGET], -c.metrics.get(r.TARGET_ACC, 0.0), c.trial_id))
    seeds = seed_runs(client, exp.experiment_id, {c.run_id for c in reached if c.is_configuration})
    for c in reached:
        c.seeds = seeds.get(c.run_id, [])
    return parent_run_id, reached


def check_search_run(client: Any, experiment_id: str, experiment: str, run_id: str) -> None:
    """`ConfigError` unless `run_id` is a search's parent run in this experiment: a configuration
    run (a replicate search's, whose children are its seeds) would be read as a search whose
    trials are its seeds, and `iterhead report` would log its page into it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(f"no run {run_id} in the tracking store", field="--run") from None
    kind = run.data.tags.get(r.KIND)
    if run.info.experiment_id != experiment_id:
        raise ConfigError(f"run {run_id} is not in experiment {experiment!r}", field="--run")
    if kind != r.KIND_SEARCH:
        what = f"a {kind} run" if kind else "not an iterhead run"
        raise ConfigError(f"run {run_id} is {what}, not a search's parent run; give the parent run of the "
                          "search (its name starts with 'search:')", field="--run")


def retrain_budget(params: dict[str, str], c: Candidate) -> str | None:
    """The `--budget` of the re-train command: the search's, where it had one. Without one, a
    configuration's seeds take the search's horizon, half its penalty (`results.PENALTY_PARAM`):
    `iterhead train` then charges a censored seed the search's penalty, not twice its own plan.
    Only where no seed trained past it, so that it stops none sooner than the search did; a
    search from before the penalty was recorded has none to give."""
    budget = params.get("budget.flops")
    if budget not in (None, "", "None"):
        return budget
    penalty = params.get(r.PENALTY_PARAM)
    if not c.is_configuration or penalty is None:
        return None
    horizon = float(penalty) / r.CENSOR_FACTOR
    return repr(horizon) if all(s.flops <= horizon for s in c.seeds) else None


def header(c: Candidate, experiment: str, parent: str, rank: int, file: str, budget: str | None = None) -> str:
    """Where the file came from, what it scored, and the command that reproduces it exactly
    (with `budget`, `retrain_budget`'s, where there is one: past it a trial stops and is censored)."""
    threads = c.tags.get(r.THREADS_TAG, "1")
    precision = c.tags.get(r.PRECISION_TAG, "fp32")  # runs from before precision was tagged trained in fp32
    # the device kind it trained on, pinned: `--device auto` would take a GPU wherever one is, and
    # numbers repeat per device kind (README, Reproducibility)
    kind = "cuda" if c.tags.get(r.DEVICE_TAG, "cpu").startswith("cuda") else "cpu"
    where = "on CPU" if kind == "cpu" else "on a GPU of the model it trained on"
    options = (f"--device {kind} --threads {threads} --precision {precision}"
               + (f" --budget {budget}" if budget else ""))
    m = c.metrics
    lines = [f"{EXPORTED} {version('iterhead')} on {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if c.is_configuration:
        seeds = ",".join(str(s.seed) for s in c.seeds)
        by_seed = ", ".join(f"seed {s.seed} " + (f"{s.compute_to_target:.6e}" if s.reached else "censored")
                            for s in c.seeds)
        lines += [
            f"search {experiment!r}, parent run {parent}, rank {rank} by median compute_to_target over seeds",
            f"configuration {c.trial_id}, MLflow run {c.run_id}",
            f"median compute_to_target {m[r.COMPUTE_TO_TARGET]:.6e} FLOP, "
            f"{m.get(r.SEEDS_REACHED, float('nan')):.0f} of {len(c.seeds)} seeds reached, "
            f"median target accuracy {m.get(r.TARGET_ACC, float('nan')):.4f}",
            f"compute_to_target by seed: {by_seed}",
            f"reproduce every seed exactly {where}: iterhead train {file} --seeds {seeds} {options}",
        ]
    else:
        who = (f"PBT member {c.trial_id}, its lineage (the stages it trained, copies of better members "
               f"included), MLflow run {c.run_id}" if c.tags.get(r.KIND) == r.KIND_MEMBER
               else f"trial {c.trial_id}, MLflow run {c.run_id}")
        lines += [
            f"search {experiment!r}, parent run {parent}, rank {rank} by compute_to_target",
            who,
            f"compute_to_target {m[r.COMPUTE_TO_TARGET]:.6e} FLOP, examples_to_target "
            f"{m.get(r.EXAMPLES_TO_TARGET, float('nan')):.0f}, "
            f"target accuracy {m.get(r.TARGET_ACC, float('nan')):.4f}",
            f"reproduce exactly {where}: iterhead train {file} {options}",
        ]
    return "".join(f"# {line}\n" for line in lines)


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._")
    return name[:80] or "trial"


def targets(out: Path, chosen: list[Candidate], top_k: int) -> list[Path]:
    """Where each chosen trial goes: OUT itself with ``--top-k 1``, else OUT/<rank>-<trial>.yaml
    (a folder whatever the number of trials that reached the target)."""
    if top_k == 1:
        return [out]
    root = out.resolve()
    paths = []
    for rank, c in enumerate(chosen, 1):
        path = (root / f"{rank:02d}-{safe_name(c.trial_id)}.yaml").resolve()
        if path.parent != root:
            raise ConfigError(f"refusing to write {path} outside {root}", field="-o")
        paths.append(path)
    return paths


def check_folder(out: Path, paths: list[Path]) -> None:
    """`ConfigError` where the folder OUT holds ranked files of an earlier export that this one
    would not replace: mixed in, two files would claim one rank. The same export again replaces
    its own files; nothing else is removed."""
    if not out.is_dir():
        return
    ranked = (p for p in out.glob("*.yaml") if re.fullmatch(r"\d{2,}-.*\.yaml", p.name))  # `targets`' names
    mine = set(paths)
    stale = sorted(p.name for p in ranked if p.resolve() not in mine)
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ConfigError(f"{out} holds files of another export ({shown}) that this one would not replace; give "
                          "a new or empty folder, or remove them", field="-o")


def check_file(out: Path) -> None:
    """`ConfigError` where the file OUT exists and is not an earlier export: it may be the user's
    own curriculum or the search's base file, which the export would replace for good. An
    earlier export is replaced, as in a folder the same export replaces its own files."""
    check_own_file(out, f"# {EXPORTED} ", "an earlier iterhead export", "give a new file name")


def check_own_file(out: Path, mark: str, what: str, instead: str, *older: str) -> None:
    """`ConfigError` on ``-o`` where `out` exists and is not a regular file that starts with `mark`
    (or with one of the `older` starts of files iterhead wrote before it had a mark): iterhead
    replaces only what it wrote itself (`export`, `iterhead report`), never a file of the user's.
    `what` names the files it wrote; `instead`, the way out."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_file():  # a FIFO would block the read below; a folder or a dangling link is not ours
        raise ConfigError(f"{out} exists and is not a file; {instead}, or move it away first", field="-o")
    try:
        with out.open("rb") as f:
            start = f.read(200)
    except OSError:
        start = b""
    if not start.startswith(tuple(m.encode() for m in (mark, *older))):
        raise ConfigError(f"{out} exists and is not {what} (its first line is not '{mark}...'); {instead}, "
                          "or move the file away first", field="-o")


def curriculum_file(client: Any, c: Candidate, folder: str) -> str:
    """The trial's curriculum artifact, downloaded into `folder`; `ExportError` naming the artifact folder
    where it is missing: a store moved or copied without it still names the folder it was made beside."""
    from mlflow.exceptions import MlflowException

    try:
        return client.download_artifacts(c.run_id, "curriculum.yaml", folder)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    where = client.get_run(c.run_id).info.artifact_uri
    raise ExportError(f"trial {c.trial_id}'s curriculum.yaml is not in its run's artifact folder {where}; a store "
                      "moved or copied keeps that path: put the artifacts there, or export where the store was made "
                      "(where the folder is there, the upload failed: train the trial again)")


def export(client: Any, experiment: str, out: Path, *, top_k: int = 1,
           parent_run_id: str | None = None) -> list[Path]:
    """Write the `top_k` best reached trials of the search; returns the files written."""
    # each file's header quotes the path in its reproduce line: a byte that is not UTF-8 failed there
    require_utf8(str(out), "the path", "the header of the file it writes quotes it: give a path in UTF-8", field="-o")
    if top_k == 1 and out.suffix not in (".yaml", ".yml"):
        raise ConfigError("with --top-k 1, give a file name ending in .yaml", field="-o")
    if top_k == 1 and out.is_dir():
        raise ConfigError(f"{out} is a folder; with --top-k 1, give a file name ending in .yaml", field="-o")
    if top_k > 1 and out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; --top-k above 1 writes a folder", field="-o")
    if not out.parent.is_dir():
        raise ConfigError(f"the folder {str(out.parent)!r} does not exist", field="-o")
    if top_k == 1:
        check_file(out)  # before the store is read: nothing is written where it would replace another's file
    parent, reached = find_candidates(client, experiment, parent_run_id)
    params = client.get_run(parent).data.params
    if not reached:
        raise ExportError(f"no trial of {experiment!r} reached its target; nothing to export")
    chosen = reached[:top_k]
    paths = targets(out, chosen, top_k)
    if top_k > 1:
        check_folder(out, paths)
    texts = []
    for rank, (c, path) in enumerate(zip(chosen, paths), 1):
        with tempfile.TemporaryDirectory(prefix="iterhead-export-") as tmp:
            local = curriculum_file(client, c, tmp)
            cur = parse_curriculum(parse_yaml_mapping(Path(local).read_text(), file=local), file=local)
        shown = out if top_k == 1 else out / path.name  # as given, so the command runs where export ran
        texts.append(header(c, experiment, parent, rank, shlex.quote(str(shown)), retrain_budget(params, c))
                     + dump_curriculum(cur))
    if top_k > 1:
        out.mkdir(exist_ok=True)
    for path, text in zip(paths, texts):
        write_atomic(path, lambda f, text=text: f.write(text.encode()))
    return paths
