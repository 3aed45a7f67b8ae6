"""No training step waits on the host: the calls that synchronise a CUDA device, caught on a CPU.

`tests/test_cuda.py` runs an epoch under CUDA's sync debug mode, which needs a GPU. `HostSyncs`
records on any device the calls that mode flags (those that reach `c10::cuda::memcpy_and_sync` or
`stream_synchronize`; `_cases` holds torch's own `test_sync_warning` cases and more):

- a value read on the host: `.item()`, `bool`/`int`/`float`/`index` of a tensor, `.tolist()`,
  `.numpy()`, `__array__`, `.cpu()` or `.to(host)` (unless non-blocking), formatting a tensor;
- an output sized by the data (CUDA counts, then reads the count): `nonzero`, `argwhere`,
  `where(cond)`, `masked_select`, `unique*`, indexing with a boolean mask or assigning a tensor
  through one, `repeat_interleave` without `output_size`, `one_hot` without `num_classes`,
  `bincount`, `histc` without a range; and the verdicts `equal`, `allclose`;
- a blocking copy from the host: `torch.tensor`/`as_tensor`/`asarray` on the training device, or
  `.to(training device)` without `non_blocking=True` (`loop.to_device` pins and does not block).

Python-level calls are judged by a `TorchFunctionMode` (`.tolist()`, `.numpy()` or a copy to where
a tensor already is never reach aten on a CPU); everything else as aten ops by a
`TorchDispatchMode`, so a `.item()` inside torch's Python code counts too. A CPU run cannot say
where a tensor lives, so runs train on `TRAINING` (`cpu:0`: CPU tensors, but a call naming it named
`cuda` on a GPU, while `cpu` names the host). Each sync carries the frames of iterhead's code that
led to it. Not seen: `copy_` between tensors already made, CPU index tensors into device ones, and
syncs inside a CUDA kernel's own implementation (test_cuda.py's part).
"""

from __future__ import annotations

import functools
import linecache
import os
import sys
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import iterhead.trainable.loop as loop_module
from iterhead.curricula.schema import Curriculum
from iterhead.trainable.adam import make_optimizer
from iterhead.trainable.loop import PRECISIONS, Trainer
from iterhead.trainable.seeds import Seeds

from support import tiny

PACKAGE = Path(os.path.realpath(loop_module.__file__)).parents[1]  # iterhead's source root
TRAINING = torch.device("cpu", 0)  # the training device, told apart from the host
HOST = torch.device("cpu")

aten = torch.ops.aten
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.cpu,
         torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
         torch.Tensor.__format__, torch.Tensor.__repr__}
FROM_HOST = {torch.tensor, torch.as_tensor, torch.asarray}
SIZED_BY_DATA = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
                 aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount,
                 aten.equal, aten.allclose}
MASKS = (torch.bool, torch.uint8)


class Frame(NamedTuple):
    file: str  # relative to iterhead's source root (or the file's name outside it)
    line: int
    function: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}: {self.text}"


@dataclass(frozen=True)
class Sync:
    """One call that would synchronise, and the frames of iterhead's code (outermost first) that made it."""

    op: str
    frames: tuple[Frame, ...]

    @property
    def where(self) -> Frame:
        return self.frames[-1]

    def __str__(self) -> str:
        return f"{self.op} at {self.where}" + "".join(f"\n    from {f}" for f in reversed(self.frames[:-1]))


@functools.lru_cache(maxsize=None)
def _source(filename: str) -> tuple[str, bool, bool]:
    """A code file's name to show, whether it is iterhead's code, and whether it is torch's (or no file)."""
    path = Path(os.path.realpath(filename))
    if filename.startswith("<"):
        return filename, False, True
    if (path.is_relative_to(PACKAGE) and not path.is_relative_to(PACKAGE / "tests")
            and "site-packages" not in path.parts):  # a virtual environment may live in the checkout (.venv)
        return str(path.relative_to(PACKAGE)), True, False
    return path.name, False, "torch" in path.parts


