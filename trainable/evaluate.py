"""Exact-match accuracy per task and per length on the test set.

A sequence counts as correct when the argmax prediction (teacher forcing) equals every
answer token s_1 .. s_L (only s_L without chain of thought). `acc/<task>` is the mean over
lengths, each length weighted equally.

Speed, none of which changes what is scored:

- rows are grouped by length and trimmed to it, so no position is padding;
- identical rows (frequent at short lengths: parity has only 2^L inputs) are run once and
  their verdict is shared; every test row still counts;
- the last block and the head run only from the first answer position (`q_start`);
- the first block's attention inputs depend on (token, position) alone: they are computed
  once per evaluation for the whole vocabulary and gathered (`Transformer.first_table`);
- rows of every length that begin with the same P tokens (parity: 2^(P-1) prefixes per
  task) share the later blocks' work on them (`EvalTable.prefixes`, `Transformer.prefix_past`);
- on a CPU, chunks of a few thousand tokens keep the activations in cache (larger chunks
  spend their time moving memory); on CUDA, large chunks keep the device busy.

All of it stays float32. The table and the prefixes change the order of some float32 sums,
as a different chunk size does, so a logit can move by rounding and only an exact tie could
change a verdict (`tests/test_evaluate.py` checks against a plain full forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from iterhead.curricula.data import TaskSplit, answer_len, seq_len
from iterhead.trainable.model import Transformer


CPU_CHUNK_TOKENS = 2**13  # measured on a 2-core EPYC: 2^12 .. 2^14 tie, 2^15 and above are slower
CUDA_CHUNK_TOKENS = 2**19


@dataclass(frozen=True)
class LengthGroup:
    """One length's distinct rows, trimmed to the length, and where each test row points."""

    length: int
    inputs: torch.Tensor  # [distinct, seq_len - 1]: what the model reads
    targets: torch.Tensor  # [distinct, answer_len]: the answer tokens
    inverse: torch.Tensor  # [rows of this length]: index of each row's distinct row
    lo: int  # this length's rows are table rows lo .. hi - 1
    hi: int
    prefix: torch.Tensor | None = None  # [distinct]: row of `EvalTable.prefixes` each begins with


@dataclass
class EvalTable:
    """All tasks' test rows on the device, ordered by length so each length is one slice."""

    tokens: torch.Tensor  # [n, width], EoS-padded
    tasks: np.ndarray  # task index of each row
    lengths: np.ndarray  # input length of each row
    task_names: tuple[str, ...]
    cot: bool
    groups: list[LengthGroup] = field(default_factory=list)
    prefixes: torch.Tensor | None = None  # [n, P]: the distinct first P tokens that rows share

    @classmethod
    def build(cls, splits: dict[str, TaskSplit], cot: bool, device: torch.device) -> "EvalTable":
        names = tuple(splits)
        tokens = np.concatenate([splits[n].tokens for n in names])
        tasks = np.concatenate([np.full(len(splits[n].lengths), i) for i, n in enumerate(names)])
        lengths = np.concatenate([splits[n].lengths for n in names])
        order = np.lexsort((tasks, lengths))
        tokens, tasks, lengths = tokens[order], tasks[order], lengths[order]
        table = cls(torch.from_numpy(tokens).to(device), tasks, lengths, names, cot)
        for length, lo, hi in table.slices():
            start, n_ans = length + 1, answer_len(length, cot)
            rows, inverse = np.unique(tokens[lo:hi, :seq_len(length, cot)], axis=0, return_inverse=True)
            table.groups.append(LengthGroup(
                length,
                torch.from_numpy(np.ascontiguousarray(rows[:, :-1])).to(device),
                torch.from_numpy(np.ascontiguousarray(rows[:, start + 1:start + 1 + n_ans])).to(device),
                torch.from_numpy(inverse.reshape(-1)).to(device), lo, hi))
        table._share_prefixes()
        return table

    def _share_prefixes(self, min_share: float = 0.05) -> None:
        """Pick the prefix length P that saves the most positions, if it saves `min_share`
        of them (the first block is not counted: its attention inputs come from a table).

        Rows whose input has at least P - 1 symbols begin with one of few P-token prefixes
        when the alphabet is small (parity: 2^(P-1) per task, for every longer length), so
        the blocks after the first run those positions once per distinct prefix."""
        rows = [g.inputs.cpu().numpy() for g in self.groups]
        base = int(max(r.max() for r in rows)) + 1
        codes = [np.zeros(len(r), dtype=np.int64) for r in rows]  # id of each row's first p tokens
        ids_at: dict[int, list[np.ndarray]] = {}
        best, best_saved = 0, min_share * sum(r.size for r in rows)
        for p in range(1, int(max(self.lengths)) + 2):  # P tokens: task, x_1 .. x_{P-1}; P <= L + 1
            live = [i for i, g in enumerate(self.groups) if p <= g.length + 1]
            keys = np.concatenate([codes[i] * base + rows[i][:, p - 1] for i in live])
            distinct, inverse = np.unique(keys, return_inverse=True)
            parts = np.split(inverse.reshape(-1), np.cumsum([len(rows[i]) for i in live])[:-1])
            for i, part in zip(live, parts):
                codes[i] = part
            saved = (len(keys) - len(distinct)) * p
            if saved > best_saved and 2 * len(distinct) <= len(keys):  # the cache stays small
                best, best_saved, ids_at[p] = p, saved, parts
        if not best:
            return
        live = [i for i, g in enumerate(self.groups) if best <= g.length + 1]
        prefixes = np.empty((int(max(part.max() for part in ids_at[best])) + 1, best), dtype=rows[0].dtype)
        device = self.tokens.device
        for i, part in zip(live, ids_at[best]):
            prefixes[part] = rows[i][:, :best]
            g = self.groups[i]
            self.groups[i] = LengthGroup(g.length, g.inputs, g.targets, g.inverse, g.lo, g.hi,
                                         torch.from_numpy(part).to(device))
        self.prefixes = torch.from_numpy(prefixes).to(device)

    def slices(self) -> list[tuple[int, int, int]]:
        """(length, start, stop) of each length's rows."""
        values, starts = np.unique(self.lengths, return_index=True)
        stops = list(starts[1:]) + [len(self.lengths)]
        return [(int(v), int(a), int(b)) for v, a, b in zip(values, starts, stops)]


