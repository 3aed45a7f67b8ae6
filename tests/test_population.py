"""PBT's decisions without training: exploring stays in its domains, and the searcher's
generations, lineages and stops follow from the members' results and the seed alone.

The searcher is iterhead's own class, driven here through Tune's searcher interface with
hand-made results (what trials would report), so every branch is reached in a second.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from ray.tune import Result

from iterhead.curricula.data import stream
from iterhead.curricula.trial import trial_curriculum
from iterhead.search.explore import draw, perturb, project_shares
from iterhead.search.population import Population, entry_name, member_rows
from iterhead.search.spec import Domain, PbtSettings
from iterhead.trainable import results as r

from support import tiny

BASE = tiny(stages=[{"name": "warm", "mix": {"polynomial": 1.0}, "epochs": 2},
                    {"name": "train", "mix": {"parity": 1.0}, "epochs": 10}]).model_dump(mode="json")
PBT = PbtSettings(interval_epochs=4, quantile=0.25, mutate={
    "mix.polynomial": Domain(uniform=(0.0, 0.5)), "lr": Domain(loguniform=(1.0e-4, 1.0e-2)),
    "train_modules": Domain(choice=[None, ["blocks.1.mlp"]])})


def test_draws_and_perturbations_stay_in_their_domains():
    rng = np.random.default_rng(0)
    domains = [Domain(uniform=(0.2, 0.4)), Domain(loguniform=(1.0e-4, 1.0e-2)), Domain(choice=[1, 2, 3])]
    for domain in domains:
        low, high = (min(domain.args), max(domain.args))
        value = draw(domain, rng)
        for _ in range(200):
            value = perturb(value, domain, rng, resample=0.25)
            assert low <= value <= high
            assert domain.kind != "choice" or value in domain.args


def test_a_nudge_is_a_factor_of_08_or_12_or_a_neighbouring_choice():
    rng = np.random.default_rng(1)
    seen = {perturb(0.25, Domain(uniform=(0.0, 1.0)), rng, resample=0.0) for _ in range(50)}
    assert seen == {0.25 * 0.8, 0.25 * 1.2}  # the same float products, so == is exact
    assert {perturb(2, Domain(choice=[1, 2, 3]), rng, 0.0) for _ in range(50)} == {1, 3}
    assert {perturb(1, Domain(choice=[1, 2, 3]), rng, 0.0) for _ in range(50)} == {1, 2}  # kept at an end


def test_the_same_generator_gives_the_same_exploration():
    def walk(seed):
        rng = stream(seed, "pbt")
        value, out = 0.3, []
        for _ in range(20):
            value = perturb(value, Domain(uniform=(0.0, 1.0)), rng, 0.25)
            out.append(value)
        return out

    assert walk(0) == walk(0) and walk(0) != walk(1)


def test_shares_are_put_back_on_the_simplex_at_the_nearest_point():
    bounds = {"a": (0.0, 1.0), "b": (0.1, 0.9), "c": (0.0, 0.3)}
    assert project_shares({"a": 0.2, "b": 0.3, "c": 0.1}, bounds) == {"a": 0.2, "b": 0.3, "c": 0.1}  # room left
    shares = {"a": 0.9, "b": 0.8, "c": 0.5}
    out = project_shares(shares, bounds)
    assert sum(out.values()) == pytest.approx(1.0, abs=1e-12)  # bisection to float precision
    assert all(bounds[k][0] <= v <= bounds[k][1] for k, v in out.items())
    # nearest: no point of a fine grid of the feasible set (in bounds, summing to 1) is closer
    dist = sum((out[k] - shares[k]) ** 2 for k in shares)
    grid = np.linspace(0, 1, 101)
    for a, b in itertools.product(grid, grid):
        c = 1.0 - a - b
        if bounds["b"][0] <= b <= bounds["b"][1] and bounds["c"][0] <= c <= bounds["c"][1] and c >= 0:
            assert (a - 0.9) ** 2 + (b - 0.8) ** 2 + (c - 0.5) ** 2 >= dist - 1e-9


def take(pop: Population) -> list[dict]:
    """Every trial the searcher proposes now (one generation)."""
    configs = []
    for i in itertools.count():
        config = pop.suggest(f"t{pop.generation}-{i}")
        if not isinstance(config, dict):
            return configs
        configs.append(config["pbt"])


def complete(pop: Population, configs: list[dict], results: dict[int, dict]) -> None:
    """End each trial with its member's result (what the trial would report last)."""
    for i, config in enumerate(configs):
        pop.on_trial_complete(f"t{config['generation']}-{i}", {
            r.TARGET_ACC: 0.0, r.LOSS: 1.0, r.REACHED: 0.0, r.MEMBER_ENDS: 0.0, **results.get(config["member"], {})})


