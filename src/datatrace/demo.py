"""A one-minute demo: attribute a digits classifier and print proponents and opponents.

Run with ``make demo`` or ``python -m datatrace.demo``. Trains a small MLP on scikit-learn's
bundled digits (no download), then asks the recommended method, EK-FAC influence with its
defaults (``make_attributor("if-ekfac", task)``: the best test LDS of ``make bench``'s
table after K-FAC), and TRAK for comparison, which training images made a few test
predictions.
"""

from __future__ import annotations

import argparse
import time

import torch

from datatrace import Task, TRAKAttributor, make_attributor
from datatrace.bench.digits import load_digits_split, train_digits_mlp


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
    model = train_digits_mlp(train)
    acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    print(
        f"trained a digits MLP on {len(train[1])} images in {time.perf_counter() - t0:.1f}s; test accuracy {acc:.3f}"
    )
    queries = (test[0][: args.queries], test[1][: args.queries])
    task = Task(model, target="margin")
    print(
        "\nA score says how much training on that image moved the query's margin (its logit"
        "\nfor the true digit against the others): proponents (> 0) raised it, opponents"
        "\n(< 0) lowered it. What to read is the ranking, which the benchmark's LDS grades"
        "\n(docs/benchmarks.md); magnitudes are on each method's own scale (EK-FAC's are"
        "\ninfluence estimates, TRAK's kernel scores), so do not compare them across methods."
    )
    for name, attributor in (
        (
            "EK-FAC influence (recommended; defaults: empirical Fisher, heuristic damping)",
            make_attributor("if-ekfac", task, batch_size=256),
        ),
        ("TRAK (proj_dim=512)", TRAKAttributor(task, proj_dim=512, batch_size=256)),
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
