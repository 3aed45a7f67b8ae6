"""The Ray Tune function trainable: a thin adapter over `Trainer` (the only file importing ray).

Per evaluation it reports the metrics with cumulative compute, the running
``compute_to_target`` (the search's censoring penalty until the target is reached) and
``target_acc`` for the scheduler. Checkpoints hold the whole trainer state, so a trial that
fails or is restored continues exactly where it stood; they are written at most every
`checkpoint_every_s` seconds (each one makes Tune snapshot its experiment state) and at the
last evaluation, and at the first report at or past each of ASHA's rungs, where ASHA may
stop the trial. Each checkpoint also carries the trial's artifacts (curriculum YAML,
attention maps, accuracy-against-compute plot) for the driver to log, so a trial that ASHA
stops keeps those of the report it stopped at (unless that report replays a shared prefix,
whose states between its ends no trial holds: then those of its latest checkpoint, if any).
A trial ends when the target is reached, its compute passes the budget (censored), or its
last stage ends. A trial restored after it had finished (its end not yet in Tune's state)
reports its last result again.

Replicates (a search with ``seeds:``): the trial is one configuration trained on every seed
in one schedule (`trainable.seeds.Seeds`). Each report carries the configuration's scores
over the seeds (`results.over_seeds`: the median ``compute_to_target`` with censored seeds
at the penalty, the median ``target_acc``, ``seeds_reached``, ``reached``) and each seed's
own report under ``seed_<s>/``; its checkpoint holds every seed. A seed that reaches the
target stops training; the trial ends when every seed has reached, been censored or
diverged, or when ASHA stops the configuration, which stops all its seeds at once.

Shared prefixes (a search's ``share``, on by default): a trial starts from the deepest
stored state of its own curriculum that another trial of the search trained
(`trainable.prefix`, `trainable.prefix_store`), reports that trial's reports up to there
as its own, as if it had trained them, and goes on; it stores its own states where others
start. Its numbers are exactly those of the unshared run (same device kind and thread
count). Every report also carries ``compute/flops_seeds`` (the curriculum's FLOPs so far,
all seeds, shared stages once) and ``compute/flops_forked`` (those of the prefix it did not
train itself), and a forked trial names the prefix's source in ``prefix_source``.

Device: the GPU Ray assigned the trial (``ray.get_gpu_ids()``), else the CPU, never a GPU
outside Ray's accounting (`devices.trial_device`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import ray
import torch
from ray import tune

from iterhead.curricula.schema import Curriculum
from iterhead.curricula.trial import trial_curriculum
from iterhead.trainable import checkpoint, results
from iterhead.trainable.artifacts import ARTIFACTS, write_artifacts, write_lineage
from iterhead.trainable.devices import prepare_env, resolve_precision, trial_device
from iterhead.trainable.loop import Evaluation, Trainer
from iterhead.trainable.prefix import adopt, environment, points, worth_storing
from iterhead.trainable.population import MemberTrial
from iterhead.trainable.prefix_store import LEASE_S, PrefixStore, Sharing
from iterhead.trainable.results import Report, over_seeds
from iterhead.trainable.schedule import last_stage
from iterhead.trainable.seeds import Seeds, choose_engine
from iterhead.trainable.summary import censored_value

REPORTS = "reports.json"  # in each checkpoint: every report up to it, the last with it
LAST_REPORT = "last_report.json"  # what checkpoints of searches begun before `REPORTS` hold instead


def reached_within(trainer: Trainer, budget: float | None) -> bool:
    """Reached the target within the budget (the budget is checked at evaluations, so a
    trial can pass it before it is stopped; reaching the target past it does not count)."""
    o = trainer.outcome
    return o.reached and (budget is None or o.compute_to_target <= budget)


def seed_report(ev: Evaluation, trainer: Trainer, penalty: float, budget: float | None) -> Report:
    """One seed's evaluation and its running outcome: what a single-seed trial reports."""
    o, reached = trainer.outcome, reached_within(trainer, budget)
    return Report(step=ev.step, stage=ev.stage, reached=reached, diverged=o.diverged,
                  compute_to_target=o.compute_to_target if reached else penalty,
                  target_acc=ev.target_acc,
                  metrics=dict(ev.metrics),
                  examples_to_target=float(o.examples_to_target) if reached else None,
                  seconds_to_target=float(o.seconds_to_target) if reached else None)


