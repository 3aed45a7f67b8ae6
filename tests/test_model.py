"""The transformer: causal, attention rows sum to 1, the windowed forward is exact."""

from __future__ import annotations

import pytest
import torch

from iterhead.curricula.schema import ModelSpec, module_names
from iterhead.trainable.compute import count_params
from iterhead.trainable.model import Transformer, pattern_hooks


def build(positional: str = "learned", n_heads: int = 2, dropout: float = 0.0) -> Transformer:
    spec = ModelSpec(d_model=32, n_layers=2, n_heads=n_heads, positional=positional, dropout=dropout)
    return Transformer(spec, vocab_size=15, max_len=20, generator=torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_causal(positional):
    model = build(positional)
    tokens = torch.randint(0, 15, (3, 12), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 15
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_attention_rows_sum_to_one_and_are_causal(positional):
    model = build(positional)
    tokens = torch.randint(0, 15, (4, 10))
    _, cache = model.run_with_cache(tokens, pattern_hooks(2))
    for name in pattern_hooks(2):
        p = cache[name]
        assert p.shape == (4, 2, 10, 10)
        torch.testing.assert_close(p.sum(-1), torch.ones(4, 2, 10))
        assert (p.triu(diagonal=1) == 0).all()


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_hooked_and_fused_attention_agree(positional):
    model = build(positional)
    tokens = torch.randint(0, 15, (2, 9))
    with torch.no_grad():
        fused = model(tokens)
        hooked, _ = model.run_with_cache(tokens, pattern_hooks(2))
    torch.testing.assert_close(fused, hooked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_start", [1, 4, 8])
def test_windowed_forward_matches_full(q_start):
    model = build()
    tokens = torch.randint(0, 15, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, q_start=q_start), model(tokens)[:, q_start:],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_schema_module_names_are_the_models(positional):
    spec = ModelSpec(d_model=32, n_layers=3, n_heads=2, positional=positional)
    model = Transformer(spec, 15, 20, torch.Generator().manual_seed(0))
    real = {n for n, _ in model.named_modules() if n and not n.endswith(("hook_pattern", "rotary"))}
    assert module_names(spec) == real


def test_count_params_matches_model():
    spec = ModelSpec(d_model=48, n_layers=3, n_heads=3, mlp_ratio=2)
    model = Transformer(spec, 17, 20, torch.Generator().manual_seed(0))
    assert count_params(48, 3, 2, 17) == model.n_params()


def test_init_is_seeded_and_dropout_needs_a_generator():
    a, b = build(dropout=0.1), build(dropout=0.1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    a.train()
    tokens = torch.randint(0, 15, (2, 6))
    with pytest.raises(ValueError, match="Generator"):
        a(tokens)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(a(tokens, generator=g1), a(tokens, generator=g2))


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="positions"):
        build()(torch.zeros(1, 21, dtype=torch.long))


@pytest.mark.parametrize("positional", ["learned", "rotary"])
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("q_start", [0, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_first_table_forward_matches_forward(positional, n_heads, n_layers, q_start, fused):
    """Gathering the first block's attention inputs only reorders float32 sums (the output
    projection goes before the attention-weighted sum instead of after, products of length
    d_model = 32): differences stay near 32 x 2^-24 relative, far inside 1e-5."""
    spec = ModelSpec(d_model=32, n_layers=n_layers, n_heads=n_heads, positional=positional)
    model = Transformer(spec, vocab_size=15, max_len=20, generator=torch.Generator().manual_seed(0)).eval()
    model.fused_attention(fused)
    tokens = torch.randint(0, 15, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, q_start=q_start, first=model.first_table()),
                                   model(tokens, q_start=q_start), rtol=1e-5, atol=1e-5)


def test_first_table_keeps_the_attention_hooks():
    """Interventions rewrite patterns through hooks; the table path must show and use them."""
    model = build(n_heads=1)
    tokens = torch.randint(0, 15, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, want = model.run_with_cache(tokens, pattern_hooks(2))
        with model.hooks(pattern_hooks(2)) as got:
            tabled = model(tokens, first=model.first_table())
        torch.testing.assert_close(tabled, plain, rtol=1e-5, atol=1e-5)
        for name in pattern_hooks(2):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        handle = model.blocks[0].attn.hook_pattern.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        try:
            zeroed_plain, zeroed_tabled = model(tokens), model(tokens, first=model.first_table())
        finally:
            handle.remove()
    torch.testing.assert_close(zeroed_tabled, zeroed_plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zeroed_plain, plain)


def test_first_table_is_refused_where_dropout_applies():
    model = build(dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        model(torch.zeros(1, 5, dtype=torch.long), generator=torch.Generator().manual_seed(0),
              first=model.first_table())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_is_the_kept_embeddings_over_the_keep_rate_bit_for_bit(dtype):
    """Exported curricula re-run to the same numbers only if dropout's arithmetic stays
    (embeddings x keep) / (1 - p): the first block must see exactly that, in either dtype."""
    model = build(dropout=0.25).to(dtype).train()
    tokens = torch.randint(0, 15, (3, 9), generator=torch.Generator().manual_seed(3))
    keep = torch.rand(3, 9, 32, generator=torch.Generator().manual_seed(4)) >= 0.25
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(tokens, keep=keep)
    finally:
        handle.remove()
    want = model._embed(tokens) * keep / (1.0 - 0.25)
    assert seen[0].dtype == dtype and torch.equal(seen[0], want)
    assert (seen[0][~keep] == 0).all() and (seen[0][keep] != 0).any()


@pytest.mark.parametrize("positional", ["learned", "rotary"])
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("prefix,q_start", [(1, 1), (3, 5), (6, 6)])
def test_shared_prefix_forward_matches_forward(positional, n_heads, n_layers, prefix, q_start):
    """Rows run from a cached prefix give the full forward's logits, up to the same float32
    reordering as the first-block table (1e-5 relative, see above)."""
    spec = ModelSpec(d_model=32, n_layers=n_layers, n_heads=n_heads, positional=positional)
    model = Transformer(spec, vocab_size=15, max_len=20, generator=torch.Generator().manual_seed(0)).eval()
    tokens = torch.randint(0, 15, (4, 11), generator=torch.Generator().manual_seed(1))
    tokens[:, :prefix] = tokens[0, :prefix]  # every row shares the first `prefix` tokens
    with torch.no_grad():
        first = model.first_table()
        past = model.prefix_past(tokens[:1, :prefix], first)
        rows = [(k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1)) for k, v in past]
        torch.testing.assert_close(model(tokens, q_start=q_start, first=first, past=rows),
                                   model(tokens, q_start=q_start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("prefix", [0, 3])
def test_rows_continue_from_their_kept_past(positional, n_heads, n_layers, prefix):
    """Logits for positions 5 .. 7, then 8 .. 10 of the same rows continued from the keys and
    values kept by the first call (`keep_past`), are the one-pass logits for 5 .. 10, up to
    the float32 reordering of the first-block table (1e-5 relative, see above)."""
    spec = ModelSpec(d_model=32, n_layers=n_layers, n_heads=n_heads, positional=positional)
    model = Transformer(spec, vocab_size=15, max_len=20, generator=torch.Generator().manual_seed(0)).eval()
    tokens = torch.randint(0, 15, (4, 11), generator=torch.Generator().manual_seed(1))
    tokens[:, :prefix] = tokens[0, :prefix]
    with torch.no_grad():
        first = model.first_table()
        past = None
        if prefix:
            past = [(k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1))
                    for k, v in model.prefix_past(tokens[:1, :prefix], first)]
        kept: list = []
        head = model(tokens[:, :8], q_start=5, first=first, past=past, keep_past=kept)
        assert len(kept) == n_layers - 1 and all(k.shape[2] == 8 for k, _ in kept)
        tail = model(tokens, q_start=8, first=first, past=kept or None)
        torch.testing.assert_close(torch.cat([head, tail], dim=1), model(tokens, q_start=5), rtol=1e-5, atol=1e-5)


def test_past_needs_the_first_block_table():
    model = build()
    with pytest.raises(ValueError, match="first"):
        model(torch.zeros(1, 5, dtype=torch.long), past=[])
    with pytest.raises(ValueError, match="first"):
        model(torch.zeros(1, 5, dtype=torch.long), keep_past=[])
