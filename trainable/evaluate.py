"""Exact-match accuracy per task and per length on the test set, in large no-grad chunks.

A sequence counts as correct when the argmax prediction (teacher forcing) equals every
answer token s_1 .. s_L (only s_L without chain of thought). `acc/<task>` is the mean over
lengths, each length weighted equally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from iterhead.curricula.data import TaskSplit, answer_len, seq_len


@dataclass
class EvalTable:
    """All tasks' test rows on the device, ordered by length so each length is one slice."""

    tokens: torch.Tensor  # [n, width]
    tasks: np.ndarray  # task index of each row
    lengths: np.ndarray  # input length of each row
    task_names: tuple[str, ...]
    cot: bool

    @classmethod
    def build(cls, splits: dict[str, TaskSplit], cot: bool, device: torch.device) -> "EvalTable":
        names = tuple(splits)
        tokens = np.concatenate([splits[n].tokens for n in names])
        tasks = np.concatenate([np.full(len(splits[n].lengths), i) for i, n in enumerate(names)])
        lengths = np.concatenate([splits[n].lengths for n in names])
        order = np.lexsort((tasks, lengths))
        return cls(torch.from_numpy(tokens[order]).to(device), tasks[order], lengths[order], names, cot)

    def slices(self) -> list[tuple[int, int, int]]:
        """(length, start, stop) of each length's rows."""
        values, starts = np.unique(self.lengths, return_index=True)
        stops = list(starts[1:]) + [len(self.lengths)]
        return [(int(v), int(a), int(b)) for v, a, b in zip(values, starts, stops)]


@torch.no_grad()
def correct_rows(model: torch.nn.Module, table: EvalTable, chunk_tokens: int = 2**19) -> np.ndarray:
    """Per-row exact match as a bool array; one device-to-host copy at the end."""
    was_training = model.training
    model.eval()
    correct = torch.empty(len(table.lengths), dtype=torch.bool, device=table.tokens.device)
    for length, lo, hi in table.slices():
        n_in = seq_len(length, table.cot) - 1
        start, n_ans = length + 1, answer_len(length, table.cot)
        step = max(1, chunk_tokens // n_in)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            rows = table.tokens[a:b]
            logits = model(rows[:, :n_in], q_start=start)
            target = rows[:, start + 1:start + 1 + n_ans]
            correct[a:b] = (logits[:, :n_ans].argmax(-1) == target).all(dim=1)
    model.train(was_training)
    return correct.cpu().numpy()


def accuracy_metrics(table: EvalTable, correct: np.ndarray) -> dict[str, float]:
    """``acc/<task>`` (mean over lengths) and ``acc/<task>/len_<L>``."""
    out: dict[str, float] = {}
    for t, name in enumerate(table.task_names):
        per_len = []
        for length in np.unique(table.lengths):
            sel = (table.tasks == t) & (table.lengths == length)
            value = float(correct[sel].mean())
            out[f"acc/{name}/len_{int(length)}"] = value
            per_len.append(value)
        out[f"acc/{name}"] = float(np.mean(per_len))
    return out