def feed(pop: Population, results: dict[int, dict]) -> list[dict]:
    """Run one generation: take every suggestion, complete it with the member's result."""
    configs = take(pop)
    complete(pop, configs, results)
    return configs


def test_generations_rank_copy_and_perturb_into_lineages_that_are_curricula():
    pop = Population(BASE, PBT, members=4, seed=0, smoke=False)
    assert pop.boundaries == [4, 8, 10] and pop.index == 1
    first = feed(pop, {m: {r.TARGET_ACC: acc} for m, acc in enumerate([0.5, 0.9, 0.2, 0.7])})
    assert [c["member"] for c in first] == [0, 1, 2, 3] and all(c["start"] is None for c in first)
    assert all(c["stop"] == [1, 4] for c in first)  # stage "train" (index 1) after 4 of its epochs
    second = {c["member"]: c for c in feed(pop, {})}
    worst = second[2]  # 0.2 is the worst; 0.9 (member 1) the best, and the only one of the best quarter
    assert worst["start"] == entry_name(0, 1) and worst["donor"] == 1
    assert [s["name"] for s in worst["stages"]] == ["train", "train-m2-e4"]
    assert [s["epochs"] for s in worst["stages"]] == [4, 6]
    assert worst["stages"][0]["mix"] == second[1]["stages"][0]["mix"]  # the donor's settings up to the switch
    assert worst["stop"] == [2, 4]  # the new segment's 4th epoch is the stage's 8th
    for m in (0, 1, 3):
        assert second[m]["start"] == entry_name(0, m) and second[m]["donor"] is None
        assert second[m]["stages"] == first[m]["stages"]  # unchanged: they go on as they were
    for config in second.values():
        cur = trial_curriculum(BASE, {"pbt": config}, smoke=False)  # each lineage is a valid curriculum
        assert [s.name for s in cur.stages][0] == "warm" and sum(s.epochs for s in cur.stages[1:]) == 10
        settings = config["segments"][-1]["settings"]
        stage = cur.stages[-1]
        assert stage.mix["polynomial"] == pytest.approx(settings["mix.polynomial"])
        assert stage.lr == settings["lr"] and stage.train_modules == settings["train_modules"]
    last = take(pop)
    assert all(c["stop"] is None for c in last)  # the last generation trains to the end of the curriculum
    assert pop.suggest("after") is None  # its trials are still to report: wait
    complete(pop, last, {m: {r.MEMBER_ENDS: 1.0} for m in range(4)})
    assert pop.suggest("done") == "FINISHED" and {m.outcome for m in pop.members} == {"censored"}


def test_the_recorded_shares_are_the_trained_ones_from_the_first_generation_on():
    """Two mutated shares drawn in [0, 0.9] often sum above 1: the draws are put on the simplex
    before they are recorded, so each member's settings are its curriculum's mix."""
    base = tiny(tasks={"parity": {"kind": "parity"}, "polynomial": {"kind": "polynomial"}, "copy": {"kind": "copy"}},
                stages=[{"name": "train", "mix": {"parity": 1.0}, "epochs": 10}]).model_dump(mode="json")
    pbt = PbtSettings(interval_epochs=4, mutate={"mix.polynomial": Domain(uniform=(0.0, 0.9)),
                                                 "mix.copy": Domain(uniform=(0.0, 0.9))})
    pop = Population(base, pbt, members=16, seed=0, smoke=False)
    generations = [take(pop)]
    complete(pop, generations[0], {m: {r.TARGET_ACC: m / 16} for m in range(16)})
    generations.append(take(pop))
    for config in generations[0] + generations[1]:
        settings = config["segments"][-1]["settings"]
        assert settings["mix.polynomial"] + settings["mix.copy"] <= 1.0 + 1e-12
        mix = trial_curriculum(base, {"pbt": config}, smoke=False).stages[-1].mix
        assert mix["polynomial"] == pytest.approx(settings["mix.polynomial"], abs=1e-12)
        assert mix["copy"] == pytest.approx(settings["mix.copy"], abs=1e-12)


def test_the_population_ends_with_the_generation_where_a_member_reaches_the_target():
    pop = Population(BASE, PBT, members=4, seed=0, smoke=False)
    feed(pop, {2: {r.REACHED: 1.0, r.MEMBER_ENDS: 1.0, r.TARGET_ACC: 1.0}, 3: {r.TARGET_ACC: 0.4}})
    assert pop.done and pop.suggest("x") == "FINISHED"
    assert [m.outcome for m in pop.members] == ["stopped", "stopped", "reached", "stopped"]


