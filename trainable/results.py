"""What a trial reports and what MLflow stores: every metric and tag name, defined once.

The trainable (`trainable/tune.py`), the driver's MLflow callback, `iterhead train`,
export, report and reconcile all import these names, so a key added on one side cannot
silently vanish on the other. A trial's report is a typed `Report` before it becomes the
flat dict Tune carries; `Report.from_dict` reads it back on the driver side.

A replicate trial (a search with ``seeds:``) reports one configuration: its scores over the
seeds, plus each seed's own metrics under ``seed_<s>/`` (`per_seed`), which the driver
routes to that seed's run. `over_seeds` is the one rule that scores a configuration over
its seeds, for the trials, `iterhead report` and `iterhead export` alike.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

# -- metrics of every evaluation (``acc/<task>``, ``acc/<task>/len_<L>``, ...) --------------
ACC_PREFIX, LOSS_PREFIX, COMPUTE_PREFIX, PROBE_PREFIX = "acc/", "loss/", "compute/", "probe/"
# The same accuracies on training sequences (``eval.train_per_len`` of them a length).
TRAIN_ACC_PREFIX = "train_acc/"
# A PBT member's settings in force at each evaluation: schedule/lr and schedule/mix/<task>.
SCHEDULE_PREFIX = "schedule/"
PREFIXES = (ACC_PREFIX, TRAIN_ACC_PREFIX, LOSS_PREFIX, COMPUTE_PREFIX, PROBE_PREFIX, SCHEDULE_PREFIX)
FLOPS = "compute/flops"
SECONDS = "compute/seconds"  # training wall time so far
LOSS = "loss/train"
# Prefix sharing (`trainable/prefix_store.py`): FLOPs over all of a trial's seeds, of its
# curriculum so far, and of the prefix it started from that another trial trained.
FLOPS_SEEDS = "compute/flops_seeds"
FLOPS_FORKED = "compute/flops_forked"
FINAL_PREFIX = "final/"  # `iterhead train`'s summary: the last evaluation's accuracies, final/acc/<task>


def acc(task: str) -> str:
    """The headline accuracy of a task: the mean over lengths."""
    return f"{ACC_PREFIX}{task}"


def target_accuracy(metrics: dict[str, float], task: str, min_len: int | None, max_len: int) -> float:
    """The accuracy a target is judged on: ``acc/<task>``, or with a ``target.min_len`` the mean
    of ``acc/<task>/len_<L>`` over lengths from it to ``max_len``."""
    if min_len is None:
        return metrics[acc(task)]
    per_len = [metrics[f"{acc(task)}/len_{length}"] for length in range(min_len, max_len + 1)]
    return float(statistics.fmean(per_len))


# A target accuracy is a mean over lengths of per-length accuracies (each k/n), rounded in
# float64: 0.95 at each of 3 lengths averages to 0.9499999999999998. That rounding is below
# lengths x 2^-53 (6e-14 at the schema's 512 lengths), while two means that differ differ by
# far more (1 / (512 x 10^6) for a million test rows a length), so the target counts as met
# within 1e-12.
TARGET_SLACK = 1e-12


def meets_target(target_acc: float, target: float) -> bool:
    """Whether an accuracy from `target_accuracy` reaches `target` (`TARGET_SLACK`)."""
    return target_acc >= target - TARGET_SLACK


# A censored trial reports CENSOR_FACTOR x its budget (`summary.censored_value`): the penalty.
CENSOR_FACTOR = 2.0
PENALTY_PARAM = "penalty"  # a search's penalty, a param of its parent run (`iterhead export` reads it)
# The largest FLOP budget a search or `iterhead train --budget` takes: its penalty must stay
# finite, as Tune drops inf.
MAX_BUDGET = 1e300


# -- a trial's outcome, reported with every evaluation ---------------------------------------
STEP = "step"
STAGE = "stage"
REACHED = "reached"
DIVERGED = "diverged"
COMPUTE_TO_TARGET = "compute_to_target"
EXAMPLES_TO_TARGET = "examples_to_target"
SECONDS_TO_TARGET = "seconds_to_target"
TARGET_ACC = "target_acc"
SEEDS_REACHED = "seeds_reached"  # replicate trials: how many seeds reached the target
MEMBER_ENDS = "member_ends"  # a PBT trial: 1 when the member's training ended, 0 at an interval's end
# 1 in a trial's last report: Tune's own `done` can be lost from its saved state (it marks a
# finished function trial done in place, after the state may have been saved), so a resumed
# search reads a trial's end from here (`search.outcome.ended`)
TRIAL_ENDS = "trial_ends"
SUMMARY = (REACHED, DIVERGED, COMPUTE_TO_TARGET, EXAMPLES_TO_TARGET, SECONDS_TO_TARGET, TARGET_ACC,
           SEEDS_REACHED)

# -- a search's own metrics, on its parent run ------------------------------------------
TRIALS = "trials"  # how many trials (configurations, with seeds:) the search ran
TRIALS_REACHED = "trials_reached"  # how many of them reached the target
FLOPS_TRAINED = "search/flops_trained"  # training FLOPs the search really spent (shared prefixes once)
FLOPS_CURRICULA = "search/flops_curricula"  # the sum of its trials' curriculum FLOPs, as if unshared

# -- where and how a trial ran: reported keys that become tags ----------------------------
NODE_ID, TORCH_THREADS, DEVICE, PRECISION = "node_id", "torch_threads", "device", "precision"
PREFIX_SOURCE = "prefix_source"  # a forked trial: the trial, node and point its prefix came from
PRECISIONS = ("auto", "fp32", "bf16")  # what a user may ask for; a run records fp32 or bf16

# -- MLflow tags ---------------------------------------------------------------------------
PARENT_RUN = "mlflow.parentRunId"
KIND = "iterhead.kind"  # one of the kinds below
KIND_SEARCH, KIND_TRIAL, KIND_CONFIGURATION, KIND_SEED = "search", "trial", "configuration", "seed"
KIND_MEMBER = "member"  # a PBT member: one run over all the trials (generations) that trained it
TRIAL_ID = "iterhead.trial_id"
SEARCH = "iterhead.search"
SEED = "iterhead.seed"
MEMBER_TAG = "iterhead.member"  # a PBT member's number
NODE_TAG = "ray.node_id"
THREADS_TAG = "iterhead.torch_threads"
DEVICE_TAG = "iterhead.device"
PRECISION_TAG = "iterhead.precision"
PREFIX_TAG = "iterhead.prefix_source"
RESULT_TAGS = {NODE_ID: NODE_TAG, TORCH_THREADS: THREADS_TAG, DEVICE: DEVICE_TAG, PRECISION: PRECISION_TAG,
               PREFIX_SOURCE: PREFIX_TAG}
CURRICULUM_TAG = "iterhead.curriculum"  # the curriculum's name, on an `iterhead train` run
SOURCE_TAG = "iterhead.source"  # the curriculum file an `iterhead train` run was given
SPEC_TAG = "iterhead.spec"  # the search spec file, on a search's parent run
STORAGE_TAG = "iterhead.storage"  # the folder of the search's Tune state, on its parent run
HEARTBEAT_TAG = "iterhead.heartbeat"  # Unix seconds of a live run's last beat (`search.tracking.Heartbeat`)
BATCHED_SEEDS_TAG = "iterhead.batched_seeds"  # `iterhead train --seeds`: the seeds trained together
ENGINE_TAG = "iterhead.engine"  # `iterhead train --seeds`: how they stepped (`trainable.seeds.choose_engine`)
INVALID_TAG = "iterhead.invalid_curriculum"  # on a trial's run: why its sampled values make no valid curriculum
DRAWN_PREFIX = "iterhead.drawn."  # + a searched key, on a --smoke trial's run: the value drawn, before the cut

_SEED_KEY = re.compile(r"^seed_(\d+)/(.+)$")


def per_seed(seed: int, key: str) -> str:
    """The key of one seed's metric inside a replicate trial's report."""
    return f"seed_{seed}/{key}"


def split_seed(key: str) -> tuple[int, str] | None:
    """``seed_3/acc/parity`` -> (3, ``acc/parity``); None for a configuration's own key."""
    m = _SEED_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def is_metric(key: str) -> bool:
    """Whether a reported key belongs in MLflow (not Tune's own bookkeeping)."""
    return key.startswith(PREFIXES) or key in SUMMARY