def configuration_report(step: int, stage: str, trainers: list[Trainer], penalty: float,
                         budget: float | None) -> Report:
    """A replicate trial's scores over its seeds (`trainable.results.over_seeds`)."""
    outcomes = [(reached_within(t, budget), t.outcome.compute_to_target) for t in trainers]
    headline = results.acc(trainers[0].cur.target.task)  # what histories saved before target_acc hold
    accs = [t.history[-1].get(results.TARGET_ACC, t.history[-1].get(headline, 0.0))
            if t.history and not t.outcome.diverged else 0.0 for t in trainers]
    score = over_seeds(outcomes, accs, penalty)
    metrics = {results.FLOPS: max(t.compute.flops for t in trainers)}  # ASHA's clock: it only grows
    return Report(step=step, stage=stage, reached=score.reached, diverged=all(t.outcome.diverged for t in trainers),
                  compute_to_target=score.compute_to_target, target_acc=score.target_acc, metrics=metrics,
                  seeds_reached=score.seeds_reached)


def train_trial(config: dict[str, Any], *, base: dict[str, Any], budget: float | None = None,
                penalty: float | None = None, smoke: bool = False, threads: int = 1,
                checkpoint_every_s: float = 30.0, seeds: list[int] | None = None, precision: str = "auto",
                share: dict[str, Any] | None = None, population: str | None = None,
                rungs: Sequence[float] = ()) -> None:
    """Train one trial of a search (module docstring).

    `penalty` is what a censored trial reports as compute_to_target; the driver passes one
    value for the whole search, so every censored trial ranks below every reached one.
    With `seeds`, the trial is one configuration trained on each seed (`trainable.seeds`).
    With `share` (``folder``, ``planned``: the point keys other trials start from, or None,
    ``lease_s``), the trial starts from the deepest stored prefix of its curriculum and
    stores its own states where others can start (`trainable.prefix_store`).
    `rungs`: ASHA's, in FLOPs (`search.space.rungs`); the first report at or past each carries
    a checkpoint, so a trial ASHA stops there keeps its state and artifacts.
    A PBT trial (a ``pbt`` config) is one member for one generation: it starts from the
    population entry its config names, in the folder `population`, and leaves its own at the
    generation's end (`trainable.population`); only the first generation uses `share`.
    """
    prepare_env()  # before training starts in this worker
    torch.set_num_threads(max(1, threads))
    cur = trial_curriculum(base, config, smoke)
    member = MemberTrial.from_config(config["pbt"], population) if "pbt" in config else None
    if member is not None and member.generation > 0:
        share = None  # later generations start from the population's entries
    device = trial_device(ray.get_gpu_ids(), torch.cuda.is_available(), torch.cuda.device_count())
    precision = resolve_precision(precision, device, cur.model.d_model)
    penalty = penalty if penalty is not None else censored_value(cur, budget)
    group = list(seeds) if seeds is not None else [cur.seed]
    engine = choose_engine("auto", device, len(group)) if seeds is not None else "lockstep"
    saved = tune.get_checkpoint()
    state, history, replay, forked = None, [], [], {results.FLOPS_FORKED: 0.0}
    if saved is not None:
        with saved.as_directory() as folder:
            state = checkpoint.load(folder, device)
            reports, last = Path(folder) / REPORTS, Path(folder) / LAST_REPORT
            history = json.loads(reports.read_text()) if reports.exists() else [json.loads(last.read_text())]
        forked = {results.FLOPS_FORKED: 0.0,  # a checkpoint from before prefix sharing has neither
                  **{k: history[-1][k] for k in (results.FLOPS_FORKED, results.PREFIX_SOURCE) if k in history[-1]}}
        history = [strip(h) for h in history]
    sharing, source = None, {}
    if share is not None:
        source = {"trial": tune.get_context().get_trial_id() or "trial",
                  "node": ray.get_runtime_context().get_node_id()}
        env = environment(group, device, precision, engine, torch.get_num_threads(), budget, penalty)
        store = PrefixStore(share["folder"], share.get("lease_s", LEASE_S))
        planned = set(share["planned"]) if share.get("planned") is not None else None
        sharing = Sharing(store, env, points(cur), worth_storing(cur, planned), owner=source["trial"])
    if member is not None and state is None and member.start is not None:
        state = member.start_state(cur, device)
        forked = {results.FLOPS_FORKED: float(state["compute"]["flops"])}  # the lineage trained before
    try:
        if sharing is not None and state is None:
            point, entry = sharing.start(device)
            if entry is not None:
                state, replay = adopt(entry["state"], cur, seeds), list(entry["reports"])
                forked = fork_record(entry, cur.stages[point.stage].name, point.epoch, source["trial"])
        elif sharing is not None:
            sharing.resume()
        _train(cur, device, precision, seeds, state, history, replay, forked, penalty, budget, checkpoint_every_s,
               sharing, source, member, tuple(rungs))
    finally:
        if sharing is not None:
            sharing.close()