def test_members_that_fail_or_diverge_leave_and_the_rest_go_on():
    pop = Population(BASE, PBT, members=4, seed=0, smoke=False)
    assert len(feed(pop, {0: {r.DIVERGED: 1.0, r.MEMBER_ENDS: 1.0}})) == 4
    second = take(pop)
    assert [c["member"] for c in second] == [1, 2, 3]
    pop.on_trial_complete("t1-0", None, error=True)  # a trial that failed for good reports no result
    pop.on_trial_complete("unknown", {r.TARGET_ACC: 1.0})  # not one of the searcher's: ignored
    for trial in ("t1-1", "t1-2"):
        assert pop.generation == 1  # the generation ends with its last trial
        pop.on_trial_complete(trial, {r.TARGET_ACC: 0.5, r.MEMBER_ENDS: 0.0})
    assert [m.outcome for m in pop.members] == ["diverged", "failed", "", ""]
    assert pop.generation == 2 and [c["member"] for c in take(pop)] == [2, 3]


def test_decisions_depend_on_the_seed_alone_and_survive_a_save_and_restore(tmp_path):
    def run(seed, restore_at=None):
        pop = Population(BASE, PBT, members=4, seed=seed, smoke=False)
        out = []
        for g in range(2):
            if g == restore_at:
                pop.save(str(tmp_path / "state.pkl"))
                pop = Population(BASE, PBT, members=4, seed=seed + 99, smoke=False)  # restored over another
                pop.restore(str(tmp_path / "state.pkl"))
            out.append(feed(pop, {m: {r.TARGET_ACC: 0.1 * m} for m in range(4)}))
        return out

    assert run(0) == run(0) == run(0, restore_at=1)
    assert run(0) != run(1)


def test_smoke_size_compares_every_epoch_of_the_cut_stage():
    pop = Population(BASE, PBT, members=4, seed=0, smoke=True)
    assert pop.epochs == 2 and pop.boundaries == [1, 2]


def test_entries_no_trial_can_start_from_are_deleted_when_the_searcher_is_saved(tmp_path):
    """Each generation leaves one entry a member; keeping them all grows the folder by a
    population's states every interval. What a restore from the last two saves needs stays."""
    folder = tmp_path / "population"
    folder.mkdir()
    pbt = PbtSettings(interval_epochs=2, quantile=0.25, mutate=PBT.mutate)  # 5 generations of 4 members
    pop = Population(BASE, pbt, members=4, seed=0, smoke=False, folder=str(folder))
    saves = []
    for generation in range(4):
        configs = take(pop)
        assert all((folder / f"{c['start']}.pt").is_file() for c in configs if c["start"])  # none pruned too early
        for c in configs:
            (folder / f"{c['entry']}.pt").write_bytes(b"state")  # what each trial leaves
            pop.save(str(tmp_path / f"state-{generation}-{c['member']}.pkl"))  # Tune saves as trials end
            saves.append(tmp_path / f"state-{generation}-{c['member']}.pkl")
        complete(pop, configs, {m: {r.TARGET_ACC: 0.1 * m} for m in range(4)})
        pop.save(str(tmp_path / f"state-{generation}.pkl"))
        saves.append(tmp_path / f"state-{generation}.pkl")
    left = sorted(p.stem for p in folder.iterdir())
    # what generation 3 started from (the save before the last one) and what generation 4 starts from
    assert left == sorted({c["start"] for c in configs} | {c["start"] for c in take(pop)})
    assert len(left) < 8 and all(name >= entry_name(2, 0) for name in left)  # of the 16 written
    for state in saves[-2:]:  # a restore from either of the last two saves finds what it starts from
        restored = Population(BASE, pbt, members=4, seed=0, smoke=False)
        restored.restore(str(state))
        assert all((folder / f"{c['start']}.pt").is_file() for c in take(restored) if c["start"])
    restored.save(str(tmp_path / "after-restore.pkl"))  # the first save after a restore deletes nothing
    assert sorted(p.stem for p in folder.iterdir()) == left


