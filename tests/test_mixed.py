"""The bf16 training copy: it mirrors the fp32 weights, hands back fp32 gradients, keeps frozen
weights frozen; and the allocator setting a CPU trainer makes."""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from iterhead.trainable.allocator import keep_freed_memory
from iterhead.trainable.loop import Trainer
from iterhead.trainable.mixed import Bf16Copy

from support import tiny


def test_the_copy_holds_the_fp32_weights_rounded_and_uses_explicit_attention_on_cpu():
    master = Trainer(tiny()).model
    copy = Bf16Copy(master)
    for (name, m), c in zip(master.named_parameters(), copy.model.parameters()):
        assert c.dtype == torch.bfloat16 and torch.equal(c, m.detach().to(torch.bfloat16)), name
    assert all(b.attn.fused for b in master.blocks)  # evaluation keeps the fused fp32 kernel
    assert not any(b.attn.fused for b in copy.model.blocks)


def test_gradients_reach_the_fp32_weights_and_only_trainable_weights_are_pulled():
    master = Trainer(tiny()).model
    for p in master.blocks[0].parameters():
        p.requires_grad_(False)
    copy = Bf16Copy(master)
    assert not any(p.requires_grad for p in copy.model.blocks[0].parameters())
    tokens = torch.randint(0, master.tok_emb.num_embeddings, (4, 6))
    copy.model.eval()
    F.cross_entropy(copy.model(tokens).float().flatten(0, 1), tokens.flatten()).backward()
    grads = {n: p.grad.clone() for n, p in copy.model.named_parameters() if p.grad is not None}
    copy.push_grads()
    for name, p in master.named_parameters():
        if name.startswith("blocks.0."):
            assert p.grad is None, name
        else:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, grads[name].float()), name
    assert all(p.grad is None for p in copy.model.parameters())  # the next step starts clean
    with torch.no_grad():
        for p in master.parameters():
            p.add_(1.0)
    copy.pull()
    for (name, m), c in zip(master.named_parameters(), copy.model.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16)) != name.startswith("blocks.0."), name
    copy.refresh()  # an epoch starts from whatever the fp32 weights hold, frozen ones too
    for m, c in zip(master.parameters(), copy.model.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16))


def test_a_cpu_trainer_keeps_freed_memory_where_the_c_library_is_glibc():
    Trainer(tiny())
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
