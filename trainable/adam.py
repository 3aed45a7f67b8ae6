"""Adam on a CPU without `torch.optim`: the same arithmetic, without importing `torch._dynamo`.

Every public method of `torch.optim.Optimizer` (construction, `step`, `zero_grad`, the state
dicts) is wrapped to keep `torch.compile` out of it, and the wrapper imports `torch._dynamo`
on first use: a median 1.76 s of CPU time in a process that compiles nothing, against 0.01 s
for this class (2-core AMD EPYC; BENCHMARKS.md, "The first Adam of a process"). `Adam` here
runs the ops of `torch.optim.Adam(foreach=True)` without `capturable`, `amsgrad` or
`maximize`, in the same order, so its weights and moments are bit-identical to torch's, step for step
(`tests/test_adam.py`); its state dict has torch's layout, so a checkpoint written with either
loads into the other. CUDA keeps torch's fused Adam (a kernel this class does not have).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Union

import torch


class Adam:
    """Adam with L2 weight decay added to the gradient (torch's `Adam`, not `AdamW`)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        params = list(params)
        if not params:
            raise ValueError("Adam got an empty parameter list")
        # torch's group keys and defaults, so state dicts are interchangeable with torch.optim.Adam's
        self.param_groups: list[dict[str, Any]] = [{
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
            "maximize": False, "foreach": True, "capturable": False, "differentiable": False,
            "fused": False, "decoupled_weight_decay": False, "params": params}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (torch's default); `set_to_none=False` zeroes them in place."""
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step over the parameters that have a gradient, as torch's foreach path does it."""
        group = self.param_groups[0]
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise ValueError("this Adam takes dense real parameters only")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)  # a CPU scalar, as torch keeps it
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            by_kind[(p.device, p.dtype)].append(p)
        for params in by_kind.values():
            self._update(params, group)

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """torch.optim.adam._multi_tensor_adam with capturable, amsgrad and maximize off."""
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        del grads
        step_size = [(lr / (1 - beta1 ** s.item())) * -1 for s in steps]
        bias_correction2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: state keyed by parameter index, the group with indices for parameters.
        The tensors are the live ones (as torch gives them): copy before stepping on if kept."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = list(range(len(group["params"])))
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": [packed]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a state of this class or of torch.optim.Adam, with the same number of parameters.
        As torch does: hyperparameters come from the saved group, moments are cast to each
        parameter's dtype and device (no copy where they match, so they stay the saved tensors)."""
        saved = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(saved) != 1 or len(saved[0]["params"]) != len(params):
            raise ValueError("the saved optimiser state has other parameter groups than this Adam's")
        if saved[0].get("amsgrad") or saved[0].get("maximize") or saved[0].get("decoupled_weight_decay"):
            raise ValueError("the saved optimiser state uses Adam options this Adam does not run")
        ids = dict(zip(saved[0]["params"], params))
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        for k, entry in state_dict["state"].items():
            if k not in ids:
                continue
            p = ids[k]
            # the step stays a CPU float32 scalar (no copy where it is one); a fused or capturable
            # Adam's (on the GPU) is moved here, as torch moves it to the parameters' device
            state[p] = {key: value.to(dtype=torch.float32, device="cpu") if key == "step"
                        else value.to(dtype=p.dtype, device=p.device) for key, value in entry.items()}
        group = copy.deepcopy({k: v for k, v in saved[0].items() if k != "params"})
        group["betas"] = tuple(group["betas"])
        # what this Adam runs, whatever the saved one ran (a CUDA run's state says fused)
        group.update(foreach=True, fused=False, capturable=False, differentiable=False)
        self.param_groups = [{**group, "params": params}]
        self.state = state


Optimizer = Union[Adam, torch.optim.Optimizer]


def load_state(optimizer: Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, keeping the kernel the optimiser was made with.

    torch's `Optimizer.load_state_dict` takes `fused` and `foreach` from the saved group, so a
    state written on a CPU (this module's Adam: foreach) turned a CUDA run's fused Adam into a
    foreach one, with its steps left on the CPU. A fused optimiser stays fused, with its
    steps where torch's fused Adam keeps them: float32 on each parameter's device."""
    fused = [bool(g.get("fused")) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, was_fused in zip(optimizer.param_groups, fused):
        if was_fused and not group.get("fused"):
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                entry = optimizer.state.get(p, {})
                if "step" in entry:
                    entry["step"] = entry["step"].to(device=p.device, dtype=torch.float32)


def make_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float,
                   device: torch.device) -> Optimizer:
    """Torch's fused Adam on CUDA (the fastest path there); on a CPU this module's Adam, which
    is torch's foreach Adam (measured faster there than its single-tensor one) op for op."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    return Adam(params, lr=lr, weight_decay=weight_decay)
