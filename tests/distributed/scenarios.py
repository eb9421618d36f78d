"""The computations the distributed tests run twice: in 2 gloo processes and in one.

Every function returns plain tensors; the same code runs under an initialised process group
(``torch.multiprocessing.spawn`` or ``torchrun``) and without one, so any difference is the
library's. Tiny float64 models; odd sizes so the ranks get unequal slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from datatrace import Task, make_attributor
from datatrace.curvature import fit_kfac
from datatrace.errors import DataError, StoreError
from tests.models import classification_data, mlp

N_TRAIN, N_QUERY, BATCH = 21, 5, 4  # 6 batches, the last one short: 3 + 3 on 2 ranks


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return classification_data(n=N_TRAIN), classification_data(n=N_QUERY, seed=7)


def methods(store: Path | None = None) -> dict[str, torch.Tensor]:
    """fit + attribute / self_attribute / topk of several methods, and a K-FAC fit."""
    train, queries = data()
    out: dict[str, torch.Tensor] = {}
    settings = {
        "trak": ("trak", {"proj_dim": 16}, "margin"),
        # true Fisher: sampled labels, two passes
        "if-ekfac": ("if-ekfac", {"damping": 1e-2}, "loss"),
        # training factors recomputed when scoring, each rank its slice of the batches
        "if-ekfac-recompute": (
            "if-ekfac",
            {"damping": 1e-2, "train_features": "recompute"},
            "loss",
        ),
        "grad-dot": ("grad-dot", {}, "loss"),
        # factored damping: queries kept as layer factors, scored pairwise per rank
        "if-kfac-factored": ("if-kfac", {"factored_damping": True}, "loss"),
    }
    for name, (method_id, options, target) in settings.items():
        attr = make_attributor(
            method_id, Task(mlp(), target=target), batch_size=BATCH, **options
        ).fit(train)
        scores = attr.attribute(queries)
        out[f"{name}/scores"] = scores.values
        out[f"{name}/unit_ids"] = scores.unit_ids
        out[f"{name}/self"] = attr.self_attribute()
        top = attr.topk(queries, 3)
        out[f"{name}/top_ids"] = torch.cat([top.proponent_ids, top.opponent_ids], 1)
        out[f"{name}/top_values"] = torch.cat([top.proponent_values, top.opponent_values], 1)
    model = mlp()
    seen = count_examples(model)
    curv = fit_kfac(Task(model), train, kind="ekfac", batch_size=BATCH)
    for name, t in curv.to_arrays().items():
        out[f"kfac/{name}"] = t
    out["work/kfac"] = torch.tensor(seen[0])  # examples through this rank's forward passes
    model = mlp()
    seen = count_examples(model)
    recompute = make_attributor(
        "if-kfac", Task(model), batch_size=BATCH, damping=1e-2, train_features="recompute"
    ).fit(train)
    seen[0] = 0
    recompute.attribute(queries)  # every rank: the queries, and its slice of the train batches
    out["work/recompute"] = torch.tensor(seen[0])
    # one batch only: rank 1 featurizes nothing (in-memory gather and K-FAC with an idle rank)
    one = make_attributor("if-kfac", Task(mlp()), batch_size=64, damping=1e-2).fit(train)
    out["if-kfac-one-batch/scores"] = one.attribute(queries).values
    # groups and members go through the same loop
    groups = torch.arange(N_TRAIN) % 4
    grouped = make_attributor("grad-dot", Task(mlp()), batch_size=BATCH, groups=groups)
    out["grad-dot-groups/scores"] = grouped.fit(train).attribute(queries).values
    members = [mlp(seed=s).state_dict() for s in (0, 1)]
    ens = make_attributor(
        "trak", Task(mlp(), target="margin"), batch_size=BATCH, proj_dim=8, members=members
    )
    out["trak-members/scores"] = ens.fit(train).attribute(queries).values
    if store is not None:
        out["store/scores"] = store_scores(store)
        if (store.parent / "partial").exists():  # written by one process, half deleted
            out["partial/scores"] = store_scores(store.parent / "partial")
    return out


def count_examples(model: torch.nn.Module) -> list[int]:
    """A counter of the examples that go through ``model``'s forward passes."""
    seen = [0]

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen[0] += int(inputs[0].shape[0])

    model.register_forward_pre_hook(hook)
    return seen


def refusals(store: Path) -> dict[str, str]:
    """Errors every rank must raise (not hang on): rank-dependent queries, a stale store."""
    train, queries = data()
    out = {}
    attr = make_attributor("grad-dot", Task(mlp()), batch_size=BATCH).fit(train)
    x, y = queries
    try:
        attr.attribute((x + dist.get_rank(), y))
    except DataError as exc:
        out["queries"] = str(exc)
    stale = make_attributor(
        "trak", Task(mlp(), target="margin"), batch_size=BATCH, proj_dim=8, store=store
    )
    try:
        stale.fit(train)
    except StoreError as exc:
        out["store"] = str(exc)
    return out


def store_attributor(store: Path):
    return make_attributor(
        "trak",
        Task(mlp(), target="margin"),
        batch_size=BATCH,
        proj_dim=16,
        store=store,
        shard_bytes=BATCH * 16 * 8,  # shards of BATCH rows of 16 float64 features: 6 shards
    )


def store_scores(store: Path) -> torch.Tensor:
    train, queries = data()
    return store_attributor(store).fit(train).attribute(queries).values


def spawned_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` target: run :func:`methods` on a gloo group."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = methods(store=Path(out_dir) / "store")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        refused = refusals(Path(out_dir) / "store")
        (Path(out_dir) / f"refusals{rank}.json").write_text(json.dumps(refused))
    finally:
        dist.destroy_process_group()
