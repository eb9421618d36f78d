"""PNG plots of a benchmark run: efficacy vs cost (Pareto), per-query LDS, top proponents.

Efficacy-vs-cost plots draw ensembles as lines over their number of members K
(:func:`plot_cost_curves`), against serving or training time.

matplotlib is imported lazily (extra ``bench``), with the Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from datatrace.errors import ConfigError

__all__ = [
    "CostPoint",
    "plot_cost_curves",
    "plot_lds_distribution",
    "plot_pareto",
    "plot_proponents",
]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("plots need matplotlib: pip install 'datatrace[bench]'") from exc
    return plt


@dataclass(frozen=True)
class CostPoint:
    """One point of an efficacy-vs-cost plot.

    Attributes:
        method: method id (points of one method share a colour).
        series: the line the point belongs to, e.g. ``"trak dropout"`` (a plain method: its id).
        k: members of the ensemble (the point's label), or None for a plain method.
        cost: the x value (seconds).
        lds: test LDS.
        ci: its 95% interval ``(low, high)``.
    """

    method: str
    series: str
    k: int | None
    cost: float
    lds: float
    ci: tuple[float, float]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_cost_curves(points: Sequence[CostPoint], path: Path, title: str, xlabel: str) -> Path:
    """Test LDS (with its 95% interval) against a cost, one line per series, points labelled K.

    Series of one method share a colour and differ in marker; the x axis is log-scaled.
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(9.0, 5.0))
    methods = list(dict.fromkeys(p.method for p in points))
    series = list(dict.fromkeys(p.series for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds_seen: dict[str, int] = {}
    for name in series:
        pts = sorted((p for p in points if p.series == name), key=lambda p: (p.k or 0, p.cost))
        method = pts[0].method
        marker = _MARKERS[kinds_seen.get(method, 0) % len(_MARKERS)]
        kinds_seen[method] = kinds_seen.get(method, 0) + 1
        ax.errorbar(
            [p.cost for p in pts],
            [p.lds for p in pts],
            yerr=[[p.lds - p.ci[0] for p in pts], [p.ci[1] - p.lds for p in pts]],
            fmt=f"{marker}-" if len(pts) > 1 else marker,
            color=colours[methods.index(method) % len(colours)],
            capsize=3,
            label=name,
        )
        for p in pts:
            if p.k is not None:
                ax.annotate(
                    f"K={p.k}",
                    (p.cost, p.lds),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    ax.set_xscale("log")
    # Ticks at 1, 2, 5 x 10^k, written plainly: default minor labels of a short range overlap.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("LDS on test queries")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(row: Mapping[str, Any]) -> str:
    ensemble = row.get("ensemble")
    if not ensemble:
        return str(row["method"])
    options = [
        f"{k}={'+'.join(v) if k == 'layers' else v}"
        for k, v in ensemble.items()
        if k not in ("kind", "k")
    ]
    return " ".join([str(row["method"]), ":".join([ensemble["kind"], *options])])


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
    cost: Literal["serve", "train"] = "serve",
) -> Path:
    """Bench rows: test LDS against serving (fit + attribute) or training seconds.

    Ensembles of a method and kind form a line whose points are labelled by K.
    """
    if cost not in ("serve", "train"):
        raise ConfigError(f"cost must be 'serve' or 'train'; got {cost!r}.")
    points = [
        CostPoint(
            method=str(r["method"]),
            series=_series(r),
            k=r["ensemble"]["k"] if r.get("ensemble") else None,
            cost=float(r["fit_s"] + r["attribute_s"] if cost == "serve" else r["train_s"]),
            lds=float(r["lds"]),
            ci=(float(r["ci"][0]), float(r["ci"][1])),
        )
        for r in rows
    ]
    xlabel = (
        "serving time: fit + attribute (s, log scale)"
        if cost == "serve"
        else "training time: every model and adapter (s, log scale)"
    )
    return plot_cost_curves(points, path, title, xlabel)


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
