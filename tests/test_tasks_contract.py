"""One contract every task passes: determinism, ids in range, reference targets, loss mask."""

from __future__ import annotations

import numpy as np
import pytest

from iterhead.curricula.data import build_data, seq_len
from iterhead.curricula.schema import make_task
from iterhead.trainable.loop import Trainer

from support import tiny

TASKS = {
    "parity": {"kind": "parity"},
    "polynomial": {"kind": "polynomial", "modulus": 11},
    "polynomial7": {"kind": "polynomial", "modulus": 7},
    "copy": {"kind": "copy"},
}


@pytest.fixture(params=[(name, cot) for name in TASKS for cot in (True, False)],
                ids=lambda p: f"{p[0]}-{'cot' if p[1] else 'nocot'}")
def case(request):
    name, cot = request.param
    cur = tiny(tasks={name: TASKS[name]}, target={"task": name},
               data={"min_len": 1, "max_len": 6, "train_per_len": 40, "test_per_len": 20, "cot": cot},
               stages=[{"name": "only", "mix": {name: 1.0}, "epochs": 1}])
    return cur, name


class TestTaskContract:
    def test_deterministic(self, case):
        cur, name = case
        _, a = build_data(cur)
        _, b = build_data(cur)
        for split in ("train", "test"):
            np.testing.assert_array_equal(a[split][name].tokens, b[split][name].tokens)

    def test_seed_changes_data(self, case):
        cur, name = case
        _, a = build_data(cur)
        _, b = build_data(cur.model_copy(update={"seed": 1}))
        assert not np.array_equal(a["train"][name].tokens, b["train"][name].tokens)

    def test_ids_in_range(self, case):
        cur, name = case
        vocab, data = build_data(cur)
        for split in ("train", "test"):
            tokens = data[split][name].tokens
            assert tokens.min() >= 0 and tokens.max() < vocab.size

    def test_layout_and_targets_match_reference(self, case):
        cur, name = case
        vocab, data = build_data(cur)
        task = make_task(cur.tasks[name])
        for split in ("train", "test"):
            s = data[split][name]
            for row, length in zip(s.tokens, s.lengths):
                length = int(length)
                x = [int(v) for v in row[1:length + 1]]
                assert row[0] == vocab.task_token(name)
                assert row[length + 1] == vocab.eoi
                assert set(x) <= set(int(v) for v in task.alphabet())
                states = task.reference(x)
                answer = states if cur.data.cot else states[-1:]
                n = seq_len(length, cur.data.cot)
                assert [int(v) for v in row[length + 2:n]] == answer
                assert (row[n:] == vocab.eos).all()

    def test_loss_mask_covers_exactly_the_answer(self, case):
        cur, name = case
        trainer = Trainer(cur)
        tokens = trainer.train_tokens.numpy()
        mask = trainer.train_mask.numpy()
        for row, m in zip(tokens, mask):
            eoi = int(np.flatnonzero(row == trainer.vocab.eoi)[0])
            length = eoi - 1
            predicted = {i + 1 for i in np.flatnonzero(m)}  # input position i predicts token i+1
            answer = set(range(eoi + 1, seq_len(length, cur.data.cot)))
            assert predicted == answer


def test_data_depends_only_on_seed_and_task_spec():
    """Adding a task or changing the stages never changes another task's sequences."""
    one = tiny(tasks={"parity": {"kind": "parity"}},
               stages=[{"name": "s", "mix": {"parity": 1}, "epochs": 1}])
    two = tiny()
    (va, a), (vb, b) = build_data(one), build_data(two)
    assert va.size != vb.size  # the vocabulary grows with the polynomial task ...
    for split in ("train", "test"):  # ... but the sequences, read as names, stay the same
        names_a = [[va.name_of(int(t)) for t in row[1:]] for row in a[split]["parity"].tokens]
        names_b = [[vb.name_of(int(t)) for t in row[1:]] for row in b[split]["parity"].tokens]
        assert names_a == names_b


def test_disjoint_split_keeps_test_inputs_out_of_training():
    cur = tiny(data={"min_len": 1, "max_len": 9, "train_per_len": 64, "test_per_len": 32,
                     "cot": True, "split": "disjoint"})
    _, data = build_data(cur)
    for name in cur.tasks:
        train, test = data["train"][name], data["test"][name]
        for length in range(1, 10):
            tr = {r[1:length + 1].tobytes() for r in train.tokens[train.lengths == length]}
            te = {r[1:length + 1].tobytes() for r in test.tokens[test.lengths == length]}
            assert tr and te and not (tr & te), (name, length)