def _frames(frame: FrameType | None) -> tuple[Frame, ...]:
    """The package's frames on the stack, outermost first; else the innermost frame outside torch."""
    ours, other = [], None
    while frame is not None:
        name, inside, skip = _source(frame.f_code.co_filename)
        if inside or (other is None and not skip):
            entry = Frame(name, frame.f_lineno, frame.f_code.co_name,
                          linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip())
            if inside and ours and ours[-1][:2] == entry[:2]:  # a comprehension's line: name its function
                ours[-1] = entry
            elif inside:
                ours.append(entry)
            else:
                other = entry
        frame = frame.f_back
    return tuple(reversed(ours)) if ours else ((other,) if other else ())


def _names(device: Any, wanted: torch.device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device) == wanted


def _python_sync(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """What a Python-level call synchronises ('' where it is known not to, None where aten decides)."""
    if func in READS:
        return func.__name__
    if func is torch.Tensor.to and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items()
                                                                           if k != "copy"})
        if _names(device, TRAINING) or _names(device, HOST):
            return "" if non_blocking else f"blocking copy to {device}"
        return None
    if func in FROM_HOST:
        device = kwargs.get("device", args[2] if func is torch.as_tensor and len(args) > 2 else None)
        return f"{func.__name__} copied to the device" if _names(device, TRAINING) else None
    if func is torch.nn.functional.one_hot:  # its CPU kernel checks the range; CUDA reads it only when not given
        classes = kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
        return "one_hot without num_classes" if classes < 0 else ""
    return None


