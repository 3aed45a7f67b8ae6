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
  spend their time moving memory); on CUDA, large chunks keep the device busy;
- a row is wrong once one answer token is, so the answer positions run in spans (the first
  `FIRST_CUT`, then spans as long as all before them while most rows stop in them, else the
  rest at once) and only the rows right so far go on, from the keys and values kept so far
  (`_verdicts`). A model that has not decided its rows gets most of them wrong within a
  few answer tokens: on the paper configuration after 2 epochs (10% of the rows right) an
  evaluation took 2.36 s instead of 4.81 on a 2-core EPYC, and with every row right to the
  end 5.29 s against 4.95 (`benchmarks/eval_exit.py`, BENCHMARKS.md).

In float32 (``precision="fp32"``), the table, the prefixes and the spans change the order
of some float32 sums, as a different chunk size does, so a logit can move by rounding and
only an exact tie could change a verdict (`tests/test_evaluate.py` checks against a plain
full forward).

In bf16 (``precision="bf16"``, what `eval.precision: bf16` selects: `screened_rows`), a pass
with bf16 matrix products (`bf16_products`) scores every distinct row, and the rows near a
tie run again in float32. The screen is a rule fitted to what was measured, not a bound: it
gave float32's verdicts in every snapshot measured (below), but a logit that is the small
difference of large products can move by more than it allows (a hand-set head whose two
weights of 256 cancel to 0.5 in float32 and to 0 in bf16 scored 54 of its 128 test rows
otherwise, none rescored). bf16 keeps 8 significant bits, and a plain bf16 pass does score
some rows of trained models otherwise than float32 (4 to 127 rows in 9 of the 23 snapshots
of `benchmarks/bf16_eval.py` on a CPU with native bf16; BENCHMARKS.md). A row is rescored
when its bf16 margin (target logit minus the best other, least over its answer positions) is
within `SCREEN` (0.25) of its largest |logit| of zero. In those 23 snapshots every row a
plain bf16 pass scored otherwise had a bf16 margin of at most 0.0038 of its largest |logit|,
66 times below the screen. Margins can move further between the two (0.301 of the largest
|logit| at most), but there far from a tie: the row that moved most went from -21.7 in
float32 to -18.0 in bf16, its largest |logit| 12.1.

The cost is one bf16 pass plus a float32 pass over the rescored rows: 4 to 6% of them once
a model has decided its rows, a quarter to a half while it is undecided. On the one CPU
with native bf16 it was timed on (a 2-core AMD EPYC with AVX-512 bf16) that saved up to
0.02 s of 0.03 to 0.06 on small decided models and was level or slower wherever a quarter
or more of the rows were rescored. On the paper configuration after 2 epochs it took 5.91 s
against float32's 2.43 s with the answer spans (BENCHMARKS.md, `benchmarks/throughput.py`),
so runs evaluate in float32 unless `eval.precision` asks for bf16.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from iterhead.curricula.data import TaskSplit, answer_len, seq_len
from iterhead.trainable.model import Transformer


CPU_CHUNK_TOKENS = 2**13  # measured on a 2-core EPYC: 2^12 .. 2^14 tie, 2^15 and above are slower
CUDA_CHUNK_TOKENS = 2**19  # at most; fewer where a chunk's tensors would pass `CUDA_CHUNK_BYTES`
CUDA_CHUNK_BYTES = 8 * 2**30  # and a quarter of the GPU's memory, which fractional trials share


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


