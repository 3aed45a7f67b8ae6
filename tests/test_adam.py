"""The CPU Adam is torch's foreach Adam bit for bit, shares its state dicts, and a training run
on a CPU never imports torch._dynamo (what it exists to avoid)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from iterhead.trainable.adam import Adam, load_state, make_optimizer
from tests.support import ROOT


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(11, 16), torch.nn.Linear(16, 32), torch.nn.GELU(),
                               torch.nn.LayerNorm(32), torch.nn.Linear(32, 11))


def _steps(model: torch.nn.Module, opt, steps: range, frozen: str | None = None) -> None:
    """Steps on batches fixed by the step number; `frozen` parameters get no gradient."""
    for name, p in model.named_parameters():
        p.requires_grad_(name != frozen)
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 11, (8, 5), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _torch_adam(params, **kw) -> torch.optim.Adam:
    """torch's Adam as iterhead built it on a CPU before (so its checkpoints look like this)."""
    return torch.optim.Adam(params, fused=False, foreach=True, **kw)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_steps_are_torchs_foreach_adam_bit_for_bit(weight_decay: float) -> None:
    ours, theirs = _model(0), _model(0)
    a = Adam(list(ours.parameters()), lr=3e-3, weight_decay=weight_decay)
    t = _torch_adam(theirs.parameters(), lr=3e-3, weight_decay=weight_decay)
    _steps(ours, a, range(12), frozen="3.weight")  # a parameter without gradient is left alone
    _steps(theirs, t, range(12), frozen="3.weight")
    _same(ours, theirs)
    assert torch.equal(ours[3].weight, _model(0)[3].weight)
    mine, torchs = a.state_dict(), t.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys() and 3 not in mine["state"]  # 3.weight: no state
    for k, entry in torchs["state"].items():
        assert entry.keys() == mine["state"][k].keys()
        for key, value in entry.items():
            assert torch.equal(value, mine["state"][k][key]) and value.dtype == mine["state"][k][key].dtype, (k, key)


def test_state_dicts_load_either_way_and_the_run_continues_identically() -> None:
    """A checkpoint from torch's Adam resumes in this one and the other way round."""
    ref = _model(1)
    t = _torch_adam(ref.parameters(), lr=1e-3)
    _steps(ref, t, range(10))

    torch_first = _model(1)
    t1 = _torch_adam(torch_first.parameters(), lr=1e-3)
    _steps(torch_first, t1, range(4))
    a1 = Adam(list(torch_first.parameters()), lr=5.0)  # the saved lr replaces this one
    a1.load_state_dict(t1.state_dict())
    assert a1.param_groups[0]["lr"] == 1e-3
    assert a1.state[next(torch_first.parameters())]["step"] is t1.state_dict()["state"][0]["step"]  # as torch: no copy
    _steps(torch_first, a1, range(4, 10))
    _same(torch_first, ref)

    ours_first = _model(1)
    a2 = Adam(list(ours_first.parameters()), lr=1e-3)
    _steps(ours_first, a2, range(4))
    t2 = _torch_adam(ours_first.parameters(), lr=1e-3)
    t2.load_state_dict(a2.state_dict())
    _steps(ours_first, t2, range(4, 10))
    _same(ours_first, ref)


def test_a_fused_adam_stays_fused_when_it_loads_a_foreach_state() -> None:
    """CUDA runs torch's fused Adam: a state this (foreach) Adam wrote on a CPU must not switch
    it to foreach, as torch's own `load_state_dict` does. torch's fused Adam runs on a CPU too,
    which is where this checks it."""
    model = _model(1)
    ours = Adam(list(model.parameters()), lr=1e-3)
    _steps(model, ours, range(3))
    plain = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    plain.load_state_dict(ours.state_dict())
    assert not plain.param_groups[0]["fused"]  # what load_state guards against
    kept = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    load_state(kept, ours.state_dict())
    assert kept.param_groups[0]["fused"] and kept.param_groups[0]["foreach"] is None
    steps = [kept.state[p]["step"] for p in model.parameters()]
    assert all(s.dtype == torch.float32 and s.item() == 3 for s in steps)
    _steps(model, kept, range(3, 5))
    assert all(kept.state[p]["step"].item() == 5 for p in model.parameters())


def test_a_state_for_other_parameters_or_options_is_refused() -> None:
    model = _model(0)
    a = Adam(list(model.parameters()), lr=1e-3)
    fewer = torch.optim.Adam(list(model.parameters())[:2], lr=1e-3)
    with pytest.raises(ValueError, match="other parameter groups"):
        a.load_state_dict(fewer.state_dict())
    with pytest.raises(ValueError, match="options"):
        a.load_state_dict(torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True).state_dict())
    gpu_like = _torch_adam(model.parameters(), lr=1e-3).state_dict()
    gpu_like["param_groups"][0].update(fused=True, foreach=None)  # what a CUDA run's fused Adam saves
    a.load_state_dict(gpu_like)
    assert (a.param_groups[0]["fused"], a.param_groups[0]["foreach"]) == (False, True)  # what this Adam runs
    with pytest.raises(ValueError, match="empty"):
        Adam([], lr=1e-3)


def test_zero_grad_drops_or_zeroes_the_gradients() -> None:
    model = _model(0)
    a = Adam(list(model.parameters()), lr=1e-3)
    _steps(model, a, range(1))
    a.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    a.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_cpu_gets_this_adam() -> None:
    assert isinstance(make_optimizer(list(_model(0).parameters()), 1e-3, 0.0, torch.device("cpu")), Adam)


def test_training_on_a_cpu_never_imports_torch_dynamo() -> None:
    """Its import is what this Adam saves (1.5 s and more a process); one import anywhere on the
    training path (a trainer with an epoch, an evaluation, probes, a checkpoint) brings it back."""
    script = """
import sys, torch
from tests.support import tiny
from iterhead.trainable.loop import Trainer
trainer = Trainer(tiny(), torch.device("cpu"))
for _ in trainer.run():
    pass
trainer.load_state_dict(trainer.state_dict())
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
