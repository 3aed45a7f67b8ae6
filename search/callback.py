"""The MLflow side of a search: a Ray Tune callback that runs in the driver.

One parent run per search (made by the driver before trials start), one child run per
trial (``mlflow.parentRunId``, tags ``iterhead.trial_id`` and ``ray.node_id``, params = the
trial's flattened curriculum). With replicates (``seeds:``) a trial's run is a
configuration run (params without the seed) and each seed gets a run under it, fed from
the ``seed_<s>/`` part of the trial's reports (`trainable/results.py`), with that seed's
artifacts. Each reported evaluation becomes one batched write at its own step; the final
checkpoint's artifacts are copied out and logged. Reported metrics are buffered per run
and written every `flush_every` seconds (and when a trial ends) as one batch of several
steps: on a small machine the driver shares the cores with the trials, and one store
transaction per report costs them measurable time. A child run is found again by its
tags, so a restored search continues the same runs instead of making new ones. All writes
go through an ordered background `RunWriter`; Tune's loop waits on the store only for a
trial's first result (until its runs exist) and at checkpoints (below). Tune pickles
callbacks into its experiment state, so the pickled state is only the settings (tracking
URI, experiment, parent run, base curriculum, seeds); the writer and the run map are
rebuilt on first use, which is also what a restored search needs.

Resuming never logs a step twice: a run found again remembers the last step it holds and
skips reports up to it (a trial restored from a checkpoint repeats the evaluations after
that checkpoint, identically). Each checkpoint first flushes and waits for that trial's
metrics, so every step up to a checkpoint is in MLflow before the checkpoint can be resumed
from. When the experiment ends, the writer is closed here (Tune restores this callback
from its state, so the driver may hold no reference to it) and the runs of trials left
unfinished by an interruption are marked KILLED: no run stays RUNNING once a search ends,
and a resume sets them RUNNING again. Progress goes to the terminal: trial starts and
ends, and a status line at most every `status_every` seconds (`search.progress`).

A trial whose sampled values make an invalid curriculum (validation probes the domains'
ends and choices, not every interior value: `search.spec`) is one failed trial, never the
end of the search: its run holds the sampled values as params and the reason in the
`results.INVALID_TAG` tag, the terminal says why, and the trial itself fails in its worker on the
same `ConfigError`, so Tune records it as errored (its error file holds the reason too)
and the other trials go on.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from iterhead.curricula.errors import ConfigError
from iterhead.curricula.io import dump_curriculum, flatten
from iterhead.search.outcome import ended
from iterhead.search import progress, signals
from iterhead.search.progress import member_of
from iterhead.search.tracking import MAX_PARAM_CHARS, RunWriter, all_runs
from iterhead.trainable import results as r
from iterhead.trainable.artifacts import ARTIFACTS
from iterhead.curricula.trial import trial_curriculum


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The reported values that belong in MLflow (not Tune's own bookkeeping)."""
    return {k: float(v) for k, v in result.items() if r.is_metric(k) and isinstance(v, (int, float))}


