"""A training loop written the obvious way, as the yardstick for `throughput.py`.

It follows the reference trainer's description in the design notes, not its code: every
sequence padded to the longest length of the whole set, a shuffled DataLoader of 256-row
batches, the loss masked to the chain-of-thought positions, `loss.item()` every step, plain
Adam, and a full evaluation (train and test sets, whole sequences) after the epoch. It uses
iterhead's data and model, so only the training method differs.

    python benchmarks/baseline.py CURRICULUM.yaml [--epochs N] [--warmup-epochs W] [--device cpu|cuda[:N]]

`--warmup-epochs` trains W untimed epochs first (for a per-epoch time without CUDA's
first-launch costs); the clock reads after a device synchronise.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from iterhead.curricula.data import build_data, seq_len
from iterhead.curricula.io import load_curriculum
from iterhead.trainable.model import Transformer


def padded(split: dict) -> TensorDataset:
    tokens = torch.cat([torch.from_numpy(s.tokens) for s in split.values()])
    lengths = torch.cat([torch.from_numpy(s.lengths) for s in split.values()])
    pos = torch.arange(tokens.shape[1] - 1)[None, :]
    start = (lengths + 1)[:, None]
    return TensorDataset(tokens, (pos >= start) & (pos < 2 * start - 1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: torch.nn.Module, data: TensorDataset, batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for tokens, mask in DataLoader(data, batch_size=batch_size):
            tokens, mask = tokens.to(device), mask.to(device)
            pred = model(tokens[:, :-1]).argmax(-1)
            ok = ((pred == tokens[:, 1:]) | ~mask).all(dim=1)
            correct += int(ok.sum().item())
    model.train()
    return correct / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curriculum")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup-epochs", type=int, default=0, help="untimed epochs before the timed ones")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    cur = load_curriculum(args.curriculum)
    vocab, data = build_data(cur)  # iterhead's data and model, nothing of its loop
    model = Transformer(cur.model, vocab.size, seq_len(cur.data.max_len, True), torch.Generator().manual_seed(cur.seed)).to(device)
    train, test = padded(data["train"]), padded(data["test"])
    bs = cur.optim.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=cur.optim.lr)
    g = torch.Generator().manual_seed(cur.seed)
    dropout = torch.Generator(device=device).manual_seed(cur.seed)
    loader = DataLoader(train, batch_size=bs, shuffle=True, generator=g)
    t_train = 0.0
    for epoch in range(args.warmup_epochs + args.epochs):
        sync(device)
        t = time.perf_counter()
        for tokens, mask in loader:
            tokens, mask = tokens.to(device), mask.to(device)
            logits = model(tokens[:, :-1], generator=dropout)
            each = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            loss = (each * mask.flatten()).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        sync(device)
        if epoch >= args.warmup_epochs:
            t_train += time.perf_counter() - t
    t = time.perf_counter()
    acc_train, acc_test = evaluate(model, train, bs, device), evaluate(model, test, bs, device)
    t_eval = time.perf_counter() - t
    print(f"baseline: train {t_train:.1f} s ({t_train / max(args.epochs, 1):.2f} s/epoch), eval {t_eval:.1f} s, whole {time.perf_counter() - t0:.1f} s, "
          f"acc train {acc_train:.3f} test {acc_test:.3f}")


if __name__ == "__main__":
    main()
