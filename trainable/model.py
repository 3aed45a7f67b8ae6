"""A small pre-LayerNorm GPT: forward returns logits; attention patterns through hook points.

Hook points follow TransformerLens: ``blocks.{i}.attn.hook_pattern`` is a module whose
forward hooks see the attention pattern [batch, head, query, key]. The pattern is only
materialised when a hook is attached (or a caller asks through `run_with_cache`); otherwise
attention runs through the fused `scaled_dot_product_attention`.

Speed: `forward(tokens, q_start=a)` returns logits for positions ``a ..`` only, and the last
block computes its queries, MLP and the head only there. Training and evaluation set ``a``
to the first answer position, which skips about a quarter of the work for chain-of-thought
sequences without changing any logit that the loss or the accuracy reads. Inference can
also gather the first block's attention inputs from a per-(token, position) table
(`first_table`), which replaces that block's layer norm and its four projections, and
run the later blocks' positions of a shared prefix once (`prefix_past`, `forward(past=...)`),
and continue rows from the keys and values an earlier call kept (`forward(keep_past=...)`),
so an evaluation can stop the rows it has already found wrong.

Randomness: embedding dropout (the paper's only dropout) draws from a `torch.Generator`
passed in by the caller, never from the global RNG, or takes a keep mask drawn by the caller
(batched seeds draw each seed's mask outside `torch.func.vmap`).

Batched seeds: under `torch.func.vmap` the fused attention kernel has no batching rule on
some devices (a slow per-seed loop), so `fused_attention(False)` switches every block to
the explicit softmax path, which batches as plain matrix products.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from iterhead.curricula.schema import ModelSpec


class HookPoint(nn.Module):
    """An identity module that forward hooks attach to, by dotted name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


