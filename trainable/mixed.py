"""bf16 training with fp32 master weights: a bf16 copy of the model takes the steps.

`Trainer` keeps its model, optimiser state and checkpoints in fp32, and evaluates that
model in fp32 (unless `eval.precision: bf16` asks for `evaluate.screened_rows`). With
precision bf16, a `Bf16Copy` of it runs each training step's forward and backward
with bf16 weights and activations: the matrix products use the bf16 units (AMX tiles or
AVX-512 bf16 on a CPU, tensor cores on CUDA) and every elementwise op (layer norms, GELU,
dropout, residual adds) moves half the bytes. Layer norm and softmax accumulate in fp32
inside their kernels; the loss is taken on fp32 logits. The gradients are copied to the
fp32 model, Adam steps there, and the updated weights are cast back, so small updates are
not lost to bf16 rounding.

Against autocast with the same attention path, side by side on a 2-core Xeon with AMX
(paper configuration, 2 threads): 8.0 to 8.3 s an epoch here, 8.6 to 8.8 s there. Autocast
keeps the residual stream in fp32 and casts every linear layer's input and gradient.

Attention on a CPU uses the explicit softmax path in bf16: PyTorch's CPU flash-attention
kernel is about 5x slower in bf16 than in fp32 at these shapes (REFERENCE.md), while the
two small batched products of the explicit path run on the bf16 units. Its keys and values
come from two products (`Attention._keys_values`), so those batched products take them
without a copy: 0.969 of the epoch time of one product split in two, the median over 16
alternating rounds on a 2-core AMD EPYC with AVX-512 bf16, faster in 11 of them
(`benchmarks/attention_layout.py`). CUDA keeps the fused kernel.

The copy is a function of the fp32 weights alone (a cast rounds to nearest even), so a
resumed run rebuilds it exactly and continues bit for bit.
"""

from __future__ import annotations

import copy

import torch

from iterhead.trainable.model import Transformer


class Bf16Copy:
    """A bf16 replica of `master` for training steps: `refresh` before an epoch (the fp32
    weights may have been loaded or frozen since), `push_grads` after each backward pass and
    `pull` after each optimiser step."""

    def __init__(self, master: Transformer) -> None:
        self.master = master
        self.model = copy.deepcopy(master).to(torch.bfloat16)
        if master.tok_emb.weight.device.type == "cpu":
            self.model.fused_attention(False)
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self.refresh()

    def refresh(self) -> None:
        """Cast every fp32 weight into the copy and mirror which of them train."""
        pairs = list(zip(self.master.parameters(), self.model.parameters()))
        with torch.no_grad():
            torch._foreach_copy_([c for _, c in pairs], [m for m, _ in pairs])
        for m, c in pairs:
            c.requires_grad_(m.requires_grad)
        self._pairs = [(m, c) for m, c in pairs if m.requires_grad]

    def push_grads(self) -> None:
        """Hand the copy's gradients to the fp32 weights (in their dtype) and clear the copy's."""
        for m, c in self._pairs:
            m.grad = None if c.grad is None else c.grad.to(m.dtype)
            c.grad = None

    def pull(self) -> None:
        """Cast the trained fp32 weights into the copy after an optimiser step."""
        with torch.no_grad():
            torch._foreach_copy_([c for _, c in self._pairs], [m for m, _ in self._pairs])
