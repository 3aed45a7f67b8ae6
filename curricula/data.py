"""Per-task train and test sets, made in memory from the curriculum seed.

A sequence is ``[task, x_1 .. x_L, EoI, s_1 .. s_L]`` with chain of thought, or
``[task, x_1 .. x_L, EoI, s_L]`` without, right-padded with EoS. Input position i predicts
token i + 1, so the answer is predicted at input positions ``L+1 .. L+answer_len``.

Each (task, length, split) draws from its own random stream, derived from the curriculum
seed and the task's spec only: adding a task, a stage or a length never changes the data
another trial sees.

Splits: ``iid`` draws train and test independently (the paper's setup; at short lengths the
input space is tiny, parity has 2^L inputs, so most test inputs also occur in training and
test accuracy there measures memorisation as much as generalisation). ``disjoint`` keeps
every test input out of training: where the space is small it is partitioned between test
and train in proportion to their sizes, and each set is drawn from its own part.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from iterhead.curricula.schema import Curriculum, make_task
from iterhead.curricula.tasks import Task
from iterhead.curricula.vocab import Vocab

SPLITS = ("train", "test")


def vocab_for(cur: Curriculum) -> Vocab:
    """The vocabulary a curriculum's tasks need."""
    n_symbols = max(make_task(spec).n_symbols for spec in cur.tasks.values())
    return Vocab(n_symbols=n_symbols, task_names=tuple(cur.tasks))


def seq_len(length, cot: bool):
    """Tokens in a sequence of input length `length`, padding excluded."""
    return 2 * length + 2 if cot else length + 3


def answer_len(length, cot: bool):
    return length if cot else 1


@dataclass(frozen=True)
class TaskSplit:
    """One task's sequences for one split, ordered by length (the same count at each length)."""

    task: str
    tokens: np.ndarray  # int64 [n, seq_len(max_len)], EoS-padded
    lengths: np.ndarray  # int64 [n]


def first_per_len(split: TaskSplit, n: int) -> TaskSplit:
    """The first `n` rows of each length (rows are drawn at random, so a fair sample of them)."""
    keep = np.concatenate([np.flatnonzero(split.lengths == length)[:n] for length in np.unique(split.lengths)])
    return TaskSplit(split.task, split.tokens[keep], split.lengths[keep])


def stream(seed: int, *labels: object) -> np.random.Generator:
    """A random stream derived from the root seed and stable labels (never Python's hash)."""
    digest = hashlib.sha256(json.dumps(labels, sort_keys=True, default=str).encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def render(task: Task, task_token: int, x: np.ndarray, vocab: Vocab, cot: bool, width: int) -> np.ndarray:
    """Token rows for inputs `x` [n, L], padded with EoS to `width`."""
    n, length = x.shape
    states = task.solve(x)
    answer = states if cot else states[:, -1:]
    rows = np.full((n, width), vocab.eos, dtype=np.int64)
    rows[:, 0] = task_token
    rows[:, 1:length + 1] = x
    rows[:, length + 1] = vocab.eoi
    rows[:, length + 2:length + 2 + answer.shape[1]] = answer
    return rows


def _keys(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(x, dtype=np.int64)]


def _draw_disjoint(task: Task, rng: np.random.Generator, length: int, n_train: int, n_test: int):
    """Train and test inputs with no test input in train."""
    space = task.input_space(length)
    if space <= 4 * (n_train + n_test):
        alphabet = task.alphabet()
        grid = np.stack(np.meshgrid(*([alphabet] * length), indexing="ij"), -1).reshape(-1, length)
        grid = grid[rng.permutation(len(grid))]
        n_test_part = min(len(grid) - 1, max(1, round(len(grid) * n_test / (n_train + n_test))))
        test_part, train_part = grid[:n_test_part], grid[n_test_part:]
        test = test_part[rng.integers(0, len(test_part), n_test)]
        train = train_part[rng.integers(0, len(train_part), n_train)]
        return train, test
    test = task.sample(rng, length, n_test)
    seen = set(_keys(test))
    train = task.sample(rng, length, n_train)
    while True:
        clash = np.array([k in seen for k in _keys(train)])
        if not clash.any():
            return train, test
        train[clash] = task.sample(rng, length, int(clash.sum()))


def build_task(cur: Curriculum, name: str, vocab: Vocab) -> dict[str, TaskSplit]:
    """Train and test sets of one task, keyed by split."""
    spec = cur.tasks[name]
    task = make_task(spec)
    d = cur.data
    width = seq_len(d.max_len, d.cot)
    counts = {"train": d.train_per_len, "test": d.test_per_len}
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    label = spec.model_dump(mode="json")
    for length in range(d.min_len, d.max_len + 1):
        if d.split == "disjoint":
            rng = stream(cur.seed, "data", label, length, "disjoint")
            drawn = dict(zip(SPLITS, _draw_disjoint(task, rng, length, counts["train"], counts["test"])))
        else:
            drawn = {s: task.sample(stream(cur.seed, "data", label, length, s), length, counts[s])
                     for s in SPLITS}
        for s in SPLITS:
            parts[s].append(render(task, vocab.task_token(name), drawn[s], vocab, d.cot, width))
    lengths = np.arange(d.min_len, d.max_len + 1)
    return {s: TaskSplit(name, np.concatenate(parts[s]), np.repeat(lengths, counts[s]))
            for s in SPLITS}


def build_data(cur: Curriculum) -> tuple[Vocab, dict[str, dict[str, TaskSplit]]]:
    """The vocabulary and every task's splits: ``data[split][task]``."""
    vocab = vocab_for(cur)
    by_task = {name: build_task(cur, name, vocab) for name in cur.tasks}
    return vocab, {s: {name: by_task[name][s] for name in cur.tasks} for s in SPLITS}
