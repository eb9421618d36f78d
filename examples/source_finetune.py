"""Source on a pretrain -> fine-tune run: which stage's examples made a prediction?

1. scikit-learn's bundled 8x8 digits (no download), 80/20 split. An MLP is *pretrained*
   with plain SGD on the training digits 0-4, then *fine-tuned* on the digits 5-9 only
   (same 10-way head, a lower learning rate). A ``CheckpointRecorder`` saves checkpoints
   during both stages, and ``recorder.set_stage(indices)`` tells it which training
   examples each stage draws from;
2. test digits of both halves are attributed to the whole training set with Source
   (``source``: approximate unrolled differentiation over the recorded trajectory, Bae et
   al. 2024) and, for comparison, with EK-FAC influence (``if-ekfac``) on the final model
   alone, which assumes the model is at an optimum of one loss over all the data;
3. for each method and each half, it reports which stage the top proponents come from and
   how often they have the query's own class.

Source knows that the pretraining examples were absent from the fine-tuning steps: they
reach the final model only through what fine-tuning kept of their effect. EK-FAC at the
final weights cannot tell the stages apart. Measured (seed 0, full run): fine-tuning on
5-9 alone makes the model forget 0-4 entirely (test accuracy 0.000 there, 0.974 on 5-9).
For test digits 5-9, Source's top-10 proponents are 99.8% fine-tuning examples (99.0% of
the query's class); EK-FAC's only 69.3% (66.9%): it credits pretraining examples of
*other* classes that the final stage never saw.

Run ``python examples/source_finetune.py`` (``--quick``: fewer queries, for the tests).
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


def digits(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """``(train, test)``: pixels scaled to [0, 1], a seeded 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(y))
    return (x[perm[:n]], y[perm[:n]]), (x[perm[n:]], y[perm[n:]])


def train_two_stages(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace):
    """SGD on digits 0-4, then on 5-9; returns the model and the recorded trajectory."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    recorder = CheckpointRecorder(every=args.every)
    g = torch.Generator().manual_seed(args.seed)
    step = 0
    stages = [(y < 5, args.pretrain_epochs, args.lr), (y >= 5, args.finetune_epochs, args.lr / 2)]
    for mask, epochs, lr in stages:
        indices = mask.nonzero().squeeze(1)
        recorder.set_stage(indices)  # the following checkpoints' steps use only these
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(epochs):
            for idx in indices[torch.randperm(len(indices), generator=g)].split(32):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
                recorder.maybe_record(model, step, optimizer=opt)
        if recorder.trajectory[-1].step != step:
            recorder.record(model, step, optimizer=opt)  # close every stage with a checkpoint
    return model.eval(), recorder.trajectory


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.2, help="pretraining SGD learning rate")
    p.add_argument("--every", type=int, default=80, help="SGD steps between checkpoints")
    p.add_argument("--n-query", type=int, default=100, help="test digits per half")
    p.add_argument("--k", type=int, default=10, help="top proponents inspected per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer queries, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.n_query = 30
    t_start = time.perf_counter()

    train, (x_test, y_test) = digits(args.seed)
    model, trajectory = train_two_stages(*train, args)
    finetuned = train[1] >= 5  # (n_train,): which stage each training example belongs to
    halves = {"pretrained digits 0-4": y_test < 5, "fine-tuned digits 5-9": y_test >= 5}
    with torch.no_grad():
        correct = model(x_test).argmax(1) == y_test
    accuracy = ", ".join(f"{h} {float(correct[m].float().mean()):.3f}" for h, m in halves.items())
    print(f"test accuracy after fine-tuning: {accuracy}")
    print(f"{len(trajectory)} checkpoints at steps {[c.step for c in trajectory]}")

    settings = {
        "source": {"damping": 1e-3},
        "if-ekfac": {"damping": "heuristic", "fisher": "empirical"},
    }
    for method, kwargs in settings.items():
        t0 = time.perf_counter()
        task = Task(model, checkpoints=trajectory if method == "source" else None)
        attributor = make_attributor(method, task, **kwargs).fit(train)
        print(f"\n== {method} ({time.perf_counter() - t0:.1f} s)")
        for half, mask in halves.items():
            queries = mask.nonzero().squeeze(1)[: args.n_query]
            scores = attributor.attribute((x_test[queries], y_test[queries]))
            print(f"{half}: scores of shape {tuple(scores.values.shape)}")
            top = scores.topk(args.k)
            for kind, ids in (("proponents", top.proponent_ids), ("opponents", top.opponent_ids)):
                from_ft = float(finetuned[ids].float().mean())
                same = float((train[1][ids] == y_test[queries, None]).float().mean())
                print(
                    f"  top-{args.k} {kind}: {from_ft:.3f} from fine-tuning, "
                    f"{1 - from_ft:.3f} from pretraining, {same:.3f} of the query's class"
                )
            mass = scores.values.abs().cpu()
            share = float(mass[:, finetuned].sum() / mass.sum())
            print(f"  share of |scores| on fine-tuning examples: {share:.3f}")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
