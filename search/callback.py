"""The MLflow side of a search: a Ray Tune callback that runs in the driver.

One parent run per search (made by the driver before trials start), one child run per trial
(``mlflow.parentRunId``, tags ``iterhead.trial_id`` and ``ray.node_id``, params = the trial's
flattened curriculum). Each reported evaluation becomes one batched write at its own step;
the final checkpoint's artifacts are copied out and logged. Reported metrics are buffered
per trial and written every `flush_every` seconds (and when a trial ends) as one batch of
several steps: on a small machine the driver shares the cores with the trials, and one
store transaction per report costs them measurable time. A child run is found again by
its trial-id tag, so a restored search continues the same runs instead of making new ones.
All writes go through an ordered background `RunWriter`; Tune's loop waits on the store
only for a trial's first result (until its run exists) and at checkpoints (below). Tune pickles callbacks into its experiment state, so the pickled state is only the
settings (tracking URI, experiment, parent run, base curriculum); the writer and the run
map are rebuilt on first use, which is also what a restored search needs.

Resuming never logs a step twice: a run found again remembers the last step it holds and
skips reports up to it (a trial restored from a checkpoint repeats the evaluations after
that checkpoint, identically). Each checkpoint first flushes and waits for that trial's
metrics, so every step up to a checkpoint is in MLflow before the checkpoint can be resumed
from. When the experiment ends, the writer is closed here (Tune restores this callback
from its state, so the driver may hold no reference to it) and the runs of trials left
unfinished by an interruption are marked KILLED: no run stays RUNNING once a search ends,
and a resume sets them RUNNING again. Progress goes to the terminal: trial starts and ends, and a status line at most
every `status_every` seconds.
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

from iterhead.curricula.io import dump_curriculum, flatten
from iterhead.search.report import short
from iterhead.search.tracking import RunWriter
from iterhead.trainable.artifacts import ARTIFACTS
from iterhead.trainable.tune import trial_curriculum

PREFIXES = ("acc/", "loss/", "compute/", "probe/")
RESULT_TAGS = {"node_id": "ray.node_id", "torch_threads": "iterhead.torch_threads", "device": "iterhead.device"}
SUMMARY = ("reached", "diverged", "compute_to_target", "examples_to_target", "seconds_to_target", "target_acc")


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The reported values that belong in MLflow (not Tune's own bookkeeping)."""
    return {k: float(v) for k, v in result.items()
            if (k.startswith(PREFIXES) or k in SUMMARY) and isinstance(v, (int, float))}