def trained_out(trainers: list[Trainer]) -> bool:
    """Whether no evaluation follows for any seed: each reached the target, diverged or passed its
    last stage. Not the first seed's position alone: a replicate seed that reached early stands
    where it reached, before the end the others trained to."""
    return all(t.finished or t.position.stage > last_stage(t.cur) for t in trainers)


def fork_record(entry: dict[str, Any], stage: str, epoch: int, trial: str) -> dict[str, Any]:
    """What a trial starting from a stored prefix `entry` (at `epoch` of `stage`) reports it forked:
    the prefix's FLOPs and where it came from. An entry the trial stored itself (before a
    retry, or a resume, that found no checkpoint of its own) is its own training, not a fork,
    but for what it had forked itself when it stored it (``forked`` in the entry's source): the
    search's trained FLOPs (`search.sharing.accounting`) count each prefix once that way."""
    src = entry["source"]
    if src["trial"] == trial:
        return dict(src.get("forked", {results.FLOPS_FORKED: 0.0}))
    return {results.FLOPS_FORKED: float(entry["reports"][-1][results.FLOPS_SEEDS]),
            results.PREFIX_SOURCE: f"{src['trial']} on node {src['node']}, stage {stage} epoch {epoch}"}


def trained_flops(trainers: list[Trainer]) -> float:
    """The FLOPs the seeds' training took: every seed's own, and the shared stages once."""
    shared = max(t.compute.flops_shared for t in trainers)
    return float(sum(t.compute.flops for t in trainers) - (len(trainers) - 1) * shared)


def schedule_metrics(trainer: Trainer) -> dict[str, float]:
    """The settings in force at the trainer's position: its stage's lr and mix shares."""
    cur = trainer.cur
    stage = cur.stages[min(trainer.position.stage, len(cur.stages) - 1)]
    total = sum(stage.mix.values()) or 1.0
    return {results.SCHEDULE_PREFIX + "lr": float(stage.lr or cur.optim.lr),
            **{f"{results.SCHEDULE_PREFIX}mix/{task}": stage.mix.get(task, 0.0) / total for task in cur.tasks}}


def resumable(evaluations: list[tuple[int, Evaluation]], trainers: list[Trainer]) -> bool:
    """Whether a checkpoint after this round resumes exactly: every seed still training stands
    at an evaluation, where its running training loss starts afresh. A round that holds only
    divergences between evaluation points (a replicate seed whose loss went non-finite) leaves
    the others mid-interval, and that interval's loss is not in their state."""
    return all(t.finished for t in trainers) or any(not ev.diverged for _, ev in evaluations)


def replayed_fork(report: dict[str, Any], forked: dict[str, Any]) -> dict[str, Any]:
    """What a replayed report of the prefix says it forked: the prefix's FLOPs up to that
    report, not the whole prefix's. A trial stopped during its replay (by ASHA) would
    otherwise report more forked than it trained, and the search's trained FLOPs
    (`sharing.accounting`: trained minus forked) would come out too low, even negative."""
    own = float(report.get(results.FLOPS_SEEDS, forked.get(results.FLOPS_FORKED, 0.0)))
    return {**forked, results.FLOPS_FORKED: min(float(forked.get(results.FLOPS_FORKED, 0.0)), own)}


