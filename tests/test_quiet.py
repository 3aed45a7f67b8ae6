"""The resume warnings a search drops (`search.quiet`) are those exact messages, and no others."""

from __future__ import annotations

import logging
import warnings

import optuna

from iterhead.search.quiet import _not_unstarted_trials_metrics as shown
from iterhead.search.quiet import quiet_libraries

TRIAL = "/runs/s-20260101-000000/train_trial_ab12cd34_3_stages_train_epochs=40_2026-01-01_00-00-00"


def fetch_warning(*failures: str) -> logging.LogRecord:
    """Tune's warning as ray/tune/analysis/experiment_analysis.py words it, for these failures."""
    message = f"Failed to fetch metrics for {len(failures)} trial(s):\n" + "\n".join(failures)
    return logging.LogRecord("ray.tune.analysis.experiment_analysis", logging.WARNING, __file__, 1, message, None,
                             None)


NO_FILES = ("- train_trial_ab12cd34: FileNotFoundError('Could not fetch metrics for train_trial_ab12cd34: both "
            f"result.json and progress.csv were not found at {TRIAL}')")


def test_only_trials_without_result_files_lose_tunes_fetch_warning():
    assert not shown(fetch_warning(NO_FILES))
    assert not shown(fetch_warning(NO_FILES, NO_FILES.replace("ab12cd34", "ef56ab78")))
    damaged = "- train_trial_ef56ab78: JSONDecodeError('Expecting value: line 1 column 1 (char 0)')"
    assert shown(fetch_warning(NO_FILES, damaged))  # a file that is there and does not read still shows
    assert shown(fetch_warning())
    assert shown(logging.LogRecord("x", logging.WARNING, __file__, 1, "Failed to fetch the state", None, None))


def test_only_optunas_repeated_step_warning_is_dropped():
    """A step reported again is ignored without a word; Optuna's other warnings still show."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study().ask()
    trial.report(0.5, step=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        trial.report(0.5, step=3)
        assert trial.study.trials[0].intermediate_values == {3: 0.5}  # Optuna kept the first value, as before
        warnings.warn("The reported value is ignored because this `step=3` is negative.", UserWarning)
        trial.report(0.25, step=4)
    assert [str(w.message) for w in caught] == ["The reported value is ignored because this `step=3` is negative."]
