"""What a search leaves of its libraries' output on the terminal (`quiet_libraries`).

Each filter here drops one message, matched on its text, that says nothing a user of iterhead
should act on; anything else those libraries say, warnings and errors included, still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Callable

from iterhead.curricula.errors import ConfigError
from iterhead.curricula.trial import TRIAL_FILE

OPTUNA_STEP_AGAIN = r"The reported value is ignored because this `step=\d+` is already reported\.\Z"
"""Optuna's warning for a step its trial holds already (optuna/trial/_trial.py, `Trial.report`)."""


def quiet_libraries() -> None:
    """Keep the terminal iterhead's: what runs, progress, the summary, where to look.

    Off: Tune's configuration box and TensorBoard hint (results live in MLflow; the legacy
    reporter at verbose=0 prints nothing), MLflow's schema-creation notes and its links to each
    run a server ended, and Ray's notice that token authentication is on; Optuna's "study
    created" line is silenced where the searcher is made. Two warnings of every resume, both
    harmless, are off too (below). Warnings and errors still reach the terminal.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # With a tracking server, MLflow writes two lines to stdout as each run ends ("View run ...",
    # "View experiment ..."): a search ends one or more runs a trial, between iterhead's lines;
    # its summary says where to look
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A new local Ray turns token authentication on and says so as a warning; it is the
    # secure default, nothing to act on. Its opposite (auth disabled) still shows.
    _add_filter("ray._private.authentication.authentication_token_setup", _not_auth_on_notice)
    # Tune's "Resume experiment with: Tuner.restore(...)" after a stop: iterhead prints the
    # command that resumes the search into its MLflow runs; Tune's would resume without them
    _add_filter("ray.tune.tune", _not_tune_resume_hint)
    # Tune's traceback of a trial whose drawn values make an invalid curriculum: the callback
    # has said so in one line, with the reason; other failures keep their traceback
    _add_filter("ray.tune.execution.tune_controller", _not_invalid_trial_traceback)
    # `Tuner.restore` reads each saved trial's result.json or progress.csv into a table that only
    # `Tuner.get_results()` before `fit()` returns (ray/tune/impl/tuner_internal.py:407-416;
    # `fit()` replaces it, line 534). Tune's loggers write those files in Ray's temp folder and
    # copy them into the search's folder when Tune saves its state, so a trial that had not
    # started by the last save has neither; Ray means to skip a trial that never reported
    # (`last_result is None`, experiment_analysis.py:139), but `Trial.last_result` is never
    # None (trial.py:484-499). A search stopped with trials waiting warned "Failed to fetch
    # metrics" for them at the stop (the table `fit()` returns, ray/tune/tune.py:1059) and again
    # at its resume. iterhead reads neither table's files: trials' last results, and MLflow.
    # A file that is there and does not read, or any other error, still shows.
    _add_filter("ray.tune.analysis.experiment_analysis", _not_unstarted_trials_metrics)
    # A resumed trial trains again from its last checkpoint (or its start), and Tune numbers its
    # reports from the checkpoint's `training_iteration` (ray/tune/trainable/trainable.py:536):
    # reports made after that checkpoint and before Tune saved its searcher come again under
    # the same numbers. Ray's OptunaSearch hands each to Optuna as a step
    # (optuna_search.py:539-541), which keeps the first value and warns (optuna/trial/_trial.py:
    # 503-506). Nothing is lost: training resumes exactly, so the value is the same; Ray's
    # NopPruner (optuna_search.py:405) reads no step, and TPE reads one only for a trial that
    # ended without its result (samplers/_tpe/sampler.py:837). Other Optuna warnings still show.
    warnings.filterwarnings("ignore", message=OPTUNA_STEP_AGAIN, category=UserWarning)


def _add_filter(logger: str, keep: Callable[[logging.LogRecord], bool]) -> None:
    """Add `keep` to the logger once (a search run twice in one process would add it twice)."""
    log = logging.getLogger(logger)
    if keep not in log.filters:
        log.addFilter(keep)


def _not_auth_on_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def _not_tune_resume_hint(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Experiment has been interrupted, but the most recent state was saved")


def _not_invalid_trial_traceback(record: logging.LogRecord) -> bool:
    """False for Tune's traceback of a trial whose curriculum `trial_curriculum` refused (the error
    its worker raised, inside Ray's wrapper), which the callback has named; True for the rest."""
    error = record.exc_info[1] if record.exc_info else None
    cause = getattr(error, "cause", error)
    return not (isinstance(cause, ConfigError) and cause.file == TRIAL_FILE
                and record.getMessage().startswith("Trial task failed"))


_NO_RESULT_FILES = re.compile(r"- .+: FileNotFoundError\(['\"]Could not fetch metrics for .+: both result\.json "
                              r"and progress\.csv were not found at .+['\"]\)")


def _not_unstarted_trials_metrics(record: logging.LogRecord) -> bool:
    """False for Tune's "Failed to fetch metrics" where every trial it names lacks both files (one
    Tune had not started when it saved its state); True where any other error is among them."""
    first, *failures = record.getMessage().splitlines() or [""]
    return not (first.startswith("Failed to fetch metrics for ") and failures
                and all(_NO_RESULT_FILES.fullmatch(line) for line in failures))
