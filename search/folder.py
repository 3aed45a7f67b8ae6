"""Where a search's state lives: its own folder under the storage path, and what is checked
there before a search starts or resumes.

A new search gets ``<name>-<YYYYmmdd-HHMMSS>`` (an ``x`` added while the name is taken), made
at once; it holds Tune's state and `STATE_FILE` (parent run, tracking URI, state). Its driver
locks it (`hold_folder`) while it runs. ``--resume`` picks the newest unfinished search of
that name, in the same store, with a parent run there and a Tune state that reads; a damaged
`STATE_FILE` stops it, with a line naming the file, only where that search could be the one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from iterhead.curricula.errors import ConfigError, require_utf8, shown
from iterhead.search.tracking import sqlite_file
from iterhead.trainable.checkpoint import write_atomic

if TYPE_CHECKING:
    from iterhead.search.run import SearchOptions
    from iterhead.search.spec import LoadedSearch

STATE_FILE = "iterhead-search.json"


def search_folder(loaded: LoadedSearch, opts: SearchOptions,
                  made: list[Path] | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Where this search's Tune state lives, and its saved state when resuming; a new search's
    folder, and the folders above it that did not exist, are added to `made` (`remove_made`).

    A saved state of that name that does not read stops a resume only where its search could be
    the one picked (`read_state`): skipping it there could resume an older search in its place."""
    if opts.storage_path and "://" in opts.storage_path:
        raise ConfigError("give a local or shared-file-system folder (object-store URIs are not "
                          "supported yet)", field="--storage-path")
    root = Path(opts.storage_path or "ray_results").resolve()
    # the search's run records the folder: the store failed on it after Ray started
    require_utf8(str(root), shown(str(root)), "the search records it: give a folder whose path is UTF-8",
                 field="--storage-path")
    writable_folder(root, "--storage-path")
    name = loaded.spec.name
    own = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}x*")
    if not opts.resume:
        folder = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        new = [path for path in (root, *root.parents) if not path.exists()]
        while True:  # made here, atomically: two searches started in one second get a folder each
            try:
                folder.mkdir(parents=True)  # the root too: another search's `remove_made` may just have removed it
                if made is not None:
                    made += [folder, *new]
                return folder, None
            except FileExistsError:
                folder = folder.with_name(folder.name + "x")
    states, damaged = [], []
    for path in root.glob(f"{name}-*/{STATE_FILE}"):
        if not own.fullmatch(path.parent.name):  # another search whose name starts like this one
            continue
        try:
            state = read_state(path)
        except ConfigError as err:
            damaged.append((_rank(path), err))
            continue
        if state.get("state") != "finished":
            states.append((_rank(path), path.parent, state))
    # the newest one Tune saved a state in: one stopped before (its folder holds no Tune state)
    # can never be resumed, and must not hide an older one that can; alone, `check_tune_state` says so
    newest = max(states, key=lambda s: s[0], default=None)
    unsure = [(rank, err) for rank, err in damaged if newest is None or rank >= newest[0]]
    if unsure:  # it may be the search to resume: resuming another in its place would be a silent mistake
        raise max(unsure, key=lambda d: d[0])[1]
    if newest is None:
        raise ConfigError(f"no unfinished search named {name!r} under {root}; run it without --resume",
                          field="--resume")
    _, folder, state = newest
    if state["uri"] not in (opts.uri, absolute_uri(opts.uri)):  # a search's state holds it absolute
        raise ConfigError(f"the search was tracked in {state['uri']}; resume it with that --tracking-uri",
                          field="--tracking-uri")
    return folder, state


def remove_made(made: list[Path]) -> None:
    """Remove a new search's folder that never began, and then each folder above it made for it
    that is empty (another search may have begun in one since), nearest first."""
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    for path in made[1:]:
        try:
            path.rmdir()
        except OSError:  # not empty, or gone
            return


def _rank(state_file: Path) -> tuple[bool, float]:
    """Which search a resume picks (the highest): one Tune saved a state for, then the newest
    saved state of iterhead's; readable or not. A time that cannot be read counts as newest."""
    try:
        mtime = state_file.stat().st_mtime
    except OSError:
        mtime = float("inf")
    return any(state_file.parent.glob("experiment_state-*.json")), mtime


def _number(value: Any, none: bool = False) -> bool:
    return (value is None and none) or (isinstance(value, (int, float)) and not isinstance(value, bool))


