"""The `iterhead` command line. Exit codes: 0 success, 2 bad input, 1 a failure while running,
130 after Ctrl-C, 143 after SIGTERM (`search/signals.py`)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from pathlib import Path
from typing import Sequence

from iterhead.curricula.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, ConfigError, first_line, memory_advice,
                                       one_line, out_of_memory, recorded_path, require_utf8, shown)
from iterhead.search.ablate import cmd_ablate
from iterhead.search.endpoints import address_field, check_store, not_a_tracking_server, ray_address, uri_field
from iterhead.search.signals import Terminated, after_stop, sigterm_as_ctrl_c
from iterhead.search.tracking import DEFAULT_URI, store_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iterhead", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate",
                       help="check curriculum and search files; exit 2 if any is bad (each bad one gets its line)")
    v.add_argument("files", nargs="+", metavar="FILE")

    t = sub.add_parser("train", help="train one curriculum and log it to MLflow")
    t.add_argument("curriculum", metavar="CURRICULUM.yaml")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default: the curriculum's name)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads, 1 to 1024 (default: torch's choice)")
    t.add_argument("--seeds", help="train these seeds (e.g. 0,1,2,3) together as one batched model, "
                                   "one MLflow run each, instead of the curriculum's seed")
    t.add_argument("--budget", type=float, default=None,
                   help="stop at this many training FLOPs and censor the run past it, as a search trial "
                        "with this budget (exported search results name it)")
    t.add_argument("--precision", default="auto",
                   help="auto | fp32 | bf16: bf16 training steps and evaluation (weights and optimiser "
                        "stay fp32; the evaluation scores what fp32 scores); auto is bf16 where the device "
                        "has native bf16 and d_model is wide enough (128 on a CPU, 768 on CUDA), else fp32 "
                        "(default: auto)")
    s = sub.add_parser("search", help="run a curriculum search on Ray Tune, tracked in MLflow")
    s.add_argument("spec", metavar="SPEC.yaml")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    s.add_argument("--address", help="join an existing Ray cluster (HOST:PORT of its head, or auto for the one "
                                    "`ray start` last recorded on this machine); default: $RAY_ADDRESS, else a "
                                    "new embedded local Ray (also `local`)")
    s.add_argument("--storage-path", help="where Tune keeps trial results and checkpoints (default: ./ray_results)")
    s.add_argument("--smoke", action="store_true", help="2 trials, tiny data, 2 epochs a stage: a quick check")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search from its storage path")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    s.add_argument("--precision", default="auto",
                   help="auto | fp32 | bf16 for every trial; auto is bf16 where a trial's device has native "
                        "bf16 and d_model is wide enough (128 on a CPU, 768 on CUDA), else fp32 (each trial run "
                        "records what it used)")
    s.add_argument("--no-share", dest="share", action="store_false",
                   help="train every trial from scratch, even where another trial already trained the same "
                        "curriculum prefix (default: share it, exactly)")
    e = sub.add_parser("export", help="write the best trials of a search as curriculum YAML")
    e.add_argument("--experiment", required=True, help="the search's MLflow experiment (its name)")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    e.add_argument("--run", dest="parent_run", help="the search's parent run id (default: the latest search)")
    e.add_argument("--top-k", type=int, default=1, help="how many trials (default 1: OUT is a .yaml file)")
    e.add_argument("-o", "--out", required=True, help="OUT.yaml for --top-k 1, else a folder")
    h = sub.add_parser("report", help="a search's results as one self-contained HTML page")
    h.add_argument("--experiment", required=True, help="the search's MLflow experiment (its name)")
    h.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    h.add_argument("--run", dest="parent_run", help="the search's parent run id (default: the latest search)")
    h.add_argument("-o", "--out", default="report", help="folder for report.html (default: ./report)")

    a = sub.add_parser("ablate", help="test accuracy of a trained trial under attention interventions")
    a.add_argument("--checkpoint", required=True, help="a trial's checkpoint folder (holding trainer.pt)")
    a.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    a.add_argument("--seed", type=int, default=None,
                   help="the seed of a replicate trial (one with seeds:) to ablate (default: each of them)")

    r = sub.add_parser("reconcile", help="mark runs a crash left RUNNING as KILLED (never a live search's)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    r.add_argument("--experiment", action="append", help="only this experiment (repeatable; default: all)")
    r.add_argument("--stale-after", type=float, default=None,
                   help="seconds without a heartbeat after which a RUNNING run is dead (default 300)")
    return p


def load_any(file: str):
    """A curriculum or a search spec, told apart by their fields."""
    from iterhead.curricula.io import load_curriculum, read_yaml_mapping
    from iterhead.search.spec import is_search_spec, load_search

    return load_search(file) if is_search_spec(read_yaml_mapping(file)) else load_curriculum(file)


def describe(obj) -> str:
    from iterhead.search.spec import LoadedSearch

    if isinstance(obj, LoadedSearch):
        s = obj.spec
        if s.pbt is not None:
            return (f"PBT search {s.name!r} of {obj.base_path.name}: {s.search.num_samples} members, "
                    f"{len(s.pbt.mutate)} setting(s) perturbed every {s.pbt.interval_epochs} epochs")
        return (f"search {s.name!r} over {len(s.space)} key(s) of {obj.base_path.name}, "
                f"{s.search.algorithm}, {s.search.num_samples} sample(s)")
    return (f"curriculum {obj.name!r}, {len(obj.tasks)} task(s), {len(obj.stages)} stage(s), "
            f"lengths {obj.data.min_len}..{obj.data.max_len}")


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for file in args.files:
        try:
            obj = load_any(file)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            bad += 1
            continue
        print(one_line(f"ok: {file}: {describe(obj)}"))
    return EXIT_BAD_INPUT if bad else EXIT_OK


def wrong_kind(file: str, want_search: bool) -> None:
    """`ConfigError` for a search spec given to `train`, or a curriculum given to `search`,
    instead of the missing fields of the other kind."""
    from iterhead.curricula.io import read_yaml_mapping
    from iterhead.search.spec import SPEC_ONLY, is_search_spec

    data = read_yaml_mapping(file)
    search = is_search_spec(data)
    if search and not want_search:
        key = next(k for k in SPEC_ONLY if k in data)
        raise ConfigError(f"this is a search spec (it has {key}:, which no curriculum has), not a curriculum: "
                          "run it with `iterhead search`", field=key, file=file)
    if want_search and not search and "stages" in data and "space" not in data:  # else: a spec's own errors
        raise ConfigError("this is a curriculum (it names no base), not a search spec: train it with "
                          "`iterhead train`, or search over it from a spec whose base: names it", file=file)


def cmd_train(args: argparse.Namespace) -> int:
    from iterhead.curricula.io import load_curriculum
    from iterhead.search.tracking import heartbeat_every, resolve_uri
    from iterhead.trainable.results import MAX_BUDGET

    wrong_kind(args.curriculum, want_search=False)
    cur = load_curriculum(args.curriculum)
    recorded_path(args.curriculum)
    uri = resolve_uri(args.tracking_uri)
    heartbeat_every()  # checked before the run is made, not once it trains
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:  # torch starts them all: 100,000 ran
        # out of threads and crashed, 5,000 hung; more than the cores is only slower (an export's reproduce line)
        raise ConfigError(f"must be from 1 to {MAX_THREADS}", field="--threads")
    if args.experiment is not None and not 0 < len(args.experiment) <= MAX_EXPERIMENT_NAME:
        raise ConfigError(f"an MLflow experiment name has 1 to {MAX_EXPERIMENT_NAME} characters "
                          f"(got {len(args.experiment)})", field="--experiment")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    check_precision(args.precision)
    if args.budget is not None and not 0 < args.budget <= MAX_BUDGET:
        raise ConfigError(f"must be a positive number of FLOPs up to {MAX_BUDGET:g} (got {args.budget:g})",
                          field="--budget")
    check_store(uri, uri_field(args.tracking_uri))
    import torch

    from iterhead.search.train import train, train_seeds
    from iterhead.trainable.devices import prepare_env, resolve_device, resolve_precision

    prepare_env()  # before training starts in this process
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(str(err), field="--device") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    where = dict(uri=uri, experiment=args.experiment or cur.name, device=device,
                 source=str(Path(args.curriculum).resolve()),
                 precision=resolve_precision(args.precision, device, cur.model.d_model), budget=args.budget)
    if seeds is None:
        train(cur, **where)
    else:
        train_seeds(cur, seeds, **where)
    return EXIT_OK


MAX_NUM_CPUS = 10**14  # Ray refuses more, in a ValueError after the search's folder and store were made
MAX_THREADS = 1024  # as a trial's resources.cpu, which an exported trial's --threads repeats
MAX_EXPERIMENT_NAME = 500  # MLflow's limit; past it the store refuses the name after the data is built


def check_precision(name: str) -> None:
    from iterhead.trainable.results import PRECISIONS  # light: no torch before bad input is rejected

    if name not in PRECISIONS:
        raise ConfigError(f"{name!r} is not a precision; use {', '.join(PRECISIONS)}", field="--precision")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` as distinct non-negative integers, or a `ConfigError` naming --seeds."""
    values = [v.strip() for v in text.split(",")]
    if not all(re.fullmatch(r"-?[0-9]+", v) for v in values):  # int() would also read 1_0 as 10, +1, ...
        raise ConfigError(f"{text!r} is not a comma-separated list of integers; write e.g. 0,1,2,3",
                          field="--seeds")
    seeds = [int(v) for v in values]
    if len(set(seeds)) != len(seeds) or any(s < 0 or s >= 2**63 for s in seeds):
        raise ConfigError(f"seeds must be distinct integers in [0, 2^63); got {text!r}", field="--seeds")
    from iterhead.search.spec import MAX_SEEDS

    if len(seeds) > MAX_SEEDS:
        raise ConfigError(f"at most {MAX_SEEDS} seeds train together, as in a search's seeds: (got {len(seeds)})",
                          field="--seeds")
    return seeds


