"""Where datatrace keeps its own code next to a library that does the same: speed side by side.

    .venv/bin/python benchmarks/own_vs_library.py

Three places (docs/own-code.md says why each is kept): per-query Spearman correlation of LDS
(``datatrace.metrics.spearman_batched`` vs ``scipy.stats.spearmanr`` per query), k-means of
the groupers (``datatrace.group.kmeans`` vs ``sklearn.cluster.KMeans``, one init each), and
conjugate gradients on many right-hand sides (``datatrace.solvers.CGSolver`` on the operator
vs ``scipy.sparse.linalg.cg`` once per right-hand side). Medians of 3 runs, 1 thread, each
pair back to back; also prints the largest difference of the results.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from datatrace.bench.questions.harness import median_time

_median_s = partial(median_time, repeats=3, warmup=0)


def main() -> None:
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import cg as scipy_cg
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans

    from datatrace.curvature import DenseOperator
    from datatrace.group import kmeans
    from datatrace.metrics.lds import spearman_batched
    from datatrace.solvers import make_solver

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    # LDS: 300 queries x 100 subsets
    a, b = torch.randn(100, 300, generator=g, dtype=torch.float64), torch.randn(100, 300)
    ours = spearman_batched(a, b.double())
    ref = np.array([spearmanr(a[:, q], b[:, q]).statistic for q in range(300)])
    print(
        f"spearman (300 queries x 100 subsets): ours {_median_s(lambda: spearman_batched(a, b)):.4f} s, "
        f"scipy per query {_median_s(lambda: [spearmanr(a[:, q], b[:, q]) for q in range(300)]):.4f} s, "
        f"max diff {np.abs(ours.numpy() - ref).max():.1e}"
    )

    # groupers: 1,437 x 64 points, 90 clusters
    x = torch.randn(1437, 64, generator=g)
    t_ours = _median_s(lambda: kmeans(x, 90, seed=0))
    t_skl = _median_s(lambda: KMeans(90, n_init=1, random_state=0).fit(x.numpy()))
    labels = kmeans(x, 90, seed=0)
    centres = torch.zeros(90, 64).index_add_(0, labels, x)
    centres /= torch.bincount(labels, minlength=90).clamp_min(1)[:, None].float()
    inertia = float(((x - centres[labels]) ** 2).sum())
    skl = KMeans(90, n_init=1, random_state=0).fit(x.numpy())
    print(
        f"k-means (1,437 x 64, k=90): ours {t_ours:.3f} s (inertia {inertia:.0f}), "
        f"scikit-learn {t_skl:.3f} s (inertia {skl.inertia_:.0f})"
    )

    # CG: SPD 2,000 x 2,000, 64 right-hand sides, 50 iterations
    m = torch.randn(2000, 2000, generator=g, dtype=torch.float64)
    spd = m @ m.T / 2000 + 0.1 * torch.eye(2000, dtype=torch.float64)
    rhs = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    solver = make_solver("cg", max_iter=50, rtol=1e-300)
    inv = solver.prepare(DenseOperator(spd), 0.0)
    x_ours = inv.apply(rhs)
    op = ScipyOperator((2000, 2000), matvec=lambda v: spd.numpy() @ v, dtype=np.float64)
    x_ref = np.stack(
        [scipy_cg(op, rhs[:, j].numpy(), maxiter=50, rtol=1e-300)[0] for j in range(64)], 1
    )
    t_ours = _median_s(lambda: inv.apply(rhs))
    t_scipy = _median_s(
        lambda: [scipy_cg(op, rhs[:, j].numpy(), maxiter=50, rtol=1e-300) for j in range(64)]
    )
    diff = np.abs(x_ours.numpy() - x_ref).max() / np.abs(x_ref).max()
    print(
        f"CG (2,000 x 2,000 SPD, 64 right-hand sides, 50 iterations): ours {t_ours:.3f} s, "
        f"scipy per column {t_scipy:.3f} s, max relative diff {diff:.1e}"
    )


if __name__ == "__main__":
    main()
