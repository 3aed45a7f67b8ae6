"""`iterhead search`: a search spec -> Ray Tune trials -> MLflow runs and a summary.

Order matters: the spec, its base and the resources are checked first (bad input exits 2
before Ray starts); the tracking store and experiment are created once from the driver
while Ray starts, before any trial writes (concurrent first-time sqlite schema creation
races); then Ray (the embedded default, or `--address`) runs the trials.

Each search gets its own folder under the storage path (`search.folder`), with Tune's state
and a small `iterhead-search.json` (parent run, tracking URI, state). ``--resume`` continues
the newest unfinished search of that name: finished trials are not run again, unfinished
ones continue from their checkpoints, and MLflow keeps the same runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from iterhead.curricula.errors import ConfigError, first_line
from iterhead.curricula.trial import SMOKE_PBT
from iterhead.search import outcome, sharing, signals
from iterhead.search.endpoints import first_answer
from iterhead.search.folder import (STATE_FILE, absolute_uri, check_parent_run, check_resume_options, check_tune_state,
                                    ended_before, hold_folder, remove_made, save_state, search_folder, spec_edits)
from iterhead.search.quiet import quiet_libraries
from iterhead.search.spec import LoadedSearch, Resources, SearchSettings
from iterhead.search.tracking import Heartbeat, RunWriter, begin_command, ui_hint
from iterhead.trainable import results

POPULATION = "population"  # a PBT search's population entries, inside its folder (`trainable/population.py`)
SCRATCH = "artifacts"  # the MLflow callback's copies of trial artifacts awaiting upload


@dataclass
class SearchOptions:
    uri: str
    address: str | None = None
    address_field: str = "--address"  # where the address came from, for the error that names it
    storage_path: str | None = None
    smoke: bool = False
    resume: bool = False
    num_cpus: int | None = None  # the embedded Ray's CPUs (default: this machine's)
    precision: str = "auto"  # each trial resolves auto on its own device (`devices.resolve_precision`)
    share: bool = True  # trials start from each other's shared prefixes (`search.sharing`)


def resume_command(loaded: LoadedSearch, opts: SearchOptions) -> str:
    """The command that continues this search: `--resume` refuses another store, folder or cluster."""
    where = [f"--tracking-uri {shlex.quote(opts.uri)}"]
    if opts.storage_path:
        where.append(f"--storage-path {shlex.quote(opts.storage_path)}")
    if opts.address:  # a cluster has its own CPUs: the command line refuses --num-cpus with it
        where.append(f"--address {shlex.quote(opts.address)}")
    elif opts.num_cpus is not None:
        where.append(f"--num-cpus {opts.num_cpus}")
    return f"iterhead search {shlex.quote(str(loaded.path))} --resume {' '.join(where)}"


def settings_for(loaded: LoadedSearch, smoke: bool) -> SearchSettings:
    """The search settings; a smoke search runs 2 samples, or 1 over grids cut to 2 values (PBT:
    a few members, `curricula.trial.SMOKE_PBT`)."""
    s = loaded.spec.search
    if not smoke:
        return s
    concurrent = min(s.max_concurrent, 2)  # a spec's 1 (one GPU's memory, say) holds at smoke size too
    if s.scheduler == "pbt":
        return s.model_copy(update={"num_samples": min(s.num_samples, SMOKE_PBT["members"]),
                                    "max_concurrent": concurrent})
    grids = any(d.kind == "grid" for d in loaded.spec.space.values())
    return s.model_copy(update={"num_samples": 1 if grids else 2, "max_concurrent": concurrent})


SMOKE_SEEDS = 2  # a smoke search trains each configuration on its first seeds only


def seeds_for(loaded: LoadedSearch, smoke: bool) -> list[int] | None:
    """The replicate seeds every configuration trains on (None: one seed per trial)."""
    seeds = loaded.spec.seeds
    return seeds[:SMOKE_SEEDS] if seeds and smoke else seeds


def local_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch (a bad spec must fail fast): the
    machine's (the driver's list, or the device files a container is given), at most as many as
    ``CUDA_VISIBLE_DEVICES`` names. The variable alone counted GPUs on a machine with none, and
    every trial that asked for one failed three times. Where it names MIG instances or UUIDs (a
    GPU split in several), or under WSL2 (no such files; GPUs come through /dev/dxg), it is
    taken as it is."""
    gpus = Path("/proc/driver/nvidia/gpus")
    present = max(len(list(gpus.iterdir())) if gpus.is_dir() else 0,
                  len([d for d in Path("/dev").glob("nvidia*") if d.name[len("nvidia"):].isdigit()]))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    named = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if Path("/dev/dxg").exists() or not all(d.isdigit() for d in named):
        return len(named)
    return min(present, len(named))