SAVED: dict[str, Callable[[Any], bool]] = {  # what a resume reads of a saved state, and what each must be
    "parent_run_id": lambda v: isinstance(v, str), "uri": lambda v: isinstance(v, str),
    "base": lambda v: isinstance(v, dict), "budget": lambda v: _number(v, none=True),
    "smoke": lambda v: isinstance(v, bool), "penalty": _number,
    "resources": lambda v: isinstance(v, dict) and set(v) <= {"cpu", "gpu"} and all(map(_number, v.values())),
    "seeds": lambda v: v is None or isinstance(v, list) and all(isinstance(x, int) for x in v),
    "precision": lambda v: v in ("fp32", "bf16", "auto"), "pbt": lambda v: isinstance(v, bool),
    "share": lambda v: isinstance(v, bool), "keys": lambda v: isinstance(v, list),
    "search_spec": lambda v: isinstance(v, dict),
}
REQUIRED = ("parent_run_id", "uri", "base", "budget", "smoke", "penalty")  # every search saved them


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the search's state whole or not at all: a resume reads it (`read_state`)."""
    write_atomic(folder / STATE_FILE, lambda f: f.write(json.dumps(state, indent=1).encode()))


def read_state(path: Path) -> dict[str, Any]:
    """The state a search saved in its folder; `ConfigError` naming the file where it does not read
    as one (cut short, edited, replaced by a folder), rather than a traceback. `search_folder`
    raises it only where that search may be the one to resume: a damaged state ranked below the
    search it picks (`_rank`, which needs no reading) would not have been picked even if it read,
    so a finished search's damage does not block resuming a newer one."""
    try:
        state = json.loads(path.read_text())
    except OSError as err:
        why = (err.strerror or type(err).__name__).lower()
    except ValueError:  # not JSON, or not text
        why = "not JSON"
    else:
        if not isinstance(state, dict):
            why = "not a JSON object"
        elif wrong := [k for k, fits in SAVED.items()
                       if (k in REQUIRED and k not in state) or (k in state and not fits(state[k]))]:
            why = f"{wrong[0]!r} " + ("missing" if wrong[0] not in state else f"is {state[wrong[0]]!r}")
        else:
            return state
    raise ConfigError(f"{path} does not read as a search's saved state ({why}), and that search may be the one "
                      f"to resume; move its folder out of {path.parent.parent} to resume an older search of that "
                      "name, or run the search again without --resume", field="--resume")


DRIVER_LOCK = "driver.lock"  # in a search's folder, locked by the driver that runs it


def hold_folder(folder: Path) -> int:
    """Lock the search's folder for this driver (an exclusive `flock`, which the system drops
    when the process ends, however it ends); the descriptor to close when the search ends.
    `ConfigError` while another driver holds it: two drivers of one search wrote the same Tune
    state and MLflow runs, training configurations twice and logging steps twice."""
    fd = os.open(folder / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"the search in {folder} is still running (its driver holds {DRIVER_LOCK}); stop "
                          "it, or wait for it to end, before resuming", field="--resume") from None
    return fd


def writable_folder(folder: Path, field: str) -> None:
    """`ConfigError` unless `folder` is, or can be made, a folder to write in: checked before
    Ray starts or any MLflow run exists, not found by a traceback halfway through."""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    except OSError as err:  # a name past the file system's limit (ENAMETOOLONG), a symlink loop
        raise ConfigError(f"cannot use {folder} ({err.strerror or err}); give another folder", field=field) from None
    if not existing.is_dir():
        raise ConfigError(f"{existing} is not a folder; give a folder (or a path where one can be made)",
                          field=field)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write in {existing}; give a folder you can write in", field=field)


def not_written(out: str, err: OSError) -> str:
    """The line for `err`, met while a command wrote its output `out` (a full disk, a folder that
    refuses what `os.access` allowed) or read what it needed on the way (an artifact it cannot
    read: named as itself, not as `out`)."""
    place = Path(os.fsdecode(err.filename)) if isinstance(err.filename, (str, bytes)) else None
    mine = Path(out).absolute()  # and the temporary file `write_atomic` makes beside it
    if place is None or place.absolute().is_relative_to(mine) or (
            place.absolute().parent == mine.parent and place.name.startswith(f".{mine.name}.")):
        return f"error: cannot write {out}: {err.strerror or err}"
    return f"error: cannot use {place}: {err.strerror or err}"


