"""Data pruning with group attribution: which data sources to drop.

1. scikit-learn's bundled 8x8 digits (no download), split into train / validation / test.
   The training set comes from "sources" (contributors) of ``--group-size`` examples each;
   a fraction ``--noisy`` of the sources are bad annotators whose labels are all random
   (the script knows which, the attribution does not);
2. an MLP is trained on everything, and the *sources* are attributed, not the examples:
   ``groups=source_ids`` makes the scores ``(n_query, n_sources)``, each the effect of
   training on a whole source at once (see docs/groups.md). A source's value is its total
   attribution to the validation loss, ``scores.values.sum(0)`` (default target: the
   loss, so positive = it lowers the validation loss);
3. the ``--prune`` lowest-valued sources are removed and the MLP is retrained on the rest,
   against removing the same number of sources at random (``--random-draws`` draws); the
   validation and test loss and accuracy are reported for all three. The test set played
   no part in choosing what to remove.

Run ``python examples/pruning_groups.py`` (``--quick``: fewer random draws, for the tests).
Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from datatrace import Task, make_attributor

Split = tuple[torch.Tensor, torch.Tensor]


def digits_with_sources(
    args: argparse.Namespace,
) -> tuple[Split, Split, Split, torch.Tensor, torch.Tensor]:
    """``(train, val, test, source_ids, noisy_sources)``: 60/20/20 split, noisy sources."""
    data = load_digits()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(data.target), generator=g)
    x = torch.tensor(data.data, dtype=torch.float32)[perm] / 16
    y = torch.tensor(data.target)[perm]
    n_train = len(y) * 3 // 5 // args.group_size * args.group_size  # whole sources
    n_val = (len(y) - n_train) // 2
    source = torch.arange(n_train) // args.group_size
    noisy = torch.randperm(int(source.max()) + 1, generator=g)[
        : round(args.noisy * (int(source.max()) + 1))
    ]
    bad = torch.isin(source, noisy)
    y_train = y[:n_train].clone()
    y_train[bad] = torch.randint(0, 10, (int(bad.sum()),), generator=g)
    return (
        (x[:n_train], y_train),
        (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        (x[n_train + n_val :], y[n_train + n_val :]),
        source,
        noisy,
    )


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)``."""
    with torch.no_grad():
        logits = model(data[0])
    return float(F.cross_entropy(logits, data[1])), float(
        (logits.argmax(1) == data[1]).float().mean()
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--method", default="if-ekfac", help="method id scoring the sources")
    p.add_argument("--group-size", type=int, default=16, help="examples per source")
    p.add_argument(
        "--noisy", type=float, default=0.1, help="fraction of sources with random labels"
    )
    p.add_argument("--prune", type=int, default=10, help="sources to remove")
    p.add_argument("--epochs", type=int, default=40, help="Adam epochs (batch 64)")
    p.add_argument("--random-draws", type=int, default=10, help="random prunings averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer random draws, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.random_draws = 3
    t_start = time.perf_counter()

    train_set, val, test, source, noisy = digits_with_sources(args)
    n_sources = int(source.max()) + 1
    print(
        f"{len(source)} training digits from {n_sources} sources of {args.group_size} "
        f"({len(noisy)} sources with random labels); {len(val[1])} validation, {len(test[1])} test"
    )
    model = train(*train_set, args.seed, args.epochs)

    t0 = time.perf_counter()
    kwargs = (
        {"damping": "heuristic", "fisher": "empirical"} if args.method.startswith("if-") else {}
    )
    attributor = make_attributor(args.method, Task(model), groups=source, **kwargs).fit(train_set)
    values = attributor.attribute(val).values.sum(0).cpu()  # (n_sources,): + = helps val loss
    attributed = values.argsort()[: args.prune]  # lowest value first
    caught = int(torch.isin(attributed, noisy).sum())
    print(
        f"{args.method} on {n_sources} groups: {time.perf_counter() - t0:.1f} s; of the "
        f"{args.prune} lowest-valued sources, {caught} are noisy (random choice: "
        f"{args.prune * len(noisy) / n_sources:.1f} on average)"
    )

    def retrain_without(removed: torch.Tensor) -> tuple[float, float, float, float]:
        keep = ~torch.isin(source, removed)
        pruned = train(train_set[0][keep], train_set[1][keep], args.seed, args.epochs)
        return (*evaluate(pruned, val), *evaluate(pruned, test))

    g = torch.Generator().manual_seed(args.seed + 1)
    draws = [torch.randperm(n_sources, generator=g)[: args.prune] for _ in range(args.random_draws)]
    rows = {
        "nothing": (*evaluate(model, val), *evaluate(model, test)),
        f"attributed ({args.method})": retrain_without(attributed),
        f"random (mean of {args.random_draws})": tuple(
            torch.tensor([retrain_without(d) for d in draws]).mean(0).tolist()
        ),
    }
    print(f"\nremoving {args.prune} of {n_sources} sources, then retraining:")
    print(f"{'removed':24s} {'val loss':>9s} {'val acc':>8s} {'test loss':>10s} {'test acc':>9s}")
    for name, (vl, va, tl, ta) in rows.items():
        print(f"{name:24s} {vl:9.4f} {va:8.3f} {tl:10.4f} {ta:9.3f}")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
