"""Demo: train an FFF classifier on scikit-learn's bundled digits, optimize it, verify it, measure it.

    make demo            # or: python examples/demo.py [--epochs N] [--quick]

1. Train ``fffcompile.nn.FFF`` (a depth-4 leaf-MLP tree with a master leaf) as the hidden layer of
   a digits classifier, in its soft training form, with the load-balancing and hardening losses.
2. ``fffcompile.optimize`` finds the tree, confirms it by numbers and swaps in the fused hard
   descent; its report gives exactness against the hardened original and fidelity to the soft one.
3. Accuracy of the soft model (the training form) and of the optimized model, and the measured
   time of both on the test set and on single rows.
The data ship with scikit-learn: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fffcompile
from fffcompile.nn import FFF, auxiliary_loss


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.tree = FFF(64, 64, depth=4, leaf_width=32, activation="relu", master_width=8)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.tree(x)))


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Soft training with a growing hardening loss, then the last quarter with hard decisions (leaves adapt)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    soft_epochs = epochs - epochs // 4
    for epoch in range(epochs):
        model.tree.train_hardened = epoch >= soft_epochs
        hardening = 1.0 * epoch / max(1, soft_epochs - 1)
        for batch in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            (loss + auxiliary_loss(model, balance=0.01, hardening=hardening)).backward()
            opt.step()
    model.tree.train_hardened = False


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few epochs and repeats (used by the test suite)")
    args = parser.parse_args(argv)
    epochs, repeats = (8, 5) if args.quick else (args.epochs, 50)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DigitsClassifier()
    print(f"training an FFF digits classifier ({model.tree}) for {epochs} epochs on {len(x_train)} images ...")
    train(model, x_train, y_train, epochs, args.seed)

    soft_model = model.train()   # the training (soft) form: every leaf computed and mixed
    soft_accuracy = accuracy(soft_model, x_test, y_test)
    fast = fffcompile.optimize(model.eval(), x_test)
    print()
    print(fast.report)
    print()
    hard_accuracy = accuracy(fast, x_test, y_test)
    print(f"test accuracy: soft (training form) {soft_accuracy:.1%}, optimized (hard descent) {hard_accuracy:.1%}")

    with torch.no_grad():
        model.train()
        row = x_test[:1]
        for label, batch in (("test set", x_test), ("one row", row)):
            soft_time = median_seconds(lambda: model(batch), repeats)
            fast_time = median_seconds(lambda: fast(batch), repeats)
            print(f"time per call, {label} ({len(batch)} rows): soft {soft_time * 1e6:.0f} us, "
                  f"optimized {fast_time * 1e6:.0f} us, speedup {soft_time / fast_time:.1f}x")
    model.eval()
    bound = fast.report.rewritten[0].speedup_bound if fast.report.rewritten else float("nan")
    print(f"(the MAC count bounds this layer's speedup at {bound:.0f}x; the head and Python overhead are shared)")
    return 0 if fast.report.rewritten else 1


if __name__ == "__main__":
    raise SystemExit(main())
