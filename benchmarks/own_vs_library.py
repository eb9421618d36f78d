"""Where datatrace keeps its own code next to a library that does the same: speed side by side.

    .venv/bin/python benchmarks/own_vs_library.py

Per-query Spearman of LDS, k-means of the groupers and CG on many right-hand sides, ours and
the library's (docs/own-code.md says which and why): medians of 3 runs, 1 thread, each pair
back to back, and the largest difference of the results.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg
from scipy.stats import spearmanr
from sklearn.cluster import KMeans

from datatrace.bench.questions.harness import median_time
from datatrace.curvature import DenseOperator
from datatrace.group import kmeans
from datatrace.metrics.lds import spearman_batched
from datatrace.solvers import make_solver

_median_s = partial(median_time, repeats=3, warmup=0)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    # LDS: 300 queries x 100 subsets
    a, b = torch.randn(100, 300, generator=g, dtype=torch.float64), torch.randn(100, 300)

    def scipy_per_query() -> list[Any]:
        return [spearmanr(a[:, q], b[:, q]) for q in range(300)]

    ref = [r.statistic for r in scipy_per_query()]
    diff = np.abs(spearman_batched(a, b.double()).numpy() - ref)
    print(
        f"spearman (300 queries x 100 subsets): ours {_median_s(lambda: spearman_batched(a, b)):.4f} s, "
        f"scipy per query {_median_s(scipy_per_query):.4f} s, max diff {diff.max():.1e}"
    )

    # groupers: 1,437 x 64 points, 90 clusters
    x = torch.randn(1437, 64, generator=g)
    t_ours = _median_s(lambda: kmeans(x, 90, seed=0))
    t_skl = _median_s(lambda: KMeans(90, n_init=1, random_state=0).fit(x.numpy()))
    labels = kmeans(x, 90, seed=0)
    inertia = sum(float(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum()) for c in range(90))
    skl = KMeans(90, n_init=1, random_state=0).fit(x.numpy())
    print(
        f"k-means (1,437 x 64, k=90): ours {t_ours:.3f} s (inertia {inertia:.0f}), "
        f"scikit-learn {t_skl:.3f} s (inertia {skl.inertia_:.0f})"
    )

    # CG: SPD 2,000 x 2,000, 64 right-hand sides, 50 iterations
    m = torch.randn(2000, 2000, generator=g, dtype=torch.float64)
    spd = m @ m.T / 2000 + 0.1 * torch.eye(2000, dtype=torch.float64)
    rhs = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    inv = make_solver("cg", max_iter=50, rtol=1e-300).prepare(DenseOperator(spd), 0.0)
    op = LinearOperator((2000, 2000), matvec=lambda v: spd.numpy() @ v, dtype=np.float64)

    def scipy_per_column() -> list[Any]:
        return [cg(op, rhs[:, j].numpy(), maxiter=50, rtol=1e-300) for j in range(64)]

    x_ref = np.stack([sol for sol, _ in scipy_per_column()], 1)
    diff = np.abs(inv.apply(rhs).numpy() - x_ref).max() / np.abs(x_ref).max()
    print(
        f"CG (2,000 x 2,000 SPD, 64 right-hand sides, 50 iterations): ours "
        f"{_median_s(lambda: inv.apply(rhs)):.3f} s, scipy per column "
        f"{_median_s(scipy_per_column):.3f} s, max relative diff {diff:.1e}"
    )


if __name__ == "__main__":
    main()