def seed_items(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A replicate trial's report split by seed: each seed's own report, keys unprefixed."""
    out: dict[int, dict[str, Any]] = {}
    for key, value in result.items():
        split = r.split_seed(key)
        if split is not None:
            out.setdefault(split[0], {})[split[1]] = value
    return out


def seed_target(trial_id: str, seed: int) -> str:
    """The key under which a seed's run is kept beside its configuration's (the trial id)."""
    return f"{trial_id}/seed_{seed}"


def run_key(trial) -> str:
    """The key of a trial's own run: its trial id, or for a PBT trial its member's (one run
    holds every generation of a member)."""
    member = member_of(trial)
    return f"member-{member['member']}" if member is not None else trial.trial_id


class MlflowSearchCallback(tune.Callback):
    SETTINGS = ("uri", "experiment", "parent", "base", "smoke", "status_every", "flush_every", "seeds",
                "scratch")

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base: dict[str, Any],
                 smoke: bool, out: TextIO | None = None, status_every: float = 10.0,
                 flush_every: float = 2.0, seeds: list[int] | None = None,
                 scratch: str | None = None) -> None:
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.base, self.smoke, self.status_every, self.flush_every = base, smoke, status_every, flush_every
        self.seeds = seeds  # replicates: a trial is a configuration run with one run per seed under it
        self.scratch = scratch  # where copied artifacts wait for upload: the search's folder, not /tmp
        self._live(out)

    def _live(self, out: TextIO | None) -> None:
        """The parts that are not pickled: writer, run map, output stream, scratch folder."""
        self.out = out or sys.stdout
        self._writer: RunWriter | None = None
        self.runs: dict[str, Future] = {}  # trial id (or `seed_target`) -> its run id
        self.tagged: dict[str, dict[str, str]] = {}
        self.logged: dict[str, int] = {}  # trial id (or `seed_target`) -> last step already in MLflow
        self._last_status = 0.0
        self._buffer: dict[str, list[tuple[int, int, dict[str, float]]]] = {}
        self._last_flush = time.monotonic()
        self._tmp: Path | None = None
        self.ended: set[str] = set()  # run keys whose runs are ended
        self.invalid: dict[str, str] = {}  # run key -> why its sampled values make no valid curriculum

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"scratch": None, **state})  # states pickled before `scratch` existed
        self._live(None)

    @property
    def writer(self) -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(self.uri)
        return self._writer

    @property
    def tmp(self) -> Path:
        """A scratch folder of this callback's own, inside `scratch` when given: a driver killed
        before `close` then leaves it in the search's folder (removed when the search
        finishes), not in the machine's temp folder."""
        if self._tmp is None:
            if self.scratch is not None:
                Path(self.scratch).mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="iterhead-artifacts-", dir=self.scratch))
        return self._tmp

    # -- runs -------------------------------------------------------------------------------

    def run_id(self, trial_id: str) -> str:
        return self.runs[trial_id].result()

    def _find_or_create(self, target: str, name: str, tags: dict[str, str], params: dict[str, Any],
                        parent: str, yaml_text: str | None, more: dict[str, str] | None = None) -> str:
        """The run of a trial (or of one seed of it): found again by its tags, else made (with
        the tags `more` too, which finding it does not read)."""
        client = self.writer.client
        exp = self.writer.experiment_id(self.experiment)
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {**tags, r.PARENT_RUN: parent}.items())
        found = client.search_runs([exp], filter_string=query)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            steps = [m.step for m in client.get_metric_history(run_id, r.FLOPS)]
            self.logged[target] = max(steps, default=-1)
            return run_id
        run_id = self.writer.create_run(self.experiment, name, {**tags, **(more or {})}, params, parent)
        if yaml_text is not None:
            client.log_text(run_id, yaml_text, "curriculum.yaml")
        return run_id

    def _run(self, trial) -> Future:
        """The trial's run: a trial run, or with seeds a configuration run and one run per seed
        under it (the seeds' runs hold exactly what an `iterhead train` run of that seed holds),
        or for a PBT trial its member's run (params: the member's first curriculum)."""
        tid = run_key(trial)
        if tid not in self.runs:
            try:
                cur = trial_curriculum(self.base, dict(trial.config), self.smoke)
            except ConfigError as err:
                return self._invalid_run(trial, err)
            tags = self._trial_tags(tid)
            # its params hold the values cut to smoke size; the terminal shows those drawn (cut as a param is)
            drawn = ({r.DRAWN_PREFIX + k: str(v)[:MAX_PARAM_CHARS] for k, v in trial.config.items() if k != "pbt"}
                     if self.smoke else {})
            member = member_of(trial)
            if member is not None:
                tags.update({r.KIND: r.KIND_MEMBER, r.MEMBER_TAG: str(member["member"])})
            params = flatten(cur)
            if self.seeds:
                params.pop("seed", None)
                params["seeds"] = ",".join(map(str, self.seeds))
            run = self.writer.submit(self._find_or_create, tid, tid, tags, params, self.parent, dump_curriculum(cur),
                                     drawn)
            self.runs[tid] = run
            for seed in self.seeds or []:
                one = cur.model_copy(update={"seed": seed})
                self.runs[seed_target(tid, seed)] = self.writer.submit(
                    lambda one=one, seed=seed: self._find_or_create(
                        seed_target(tid, seed), f"{tid}-seed{seed}",
                        {r.TRIAL_ID: tid, r.SEARCH: self.experiment, r.KIND: r.KIND_SEED, r.SEED: str(seed)},
                        flatten(one), run.result(), dump_curriculum(one)))
        return self.runs[tid]

    def _trial_tags(self, tid: str) -> dict[str, str]:
        """What finds a trial's (or a configuration's) run again in the store."""
        kind = r.KIND_CONFIGURATION if self.seeds else r.KIND_TRIAL
        return {r.TRIAL_ID: tid, r.SEARCH: self.experiment, r.KIND: kind}

    def _invalid_run(self, trial, err: ConfigError) -> Future:
        """The run of a trial whose sampled values make no valid curriculum: those values as params and
        the reason as a tag, no curriculum and no seed runs (it trains nothing). Its worker fails on
        the same error, so Tune ends it as errored and `on_trial_error` marks the run FAILED."""
        tid = run_key(trial)
        reason = f"{err.field}: {err.message}" if err.field else err.message
        self.invalid[tid] = reason
        run = self.writer.submit(self._find_or_create, tid, tid, self._trial_tags(tid), dict(trial.config),
                                 self.parent, None)
        self.runs[tid] = run
        # set apart from `tags`, which find the run again in a filter the reason's quotes would break
        self.writer.submit(lambda: self.writer.client.set_tag(run.result(), r.INVALID_TAG, reason))
        return run

    def _targets(self, trial) -> list[str]:
        """The keys of every run a trial owns: its own, then its seeds' (none for an invalid one)."""
        if run_key(trial) in self.invalid:
            return [run_key(trial)]
        return [run_key(trial)] + [seed_target(trial.trial_id, s) for s in self.seeds or []]

    # -- Tune hooks -------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)
        if run_key(trial) in self.invalid:
            trial.max_failures = 0  # Tune's retries are for crashes; this trial would fail the same way again
        self._say(*progress.trial_started(trial, self.invalid.get(run_key(trial))))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._run(trial)
        step = int(result.get(r.STEP, result.get("training_iteration", 0)))
        writes = [(run_key(trial), step, metric_items(result))]
        for seed, own in seed_items(result).items():
            writes.append((seed_target(trial.trial_id, seed), int(own[r.STEP]), metric_items(own)))
        for target, at, metrics in writes:
            self.runs[target].result()  # the run (and, for a resumed one, its last logged step) is known first
            if at <= self.logged.get(target, -1):
                continue
            self.logged[target] = at
            self._buffer.setdefault(target, []).append((at, int(time.time() * 1000), metrics))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self._flush()
        tags = {tag: str(result[key]) for key, tag in r.RESULT_TAGS.items() if key in result}
        if tags and self.tagged.get(run_key(trial)) != tags:  # once, and again if a resume moved it
            self.tagged[run_key(trial)] = tags
            runs = [self.runs[t] for t in self._targets(trial)]
            self.writer.submit(lambda: [self.writer.client.set_tag(run.result(), k, v)
                                        for run in runs for k, v in tags.items()])
        now = time.monotonic()
        if now - self._last_status >= self.status_every:
            self._last_status = now
            self._say(progress.status_line(trials))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._run(trial)
        for target in self._targets(trial):
            self._flush(target)
        self.writer.flush()  # every step up to this checkpoint is stored before it counts
        with checkpoint.as_directory() as folder:
            for target in self._targets(trial):
                split = target.rsplit("/", 1)
                src = Path(folder) / ARTIFACTS / (split[1] if len(split) == 2 else "")
                if not (src / "curriculum.yaml").is_file():
                    continue
                dst = self.tmp / target.replace("/", "-")
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
                run = self.runs[target]
                self.writer.submit(lambda run=run, dst=dst: self.writer.client.log_artifacts(run.result(), str(dst)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if member_of(trial) is not None and not (trial.last_result or {}).get(r.MEMBER_ENDS):
            for target in self._targets(trial):  # a generation's end: the member goes on
                self._flush(target)
        else:
            self._end(trial, "FINISHED")
            self._say(progress.trial_finished(trial, self.seeds))
        self._say(progress.generation_trained(trials, trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FAILED")
        reason = self.invalid.get(run_key(trial))
        why = (f"its sampled values make an invalid curriculum: {reason}" if reason is not None
               else "see its error file under the storage path")
        self._say(f"trial {trial.trial_id} FAILED ({why})", progress.generation_trained(trials, trial, failed=True))

    def _say(self, *lines: str | None) -> None:
        for line in lines:
            if line is not None:
                print(line, file=self.out, flush=True)

    def _flush(self, trial_id: str | None = None) -> None:
        """Queue the buffered metrics (of one trial, or all) as one write per trial."""
        for tid in [trial_id] if trial_id else list(self._buffer):
            steps = self._buffer.pop(tid, [])
            if steps:
                run = self.runs[tid]
                self.writer.submit(lambda run=run, steps=steps: self.writer.log_steps(run.result(), steps))
        if trial_id is None:
            self._last_flush = time.monotonic()

    def _end(self, trial, status: str) -> None:
        self._run(trial)
        for target in reversed(self._targets(trial)):  # the seeds' runs, then their configuration's
            self._flush(target)
            self.ended.add(target)
            run = self.runs[target]
            self.writer.submit(lambda run=run: self.writer.end_run(run.result(), status))

    def on_experiment_end(self, trials, **info) -> None:
        cut = [t for t in trials if not ended(t.last_result, t.status == "ERROR")]  # an interruption left them
        stopped = bool(cut) or signals.tune_stopped()  # or one came as no trial ran (between generations)
        if stopped:  # a store that stopped answering must not turn the stop into a failure
            self.writer.mark_stopping()
        for trial in cut:
            if run_key(trial) in self.runs and run_key(trial) not in self.ended:
                self._end(trial, "KILLED")
        for trial in trials:  # PBT members still open: the population ended before their training did
            if run_key(trial) not in self.ended and run_key(trial) in self.runs:  # (or, if stopped, the search)
                self._end(trial, "KILLED" if stopped else "FINISHED")
        if not stopped:
            for trial in self._stopped_earlier(trials):
                self._end(trial, "FINISHED")
            for trial in self._left_open(trials):  # its last report and artifacts, if they were lost
                if trial.last_result:
                    self.on_trial_result(0, trials, trial, trial.last_result)
                if trial.checkpoint is not None:
                    self.on_checkpoint(0, trials, trial, trial.checkpoint)
                self._end(trial, "FAILED" if trial.status == "ERROR" else "FINISHED")
        self.close(stopping=stopped)

    def _untouched(self, trials) -> dict[str, Any]:
        """The trial of each run key (PBT: a member's last generation) whose run this driver has not
        touched: after a resume, what ended before it (found again by its tags only if it runs again)."""
        latest: dict[str, Any] = {}
        for t in trials:
            member = member_of(t)
            if member is None or member["generation"] >= member_of(latest.get(run_key(t), t))["generation"]:
                latest[run_key(t)] = t
        return {key: t for key, t in latest.items() if key not in self.runs and key not in self.ended}

    def _stopped_earlier(self, trials) -> list:
        """After a resume, the PBT members whose last generation ended before the stop, that the
        population then ended without training them again: their runs stand as the stop left them.
        Not a failed member, nor one whose own training ended (its run ended with it: `_left_open`)."""
        return [t for t in self._untouched(trials).values() if member_of(t) is not None
                and t.status == "TERMINATED" and t.last_result and not t.last_result.get(r.MEMBER_ENDS)]

    def _left_open(self, trials) -> list:
        """After a resume, the trials (PBT: members) whose training ended before it and whose runs
        say RUNNING, or KILLED (`reconcile` marks a run left RUNNING for long): a store that stopped
        answering as they ended dropped their last writes (the command exited 1, or was stopped).
        No trial of theirs runs again: their last report and their end are written here."""
        done = {key: t for key, t in self._untouched(trials).items() if ended(t.last_result, t.status == "ERROR")
                and (member_of(t) is None or t.status == "ERROR" or t.last_result.get(r.MEMBER_ENDS))}
        if not done:
            return []
        query = f"tags.`{r.PARENT_RUN}` = '{self.parent}'"
        unended = self.writer.submit(lambda: {run.data.tags.get(r.TRIAL_ID) for run in all_runs(
            self.writer.client, self.writer.experiment_id(self.experiment), query)
            if run.info.status in ("RUNNING", "KILLED")}).result()
        return [t for key, t in done.items() if key in unended]

    def close(self, stopping: bool = False) -> None:
        """Wait for every write (raising the first error, or `stopping` saying a store's error in
        one line: `RunWriter.close`), then drop the copied artifacts."""
        try:
            self._flush()
            if self._writer is not None:
                self._writer.close(stopping=stopping)
        finally:
            self._writer = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

