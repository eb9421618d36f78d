"""A one-minute demo: attribute a digits classifier and print proponents and opponents.

Run with ``make demo`` or ``python -m datatrace.demo``. Trains a small MLP on scikit-learn's
bundled digits (no download), then asks TRAK and influence functions which training images
made a few test predictions.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from datatrace import InfluenceAttributor, Task, TRAKAttributor
from datatrace.errors import ConfigError


def load_digits_split(
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Digits as float32 tensors in [0, 1]: (train, test) with a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the demo needs scikit-learn: pip install 'datatrace[bench]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def train_mlp(
    train: tuple[torch.Tensor, torch.Tensor], epochs: int = 30, seed: int = 0
) -> nn.Module:
    """A 64-128-64-10 MLP trained with Adam (deterministic given the seed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _row(label: str, ids: list[int], values: list[float], labels: torch.Tensor) -> str:
    cells = ", ".join(f"#{i} (digit {int(labels[i])}, {v:+.3g})" for i, v in zip(ids, values))
    return f"    {label}: {cells}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3, help="number of test queries to explain")
    parser.add_argument("--k", type=int, default=3, help="proponents/opponents per query")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = load_digits_split()
    t0 = time.perf_counter()
    model = train_mlp(train)
    acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    print(
        f"trained a digits MLP on {len(train[1])} images in {time.perf_counter() - t0:.1f}s; test accuracy {acc:.3f}"
    )
    queries = (test[0][: args.queries], test[1][: args.queries])
    task = Task(model, target="margin")
    for name, attributor in (
        ("TRAK (proj_dim=512)", TRAKAttributor(task, proj_dim=512, batch_size=256)),
        (
            "influence (GGN, CG, damping=1e-2)",
            InfluenceAttributor(Task(model), damping=1e-2, batch_size=256),
        ),
    ):
        t0 = time.perf_counter()
        top = attributor.fit(train).topk(queries, args.k)
        print(f"\n{name}: fit+attribute {time.perf_counter() - t0:.2f}s")
        for q in range(args.queries):
            pred = int(model(queries[0][q : q + 1]).argmax())
            print(f"  query {q}: true digit {int(queries[1][q])}, predicted {pred}")
            print(
                _row(
                    "proponents",
                    top.proponent_ids[q].tolist(),
                    top.proponent_values[q].tolist(),
                    train[1],
                )
            )
            print(
                _row(
                    "opponents ",
                    top.opponent_ids[q].tolist(),
                    top.opponent_values[q].tolist(),
                    train[1],
                )
            )


if __name__ == "__main__":
    main()
