"""Explaining a CNN's predictions with proponents and opponents, as a picture.

1. scikit-learn's bundled 8x8 digits (no download) as ``(n, 1, 8, 8)`` images, 80/20 split;
2. a small CNN (two 3x3 convolutions, max-pooling, two linear layers) trained with Adam;
3. the margin of each *predicted* label (``Task(model, target="margin")``, queries labelled
   with the model's own predictions: "why this answer?") is attributed to the training
   images with EK-FAC influence (``if-ekfac``; ``--method trak`` etc. also work). The
   hook engine handles ``Conv2d`` like ``Linear``: its gradient is an outer product of
   unfolded input patches and output gradients;
4. ``attributor.topk(queries, k)`` gives each query's ``k`` strongest proponents (training
   on them raises the margin) and opponents (they lower it), without holding the whole
   score matrix. A PNG grid (``--out``) shows, per row, a test image, its proponents and
   its opponents, each with its training label. The grid's first rows are misclassified
   test images, when there are any;
5. as a check, on ``--n-check`` test images: how often a top proponent's training label
   is the query's predicted label (10% by chance), and a top opponent's.

Run ``python examples/explain_cnn.py --out cnn.png`` (``--quick``: fewer epochs and
checked queries, for the tests). Needs scikit-learn and matplotlib.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from datatrace import Task, make_attributor

SETTINGS = {"if-ekfac": {"damping": "heuristic", "fisher": "empirical"}, "trak": {}}


def digits(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """``(train, test)`` images ``(n, 1, 8, 8)`` in [0, 1], a seeded 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(y))
    return (x[perm[:n]], y[perm[:n]]), (x[perm[n:]], y[perm[n:]])


def train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def draw(path: str, queries, labels, pred, top, train) -> None:
    """One row per query: the query, its k proponents (green) and k opponents (red)."""
    import matplotlib

    matplotlib.use("Agg")  # write files, never open a window
    import matplotlib.pyplot as plt

    rows, k = top.proponent_ids.shape
    fig, axes = plt.subplots(rows, 2 * k + 1, figsize=(1.2 * (2 * k + 1), 1.4 * rows))
    for r in range(rows):
        cells = [(queries[r], f"true {labels[r]}\npred {pred[r]}", "black")]
        for sign, ids, color in (("+", top.proponent_ids, "green"), ("-", top.opponent_ids, "red")):
            cells += [(train[0][i], f"{sign} label {train[1][i]}", color) for i in ids[r].tolist()]
        for ax, (image, title, color) in zip(axes[r], cells):
            ax.imshow(image[0], cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("test image | top proponents (+) | top opponents (-)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="explain_cnn.png", help="where to write the PNG grid")
    p.add_argument("--method", default="if-ekfac", help="a method id without checkpoints")
    p.add_argument("--epochs", type=int, default=20, help="Adam epochs (batch 64)")
    p.add_argument("--k", type=int, default=5, help="proponents and opponents per query")
    p.add_argument("--rows", type=int, default=6, help="test images in the picture")
    p.add_argument("--n-check", type=int, default=360, help="test images in the label check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer epochs, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_check = 8, 100
    t_start = time.perf_counter()

    train, (x_test, y_test) = digits(args.seed)
    model = train_cnn(*train, args.epochs, args.seed)
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    wrong = (pred != y_test).nonzero().squeeze(1)
    accuracy = float((pred == y_test).float().mean())
    print(
        f"CNN after {args.epochs} epochs: test accuracy {accuracy:.3f}"
        f" ({len(wrong)} of {len(y_test)} test images misclassified)"
    )

    t0 = time.perf_counter()
    task = Task(model, target="margin")  # the margin of the label each query carries
    attributor = make_attributor(args.method, task, **SETTINGS.get(args.method, {})).fit(train)
    checked = torch.arange(min(args.n_check, len(y_test)))
    top = attributor.topk((x_test[checked], pred[checked]), args.k)  # "why this prediction?"
    seconds = time.perf_counter() - t0
    print(f"{args.method}: fit and top-{args.k} of {len(checked)} queries, {seconds:.1f} s")
    same_pro = float((train[1][top.proponent_ids] == pred[checked, None]).float().mean())
    same_opp = float((train[1][top.opponent_ids] == pred[checked, None]).float().mean())
    print(f"top-{args.k} proponents labelled as the prediction: {same_pro:.3f} (chance about 0.1)")
    print(f"top-{args.k} opponents labelled as the prediction: {same_opp:.3f}")

    shown = torch.cat([wrong, checked])[: args.rows]  # misclassified images first
    top_shown = attributor.topk((x_test[shown], pred[shown]), args.k)
    for r, i in enumerate(shown.tolist()):
        pro = ", ".join(f"{j}:{int(train[1][j])}" for j in top_shown.proponent_ids[r].tolist())
        opp = ", ".join(f"{j}:{int(train[1][j])}" for j in top_shown.opponent_ids[r].tolist())
        truth, guess = int(y_test[i]), int(pred[i])
        print(f"test {i} (true {truth}, pred {guess}): proponents {pro}; opponents {opp}")
    draw(args.out, x_test[shown], y_test[shown].tolist(), pred[shown].tolist(), top_shown, train)
    print(f"wrote {args.out} (train id:label above)")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