def cmd_search(args: argparse.Namespace) -> int:
    from iterhead.search.spec import load_search
    from iterhead.search.tracking import heartbeat_every, resolve_uri

    wrong_kind(args.spec, want_search=True)
    loaded = load_search(args.spec)
    recorded_path(args.spec)
    uri = resolve_uri(args.tracking_uri)
    heartbeat_every()  # checked before the parent run is made and Ray starts
    if args.num_cpus is not None and not 1 <= args.num_cpus <= MAX_NUM_CPUS:
        raise ConfigError(f"must be from 1 to {MAX_NUM_CPUS:.0e} (Ray's limit)", field="--num-cpus")
    from iterhead.search.run import SearchOptions, run_search

    check_precision(args.precision)
    # None: the embedded Ray, never an address a killed `ray start` left in Ray's temp folder
    field = address_field(args.address)
    given = args.address or os.environ.get("RAY_ADDRESS")
    if args.num_cpus is not None and given and given != "local":  # it was ignored there, without a word
        local = " (or pass --address local for the embedded Ray)" if field == "RAY_ADDRESS" else ""
        raise ConfigError(f"sets the CPUs of the embedded local Ray, but {field} names a cluster, which has its own; "
                          f"leave --num-cpus out{local}", field="--num-cpus")
    address = ray_address(given, field)
    check_store(uri, uri_field(args.tracking_uri))
    run_search(loaded, SearchOptions(uri=uri, address=address, address_field=field, storage_path=args.storage_path,
                                     smoke=args.smoke, resume=args.resume, num_cpus=args.num_cpus,
                                     precision=args.precision, share=args.share))
    return EXIT_OK