def absolute_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute: a search resumed from another folder
    then still names its own store, not a new one in that folder."""
    file = sqlite_file(uri)
    if file is None or file.is_absolute():
        return uri
    _, mark, query = uri.partition("?")  # the driver's options (``?mode=rw``) stay as given
    # the path as SQLAlchemy decodes it again: '%' escapes, '?' would start the query, '#' a fragment
    path = str(file.resolve()).replace("%", "%25").replace("?", "%3F").replace("#", "%23")
    return f"sqlite:///{path}{mark}{query}"


def check_parent_run(uri: str, state: dict[str, Any]) -> None:
    """`ConfigError` unless the resumed search's parent run is in the store `uri` names (a
    relative sqlite URI names another store in another folder). Creates no store."""
    parent, tracked = state["parent_run_id"], state["uri"]
    file = sqlite_file(uri)
    where = (f"{tracked} is relative to the folder the search started in: run --resume from that folder"
             if absolute_uri(tracked) != tracked else "restore the store it was tracked in, or run the search "
             "again without --resume")
    missing = f"the search's MLflow parent run {parent} is not in {uri}; {where}"
    if file is not None and not file.is_file():
        raise ConfigError(missing, field="--tracking-uri")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(parent)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(missing, field="--tracking-uri") from None


def check_tune_state(folder: Path) -> None:
    """`ConfigError` unless Tune's newest saved state in `folder` reads. Tune restores from it,
    and where it is empty or cut short (the driver killed while Tune wrote it) Tune started the
    search afresh inside the old one: a PBT search then reported a population of one, marked
    itself finished and removed the others' entries."""
    states = sorted(folder.glob("experiment_state-*.json"))  # the names sort by their time stamps
    if not states:
        raise ConfigError(f"Tune saved no state in {folder} before the search stopped; run it again "
                          "without --resume", field="--resume")
    try:
        json.loads(states[-1].read_text())
    except (OSError, ValueError):
        way = (f"remove it to resume from the one before ({states[-2].name}), or run the search again without "
               "--resume" if len(states) > 1 else "run the search again without --resume")
        raise ConfigError(f"Tune's saved state {states[-1].name} in {folder} is empty or cut short (the search "
                          f"was killed while Tune wrote it), and Tune resumes from the newest; {way}",
                          field="--resume") from None


def ended_before(folder: Path) -> set[str]:
    """The trials that Tune's newest saved state in `folder` holds as TERMINATED: they ended before
    the stop (a graceful stop saves the trials it stops as running) and Tune runs none of them
    again. A search begun before trials said so in their last report (`results.TRIAL_ENDS`) may
    hold them without Tune's `done` (`outcome.ended`); without this a resume of it could never
    finish. Empty where the state does not read as expected (Tune's own format)."""
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        saved = json.loads(states[-1].read_text())["trial_data"]
        trials = [json.loads(t) if isinstance(t, str) else t for t, _ in saved]
        return {str(t["trial_id"]) for t in trials if t.get("status") == "TERMINATED"}
    except (IndexError, KeyError, TypeError, ValueError, OSError):
        return set()


def check_resume_options(opts: SearchOptions, state: dict[str, Any]) -> None:
    """`ConfigError` for a flag given with ``--resume`` that the search did not start with: a
    resume trains what the search began with (its saved state), which would silently win."""
    began = {"--smoke": state.get("smoke", False), "--precision": state.get("precision", "fp32"),
             "--no-share": not state.get("share", False)}
    given = {"--smoke": opts.smoke or None, "--precision": None if opts.precision == "auto" else opts.precision,
             "--no-share": (not opts.share) or None}
    for flag, value in given.items():
        if value is not None and value != began[flag]:
            was = f"with --precision {began[flag]}" if flag == "--precision" else (
                "with it" if began[flag] else "without it")
            raise ConfigError(f"the search began {was}, and a resume trains what it began with; leave {flag} out",
                              field=flag)


RESUME_READS = {"search.checkpoint_every_s"}  # the one spec field a resume reads again


def spec_edits(loaded: LoadedSearch, state: dict[str, Any]) -> dict[str, list[str]]:
    """Per file, the fields that differ from what the search began with (a search begun by an
    earlier version saved its base only). A resume trains what it began with, so an edit made
    for the resume would otherwise be dropped without a word."""
    out = {str(loaded.base_path): _differ(state["base"], loaded.base.model_dump(mode="json"))}  # `REQUIRED`
    if "search_spec" in state:
        out[str(loaded.path)] = [f for f in _differ(state["search_spec"], loaded.spec.model_dump(mode="json"))
                                 if f not in RESUME_READS]
    return {file: fields for file, fields in out.items() if fields}


def _differ(began: Any, now: Any) -> list[str]:
    """Dotted names of the leaves that differ (list items by their `name` where they have one:
    the names the space's keys use, as in ``stages.finetune.epochs``)."""
    a, b = _leaves(began), _leaves(now)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value) and value:
        value = {str(v["name"]): v for v in value}
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}