def strip(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what belongs to the trial that made it (where it ran, what it forked)."""
    own = (results.NODE_ID, results.TORCH_THREADS, results.DEVICE, results.PRECISION, results.PREFIX_SOURCE,
           results.FLOPS_FORKED, results.TRIAL_ENDS)
    return {k: v for k, v in report.items() if k not in own}


def _train(cur: Curriculum, device: torch.device, precision: str, seeds: list[int] | None,
           state: dict[str, Any] | None, history: list[dict[str, Any]], replay: list[dict[str, Any]],
           forked: dict[str, Any], penalty: float, budget: float | None, checkpoint_every_s: float,
           sharing: Sharing | None, source: dict[str, str], member: MemberTrial | None = None,
           rungs: tuple[float, ...] = ()) -> None:
    """The trial's reports: first those of a forked prefix, as made, then its own evaluations.

    `history` holds the reports made so far (a restored trial's, from its checkpoint); each
    stored prefix carries it, so a trial forked from it reports the same history. A PBT
    `member` also stops at its generation's end, leaving its state there first, and reports
    the settings in force (``schedule/...``) and whether the member's training ended.
    """
    if seeds is None:
        trainer = Trainer(cur, device, state, precision)
        trainers, rounds, state_dict = [trainer], ([(cur.seed, ev)] for ev in trainer.run()), trainer.state_dict
    else:
        group = Seeds(cur, seeds, device, precision, state=state)
        trainers, rounds, state_dict = group.trainers, group.run(), group.state_dict
    by_seed = {t.cur.seed: t for t in trainers}
    history = history + replay
    where = {results.NODE_ID: ray.get_runtime_context().get_node_id(),
             results.TORCH_THREADS: torch.get_num_threads(), results.DEVICE: str(device), results.PRECISION: precision}

    def over_budget(metrics: dict[str, Any]) -> bool:
        return budget is not None and metrics[results.FLOPS] >= budget

    def send(metrics: dict[str, Any], save: bool, before: list[dict[str, Any]]) -> None:
        """Report `metrics`; with `save`, with a checkpoint holding the state and the reports so far.
        A PBT member draws its figures only where its training ends, not at every generation's end
        (each costs most of a second; its text artifacts are written every time)."""
        if not save:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(state_dict(), folder)
            (Path(folder) / REPORTS).write_text(json.dumps(before + [metrics]))
            figures = member is None or bool(metrics.get(results.MEMBER_ENDS, 1.0))
            for t in trainers:  # a trial ASHA stops keeps those of its latest checkpoint
                write_artifacts(t, Path(folder) / ARTIFACTS / (f"seed_{t.cur.seed}" if seeds else ""), figures)
            if member is not None:
                write_lineage(trainers[0], member.segments, member.member, Path(folder) / ARTIFACTS, figures)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def stops(trainer: Trainer) -> bool:
        return member is not None and member.stops_at(trainer.position)

    done = trained_out(trainers) or stops(trainers[0])
    for i, report in enumerate(replay):  # the prefix's reports, as its trial made them
        metrics = {**report, **where, **replayed_fork(report, forked)}
        final = i == len(replay) - 1 and (done or over_budget(metrics))
        if final:
            metrics[results.TRIAL_ENDS] = 1.0
        send(metrics, final, replay[:i])
        if final:
            return
    if history and (done or over_budget(history[-1])):  # restored after it had finished
        if stops(trainers[0]) and not member.has_left():  # killed between its last report and its entry
            member.leave(state_dict())
        tune.report({**history[-1], **where, **forked, results.TRIAL_ENDS: 1.0})
        return
    step = int(history[-1][results.STEP]) + 1 if history else 0  # a replicate trial counts its reports
    over = {t.cur.seed for t in trainers if t.finished}  # seeds no evaluation follows for
    saved_at = time.monotonic()
    for evaluations in rounds:
        if seeds is None:
            (_, ev), = evaluations
            report = seed_report(ev, trainer, penalty, budget)
        else:
            report = configuration_report(step, evaluations[0][1].stage, trainers, penalty, budget)
            for seed, ev in evaluations:
                own = seed_report(ev, by_seed[seed], penalty, budget).to_dict()
                report.metrics.update({results.per_seed(seed, k): v for k, v in own.items()})
        report.metrics[results.FLOPS_SEEDS] = trained_flops(trainers)
        before = history[-1][results.FLOPS] if history else 0.0
        at_rung = any(before < rung <= report.metrics[results.FLOPS] for rung in rungs)  # ASHA may stop it here
        ends = all(t.finished for t in trainers) or over_budget(report.metrics)
        if member is not None:
            report.metrics.update(schedule_metrics(trainers[0]))
            report.metrics[results.MEMBER_ENDS] = float(ends or any(ev.final for _, ev in evaluations))
        step += 1
        history.append(report.to_dict())
        metrics = {**history[-1], **where, **forked}
        if sharing is not None:
            at = by_seed[evaluations[0][0]].position
            sharing.write(at.stage, at.epoch, state_dict, history, {**source, "forked": forked}, ends=ends)
        if stops(trainers[0]) and not ends:  # the generation's end: the next one starts from here
            member.leave(state_dict())
            ends = True
        over.update(seed for seed, ev in evaluations if ev.final)
        if ends or len(over) == len(trainers):  # the trial's last report
            metrics[results.TRIAL_ENDS] = 1.0
        save = ends or resumable(evaluations, trainers) and (
            any(ev.final for _, ev in evaluations) or at_rung or time.monotonic() - saved_at >= checkpoint_every_s)
        send(metrics, save, history[:-1])
        if save:
            saved_at = time.monotonic()
        if ends:
            return
    if not history:  # no stage trains (each drawn at epochs 0): nothing to evaluate, censored at once
        report = Report(step=0, stage=cur.stages[-1].name, reached=False, diverged=False, compute_to_target=penalty,
                        target_acc=0.0, metrics={**trainers[0].compute.metrics(), results.FLOPS_SEEDS: 0.0},
                        seeds_reached=0 if seeds is not None else None)
        tune.report({**report.to_dict(), **where, **forked, results.TRIAL_ENDS: 1.0})