class MlflowSearchCallback(tune.Callback):
    SETTINGS = ("uri", "experiment", "parent", "base", "smoke", "status_every", "flush_every")

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base: dict[str, Any],
                 smoke: bool, out: TextIO | None = None, status_every: float = 10.0,
                 flush_every: float = 2.0) -> None:
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.base, self.smoke, self.status_every, self.flush_every = base, smoke, status_every, flush_every
        self._live(out)

    def _live(self, out: TextIO | None) -> None:
        """The parts that are not pickled: writer, run map, output stream, scratch folder."""
        self.out = out or sys.stdout
        self._writer: RunWriter | None = None
        self.runs: dict[str, Future] = {}
        self.tagged: dict[str, dict[str, str]] = {}
        self.logged: dict[str, int] = {}  # trial id -> last step already in MLflow
        self._last_status = 0.0
        self._buffer: dict[str, list[tuple[int, int, dict[str, float]]]] = {}
        self._last_flush = time.monotonic()
        self._tmp: Path | None = None
        self.finished: dict[str, str] = {}  # trial id -> final status

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live(None)

    @property
    def writer(self) -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(self.uri)
        return self._writer

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="iterhead-artifacts-"))
        return self._tmp

    # -- runs -------------------------------------------------------------------------------

    def run_id(self, trial_id: str) -> str:
        return self.runs[trial_id].result()

    def _find_or_create(self, trial_id: str, config: dict[str, Any]) -> str:
        client = self.writer.client
        exp = self.writer.experiment_id(self.experiment)
        found = client.search_runs([exp], filter_string=(
            f"tags.`iterhead.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent}'"))
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            steps = [m.step for m in client.get_metric_history(run_id, "compute/flops")]
            self.logged[trial_id] = max(steps, default=-1)
            return run_id
        cur = trial_curriculum(self.base, config, self.smoke)
        tags = {"iterhead.trial_id": trial_id, "iterhead.search": self.experiment}
        run_id = self.writer.create_run(self.experiment, f"{trial_id}", tags, flatten(cur), self.parent)
        client.log_text(run_id, dump_curriculum(cur), "curriculum.yaml")
        return run_id

    def _run(self, trial) -> Future:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.writer.submit(self._find_or_create, trial.trial_id, dict(trial.config))
        return self.runs[trial.trial_id]

    # -- Tune hooks -------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)
        values = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} started{': ' + values if values else ''}", file=self.out, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run = self._run(trial)
        step = int(result.get("step", result.get("training_iteration", 0)))
        run.result()  # the run (and, for a resumed one, its last logged step) is known first
        if step <= self.logged.get(trial.trial_id, -1):
            return
        self.logged[trial.trial_id] = step
        self._buffer.setdefault(trial.trial_id, []).append((step, int(time.time() * 1000), metric_items(result)))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self._flush()
        tags = {tag: str(result[key]) for key, tag in RESULT_TAGS.items() if key in result}
        if tags and self.tagged.get(trial.trial_id) != tags:  # once, and again if a resume moved it
            self.tagged[trial.trial_id] = tags
            self.writer.submit(lambda: [self.writer.client.set_tag(run.result(), k, v) for k, v in tags.items()])
        now = time.monotonic()
        if now - self._last_status >= self.status_every:
            self._last_status = now
            self._status(trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._flush(trial.trial_id)
        self.writer.flush()  # every step up to this checkpoint is stored before it counts
        with checkpoint.as_directory() as folder:
            src = Path(folder) / ARTIFACTS
            if not src.is_dir():
                return
            dst = self.tmp / trial.trial_id
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        run = self._run(trial)
        self.writer.submit(lambda: self.writer.client.log_artifacts(run.result(), str(dst)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FINISHED")
        r = trial.last_result or {}
        if r.get("diverged"):
            how = "diverged (the loss became NaN or infinite; censored)"
        elif r.get("reached"):
            how = f"reached the target at {r['compute_to_target']:.3e} FLOP"
        else:
            how = f"censored (did not reach the target; {r.get('compute/flops', 0):.3e} FLOP spent)"
        print(f"trial {trial.trial_id} finished: {how}", file=self.out, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FAILED")
        print(f"trial {trial.trial_id} FAILED (see its error file under the storage path)", file=self.out, flush=True)

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
        self._flush(trial.trial_id)
        run = self._run(trial)
        self.finished[trial.trial_id] = status
        self.writer.submit(lambda: self.writer.end_run(run.result(), status))

    def _status(self, trials) -> None:
        states: dict[str, int] = {}
        for t in trials:
            states[t.status] = states.get(t.status, 0) + 1
        reached = sum(1 for t in trials if (t.last_result or {}).get("reached"))
        running = [t for t in trials if t.status == "RUNNING" and t.last_result]
        best = max((t.last_result.get("target_acc", 0.0) for t in running), default=None)
        line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        extra = f"; best running target accuracy {best:.1%}" if best is not None else ""
        print(f"[status] {line}; {reached} reached the target{extra}", file=self.out, flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        for trial in trials:
            if trial.trial_id not in self.finished and trial.trial_id in self.runs:
                self._end(trial, "KILLED")
        self.close()

    def close(self) -> None:
        """Wait for every write (raising the first error), then drop the copied artifacts."""
        try:
            self._flush()
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