def existing_store(tracking_uri: str | None):
    """A client of a tracking store that must already exist (for commands that read one)."""
    from iterhead.search.tracking import resolve_uri

    uri = resolve_uri(tracking_uri, must_exist=True)
    check_store(uri, uri_field(tracking_uri))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few small artifacts
    from mlflow import MlflowClient

    return MlflowClient(uri)


def cmd_export(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ConfigError("must be at least 1", field="--top-k")
    client = existing_store(args.tracking_uri)
    from iterhead.search.export import ExportError, export
    from iterhead.search.folder import not_written

    try:
        paths = export(client, args.experiment, Path(args.out), top_k=args.top_k,
                       parent_run_id=args.parent_run)
    except ExportError as err:
        print(one_line(f"error: {err}"), file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # a full disk, a read-only folder: earlier files are left as they were
        if err.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"cannot write {args.out}: {err.strerror}; give a shorter path", field="-o") from None
        print(one_line(not_written(args.out, err)), file=sys.stderr)
        return EXIT_FAILED
    for path in paths:
        print(one_line(f"wrote {path}"))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    client = existing_store(args.tracking_uri)
    from iterhead.search.folder import not_written
    from iterhead.search.page import NotLogged, build, unmarked

    try:
        page = build(client, args.experiment, Path(args.out), args.parent_run)
    except NotLogged as err:
        print(one_line(f"error: {err}"), file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # as export says it
        if err.errno == errno.ENAMETOOLONG:
            raise
        print(one_line(not_written(args.out, err)), file=sys.stderr)
        return EXIT_FAILED
    print(unmarked((page.parent / "medians.md").read_text()))
    print(one_line(f"wrote {page} and medians.md beside it (and the figures on the search's parent run, "
                   "under report/)"))
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    from iterhead.search.reconcile import STALE_AFTER_S, reconcile
    from iterhead.search.tracking import heartbeat_every

    stale = STALE_AFTER_S if args.stale_after is None else args.stale_after
    every = heartbeat_every()
    if not 0 <= stale < float("inf"):  # NaN fails too
        raise ConfigError(f"must be a number of seconds, at least 0 (got {stale:g})", field="--stale-after")
    if stale < 2 * every:  # a live run's last beat can be nearly `every` old: it would be marked KILLED
        raise ConfigError(f"must be at least {2 * every:g} s, twice the heartbeat interval, or a live run could "
                          f"be marked KILLED between two beats (got {stale:g})", field="--stale-after")
    marked = reconcile(existing_store(args.tracking_uri), args.experiment, stale)
    for m in marked:
        print(f"marked KILLED: {m.what} run {m.run_id} in {m.experiment!r} (no sign of life for {m.idle_s:.0f} s)")
    print(f"{len(marked)} run(s) marked KILLED")
    return EXIT_OK


COMMANDS = {"validate": cmd_validate, "train": cmd_train, "search": cmd_search, "export": cmd_export,
            "report": cmd_report, "ablate": cmd_ablate, "reconcile": cmd_reconcile}


# An empty value was taken for the option's default (`x or default`), or for the current folder
# (Path("") is "."): each is refused, naming what to give instead.
NOT_EMPTY = {
    "address": ("--address", "give the HOST:PORT of the cluster's head, or leave the option out for $RAY_ADDRESS "
                             "or a new local Ray"),
    "storage_path": ("--storage-path", "give a folder, or leave the option out for ./ray_results"),
    "checkpoint": ("--checkpoint", "give a trial's checkpoint folder"),
    "out": ("-o", "give the file or folder to write"),
    "tracking_uri": ("--tracking-uri", f"give a tracking URI, or leave the option out for $MLFLOW_TRACKING_URI or "
                                       f"{DEFAULT_URI}"),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse an empty value where one silently meant a default (a file named " " is legal, but never
    meant; MLflow takes a blank experiment name), and an experiment name that is not UTF-8 text
    (MLflow failed on those bytes with a store error, exit 1)."""
    names = getattr(args, "experiment", None)
    names = [name for name in (names if isinstance(names, list) else [names]) if name is not None]
    keep = ", or leave the option out" if args.command in ("train", "reconcile") else ""
    given = [(getattr(args, dest, None), flag, hint) for dest, (flag, hint) in NOT_EMPTY.items()]
    for value, flag, hint in given + [(name, "--experiment", "name the experiment" + keep) for name in names]:
        if value is not None and not value.strip():
            raise ConfigError(f"{value!r} is {'empty' if not value else 'blank'}; {hint}", field=flag)
    for name in names:
        require_utf8(name, shown(name), "name the experiment in UTF-8", field="--experiment")


def main(argv: Sequence[str] | None = None) -> int:
    """Without `argv`, the command of this process: its stop lasts to the process's end (`after_stop`)."""
    code = _command(_parser().parse_args(argv))
    return after_stop(code) if argv is None else code


def _command(args: argparse.Namespace) -> int:
    try:
        with sigterm_as_ctrl_c():  # every command's clean-up runs (its temporary folders go, runs end KILLED)
            check_arguments(args)
            return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:  # only a path the user gave can be too long: bad input
            raise
        print(one_line(f"error: {err.filename or err}: {err.strerror}; give a shorter path"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - the store's failures and failed allocations only; the rest go on up
        if out_of_memory(err):  # too large for this machine: validation bounds sizes past any machine
            print(one_line(f"error: out of memory: {first_line(err, 300)}; {memory_advice(err)}"), file=sys.stderr)
            return EXIT_FAILED
        # one line and exit 1, not the client's traceback through its retries; exit 2 where the
        # store's first answer shows that the URI names no MLflow server
        if not store_error(err):
            raise
        given = getattr(args, "tracking_uri", None)
        field = uri_field(given)
        wrong = not_a_tracking_server(err, given or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
        if wrong:
            print(one_line(f"error: {field}: {wrong}"), file=sys.stderr)
            return EXIT_BAD_INPUT
        print(one_line(f"error: {field}: the MLflow store failed: {first_line(err, 400)}"), file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
