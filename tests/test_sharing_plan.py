"""Where a grid search's trials store states for each other, and what the search accounts.

No training here: the plan is a pure function of the spec, so it is checked on the shipped
paper specs, whose shared prefixes are known by reading them.
"""

from __future__ import annotations

from iterhead.curricula.trial import trial_curriculum
from iterhead.search.sharing import accounting, grid_configs, plan
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.prefix import points

from support import ROOT

CPU = ROOT / "examples" / "paper" / "cpu"


def planned_points(spec: str, smoke: bool = False) -> set[tuple[str, int, int]]:
    """The planned keys as (stage name, epoch, epochs of earlier stages), over the spec's trials."""
    loaded = load_search(CPU / spec)
    base = loaded.base.model_dump(mode="json")
    keys = set(plan(loaded, base, smoke) or [])
    out = set()
    for config in grid_configs(loaded, smoke):
        cur = trial_curriculum(base, config, smoke)
        out |= {(cur.stages[p.stage].name, p.epoch, p.epochs_before) for p in points(cur) if p.key in keys}
    return out


def test_experiment_1_stores_where_shorter_pretrainings_end():
    # pretraining 0, 10, 20 or 40 epochs: 10 is the start of 20 and 40, 20 the start of 40
    assert planned_points("1_transfer.yaml") == {("pretrain", 10, 0), ("pretrain", 20, 0)}


def test_experiment_3_stores_both_pretraining_ends():
    # pretraining 20 or 80 epochs, each finetuned two ways: both ends are shared
    assert planned_points("3_finetune_mlp.yaml") == {("pretrain", 20, 0), ("pretrain", 80, 0)}


def test_finetuning_settings_share_their_one_pretraining():
    assert planned_points("finetune_settings.yaml") == {("pretrain", 40, 0)}


def test_searches_that_propose_as_they_go_have_no_plan():
    loaded = load_search(ROOT / "examples" / "search_small.yaml")
    assert plan(loaded, loaded.base.model_dump(mode="json"), False) is None


def test_accounting_counts_forked_prefixes_once():
    rows = [{r.FLOPS_SEEDS: 10.0, r.FLOPS_FORKED: 0.0}, {r.FLOPS_SEEDS: 12.0, r.FLOPS_FORKED: 8.0},
            {r.FLOPS_SEEDS: 5.0}]  # a trial that reported nothing of it (an old checkpoint)
    assert accounting(rows) == {r.FLOPS_CURRICULA: 27.0, r.FLOPS_TRAINED: 19.0}


def test_a_trial_stopped_while_replaying_its_prefix_trained_nothing():
    """A forked trial first replays the prefix's reports; each says it forked only the FLOPs of
    the prefix up to it, so a trial that ASHA stops during the replay adds 0 to the FLOPs the
    search trained, not minus the rest of the prefix."""
    from iterhead.trainable.tune import replayed_fork

    forked = {r.FLOPS_FORKED: 2.0e9, r.PREFIX_SOURCE: "trial x"}
    early = {r.FLOPS_SEEDS: 5.0e8, **replayed_fork({r.FLOPS_SEEDS: 5.0e8}, forked)}
    assert early == {r.FLOPS_SEEDS: 5.0e8, r.FLOPS_FORKED: 5.0e8, r.PREFIX_SOURCE: "trial x"}
    assert accounting([early])[r.FLOPS_TRAINED] == 0.0
    producer = {r.FLOPS_SEEDS: 2.0e9, r.FLOPS_FORKED: 0.0}
    assert accounting([producer, early]) == {r.FLOPS_CURRICULA: 2.5e9, r.FLOPS_TRAINED: 2.0e9}
    assert replayed_fork({r.FLOPS_SEEDS: 2.0e9}, forked)[r.FLOPS_FORKED] == 2.0e9  # the prefix's last report


def test_a_trial_restarted_from_a_prefix_it_stored_itself_forked_nothing():
    """A trial retried (or resumed) before its first checkpoint starts from the deepest stored
    state of its curriculum, which it may have stored itself: that prefix is its own training,
    counted once by the search, not a fork that no trial counts as trained."""
    from iterhead.trainable.tune import fork_record

    entry = {"source": {"trial": "t1", "node": "n"}, "reports": [{r.FLOPS_SEEDS: 1.0e9}, {r.FLOPS_SEEDS: 2.0e9}]}
    own = fork_record(entry, "pretrain", 4, "t1")
    assert own == {r.FLOPS_FORKED: 0.0}
    assert accounting([{r.FLOPS_SEEDS: 3.0e9, **own}]) == {r.FLOPS_CURRICULA: 3.0e9, r.FLOPS_TRAINED: 3.0e9}
    other = fork_record(entry, "pretrain", 4, "t2")
    assert other == {r.FLOPS_FORKED: 2.0e9, r.PREFIX_SOURCE: "t1 on node n, stage pretrain epoch 4"}
    # t2 trains on from t1's prefix, stores its own entry further on, and restarts from it: what it
    # forked from t1 is still forked, and counted once, by t1
    later = {"source": {"trial": "t2", "node": "n", "forked": other}, "reports": [{r.FLOPS_SEEDS: 3.0e9}]}
    assert fork_record(later, "pretrain", 6, "t2") == other
    rows = [{r.FLOPS_SEEDS: 3.0e9, **own}, {r.FLOPS_SEEDS: 4.0e9, **fork_record(later, "pretrain", 6, "t2")}]
    assert accounting(rows)[r.FLOPS_TRAINED] == 3.0e9 + 2.0e9
