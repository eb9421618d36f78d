"""PNG plots of a benchmark run: efficacy vs cost (Pareto) and the per-query LDS distribution.

matplotlib is imported lazily (extra ``bench``), with the Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from datatrace.errors import ConfigError

__all__ = ["plot_lds_distribution", "plot_pareto"]


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