def _aten_sync(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               host_scalars: weakref.WeakValueDictionary[int, torch.Tensor]) -> str | None:
    """What an aten op synchronises on CUDA, or None."""
    packet = func.overloadpacket
    if packet in SIZED_BY_DATA:
        return str(func)
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return str(func) if kwargs.get("output_size", args[1] if len(args) > 1 else None) is None else None
    if packet is aten.histc:  # CUDA finds the range itself when none is given
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return str(func) if low == high else None
    if packet in (aten.index, aten.index_put_, aten.index_put, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs["indices"]
        if not any(i is not None and i.dtype in MASKS for i in indices):
            return None
        if packet is aten.index:
            return f"{func} with a boolean mask"
        value = args[2] if len(args) > 2 else kwargs["values"]
        if len(indices) == 1 and value.numel() == 1 and host_scalars.get(id(value)) is value:  # CUDA: masked_fill_
            return None
        return f"{func} with a boolean mask"
    return None


class HostSyncs:
    """While open, records in `syncs` every call that would synchronise a CUDA device with the host.

    It proves itself live: a probe on entering and on leaving must be recorded, or it raises."""

    def __init__(self) -> None:
        self.syncs: list[Sync] = []
        self._quiet = 0  # inside a Python call already judged: its aten ops are its own business
        self._host_scalars: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._modes = (_Functions(self), _Dispatch(self))

    def record(self, op: str, caller: FrameType | None) -> None:
        self.syncs.append(Sync(op, _frames(caller)))

    def _probe(self) -> None:
        probe = torch.zeros(2, device=TRAINING)
        before = len(self.syncs)
        probe.sum().item()
        probe.tolist()
        found = self.syncs[before:]
        del self.syncs[before:]
        if [s.op for s in found] != ["item", "tolist"]:
            raise AssertionError(f"the detector missed its probe's syncs; it recorded {[str(s) for s in found]}")

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        self._probe()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._probe()
        finally:
            for mode in reversed(self._modes):
                mode.__exit__(*exc)


class _Functions(TorchFunctionMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        verdict = _python_sync(func, args, kwargs) if not self.owner._quiet else None
        if verdict is None:
            return func(*args, **kwargs)
        if verdict:
            self.owner.record(verdict, sys._getframe(1))
        self.owner._quiet += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.owner._quiet -= 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.owner._quiet:
            verdict = _aten_sync(func, args, kwargs, self.owner._host_scalars)
            if verdict:
                self.owner.record(verdict, sys._getframe(1))
        out = func(*args, **kwargs)
        if func is aten.lift_fresh.default and out.numel() == 1:  # a Python number made a tensor: host memory
            self.owner._host_scalars[id(out)] = out  # by identity: a tensor's == is elementwise
        return out


# -- the detector against what CUDA flags ------------------------------------------------------

def _put(x: torch.Tensor, index: Any, value: Any) -> None:
    x[index] = value


def _cases() -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """Calls that synchronise on CUDA and calls that do not: torch's `test_sync_warning`, then ours."""
    x, y = torch.rand(4, device=TRAINING), torch.rand((), device=TRAINING)
    index, repeats = torch.tensor([0, 2, 3], device=TRAINING), torch.full((4,), 2, device=TRAINING)
    mask = x > 0.5
    syncs: dict[str, Callable[[], object]] = {
        "x[mask] = tensor": lambda: _put(x, mask, y), "x[mask]": lambda: x[mask], "nonzero": x.nonzero,
        "if tensor": lambda: 1 if y else 0, "one_hot without num_classes": lambda: torch.nn.functional.one_hot(index),
        "repeat_interleave without output_size": lambda: x.repeat_interleave(repeats),
        "item": y.item, "float": lambda: float(y), "int": lambda: int(index[0]),
        "index": lambda: [0, 1, 2, 3][index[0]],
        "format": lambda: f"{y:.3f}", "tolist": x.tolist, "numpy": x.numpy, "np.asarray": lambda: np.asarray(x),
        "cpu": x.cpu, "to host": lambda: x.to("cpu"), "to host, copy": lambda: x.to(HOST, copy=True),
        "argwhere": lambda: torch.argwhere(x), "where(mask)": lambda: torch.where(mask),
        "masked_select": lambda: x.masked_select(mask), "unique": x.unique, "unique_consecutive": x.unique_consecutive,
        "bincount": index.bincount, "histc": x.histc, "equal": lambda: torch.equal(x, x),
        "allclose": lambda: torch.allclose(x, x), "is_nonzero": lambda: torch.is_nonzero(y),
        "tensor on the device": lambda: torch.tensor([1, 2], device=TRAINING),
        "blocking copy to the device": lambda: x.to(TRAINING),
    }
    none: dict[str, Callable[[], object]] = {
        "x[mask] = number": lambda: _put(x, mask, 1.0), "x[index] = tensor": lambda: _put(x, index, y),
        "x[index]": lambda: x[index], "one_hot with num_classes": lambda: torch.nn.functional.one_hot(index, 4),
        "randperm": lambda: torch.randperm(20, device=TRAINING),
        "repeat_interleave with output_size": lambda: x.repeat_interleave(repeats, output_size=8),
        "repeat_interleave by a number": lambda: x.repeat_interleave(2), "any": lambda: torch.any(y),
        "histc with a range": lambda: x.histc(min=0, max=1), "masked_fill": lambda: x.masked_fill(mask, 0.0),
        "where(mask, a, b)": lambda: torch.where(mask, x, 0.0), "finite": lambda: torch.isfinite(x).all(),
        "non-blocking copy to the device": lambda: x.to(TRAINING, non_blocking=True),
        "non-blocking copy to the host": lambda: x.to(HOST, non_blocking=True),
        "cast": lambda: x.to(torch.float64), "zeros on the device": lambda: torch.zeros(3, device=TRAINING),
        "tensor on the host": lambda: torch.tensor([1.0]), "shape": lambda: len(x) + x.shape[0],
    }
    return syncs, none


def test_the_detector_flags_each_call_cuda_flags_once_and_no_other():
    """Once each, named at the caller's line (here this file's), and nothing for the calls CUDA runs on."""
    syncs, none = _cases()
    for name, call in syncs.items():
        with HostSyncs() as found:
            call()
        assert len(found.syncs) == 1, (name, [str(s) for s in found.syncs])
        assert found.syncs[0].where.file == "test_host_syncs.py", (name, str(found.syncs[0]))
    for name, call in none.items():
        with HostSyncs() as found:
            call()
        assert found.syncs == [], (name, [str(s) for s in found.syncs])


def test_a_detector_that_records_nothing_raises_rather_than_passing():
    """The probes on entering and leaving: a detector that saw nothing says so, so no test passes on it."""

    class Deaf(HostSyncs):
        def record(self, op: str, caller: FrameType | None) -> None:
            pass

    with pytest.raises(AssertionError, match="missed its probe"):
        with Deaf():
            pass


# -- training ----------------------------------------------------------------------------------

# 40 rows a length in batches of 32: batches straddle lengths (the masked loss) and the seeds' differ (padding)
DATA = {"min_len": 1, "max_len": 4, "train_per_len": 40, "test_per_len": 32, "cot": True}
EPOCHS = 3
# syncs in code that a CUDA run does not take, with why
CPU_ONLY = {("trainable/adam.py", "_update"): "the CPU's Adam reads its step counts, host scalars; on CUDA "
                                                "`make_optimizer` gives torch's fused Adam (the test below)"}
PER_EPOCH = "torch.isfinite(losses).tolist()"  # schedule.py: the divergence check, the one sync of an epoch
PER_EVALUATION = ("loss_sum.tolist()", "r.weights_finite()", "r.evaluate(")  # schedule.py, at an evaluation


def _curriculum() -> Curriculum:
    """One stage of two tasks, with dropout, evaluated once: after its last epoch."""
    return tiny(data=DATA, stages=[{"name": "s", "mix": {"parity": 0.5, "polynomial": 0.5}, "epochs": EPOCHS}],
                eval={"every_epochs": EPOCHS, "probe_per_len": 2})


def _to_first_evaluation(engine: str, precision: str, hook: Callable[..., object] | None = None) -> list[Sync]:
    """Every sync of a run on `TRAINING` up to its first evaluation (included), but those of CPU-only code."""
    if engine == "single":
        trainer = Trainer(_curriculum(), TRAINING, precision=precision)
        if hook is not None:
            trainer.model.register_forward_hook(hook)
        run = trainer.run()
    else:
        run = Seeds(_curriculum(), [0, 1], TRAINING, precision=precision, engine=engine).run()
    with HostSyncs() as found:
        next(iter(run))
    return [s for s in found.syncs if not any((f.file, f.function) in CPU_ONLY for f in s.frames)]


def _schedule_line(sync: Sync) -> str:
    """The line of the training loop (`Schedule.run`) that led to `sync`."""
    return next((f.text for f in sync.frames if f.file == "trainable/schedule.py" and f.function == "run"), "")


def _listed(syncs: list[Sync]) -> str:
    """Each distinct sync once, with how often it happened."""
    return "\n".join(f"{n}x {text}" for text, n in Counter(map(str, syncs)).items())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("engine", ["single", "lockstep", "stacked"])
def test_training_waits_on_the_host_once_an_epoch_and_never_in_a_step(engine, precision):
    """A single run (`Trainer`) and two seeds (`Seeds`, both engines), in fp32 and bf16: no step syncs
    (the engines' `train_epoch`), the loop once an epoch, and the rest only at the evaluation."""
    syncs = _to_first_evaluation(engine, precision)
    steps = [s for s in syncs if "engine.train_epoch(" in _schedule_line(s)]
    assert steps == [], "a training step waits on the host:\n" + _listed(steps)
    epochs = [s for s in syncs if PER_EPOCH in _schedule_line(s)]
    assert len(epochs) == EPOCHS, _listed(epochs)
    other = [s for s in syncs if s not in epochs and not any(e in _schedule_line(s) for e in PER_EVALUATION)]
    assert other == [], "the loop waits outside a step, the epoch's check and evaluation:\n" + _listed(other)


def test_a_step_that_reads_a_value_back_is_named_by_its_line():
    """What the test above reports when a step syncs: here a forward hook reads the logits, as a logging
    line in a step would; each step's read is named at the line of `Trainer.train_epoch` that ran it."""
    def read(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.sum().item()

    syncs = _to_first_evaluation("single", "fp32", hook=read)
    steps = [s for s in syncs if "engine.train_epoch(" in _schedule_line(s)]
    assert len(steps) >= EPOCHS
    assert {(s.op, s.where.file, s.where.function) for s in steps} == {("item", "trainable/loop.py", "train_epoch")}
    assert all(s.where.text.startswith("logits = model(") for s in steps)


def test_the_optimiser_of_a_cuda_run_steps_without_reading_anything_back():
    """Why `CPU_ONLY` may leave the CPU Adam out: a CUDA run steps with torch's fused Adam (`make_optimizer`),
    whose step counts stay on the device; its steps, run here on CPU tensors, read nothing back."""
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = make_optimizer(params, 1e-3, 0.01, torch.device("cuda"))
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"]
    with HostSyncs() as found:
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert found.syncs == [], _listed(found.syncs)
