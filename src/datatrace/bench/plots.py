"""PNG plots of a benchmark run: efficacy vs cost (Pareto), per-query LDS, top proponents.

matplotlib is imported lazily (extra ``bench``), with the Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from datatrace.errors import ConfigError

__all__ = ["plot_lds_distribution", "plot_pareto", "plot_proponents"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("plots need matplotlib: pip install 'datatrace[bench]'") from exc
    return plt


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Scatter of test LDS (with its 95% interval) against fit + attribute seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        cost = r["fit_s"] + r["attribute_s"]
        low, high = r["ci"]
        ax.errorbar(
            [cost],
            [r["lds"]],
            yerr=[[r["lds"] - low], [high - r["lds"]]],
            fmt="o",
            capsize=3,
            label=r["method"],
        )
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Ticks at 1, 2, 5 x 10^k, written plainly: default minor labels of a short range overlap.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("fit + attribute time (s, log scale)")
    ax.set_ylabel("LDS on test queries")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lds_distribution(per_query: Mapping[str, torch.Tensor], path: Path, title: str) -> Path:
    """Box plot of each method's per-query Spearman correlations (NaN queries dropped)."""
    plt = _pyplot()
    names = list(per_query)
    data = [per_query[n][~torch.isnan(per_query[n])].tolist() for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4.5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_xlabel("method")
    ax.set_ylabel("per-query Spearman (LDS)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_proponents(
    setting: Any, values: torch.Tensor, path: Path, title: str, n_queries: int = 4, k: int = 3
) -> Path:
    """Grid of images: per test query, the query, its top ``k`` proponents and opponents.

    Args:
        setting: a setting with ``image_shape`` (e.g. the digits settings).
        values: ``(n_test, n_train)`` scores of the test queries.
        path: PNG file to write.
        title: figure title.
        n_queries: how many test queries (rows), the first ones.
        k: proponents and opponents per query.
    """
    if setting.image_shape is None:
        raise ConfigError(f"setting {setting.name!r} has no image_shape; cannot draw its inputs.")
    plt = _pyplot()
    xq, yq = setting.data.test_queries
    x, y = setting.data.train
    n_queries = min(n_queries, int(values.shape[0]))
    order = torch.argsort(values[:n_queries], dim=1, descending=True, stable=True)
    fig, axes = plt.subplots(
        n_queries, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.45 * n_queries + 0.6), squeeze=False
    )

    def show(ax: Any, image: torch.Tensor, caption: str) -> None:
        ax.imshow(image.reshape(setting.image_shape).float().numpy(), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=7)

    for row in range(n_queries):
        show(axes[row][0], xq[row], f"label {int(yq[row])}")
        axes[row][0].set_ylabel(f"test query {row}", fontsize=8)
        picks = [*order[row, :k].tolist(), *order[row, -k:].flip(0).tolist()]
        for col, i in enumerate(picks, start=1):
            show(axes[row][col], x[i], f"label {int(y[i])}, {float(values[row, i]):+.2g}")
    for col in range(2 * k + 1):
        axes[0][col].set_title(
            "query" if col == 0 else (f"proponent {col}" if col <= k else f"opponent {col - k}"),
            fontsize=8,
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