def default_chunk_tokens(device: torch.device, model: torch.nn.Module | None = None) -> int:
    if device.type != "cuda":
        return CPU_CHUNK_TOKENS
    spec = getattr(model, "spec", None)
    if spec is None:
        return CUDA_CHUNK_TOKENS
    memory = torch.cuda.get_device_properties(device).total_memory
    return cuda_chunk_tokens(spec.d_model, spec.n_heads, spec.mlp_ratio, min(CUDA_CHUNK_BYTES, memory // 4))


def cuda_chunk_tokens(d_model: int, n_heads: int, mlp_ratio: int, budget: int) -> int:
    """Tokens a chunk may hold on a GPU for its largest float32 tensors to fit in `budget` bytes.
    A token holds a first-block table row ((2 + heads) x d_model, `Transformer._gather`), the
    attention output per head before their sum (heads x d_model) and the MLP's and residual
    stream's activations: at the paper's width `CUDA_CHUNK_TOKENS` take 3.7 GB, but at
    d_model 768 with 12 heads they would take 58 GB."""
    per_token = 4 * d_model * (2 + 2 * n_heads + mlp_ratio + 6)
    return max(2**10, min(CUDA_CHUNK_TOKENS, budget // per_token))


SCREEN = 0.25  # a bf16 verdict stands when |margin| > SCREEN x the row's largest |logit| (module docstring)


@torch.no_grad()  # inference_mode was no faster, and its tensors (cached masks) are restricted later
def correct_rows(model: torch.nn.Module, table: EvalTable, chunk_tokens: int | None = None,
                 precision: str = "fp32") -> np.ndarray:
    """Per-row exact match as a bool array. The host waits on the device only for the count
    of rows that go on after each answer span, and for the copy at the end.

    ``fp32`` runs every row in float32. ``bf16`` (`screened_rows`) scores a bf16 pass and
    runs the rows near a tie again in float32: float32's verdicts wherever it was measured,
    by a fitted screen, not a bound (module docstring)."""
    if precision == "bf16":
        return screened_rows(model, table, chunk_tokens)[0]
    if precision != "fp32":
        raise ValueError(f"an evaluation runs in fp32 or bf16, not {precision!r}")
    verdicts = _distinct_flags(table)
    _score(model, table, chunk_tokens or default_chunk_tokens(table.tokens.device, model), verdicts)
    return spread_rows(table, verdicts)


@torch.no_grad()
def screened_rows(model: torch.nn.Module, table: EvalTable,
                  chunk_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """`correct_rows` from a bf16 pass (`bf16_products`), and how many distinct rows were rescored.

    A distinct row whose bf16 margin (`row_margins`) is within `SCREEN` of its largest
    |logit| of zero, or not finite, runs again in float32 and that verdict counts."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(table.tokens.device, model)
    with bf16_products(model):
        margins = row_margins(model, table, chunk_tokens)
    verdicts, again = [], {}
    for gi, (margin, scale) in enumerate(margins):
        verdicts.append(margin > 0)
        again[gi] = (~(margin.abs() > SCREEN * scale)).nonzero().squeeze(1)  # NaN is unsure
    rescored = sum(len(ids) for ids in again.values())
    if rescored:
        _score(model, table, chunk_tokens, verdicts, again)
    return spread_rows(table, verdicts), rescored


def _score(model: torch.nn.Module, table: EvalTable, chunk_tokens: int, verdicts: list[torch.Tensor],
           only: dict[int, torch.Tensor] | None = None) -> None:
    """Set each distinct row's verdict (or `only` these rows' per group): its argmax matches
    every answer token."""
    with _eval_mode(model):
        for gi, ids, inputs, shared in _chunks(model, table, chunk_tokens, only):
            g = table.groups[gi]
            verdicts[gi][ids] = _verdicts(model, inputs, g.targets.index_select(0, ids), g.length + 1, shared)


def _hooked(model: Transformer) -> bool:
    """Whether a hook watches an attention pattern: hooks see whole rows, so the shortcuts
    that split rows (spans, shared prefixes) stand aside."""
    return any(b.attn.hook_pattern.active for b in model.blocks)


FIRST_CUT = 4  # answer positions every row runs before its first exit (2 and 8 were slower on the paper config)


def _verdicts(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, start: int,
              shared: dict) -> torch.Tensor:
    """Whether each row's argmax matches every answer token, stopping rows at their first miss.

    The answer positions run in spans (the first `FIRST_CUT`, then each as long as all before
    it, or all the rest once most rows carry on). A row with a wrong token in a span is wrong
    whatever follows, so only the others continue, from the keys and values kept so far
    (`Transformer.forward(keep_past=)`). Causal attention makes each kept position what one
    pass over the whole row computes."""
    n = targets.shape[1]
    if "first" not in shared or n <= FIRST_CUT or _hooked(model):
        return (model(inputs, q_start=start, **shared).argmax(-1) == targets).all(dim=1)
    ok = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    alive = torch.arange(len(inputs), device=inputs.device)
    past, lo, hi = shared.get("past"), 0, FIRST_CUT
    while len(alive):
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = model(inputs[:, :start + hi].index_select(0, alive), q_start=start + lo,
                       first=shared["first"], past=past, keep_past=kept if hi < n else None)
        good = (logits.argmax(-1) == targets[:, lo:hi].index_select(0, alive)).all(dim=1)
        if hi == n:
            ok[alive[good]] = True
            break
        at = good.nonzero().squeeze(1)
        # Another span pays when most rows stop in it; when most carry on, the rest in one go
        # costs the least (each span re-reads the kept keys and values and runs smaller products).
        hi_next = n if 2 * len(at) > len(alive) else min(n, 2 * hi)
        alive, lo, hi = alive.index_select(0, at), hi, hi_next
        past = [(k.index_select(0, at), v.index_select(0, at)) for k, v in kept] if kept else None
    return ok


@contextmanager
def bf16_products(model: torch.nn.Module) -> Iterator[None]:
    """bf16 autocast (the matrix products in bf16; the residual stream and the layer norms
    stay fp32), with the explicit attention on a CPU, where PyTorch's flash attention is slow
    in bf16 (`mixed.py`). The weights are not touched."""
    device = next(model.parameters()).device
    blocks = list(model.blocks) if isinstance(model, Transformer) else []
    fused = [b.attn.fused for b in blocks]
    if device.type == "cpu":
        for b in blocks:
            b.attn.fused = False
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for b, on in zip(blocks, fused):
            b.attn.fused = on


@torch.no_grad()
def row_margins(model: torch.nn.Module, table: EvalTable,
                chunk_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per length group, each distinct row's margin (target logit minus the best other, least
    over its answer positions; above 0 is a correct row) and its largest |logit|, in float32
    from logits in the model's own dtype."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(table.tokens.device, model)
    out = [(torch.empty(len(g.inputs), device=g.inputs.device), torch.empty(len(g.inputs), device=g.inputs.device))
           for g in table.groups]
    with _eval_mode(model):
        for gi, ids, logits in _answer_logits(model, table, chunk_tokens):
            logits, targets = logits.float(), table.groups[gi].targets[ids].unsqueeze(-1)
            own = logits.gather(-1, targets).squeeze(-1)
            best_other = logits.scatter(-1, targets, float("-inf")).amax(-1)
            out[gi][0][ids] = (own - best_other).amin(dim=1)
            out[gi][1][ids] = logits.abs().flatten(1).amax(dim=1)
    return out


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _distinct_flags(table: EvalTable) -> list[torch.Tensor]:
    """One bool per distinct row of each length group."""
    return [torch.zeros(len(g.inputs), dtype=torch.bool, device=table.tokens.device) for g in table.groups]


def spread_rows(table: EvalTable, values: list[torch.Tensor]) -> np.ndarray:
    """Each test row's value (a verdict, a margin) from its distinct row's, one list entry
    per length group."""
    out = torch.empty(len(table.lengths), dtype=values[0].dtype, device=table.tokens.device)
    for g, distinct in zip(table.groups, values):
        out[g.lo:g.hi] = distinct[g.inverse]
    return out.cpu().numpy()


def _answer_logits(model: torch.nn.Module, table: EvalTable,
                   chunk_tokens: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(group index, distinct-row indices, logits at every answer position) chunk by chunk."""
    for gi, ids, inputs, shared in _chunks(model, table, chunk_tokens):
        yield gi, ids, model(inputs, q_start=table.groups[gi].length + 1, **shared)


def _chunks(model: torch.nn.Module, table: EvalTable, chunk_tokens: int,
            only: dict[int, torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict]]:
    """(group index, distinct-row indices, their inputs, the model's shortcuts for them) over
    every distinct row or `only` the given ones per group (then without the shared prefixes,
    whose keys and values would cost more than a few rows save)."""
    first = {"first": model.first_table()} if isinstance(model, Transformer) else {}
    past = None if only is not None else _prefix_past(model, table, first, chunk_tokens)
    for gi, g in enumerate(table.groups):
        index = torch.arange(len(g.inputs), device=g.inputs.device) if only is None else only[gi]
        step = max(1, chunk_tokens // g.inputs.shape[1])
        for a in range(0, len(index), step):
            ids = index[a:a + step]
            shared = dict(first)
            if past is not None and g.prefix is not None:
                at = g.prefix.index_select(0, ids)
                shared["past"] = [(k.index_select(0, at), v.index_select(0, at)) for k, v in past]
            yield gi, ids, g.inputs.index_select(0, ids), shared


def _prefix_past(model: torch.nn.Module, table: EvalTable, first: dict[str, torch.Tensor],
                 chunk_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Blocks 1 ..'s keys and values on the table's shared prefixes, or None where they do
    not apply: no shared prefix, one block, or a hook attached (hooks see whole rows)."""
    if table.prefixes is None or not first or len(model.blocks) < 2 or _hooked(model):
        return None
    step = max(1, chunk_tokens // table.prefixes.shape[1])
    parts = [model.prefix_past(table.prefixes[a:a + step], first["first"])
             for a in range(0, len(table.prefixes), step)]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


@torch.no_grad()
def own_answers(model: torch.nn.Module, table: EvalTable) -> EvalTable:
    """`table` with every row's answer set to the model's own argmax, so that the model gets
    every row right (but a tie within rounding): what an evaluation costs once a model has
    decided all its rows, for benchmarks and tests."""
    own = [torch.empty_like(g.targets) for g in table.groups]
    with _eval_mode(model):
        for gi, ids, logits in _answer_logits(model, table, default_chunk_tokens(table.tokens.device, model)):
            own[gi][ids] = logits.argmax(-1)
    return replace(table, groups=[replace(g, targets=o) for g, o in zip(table.groups, own)])


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