@dataclass
class Report:
    """One report of a trial: an evaluation's metrics and the running outcome.

    `compute_to_target` is the search's penalty while the target is not reached (censored),
    so the searcher always sees a finite value; `examples_to_target` and
    `seconds_to_target` exist only once it is reached.
    """

    step: int
    stage: str
    reached: bool
    diverged: bool
    compute_to_target: float
    target_acc: float
    metrics: dict[str, float] = field(default_factory=dict)  # acc/, loss/, compute/, probe/
    examples_to_target: float | None = None
    seconds_to_target: float | None = None
    seeds_reached: int | None = None  # replicate trials only
    node_id: str = ""
    torch_threads: int = 0
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The flat dict Tune carries: evaluation metrics and the outcome side by side."""
        out: dict[str, Any] = dict(self.metrics)
        for key, value in asdict(self).items():
            if key == "metrics" or value is None:
                continue
            out[key] = float(value) if isinstance(value, bool) else value
        return out


@dataclass
class SeedScore:
    """A configuration scored over its seeds."""

    compute_to_target: float  # the median, censored seeds at the penalty
    target_acc: float  # the median of the seeds' latest target accuracies
    seeds_reached: int
    reached: bool  # at least half the seeds reached: the median is a real seed's compute


def over_seeds(outcomes: list[tuple[bool, float | None]], target_accs: list[float], penalty: float) -> SeedScore:
    """Score a configuration from its seeds' (reached, compute_to_target) and accuracies.

    The median is the lower median: with an even number of seeds it is still one seed's
    value, so it is censored exactly when fewer than half the seeds reached the target (a
    mean of a compute and the penalty would be neither).
    """
    values = [float(c) if reached else penalty for reached, c in outcomes]
    n_reached = sum(1 for reached, _ in outcomes if reached)
    return SeedScore(compute_to_target=float(statistics.median_low(values)),
                     target_acc=float(statistics.median(target_accs)), seeds_reached=n_reached,
                     reached=2 * n_reached >= len(outcomes))
