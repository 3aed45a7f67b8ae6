"""Search specs: space keys, domains and resources are checked before anything starts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace
from typing import Literal, get_args, get_origin

import pytest

from iterhead.curricula.overrides import apply, blend
from iterhead.search import run
from iterhead.search.cli import _parser, main
from iterhead.search.run import SearchOptions, resume_command
from iterhead.search.spec import SearchSettings, SearchSpec, load_search
from iterhead.curricula.trial import trial_curriculum

from support import ROOT, no_ray

BASE = ROOT / "examples" / "poly_then_parity_small.yaml"


def write_spec(tmp_path, body: str):
    (tmp_path / "base.yaml").write_text(BASE.read_text())
    path = tmp_path / "spec.yaml"
    path.write_text("name: s\nbase: base.yaml\n" + body)
    return path


PBT_SECTION = "pbt: {interval_epochs: 4, mutate: {lr: {loguniform: [1.0e-4, 3.0e-3]}}}\n"
PBT_SCHEDULER = "search: {scheduler: pbt}\n"
PBT = PBT_SCHEDULER + PBT_SECTION  # a valid PBT search of BASE; the cases below break one thing each

BAD = {
    "unknown-top-key": ("spaces: {}\n", "spaces", "unknown field"),
    "key-names-no-field": ("space:\n  optim.learning_rate: {uniform: [0.1, 0.2]}\n", "space.optim.learning_rate",
                           "unknown field 'learning_rate'; fields of optim: lr, batch_size, weight_decay, batch_order"),
    "undefined-stage": ("space:\n  stages.warmup.epochs: {randint: [0, 3]}\n", "space.stages.warmup.epochs",
                        "unknown stage 'warmup'; stages: pretrain, finetune"),
    "mix-of-undefined-task": ("space:\n  stages.pretrain.mix.copy: {uniform: [0, 1]}\n", "space.stages.pretrain.mix.copy", "task"),
    "low-not-below-high": ("space:\n  optim.lr: {uniform: [0.2, 0.1]}\n", "space.optim.lr", "low < high"),
    "loguniform-at-zero": ("space:\n  optim.lr: {loguniform: [0.0, 0.1]}\n", "space.optim.lr", "low > 0"),
    "two-domains": ("space:\n  optim.lr: {uniform: [0.1, 0.2], loguniform: [0.1, 0.2]}\n", "space.optim.lr",
                    "exactly one domain of uniform, loguniform, randint, choice, grid (got uniform, loguniform)"),
    "no-domain": ("space:\n  optim.lr: {}\n", "space.optim.lr", "(got none)"),
    "empty-choice": ("space:\n  optim.batch_size: {choice: []}\n", "space.optim.batch_size", "at least one"),
    "value-breaks-curriculum": ("space:\n  optim.lr: {uniform: [-1.0, 0.1]}\n", "space.optim.lr", "greater than 0"),
    "unknown-algorithm": ("search: {algorithm: bayes}\n", "search.algorithm",
                          "unknown algorithm 'bayes'; choose one of optuna, random, grid"),
    "grid-with-optuna": ("space:\n  seed: {grid: [0, 1]}\nsearch: {algorithm: optuna}\n", "search.algorithm",
                         "not 'optuna'"),
    "negative-budget": ("budget: {flops: -1.0}\n", "budget.flops", "greater than 0"),
    "missing-base": ("", "base", "no curriculum file"),
    "unknown-search-key": ("search: {algo: optuna}\n", "search.algo", "unknown field"),
    "num-samples-zero": ("search: {num_samples: 0}\n", "search.num_samples", "greater than 0"),
    "max-concurrent-zero": ("search: {max_concurrent: 0}\n", "search.max_concurrent", "greater than 0"),
    "unknown-scheduler": ("search: {scheduler: hyperband}\n", "search.scheduler",
                          "unknown scheduler 'hyperband'; choose one of asha, none, pbt"),
    "budget-zero": ("budget: {flops: 0}\n", "budget.flops", "greater than 0"),
    "budget-infinite": ("budget: {flops: .inf}\n", "budget.flops", "finite"),
    "budget-huge": ("budget: {flops: 1.0e+308}\n", "budget.flops", "less than or equal to"),
    "budget-text": ("budget: {flops: lots}\n", "budget.flops", "(got 'lots')"),
    "share-of-the-only-task": ("space:\n  stages.pretrain.mix.polynomial: {uniform: [0.2, 0.8]}\n",
                               "space.stages.pretrain.mix.polynomial",
                               "stage 'pretrain' of the base trains only polynomial, which the space searches"),
    "shares-of-every-task": ("space:\n  stages.finetune.mix.polynomial: {uniform: [0, 0.3]}\n"
                             "  stages.finetune.mix.parity: {uniform: [0.5, 1]}\nsearch: {algorithm: random}\n",
                             "space.stages.finetune.mix.polynomial", "drawn shares would be rescaled to sum to 1"),
    "num-samples-bool": ("search: {num_samples: true}\n", "search.num_samples", "a number is needed here"),
    "negative-gpu": ("resources: {gpu: -1}\n", "resources.gpu", "greater than or equal to 0"),
    "zero-cpu": ("resources: {cpu: 0}\n", "resources.cpu", "greater than or equal to 0.0001"),
    "two-gpus": ("resources: {gpu: 2}\n", "resources", "a trial trains on one GPU or a share of one"),
    "unknown-resource": ("resources: {tpu: 1}\n", "resources.tpu", "unknown field"),
    "whole-section": ("space:\n  model: {choice: [1]}\n", "space.model", "single value, not a whole section (fields: d_model,"),
    "field-of-a-value": ("space:\n  optim.lr.x: {uniform: [0.1, 0.2]}\n", "space.optim.lr.x",
                         "optim.lr is a single value (0.001); it has no field 'x'"),
    "stage-without-field": ("space:\n  stages.pretrain: {randint: [0, 3]}\n", "space.stages.pretrain", "stages.<stage name>.<field>"),
    "randint-of-floats": ("space:\n  stages.pretrain.epochs: {randint: [0.5, 3]}\n", "space.stages.pretrain.epochs.randint[0]", "integer"),
    "grid-algorithm-with-uniform": ("space:\n  optim.lr: {uniform: [0.1, 0.2]}\nsearch: {algorithm: grid}\n", "space.optim.lr",
                                    "grid domains only, not uniform"),
    "choice-breaks-curriculum": ("space:\n  optim.batch_size: {choice: [32, 0]}\n", "space.optim.batch_size", "greater than 0"),
    "space-not-a-mapping": ("space: [optim.lr]\n", "space", "dictionary (got ['optim.lr'])"),
    "unknown-domain": ("space:\n  optim.lr: {gaussian: [0, 1]}\n", "space.optim.lr.gaussian",
                       "unknown field 'gaussian'; allowed here: choice, grid, loguniform, randint, uniform"),
    "seed-searched-and-listed": ("seeds: [0, 1]\nspace:\n  seed: {choice: [0, 1]}\n", "space.seed",
                                 "cannot also be searched; remove space.seed"),
    "seed-listed-twice": ("seeds: [0, 1, 0]\n", "seeds", "seed 0 is listed twice"),
    "no-seeds-listed": ("seeds: []\n", "seeds", "at least 1 item"),
    "negative-seed": ("seeds: [-1]\n", "seeds[0]", "greater than or equal to 0"),
    **{f"pbt-{name}": case for name, case in {  # a PBT search (the base: pretrain 60, finetune 150, eval every 2)
        "section-without-scheduler": (PBT_SECTION, "search.scheduler", "a pbt: section needs search.scheduler: pbt"),
        "scheduler-without-section": ("search: {scheduler: pbt}\n", "pbt", "scheduler pbt needs a pbt: section"),
        "with-optuna": (PBT.replace("scheduler: pbt", "scheduler: pbt, algorithm: optuna"), "search.algorithm",
                        "algorithm 'optuna' has nothing to propose; leave search.algorithm out"),
        "with-space": (PBT + "space:\n  optim.lr: {uniform: [0.1, 0.2]}\n", "space.optim.lr",
                       "varies only the stage fields in pbt.mutate"),
        "with-seeds": (PBT + "seeds: [0, 1]\n", "seeds", "all train the base curriculum's seed; remove seeds:"),
        "unknown-stage": (PBT.replace("interval_epochs: 4", "interval_epochs: 4, stage: warmup"), "pbt.stage",
                          "unknown stage 'warmup'; stages that train: pretrain, finetune"),
        "interval-off-evaluations": (PBT.replace("interval_epochs: 4", "interval_epochs: 3"), "pbt.interval_epochs",
                                     "must be a multiple of the base's eval.every_epochs (2)"),
        "interval-past-the-stage": (PBT.replace("interval_epochs: 4", "interval_epochs: 150"), "pbt.interval_epochs",
                                    "must be below the epochs of stage 'finetune' (150)"),
        "interval-zero": (PBT.replace("interval_epochs: 4", "interval_epochs: 0"), "pbt.interval_epochs",
                          "greater than 0"),
        "quantile-above-half": (PBT.replace("interval_epochs: 4", "interval_epochs: 4, quantile: 0.6"),
                                "pbt.quantile", "less than or equal to 0.5"),
        "mutate-epochs": (PBT.replace("lr: {loguniform", "epochs: {loguniform"), "pbt.mutate.epochs",
                          "unknown stage field 'epochs'; PBT perturbs lr, mix.<task>, train_modules"),
        "mutate-nothing": (PBT_SECTION.replace("{lr: {loguniform: [1.0e-4, 3.0e-3]}}", "{}") + PBT_SCHEDULER,
                           "pbt.mutate", "at least 1 item"),
        "grid-domain": (PBT.replace("loguniform: [1.0e-4, 3.0e-3]", "grid: [1.0e-4, 1.0e-3]"), "pbt.mutate.lr",
                        "lr takes a uniform or loguniform or choice domain here, not grid"),
        "mix-share-above-one": (PBT.replace("lr: {loguniform: [1.0e-4, 3.0e-3]}", "mix.polynomial: {uniform: [0, 1.5]}"),
                                "pbt.mutate.mix.polynomial", "a mix share lies in [0, 1] (got [0.0, 1.5])"),
        "mix-of-undefined-task": (PBT.replace("lr: {loguniform: [1.0e-4, 3.0e-3]}", "mix.copy: {uniform: [0, 1]}"),
                                  "pbt.mutate.mix.copy", "unknown task 'copy'"),
        "base-outside-domain": (PBT.replace("[1.0e-4, 3.0e-3]", "[1.0e-4, 5.0e-4]"), "pbt.mutate.lr",
                                "stage 'finetune' of the base has lr = 0.001, outside this domain"),
        "one-member": (PBT.replace("scheduler: pbt", "scheduler: pbt, num_samples: 1"), "search.num_samples",
                       "a population needs at least 2 members"),
        "every-mixed-task-mutated": (PBT.replace("lr: {loguniform: [1.0e-4, 3.0e-3]}", "mix.parity: {uniform: [0.5, 1]}"),
                                     "pbt.mutate", "leave one task of stage 'finetune''s mix out of pbt.mutate"),
        "module-unknown": (PBT.replace("lr: {loguniform: [1.0e-4, 3.0e-3]}",
                                       "train_modules: {choice: [null, [blocks.9.mlp]]}"),
                           "pbt.mutate.train_modules", "the value ['blocks.9.mlp'] makes the curriculum invalid"),
    }.items()},
}


NOTHING_TRAINS = ("  - {name: pretrain, mix: {polynomial: 1.0}, epochs: 0}\n"
                  "  - {name: finetune, mix: {parity: 1.0}, epochs: 0}\n")


BAD_PBT_BASES = {  # PBT specs that are bad because of their base: (its stages, the error's words)
    "nothing-trains": (NOTHING_TRAINS, "every stage of the base has epochs: 0"),
    "stage-named-like-a-segment": ("  - {name: finetune-m1-e4, mix: {polynomial: 1.0}, epochs: 60}\n"
                                   "  - {name: finetune, mix: {parity: 1.0}, epochs: 150}\n",
                                   "stage 'finetune-m1-e4' of the base has the form of the names PBT gives"),
}


@pytest.mark.parametrize("stages, words", BAD_PBT_BASES.values(), ids=BAD_PBT_BASES.keys())
def test_pbt_spec_with_a_bad_base_exits_2_with_one_line(tmp_path, capsys, stages, words):
    path = write_spec(tmp_path, PBT)
    text = BASE.read_text()
    start, end = text.index("stages:\n"), text.index("target:")
    (tmp_path / "base.yaml").write_text(text[:start] + "stages:\n" + stages + text[end:])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: pbt.stage: " in err[0] and words in err[0], err


def test_pbt_naming_a_stage_that_trains_nothing_says_so(tmp_path, capsys):
    """It said "unknown stage 'pretrain'" of a stage the base defines, with epochs: 0."""
    path = write_spec(tmp_path, PBT.replace("{interval_epochs: 4,", "{stage: pretrain, interval_epochs: 4,"))
    (tmp_path / "base.yaml").write_text(BASE.read_text().replace("epochs: 60}", "epochs: 0}"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pbt.stage: stage 'pretrain' of the base has epochs: 0" in err[0], err
    assert "name one of finetune, or give it epochs" in err[0]


@pytest.mark.parametrize("body, words", [
    ("space:\n  optim.lr: {loguniform: [5.0e-4, 3.0e-3]}\n", "epochs: 0, so no trial trains"),
    ("space:\n  stages.pretrain.epochs: {choice: [0]}\n", "epochs: 0 at every value of the space"),
], ids=["no-epochs-searched", "epochs-searched-at-0"])
def test_search_whose_trials_train_nothing_exits_2_before_ray_starts(tmp_path, capsys, monkeypatch, body, words):
    """Its horizon would be 0 FLOPs: ASHA refused it with a traceback after the search had begun."""
    path = write_spec(tmp_path, body + "search: {algorithm: random, num_samples: 2, scheduler: asha}\n")
    text = BASE.read_text()
    start, end = text.index("stages:\n"), text.index("target:")
    (tmp_path / "base.yaml").write_text(text[:start] + "stages:\n" + NOTHING_TRAINS + text[end:])
    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    assert main(["search", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: base: every stage of the base has " in err[0] and words in err[0], err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()
    # searching one stage's epochs over a range that leaves 0 makes the spec valid
    path.write_text(path.read_text().replace(body, "space:\n  stages.pretrain.epochs: {randint: [0, 3]}\n"))
    assert load_search(path).spec.space["stages.pretrain.epochs"].probes() == [0, 3]


@pytest.mark.parametrize("body, field, words", BAD.values(), ids=BAD.keys())
def test_bad_spec_exits_2_with_one_line(tmp_path, capsys, body, field, words):
    path = write_spec(tmp_path, body)
    if field == "base":
        (tmp_path / "base.yaml").unlink()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: {field}: " in err[0] and words in err[0], err


# (spec body, field, the message after "FIELD: "): a near miss names the value and the nearest
# valid one; a far one names the value and lists the choices without guessing.
SUGGEST = {
    "algorithm-typo": ("search: {algorithm: optuan}\n", "search.algorithm",
                       "unknown algorithm 'optuan'; did you mean 'optuna'? (choose one of optuna, random, grid)"),
    "scheduler-case": ("search: {scheduler: ASHA}\n", "search.scheduler",
                       "unknown scheduler 'ASHA'; did you mean 'asha'? (choose one of asha, none, pbt)"),
    "search-key-typo": ("search: {algo: optuna}\n", "search.algo",
                        "unknown field 'algo'; did you mean 'algorithm'? (allowed here: algorithm, "
                        "checkpoint_every_s, grace_fraction, max_concurrent, max_failures, num_samples, "
                        "reduction_factor, scheduler, seed)"),
    "top-key-typo": ("spaces: {}\n", "spaces",
                     "unknown field 'spaces'; did you mean 'space'? (allowed here: base, budget, name, "
                     "pbt, resources, search, seeds, space)"),
    "resource-typo": ("resources: {cpus: 1}\n", "resources.cpus",
                      "unknown field 'cpus'; did you mean 'cpu'? (allowed here: cpu, gpu)"),
    "budget-typo": ("budget: {flop: 1.0e12}\n", "budget.flop",
                    "unknown field 'flop'; did you mean 'flops'? (allowed here: flops)"),
    "domain-typo": ("space:\n  optim.lr: {unifrom: [0.1, 0.2]}\n", "space.optim.lr.unifrom",
                    "unknown field 'unifrom'; did you mean 'uniform'? (allowed here: choice, grid, "
                    "loguniform, randint, uniform)"),
    "space-field-typo": ("space:\n  optim.lrr: {uniform: [0.1, 0.2]}\n", "space.optim.lrr",
                         "unknown field 'lrr'; did you mean 'lr'? (fields of optim: lr, batch_size, "
                         "weight_decay, batch_order)"),
    "space-section-typo": ("space:\n  optm.lr: {uniform: [0.1, 0.2]}\n", "space.optm.lr",
                           "unknown field 'optm'; did you mean 'optim'? (fields of the top level: name, seed, "
                           "model, data, tasks, optim, stages, target, eval)"),
    "space-stage-typo": ("space:\n  stages.pretrian.epochs: {randint: [0, 3]}\n", "space.stages.pretrian.epochs",
                         "unknown stage 'pretrian'; did you mean 'pretrain'? (stages: pretrain, finetune)"),
    "space-stage-field-typo": ("space:\n  stages.pretrain.epoch: {randint: [0, 3]}\n",
                               "space.stages.pretrain.epoch",
                               "unknown field 'epoch'; did you mean 'epochs'? (fields of stages.pretrain: "
                               "name, mix, epochs, lr, train_modules, seed)"),
    "space-mix-task-typo": ("space:\n  stages.pretrain.mix.parityy: {uniform: [0, 1]}\n",
                            "space.stages.pretrain.mix.parityy",
                            "unknown task 'parityy'; did you mean 'parity'? (defined tasks: parity, polynomial)"),
    "space-mix-task-far-off": ("space:\n  stages.pretrain.mix.copy: {uniform: [0, 1]}\n",
                               "space.stages.pretrain.mix.copy",
                               "unknown task 'copy'; defined tasks: parity, polynomial"),
    "choice-of-positional-typo": ("space:\n  model.positional: {choice: [learned, rotory]}\n",
                                  "space.model.positional",
                                  "unknown positional 'rotory'; did you mean 'rotary'? (choose one of learned, rotary)"),
    "choice-of-target-task-typo": ("space:\n  target.task: {choice: [parity, polynomal]}\n", "space.target.task",
                                   "unknown task 'polynomal'; did you mean 'polynomial'? "
                                   "(defined tasks: parity, polynomial)"),
    "choice-of-module-typo": ("space:\n  stages.finetune.train_modules: {choice: [[blocks.1.mlpp]]}\n",
                              "space.stages.finetune.train_modules",
                              "the value ['blocks.1.mlpp'] makes the curriculum invalid: stages[1].train_modules[0]: "
                              "unknown module 'blocks.1.mlpp'; did you mean 'blocks.1.mlp'? (modules of this model: "),
}


@pytest.mark.parametrize("body, field, message", SUGGEST.values(), ids=SUGGEST.keys())
def test_bad_spec_names_the_value_and_suggests(tmp_path, capsys, body, field, message):
    path = write_spec(tmp_path, body)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: {field}: {message}"), err
    assert "did you mean" in message or "did you mean" not in err[0]


SEARCH_CHOICES = {name: get_args(f.annotation) for name, f in SearchSettings.model_fields.items()
                  if get_origin(f.annotation) is Literal}


def test_every_search_choice_field_is_covered():
    assert set(SEARCH_CHOICES) == {"algorithm", "scheduler"}
    assert not [n for n, f in SearchSpec.model_fields.items() if get_origin(f.annotation) is Literal]


@pytest.mark.parametrize("name", sorted(SEARCH_CHOICES))
@pytest.mark.parametrize("how", ["typo", "far-off"])
def test_search_choice_names_the_value_and_the_nearest_choice(tmp_path, capsys, name, how):
    choices = SEARCH_CHOICES[name]
    given = choices[0][:-1] + "x" + choices[0][-1] if how == "typo" else "zzzz"
    path = write_spec(tmp_path, f"search: {{{name}: {given}}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    listed = f"choose one of {', '.join(choices)}"
    tail = f"did you mean {choices[0]!r}? ({listed})" if how == "typo" else listed
    assert err == [f"error: {path}: search.{name}: unknown {name} {given!r}; {tail}"]


@pytest.mark.parametrize("base_text, words", [
    ("- just\n- a list\n", "top level must be a mapping"),
    ("name: s\nbase: other.yaml\n", "search spec, not a curriculum"),
    ("name: x\ntasks: {p: {kind: parity}}\nstages: []\ntarget: {task: p}\n", "at least one stage"),
    ("\x00\x01binary", "YAML"),
], ids=["list", "a-search-spec", "no-stages", "binary"])
def test_base_that_is_not_a_curriculum(tmp_path, capsys, base_text, words):
    path = write_spec(tmp_path, "")
    (tmp_path / "base.yaml").write_text(base_text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: base: the base curriculum is invalid" in err[0] and words in err[0], err


def test_impossible_resources_fail_fast_before_ray(tmp_path):
    """Exit 2 with one line, no store made, and neither torch nor ray imported (that is what
    makes it take a fraction of a second; the time itself is not asserted here)."""
    path = write_spec(tmp_path, "resources: {cpu: 4096}\n")
    code = ("import sys; from iterhead.search.cli import main; "
            f"rc = main(['search', {str(path)!r}, '--tracking-uri', 'sqlite:///{tmp_path}/mlflow.db']); "
            "print('RESULT', rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "RESULT 2 False False" in out.stdout, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "resources.cpu" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_resources_are_checked_against_the_largest_live_node_not_the_cluster_totals():
    """A trial runs on one node: two single-GPU nodes cannot place a trial asking for more
    than one GPU, nor four 4-CPU nodes one asking for 8 CPUs; a dead node counts for nothing."""
    from iterhead.search.run import largest_node

    def node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}

    assert largest_node([node(4, 1), node(4, 1), node(4), node(4)]) == (4.0, 1.0)
    assert largest_node([node(2), node(16, 8, alive=False)]) == (2.0, 0.0)
    assert largest_node([]) == (0.0, 0.0)


def test_every_shipped_file_validates():
    """Every curriculum and search spec under examples/, whatever folder it sits in."""
    files = sorted((ROOT / "examples").rglob("*.yaml"))
    assert len(files) >= 20 and any("pbt" in f.name for f in files)
    for file in files:
        assert main(["validate", str(file)]) == 0, file


def test_overrides_address_stages_by_name_and_mix_as_share():
    loaded = load_search(ROOT / "examples" / "search_small.yaml")
    cur = trial_curriculum(loaded.base.model_dump(mode="json"),  # what a trial trains
                           {"stages.pretrain.epochs": 0, "stages.finetune.mix.polynomial": 0.25,
                            "optim.lr": 0.002}, smoke=False)
    assert cur.stage("pretrain").epochs == 0 and cur.optim.lr == 0.002
    assert cur.stage("finetune").mix == pytest.approx({"parity": 0.75, "polynomial": 0.25})
    assert blend({"a": 1.0, "b": 3.0}, {"c": 0.5}) == pytest.approx({"a": 0.125, "b": 0.375, "c": 0.5})
    assert blend({"a": 1.0}, {"b": 0.8, "c": 0.8}) == pytest.approx({"b": 0.5, "c": 0.5})
    original = loaded.base.model_dump(mode="json")
    apply(original, {"optim.lr": 1.0})
    assert original == loaded.base.model_dump(mode="json")  # apply never changes its input


def test_the_resume_command_names_the_store_folder_and_cluster_the_search_ran_with(tmp_path):
    """Without --tracking-uri it pointed at the default store, which --resume refuses."""

    folder = tmp_path / "a folder"  # a space the shell would split on
    folder.mkdir()
    path = write_spec(folder, "")
    opts = SearchOptions(uri=f"sqlite:///{tmp_path}/my store.db", storage_path=str(tmp_path / "runs"),
                         address="10.0.0.1:6379", num_cpus=3)
    args = _parser().parse_args(shlex.split(resume_command(load_search(path), opts))[1:])
    assert (args.command, args.spec, args.resume) == ("search", str(path), True)
    assert (args.tracking_uri, args.storage_path, args.address, args.num_cpus) == (
        opts.uri, opts.storage_path, opts.address, None)  # the command line refuses --num-cpus with a cluster
    args = _parser().parse_args(shlex.split(resume_command(load_search(path), replace(opts, address=None)))[1:])
    assert (args.address, args.num_cpus) == (None, 3)  # the embedded Ray's CPUs


@pytest.mark.parametrize("asked, smoke", [(1, 1), (2, 2), (8, 2)])
def test_a_smoke_search_runs_at_most_two_trials_at_once_and_never_more_than_asked(tmp_path, asked, smoke):
    """A spec's max_concurrent 1 (one GPU's memory, say) was raised to 2 at smoke size."""
    for body in (f"space: {{optim.lr: {{uniform: [0.001, 0.01]}}}}\nsearch: {{max_concurrent: {asked}}}\n",
                 f"search: {{scheduler: pbt, max_concurrent: {asked}}}\n" + PBT_SECTION):
        assert run.settings_for(load_search(write_spec(tmp_path, body)), smoke=True).max_concurrent == smoke


@pytest.mark.parametrize("grace, factor", [(1 / 9, 3.0), (0.25, 2.0), (0.1, 3.0), (0.3, 4.0), (1.0, 3.0)])
def test_checkpoint_rungs_are_where_ashas_bracket_compares(tmp_path, grace, factor):
    """A trial checkpoints at ASHA's rungs, so that one ASHA stops there keeps its figures: the
    list must be the one Ray's bracket holds, a tie of the logarithms (1/9 at factor 3) included."""
    from iterhead.search.space import rungs, scheduler

    asha = f"search: {{scheduler: asha, grace_fraction: {grace}, reduction_factor: {factor}}}\n"
    loaded = load_search(write_spec(tmp_path, "space: {optim.lr: {uniform: [0.001, 0.01]}}\n" + asha))
    settings = run.settings_for(loaded, smoke=False)
    bracket = scheduler(loaded, settings)._brackets[0]  # Ray's own: one bracket
    assert rungs(loaded, settings) == sorted(milestone for milestone, _ in bracket._rungs)
    none = load_search(write_spec(tmp_path, "search: {scheduler: none}\n"))
    assert rungs(none, run.settings_for(none, smoke=False)) == []