class Rotary(nn.Module):
    """Rotary position embedding applied to queries and keys."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate `x` [B, H, T, hd] whose first position is `start`."""
        t = x.shape[-2]
        cos, sin = self.cos[start:start + t].to(x.dtype), self.sin[start:start + t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        d = spec.d_model
        self.n_heads = spec.n_heads
        self.head_dim = d // spec.n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.rotary = Rotary(self.head_dim, max_len) if spec.positional == "rotary" else None
        self.hook_pattern = HookPoint()
        self.fused = True
        self._masks: dict[tuple[int, int, str, bool], torch.Tensor] = {}

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    @property
    def explicit(self) -> bool:
        """Whether attention runs as explicit products and softmax: to show a hook the
        pattern, or where the fused kernel is switched off (`fused`)."""
        return self.hook_pattern.active or not self.fused

    def _mask(self, q_start: int, t: int, device: torch.device, hidden: bool = False) -> torch.Tensor:
        """Causal mask for queries at ``q_start .. t-1`` over keys ``0 .. t-1``: True = keep,
        or with `hidden` its complement (True = masked out), each made once per shape."""
        key = (q_start, t, str(device), hidden)
        if key not in self._masks:
            q = torch.arange(q_start, t, device=device)[:, None]
            keep = torch.arange(t, device=device)[None, :] <= q
            self._masks[key] = ~keep if hidden else keep
        return self._masks[key]

    def forward(self, x: torch.Tensor, q_start: int = 0,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                keep_past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Attention output for the queries at ``q_start ..`` (absolute positions).

        `past` holds the keys and values [B, H, P, hd] of positions 0 .. P-1 (from
        `kv`); `x` then holds positions P .. and `q_start` must be at least P. `keep_past`,
        if given, receives the keys and values of every position, the `past` of a later call."""
        d = x.shape[-1]
        p = 0 if past is None else past[0].shape[2]
        w, bias = self.qkv.weight, self.qkv.bias
        q = self._split(F.linear(x[:, q_start - p:], w[:d], bias[:d]))
        k, v = self._keys_values(x)
        if self.rotary is not None:
            q, k = self.rotary(q, q_start), self.rotary(k, p)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if keep_past is not None:
            keep_past.append((k, v))
        y = self._attend(q, k, v, q_start, p + x.shape[1])
        b, _, tq, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, tq, d))

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (not rotated) and values [B, H, T, hd] of normalised inputs `x`.

        The explicit path takes them from two products, not from one split in two: with one
        head (the paper's configuration) its batched products then take them as they are,
        where a split's halves are copied (and joined again in the backward pass). bf16
        training on a CPU runs this path (`benchmarks/attention_layout.py`). The fused kernel
        keeps the one product, so fp32 training of one seed and the accuracy evaluation compute
        exactly what they did."""
        d = x.shape[-1]
        w, bias = self.qkv.weight, self.qkv.bias
        if self.explicit:
            k, v = F.linear(x, w[d:2 * d], bias[d:2 * d]), F.linear(x, w[2 * d:], bias[2 * d:])
        else:
            k, v = F.linear(x, w[d:], bias[d:]).split(d, dim=-1)
        return self._split(k), self._split(v)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values [B, H, T, hd] of normalised inputs at positions 0 .. T-1."""
        k, v = self._keys_values(x)
        return (k if self.rotary is None else self.rotary(k, 0)), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, t: int) -> torch.Tensor:
        """Causal attention of queries at ``q_start .. t-1``: [B, H, Tq, value dim]."""
        if self.explicit:
            # scaled and masked in place: the product's output is not needed by its backward
            scores = torch.matmul(q, k.transpose(-2, -1)).div_(math.sqrt(self.head_dim))
            scores = scores.masked_fill_(self._mask(q_start, t, q.device, hidden=True), float("-inf"))
            return self.hook_pattern(scores.softmax(dim=-1)) @ v
        if q_start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q_start, t, q.device))

    def table(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys, and each head's values already through the output projection, for
        normalised inputs [N, T, d] at positions 0 .. T-1: packed [N, T, 2d + heads x d].

        In the first block these depend on (token, position) alone, so inference can compute
        them once for the whole vocabulary and gather them (`Transformer.first_table`)."""
        d = x.shape[-1]
        q, k, v = (self._split(t) for t in self.qkv(x).split(d, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q, 0), self.rotary(k, 0)
        u = torch.einsum("nhtc,ehc->nthe", v, self.proj.weight.view(d, self.n_heads, self.head_dim))
        return torch.cat([q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2), u.flatten(2)], dim=-1)

    def forward_table(self, packed: torch.Tensor, q_start: int = 0) -> torch.Tensor:
        """`forward` from gathered `table` rows [B, T, 2d + heads x d]: equal up to rounding, as
        the output projection is applied to each value before the attention-weighted sum."""
        b, t, _ = packed.shape
        d = self.n_heads * self.head_dim
        q, k = self._split(packed[:, q_start:, :d]), self._split(packed[:, :, d:2 * d])
        u = packed[:, :, 2 * d:].view(b, t, self.n_heads, d).transpose(1, 2)
        return self._attend(q, k, u, q_start, t).sum(dim=1) + self.proj.bias


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.fc = nn.Linear(spec.d_model, spec.mlp_ratio * spec.d_model)
        self.proj = nn.Linear(spec.mlp_ratio * spec.d_model, spec.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attn = Attention(spec, max_len)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, q_start: int = 0,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                keep_past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        p = 0 if past is None else past[0].shape[2]
        x = x[:, q_start - p:] + self.attn(self.ln1(x), q_start, past, keep_past)
        return x + self.mlp(self.ln2(x))

    def forward_table(self, x: torch.Tensor, packed: torch.Tensor, q_start: int = 0) -> torch.Tensor:
        """`forward` with the attention inputs gathered from `Transformer.first_table`."""
        x = x[:, q_start:] + self.attn.forward_table(packed, q_start)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token (+ learned position) embeddings, pre-LN blocks, final LayerNorm, linear head."""

    def __init__(self, spec: ModelSpec, vocab_size: int, max_len: int, generator: torch.Generator) -> None:
        super().__init__()
        self.spec = spec
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(max_len, spec.d_model) if spec.positional == "learned" else None
        self.blocks = nn.ModuleList([Block(spec, max_len) for _ in range(spec.n_layers)])
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, vocab_size)
        self._init(generator)

    @torch.no_grad()
    def _init(self, g: torch.Generator) -> None:
        """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("ln1.weight") or name.endswith("ln2.weight")
                        or name == "ln_f.weight" else 0.0)
                continue
            std = 0.02 / math.sqrt(2 * self.spec.n_layers) if name.endswith("proj.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def n_params(self, embeddings: bool = False) -> int:
        """Parameter count; without token and position embeddings unless asked."""
        skip = set() if embeddings else {"tok_emb.weight", "pos_emb.weight"}
        return sum(p.numel() for n, p in self.named_parameters() if n not in skip)

    def fused_attention(self, on: bool) -> None:
        """Use the fused attention kernel (default) or the explicit one (for vmap)."""
        for block in self.blocks:
            block.attn.fused = on

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:tokens.shape[1]]
        return x

    def _gather(self, first: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The `first_table` rows of each (token, position) of `tokens` [B, T]."""
        index = tokens * self.max_len + torch.arange(tokens.shape[1], device=tokens.device)
        return F.embedding(index, first)

    @torch.no_grad()
    def first_table(self) -> torch.Tensor:
        """The first block's `Attention.table` for every (token, position), [vocab x max_len, ...].

        Without dropout the first block's attention inputs depend on (token, position) alone;
        an evaluation computes this table once and `forward(first=...)` gathers from it
        instead of running the first layer norm and the query, key, value and output
        projections on every position (about a fifth of an evaluation's FLOPs)."""
        x = self.tok_emb.weight[:, None, :].expand(-1, self.max_len, -1)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[None]
        block = self.blocks[0]
        return block.attn.table(block.ln1(x)).flatten(0, 1)

    @torch.no_grad()
    def prefix_past(self, prefixes: torch.Tensor, first: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of blocks 1 .. at every position of `prefixes` [n, P], for
        `forward(past=...)`: rows that begin with the same P tokens share this work."""
        x = self.blocks[0].forward_table(self._embed(prefixes), self._gather(first, prefixes))
        out = []
        for i, block in enumerate(self.blocks[1:], start=1):
            out.append(block.attn.kv(block.ln1(x)))
            if i < len(self.blocks) - 1:
                x = block(x)
        return out

    def forward(self, tokens: torch.Tensor, q_start: int = 0,
                generator: torch.Generator | None = None, keep: torch.Tensor | None = None,
                first: torch.Tensor | None = None,
                past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                keep_past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits [batch, T - q_start, vocab] for token ids [batch, T].

        Training with dropout needs `generator` or `keep`, a boolean mask shaped like the
        embeddings [batch, T, d_model] (True = kept). Inference shortcuts, refused where
        dropout applies: `first` (from `first_table`, made with the current weights), and
        with it `past` (from `prefix_past`, or `keep_past` of an earlier call, one entry per
        row): blocks 1 .. then run only from position P, the past's length, which must not
        exceed `q_start`. `keep_past`, a list, receives blocks 1 ..'s keys and values at
        positions 0 .. T-1, so that a later call can continue these rows from T."""
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's {self.max_len} positions")
        x = self._embed(tokens)
        p = self.spec.dropout
        if self.training and p > 0:
            if keep is None:
                if generator is None:
                    raise ValueError("training with dropout needs an explicit torch.Generator or keep mask")
                keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
            x = torch.where(keep, x / (1.0 - p), 0.0)  # (x * keep) / (1 - p) without casting the mask
        last = len(self.blocks) - 1
        if first is None:
            if past is not None or keep_past is not None:
                raise ValueError("`past` and `keep_past` need the first-block table `first`")
            for i, block in enumerate(self.blocks):
                x = block(x, q_start if i == last else 0)
            return self.head(self.ln_f(x))
        if self.training and p > 0:
            raise ValueError("a first-block table holds no dropout: use it in eval mode only")
        start = 0 if past is None or last == 0 else past[0][0].shape[2]  # first position blocks 1.. see
        x = self.blocks[0].forward_table(x, self._gather(first, tokens), q_start if last == 0 else start)
        for i, block in enumerate(self.blocks[1:], start=1):
            x = block(x, q_start if i == last else start, None if past is None else past[i - 1], keep_past)
        return self.head(self.ln_f(x))

    @contextmanager
    def hooks(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Capture the outputs of the named hook points while the context is open."""
        cache: dict[str, torch.Tensor] = {}
        modules = dict(self.named_modules())
        handles = []
        for name in names:
            if not isinstance(modules.get(name), HookPoint):
                raise KeyError(f"{name!r} is not a hook point")
            handles.append(modules[name].register_forward_hook(
                lambda _m, _i, out, name=name: cache.__setitem__(name, out.detach())))
        try:
            yield cache
        finally:
            for h in handles:
                h.remove()

    def run_with_cache(self, tokens: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the named hook points' outputs for one forward pass."""
        with self.hooks(names) as cache:
            logits = self(tokens)
        return logits, dict(cache)


def pattern_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)]
