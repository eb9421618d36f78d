"""Finding mislabeled digits with self-influence.

1. scikit-learn's bundled 8x8 digits (no download), 80/20 split; 10% of the training labels
   are flipped to another class, drawn at random;
2. a small MLP (64-128-10) is trained with Adam until it fits every label, flipped ones
   included (it memorises them: a flip no longer shows up as a misclassified example).
   A checkpoint is recorded every few epochs with ``CheckpointRecorder``, for TracIn;
3. each method's ``self_attribute()`` scores every training example by how much it
   supports its own (given) label; a flipped example is one the rest of the data
   contradicts, so it needs, and gets, an unusually large self-influence. The script
   ranks the training set by it and reports the fraction of flipped labels found in the
   top 20% of the ranking, for EK-FAC influence (``if-ekfac``), TRAK, TracIn and
   representer points (``rps``), next to ranking by training loss (the baseline) and
   random order (20% by construction). Grad-Cos is left out: its self-influence is the
   cosine of a gradient with itself, 1 for every example.

Measured (seed 0, full run): the training loss finds 80% of the flips in the top 20%,
``if-ekfac`` 83%, ``trak`` 85%, ``tracin`` and ``rps`` 100%. TracIn sums over checkpoints,
and at the early ones the flipped labels are not fitted yet and have large gradients.

Run ``python examples/mislabeled_digits.py`` (``--quick``: fewer epochs, for the tests).
Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from datatrace import CheckpointRecorder, Task, make_attributor

METHODS = {
    "if-ekfac": {"damping": "heuristic", "fisher": "empirical"},
    "trak": {"proj_dim": 512},
    "tracin": {},
    "rps": {},
}


def digits(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """``(train, test)``: pixels scaled to [0, 1], a seeded 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(y))
    return (x[perm[:n]], y[perm[:n]]), (x[perm[n:]], y[perm[n:]])


def flip(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy labels and the mask of flipped ones: each flip moves to another class."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
    return noisy, noisy != labels


def train(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, list]:
    """Adam, no weight decay, until the noisy labels are memorised; checkpoints for TracIn."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps_per_epoch = -(-len(y) // 64)
    recorder = CheckpointRecorder(every=max(1, args.epochs // 5) * steps_per_epoch)  # 5 in all
    g = torch.Generator().manual_seed(args.seed)
    step = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            recorder.maybe_record(model, step, optimizer=opt)
    return model.eval(), recorder.trajectory


def found_in_top(scores: torch.Tensor, flipped: torch.Tensor, fraction: float) -> float:
    """Fraction of the flipped examples among the ``fraction`` highest ``scores``."""
    top = scores.topk(round(fraction * len(scores))).indices
    return float(flipped[top].sum() / flipped.sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--flip", type=float, default=0.1, help="fraction of flipped train labels")
    p.add_argument("--epochs", type=int, default=300, help="Adam epochs (batch 64)")
    p.add_argument("--inspect", type=float, default=0.2, help="fraction of the ranking inspected")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer epochs, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 150  # 99% of the noisy labels fitted instead of 100%
    t_start = time.perf_counter()

    (x, y_true), (x_test, y_test) = digits(args.seed)
    y, flipped = flip(y_true, args.flip, args.seed)
    print(f"{len(y)} training digits, {int(flipped.sum())} labels flipped; {len(y_test)} test")
    model, trajectory = train(x, y, args)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
        train_acc = float((model(x).argmax(1) == y).float().mean())
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
    print(
        f"MLP after {args.epochs} epochs: train accuracy {train_acc:.3f} on the noisy labels "
        f"(flipped ones memorised: {float((model(x).argmax(1) == y)[flipped].float().mean()):.2f}),"
        f" test accuracy {test_acc:.3f}; {len(trajectory)} checkpoints"
    )

    top = f"top {args.inspect:.0%}"
    print(f"\nfraction of the flipped labels found in the {top} of each ranking:")
    print(f"found random order: {args.inspect:.3f}  (by construction)")
    print(f"found training loss: {found_in_top(losses, flipped, args.inspect):.3f}  (baseline)")
    results = {}
    for method, kwargs in METHODS.items():
        t0 = time.perf_counter()
        task = Task(model, checkpoints=trajectory if method == "tracin" else None)
        self_influence = make_attributor(method, task, **kwargs).fit((x, y)).self_attribute()
        results[method] = found_in_top(self_influence.cpu(), flipped, args.inspect)
        print(
            f"found {method}: {results[method]:.3f}  "
            f"(self-influence, {time.perf_counter() - t0:.1f} s)"
        )
    best = max(results, key=results.__getitem__)
    print(f"\nbest: {best} finds {results[best]:.0%} of the flipped labels in the {top}")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