def test_a_generation_that_failed_before_reporting_keeps_the_members_lineage():
    """Member 0's generation 1 failed before its first report (Ray's result holds only its
    config): the row keeps generation 0's outcome and lineage FLOPs, so nothing it trained is
    lost from the search's accounting and no forked FLOPs come out negative."""
    from ray.tune import Result

    def config(generation: int) -> dict:
        return {"pbt": {"member": 0, "generation": generation, "segments": [{"settings": {"optim.lr": 1e-3}}]}}

    first = Result(metrics={"config": config(0), "training_iteration": 3, r.FLOPS_SEEDS: 1.5e9,
                            r.FLOPS_FORKED: 0.0, r.REACHED: 0.0, r.COMPUTE_TO_TARGET: 6.3e9,
                            r.TARGET_ACC: 0.1875, r.FLOPS: 1.5e9}, checkpoint=None, error=None, path="g0")
    failed = Result(metrics={"config": config(1)}, checkpoint=None, error=RuntimeError("entry unreadable"),
                    path="g1")
    (row,) = member_rows([first, failed], {}, ["optim.lr"])
    assert row["status"] == "ERROR" and row["generations"] == 2
    assert (row[r.FLOPS_SEEDS], row[r.FLOPS_FORKED]) == (1.5e9, 0.0)
    assert (row[r.REACHED], row[r.COMPUTE_TO_TARGET], row[r.TARGET_ACC]) == (0.0, 6.3e9, 0.1875)


def member_result(member: int, generation: int, error: Exception | None = None, **metrics) -> Result:
    """What Tune's result grid holds for one member's trial of one generation: its last report."""
    trial = f"m{member}g{generation}"
    config = {"pbt": {"member": member, "generation": generation, "segments": [{"settings": {"lr": 1e-3}}]}}
    return Result(metrics={"config": config, "trial_id": trial, "training_iteration": 2, r.FLOPS_SEEDS: 1e9,
                           r.FLOPS_FORKED: 0.0, r.REACHED: 0.0, r.COMPUTE_TO_TARGET: 5e9, r.TARGET_ACC: 0.5,
                           r.FLOPS: 1e9, r.MEMBER_ENDS: 0.0, **metrics}, checkpoint=None, error=error, path=trial)


def test_members_the_stop_cut_are_unfinished_and_those_whose_training_ended_are_not():
    """A search stopped in generation 1 where member 0 reached the target: the population ends
    with that generation, so member 1, whose generation-1 trial ended, is done; member 2's trial
    was cut mid-interval; member 3's trial ended before a resume (Tune's saved state says so, its
    report does not). Stopped in a generation where none reached, a member whose interval ended
    still has its next generation to train; one that diverged is done."""
    from iterhead.search.outcome import print_summary

    at_end = {r.TRIAL_ENDS: 1.0}
    reached = [member_result(0, 0, **at_end), member_result(0, 1, **at_end, **{r.REACHED: 1.0, r.MEMBER_ENDS: 1.0}),
               member_result(1, 0, **at_end), member_result(1, 1, **at_end),
               member_result(2, 0, **at_end), member_result(2, 1),
               member_result(3, 0, **at_end), member_result(3, 1)]
    rows = member_rows(reached, {}, ["lr"], finished={"m3g1"})
    assert [row["status"] for row in rows] == ["TERMINATED", "TERMINATED", "UNFINISHED", "TERMINATED"]
    diverged = {r.DIVERGED: 1.0, r.MEMBER_ENDS: 1.0}
    none_reached = [member_result(0, 0, **at_end), member_result(1, 0, **at_end, **diverged),
                    member_result(2, 0, **at_end), member_result(2, 1, **at_end),
                    member_result(3, 0, **at_end), member_result(3, 1, RuntimeError("died"))]
    rows = member_rows(none_reached, {}, ["lr"])
    assert [row["status"] for row in rows] == ["UNFINISHED", "TERMINATED", "UNFINISHED", "ERROR"]
    out = io.StringIO()
    print_summary(rows, ["lr"], out, what="members")
    lines = {line.split(" | ")[0].strip(): line for line in out.getvalue().splitlines() if "member-" in line}
    assert lines["member-0"].endswith("| no | unfinished") and lines["member-2"].endswith("| no | unfinished")
    assert lines["member-1"].endswith("(censored)") and lines["member-3"].endswith("| no | failed")


def test_a_search_stopped_between_generations_has_not_run_to_its_end():
    """Ctrl-C after generation 0's last trial ended and before Tune made generation 1's: every
    trial ended, but the members have more to train. A search whose population ended (a member
    reached the target) has run to its end."""
    from iterhead.search.outcome import ran_to_end, trials_ended

    at_end = {r.TRIAL_ENDS: 1.0}
    between = [member_result(m, 0, **at_end) for m in range(4)]
    assert trials_ended(between) and not ran_to_end(member_rows(between, {}, ["lr"]))
    over = [*between[1:], member_result(0, 0, **at_end, **{r.REACHED: 1.0, r.MEMBER_ENDS: 1.0})]
    assert trials_ended(over) and ran_to_end(member_rows(over, {}, ["lr"]))