def check_resources(loaded: LoadedSearch, cpus: float, gpus: float, where: str) -> dict[str, float]:
    """The per-trial resources to ask for; `ConfigError` if no node could ever grant them."""
    r = loaded.spec.resources
    file = str(loaded.path)
    if r.cpu > cpus:
        raise ConfigError(f"a trial asks for {r.cpu:g} CPUs but {where} has {cpus:g}; lower resources.cpu",
                          field="resources.cpu", file=file)
    gpu = r.gpu if gpus > 0 else 0.0  # gpu is ignored where no CUDA device exists
    if gpu > gpus:
        raise ConfigError(f"a trial asks for {gpu:g} GPUs but {where} has {gpus:g}; lower resources.gpu",
                          field="resources.gpu", file=file)
    return {"cpu": r.cpu, "gpu": gpu}


def largest_node(nodes: list[dict[str, Any]]) -> tuple[float, float]:
    """The most CPUs and the most GPUs one live node has (`ray.nodes()`): a trial runs on one
    node, so the cluster's totals would pass a trial that no node can place."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    return (max((res.get("CPU", 0.0) for res in alive), default=0.0),
            max((res.get("GPU", 0.0) for res in alive), default=0.0))


def start_ray(opts: SearchOptions) -> bool:
    """Connect to `--address`, or start the embedded Ray; True if we started it.

    The embedded Ray is always a new one (``address="local"``): a bare ``ray.init()`` would
    join whatever `ray start` last wrote into Ray's temp folder, even a cluster long dead,
    and then refuse our CPU count. Only an explicit address (`--address`, or `RAY_ADDRESS`
    read by the CLI) joins another cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    if opts.address:
        try:
            ray.init(address=opts.address, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:  # something answers there, but no Ray (`endpoints.ray_address`)
            raise ConfigError(f"no Ray cluster at {opts.address}: {first_line(err, 300)}",
                              field=opts.address_field) from None
        return True
    ray.init(address="local", num_cpus=opts.num_cpus or os.cpu_count() or 1, num_gpus=local_gpus(),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def run_search(loaded: LoadedSearch, opts: SearchOptions, out: TextIO | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the search; returns one summary row per trial. SIGTERM stops it as Ctrl-C
    does from the start (`signals`): killed by the signal while MLflow made a new store's tables,
    the driver left a store that every later command failed on (``duplicate column name``)."""
    with signals.sigterm_as_ctrl_c() as terminated:
        return _run_search(loaded, opts, out or sys.stdout, terminated)


def _run_search(loaded: LoadedSearch, opts: SearchOptions, out: TextIO,
                terminated: threading.Event) -> list[dict[str, Any]]:
    quiet_libraries()
    begin_command()
    spec = loaded.spec
    settings = settings_for(loaded, opts.smoke)
    pbt = settings.scheduler == "pbt"
    keys = list(spec.pbt.mutate) if pbt else list(spec.space)  # what the summary shows of each trial
    if not opts.address and not opts.resume:  # checked before Ray starts (a resume's: below)
        check_resources(loaded, float(opts.num_cpus or os.cpu_count() or 1), float(local_gpus()), "this machine")
    new_folders: list[Path] = []  # removed if the search never begins
    folder, state = search_folder(loaded, opts, new_folders)
    opts = replace(opts, uri=absolute_uri(opts.uri))  # saved in the state, used by the restored callback
    stopping = contextlib.ExitStack()
    if state:
        check_resume_options(opts, state)
        check_parent_run(opts.uri, state)
        check_tune_state(folder)
        for file, fields in spec_edits(loaded, state).items():
            shown = ", ".join(fields[:6]) + (f" and {len(fields) - 6} more" if len(fields) > 6 else "")
            print(f"note: {file} changed since the search began ({shown}); a resume trains what it began "
                  "with: run the search without --resume to train the change", file=out)
        if "resources" in state:  # a resume trains with the threads it began with, whatever the spec says now
            loaded = LoadedSearch(spec.model_copy(update={"resources": Resources(**state["resources"])}),
                                  loaded.base, loaded.base_path, loaded.path)
        if not opts.address:
            check_resources(loaded, float(opts.num_cpus or os.cpu_count() or 1), float(local_gpus()), "this machine")
    parent = state["parent_run_id"] if state else None
    writer: RunWriter | None = None
    heartbeat: Heartbeat | None = None
    status = "FAILED"
    ours = False  # whether the parent run is this driver's to end: made, or set RUNNING again by this resume
    started = False
    rows: list[dict[str, Any]] = []
    try:
        finished = ended_before(folder) if state else set()  # read before Tune saves its state again
        stopping.callback(os.close, hold_folder(folder))  # the driver's, while it runs: a second --resume is refused
        writer = RunWriter(opts.uri)
        experiment = spec.name
        made = writer.submit_untracked(writer.experiment_id, experiment)  # store and experiment, once, here ...
        import ray
        from ray import tune

        from iterhead.search import population
        from iterhead.search.callback import MlflowSearchCallback
        from iterhead.search.reconcile import reconcile
        from iterhead.search.space import horizon, param_space, rungs, scheduler, searcher
        from iterhead.trainable.tune import train_trial

        with signals.through_ray_init(terminated):
            started = start_ray(opts)  # ... while Ray starts: both take seconds
        try:
            first_answer(made)  # before any trial can write
        except ConfigError as err:  # a deleted experiment: the spec's name chose it
            raise ConfigError(err.message, field="name", file=str(loaded.path)) from None
        for m in writer.submit(reconcile, writer.client, [experiment]).result():
            print(f"marked KILLED: a {m.what} run a crash left RUNNING ({m.run_id})", file=out)
        resources = check_resources(loaded, *largest_node(ray.nodes()), "the Ray cluster's largest node")
        # a resume trains what the search started with, whatever the files say now
        base = state["base"] if state else loaded.base.model_dump(mode="json")
        budget = state["budget"] if state else spec.budget.flops
        smoke = state["smoke"] if state else opts.smoke
        penalty = state["penalty"] if state else results.CENSOR_FACTOR * horizon(loaded, smoke)
        seeds = state.get("seeds") if state else seeds_for(loaded, opts.smoke)
        checkpoints_at = state.get("rungs", []) if state else rungs(loaded, settings, smoke)  # ASHA's, as it began
        precision = state.get("precision", "fp32") if state else opts.precision
        pbt = state.get("pbt", False) if state else pbt
        keys = state.get("keys", keys) if state else keys
        share = state.get("share", False) if state else opts.share
        plan = state.get("plan") if state else (
            (population.prefix_plan(loaded, base, smoke) if pbt else sharing.plan(loaded, base, smoke))
            if share else None)
        share = share and (plan is not None or not pbt)  # PBT shares only what its first generation repeats
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=base, budget=budget, smoke=smoke, penalty=penalty, seeds=seeds,
                                 precision=precision, threads=max(1, int(resources["cpu"])),
                                 share={"folder": str(folder / sharing.PREFIXES), "planned": plan} if share else None,
                                 population=str(folder / POPULATION) if pbt else None,
                                 checkpoint_every_s=settings.checkpoint_every_s, rungs=checkpoints_at), resources)
        if state:
            writer.submit(lambda: writer.client.update_run(parent, status="RUNNING")).result()
            ours = True
            heartbeat = Heartbeat(writer, parent)
            print(f"resuming search {spec.name!r} from {folder}; MLflow parent run {parent}", file=out, flush=True)
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True,
                                       resume_errored=not pbt)  # a failed member stays failed: the
            # population went on without it, and a re-run of its generation would be read by no one
        else:
            parent = writer.submit(writer.create_run, experiment, f"search:{spec.name}",
                                   {results.KIND: results.KIND_SEARCH, results.SPEC_TAG: str(loaded.path.resolve()),
                                    results.STORAGE_TAG: str(folder)},
                                   _spec_params(loaded, settings, opts, base, penalty)).result()
            ours = True
            heartbeat = Heartbeat(writer, parent)
            save_state(folder, {"parent_run_id": parent, "uri": opts.uri, "spec": str(loaded.path.resolve()),
                                "state": "running", "base": base, "budget": budget, "smoke": smoke,
                                "penalty": penalty, "rungs": checkpoints_at, "seeds": seeds, "precision": precision,
                                "share": share, "plan": plan, "pbt": pbt, "keys": keys,
                                "resources": spec.resources.model_dump(),
                                "search_spec": spec.model_dump(mode="json")})
            how = (f"PBT over stage {population.pbt_stage(spec.pbt, base)!r}, {settings.num_samples} members compared "
                   f"every {population.interval_for(spec.pbt, smoke)} epochs" if pbt else
                   f"{settings.num_samples} sample(s), {settings.algorithm} + {settings.scheduler}")
            print(f"search {spec.name!r}: {how}, at most {settings.max_concurrent} at once; MLflow parent run "
                  f"{parent}; Tune state in {folder}", file=out, flush=True)
            callback = MlflowSearchCallback(opts.uri, experiment, parent, base, smoke, out, seeds=seeds,
                                            scratch=str(folder / SCRATCH))
            search_alg, trial_scheduler, samples = (
                population.tune_parts(loaded, base, settings, smoke, folder / POPULATION) if pbt else
                (searcher(settings, bool(spec.space)), scheduler(loaded, settings, smoke), settings.num_samples))
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(loaded, smoke),
                tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=trial_scheduler, num_samples=samples,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=folder.name, storage_path=str(folder.parent), callbacks=[callback],
                                          verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                          failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
            )
        with signals.tune_loop():
            grid = tuner.fit()
            # Ctrl-C or SIGTERM: with trials cut, or with none running (`signals.tune_stopped`)
            stopped = terminated.is_set() or signals.tune_stopped() or not outcome.trials_ended(grid, finished)
        if stopped:
            writer.mark_stopping()
        rows = outcome.trial_rows(grid, writer, experiment, parent, keys, pbt, finished, stopping=stopped)
        complete = not stopped and outcome.ran_to_end(rows)
        if complete:
            outcome.log_summary(writer, parent, rows, keys, sharing.accounting(rows))
            save_state(folder, {**json.loads((folder / STATE_FILE).read_text()), "state": "finished"})
            for own in (sharing.PREFIXES, POPULATION, SCRATCH):  # only this search's trials start there
                shutil.rmtree(folder / own, ignore_errors=True)
        status = "FINISHED" if complete else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:  # a store that stopped answering, say: Tune saved what a resume continues
        if parent is not None and not isinstance(err, ConfigError):
            print(f"\nsearch failed; once its cause is fixed, continue it with: {resume_command(loaded, opts)}",
                  file=out, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, lambda *_: terminated.set())  # raised in the clean-up, it left runs RUNNING
        stopping.close()
        if parent is None:  # a new search that never began: its folder holds nothing
            remove_made(new_folders)
        try:
            if heartbeat is not None:
                heartbeat.stop()
            if ours:  # unchecked: an earlier write error must not hide the first error
                writer.submit(writer.end_run, parent, status, check=False)
        finally:
            try:
                if writer is not None:
                    writer.close(stopping=status == "KILLED")
            finally:
                if started:
                    ray.shutdown()
    if status != "FINISHED":
        print(f"\nsearch interrupted; continue it with: {resume_command(loaded, opts)}", file=out)
    outcome.print_summary(rows, keys, out, state.get("seeds") if state else seeds_for(loaded, opts.smoke),
                          "members" if pbt else None)
    if rows and pbt:
        print(population.summary_line(sharing.accounting(rows), rows), file=out)
    elif rows:
        print(sharing.summary_line(sharing.accounting(rows), sum(1 for row in rows if row["forked_from"])), file=out)
    print(f"MLflow experiment {experiment!r}; to look: {ui_hint(opts.uri)}", file=out)
    if status != "FINISHED":  # Tune's graceful stop: the command still exits 130, or 143 after SIGTERM (`signals`)
        raise KeyboardInterrupt()
    return rows


PBT_UNUSED = ("algorithm", "grace_fraction", "reduction_factor")  # search settings a PBT search does not read


def _spec_params(loaded: LoadedSearch, settings: SearchSettings, opts: SearchOptions,
                 base: dict[str, Any], penalty: float) -> dict[str, Any]:
    """The parent run's params: how the search searched (a PBT search: its `pbt` settings as it
    runs them, not the searcher and ASHA settings it does not use), its budget, the penalty a
    censored trial reports (export's re-train command charges the same) and resources."""
    spec = loaded.spec
    params: dict[str, Any] = {f"space.{k}": f"{d.kind} {d.args}" for k, d in spec.space.items()}
    search = settings.model_dump()
    if spec.pbt is not None:
        from iterhead.search import population

        search = {k: v for k, v in search.items() if k not in PBT_UNUSED}
        params.update({"pbt.interval_epochs": population.interval_for(spec.pbt, opts.smoke),
                       "pbt.quantile": spec.pbt.quantile, "pbt.resample_probability": spec.pbt.resample_probability,
                       "pbt.stage": population.pbt_stage(spec.pbt, base),
                       **{f"pbt.mutate.{k}": f"{d.kind} {d.args}" for k, d in spec.pbt.mutate.items()}})
    params.update({f"search.{k}": v for k, v in search.items()})
    params.update({"budget.flops": loaded.spec.budget.flops, results.PENALTY_PARAM: penalty,
                   "base": str(loaded.base_path), "smoke": opts.smoke,
                   "seeds": ",".join(map(str, loaded.spec.seeds)) if loaded.spec.seeds else "",
                   "precision": opts.precision})
    params.update({f"resources.{k}": v for k, v in loaded.spec.resources.model_dump().items()})
    return params
