"""LDS of EK-FAC influence on ``pydoc-charlm`` with low-rank query gradients (``query_rank``).

    .venv/bin/python benchmarks/query_rank_charlm.py --ranks none,1,4,16

The model, task and attributor of ``benchmarks/kronfluence_charlm.py`` (the setting's seed-0
model, the 13 ``nn.Linear`` layers, ``if-ekfac`` with the true Fisher, one sampled label,
damping 1e-4, batch size 64) with ``train_features="recompute"``, the cached LDS ground truth
(20 half-subsets x 2 seeds; refused when missing) and the 300 test queries. Each rank prints
its test LDS, the Pearson correlation of its scores with the full-rank ones, and fit +
attribute seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kronfluence_charlm import cached_ground_truth, trained_model
from datatrace import make_attributor
from datatrace.bench.cache import GroundTruthSpec
from datatrace.bench.settings import get_setting
from datatrace.metrics import lds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="none,1,4,16", help="comma-separated; none = full rank")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [None if r == "none" else int(r) for r in args.ranks.split(",") if r]
    setting = get_setting("pydoc-charlm")
    gt = cached_ground_truth(setting, GroundTruthSpec(m=20, seeds=2), allow_retraining=False)
    task = setting.make_task(trained_model(setting), module_types=(nn.Linear,))
    full = None
    for rank in ranks:
        t0 = time.perf_counter()
        attr = make_attributor(
            "if-ekfac",
            task,
            damping=1e-4,
            fisher="true",
            fisher_samples=1,
            batch_size=64,
            train_features="recompute",
            query_rank=rank,
        ).fit(setting.data.train)
        values = attr.attribute(setting.data.test_queries).values
        seconds = time.perf_counter() - t0
        full = values if full is None and rank is None else full
        pearson = (
            float(torch.corrcoef(torch.stack([values.flatten(), full.flatten()]))[0, 1])
            if full is not None
            else float("nan")
        )
        result = lds(values, gt.subsets, gt.targets[:, setting.n_val :])
        row = {"query_rank": rank, "lds": result.mean, "pearson_vs_full": pearson}
        print(json.dumps({**row, "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