def default_chunk_tokens(device: torch.device) -> int:
    return CUDA_CHUNK_TOKENS if device.type == "cuda" else CPU_CHUNK_TOKENS


@torch.no_grad()  # inference_mode was no faster, and its tensors (cached masks) are restricted later
def correct_rows(model: torch.nn.Module, table: EvalTable, chunk_tokens: int | None = None) -> np.ndarray:
    """Per-row exact match as a bool array; one device-to-host copy at the end.

    fp32 on purpose, whatever precision trained the model: bf16 autocast moved row margins
    by up to 13% of the row's largest |logit| and flipped verdicts on trained models, so it
    would change what is scored."""
    device = table.tokens.device
    chunk_tokens = chunk_tokens or default_chunk_tokens(device)
    was_training = model.training
    model.eval()
    first = {"first": model.first_table()} if isinstance(model, Transformer) else {}
    past = _prefix_past(model, table, first, chunk_tokens)
    correct = torch.empty(len(table.lengths), dtype=torch.bool, device=device)
    for g in table.groups:
        start, step = g.length + 1, max(1, chunk_tokens // g.inputs.shape[1])
        distinct = torch.empty(len(g.inputs), dtype=torch.bool, device=device)
        for a in range(0, len(g.inputs), step):
            shared = {}
            if past is not None and g.prefix is not None:
                ids = g.prefix[a:a + step]
                shared["past"] = [(k.index_select(0, ids), v.index_select(0, ids)) for k, v in past]
            logits = model(g.inputs[a:a + step], q_start=start, **first, **shared)
            distinct[a:a + step] = (logits.argmax(-1) == g.targets[a:a + step]).all(dim=1)
        correct[g.lo:g.hi] = distinct[g.inverse]
    model.train(was_training)
    return correct.cpu().numpy()


def _prefix_past(model: torch.nn.Module, table: EvalTable, first: dict[str, torch.Tensor],
                 chunk_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Blocks 1 ..'s keys and values on the table's shared prefixes, or None where they do
    not apply: no shared prefix, one block, or a hook attached (hooks see whole rows)."""
    if table.prefixes is None or not first or len(model.blocks) < 2 or \
            any(b.attn.hook_pattern.active for b in model.blocks):
        return None
    step = max(1, chunk_tokens // table.prefixes.shape[1])
    parts = [model.prefix_past(table.prefixes[a:a + step], first["first"])
             for a in range(0, len(table.prefixes), step)]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def accuracy_metrics(table: EvalTable, correct: np.ndarray, prefix: str = "acc/") -> dict[str, float]:
    """``acc/<task>`` (mean over lengths) and ``acc/<task>/len_<L>`` (or under another prefix)."""
    out: dict[str, float] = {}
    for t, name in enumerate(table.task_names):
        per_len = []
        for length in np.unique(table.lengths):
            sel = (table.tasks == t) & (table.lengths == length)
            value = float(correct[sel].mean())
            out[f"{prefix}{name}/len_{int(length)}"] = value
            per_len.append(value)
        out[f"{prefix}{name}"] = float(np.mean(per_len))
    return out
