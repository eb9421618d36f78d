"""Inspect the figures datatrace's plot functions draw, before they are closed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import datatrace.bench.plots as plots


@dataclass
class DrawnAxes:
    """What the first axes of a figure showed.

    Attributes:
        title: the axes' title.
        xlabel: the x label.
        ylabel: the y label.
        legend: legend entries (empty without a legend).
        texts: annotations written on the axes.
    """

    title: str
    xlabel: str
    ylabel: str
    legend: list[str]
    texts: list[str]


@contextmanager
def recorded_figures() -> Iterator[dict[str, DrawnAxes]]:
    """Record, by title, the first axes of every figure the plot functions close inside."""
    seen: dict[str, DrawnAxes] = {}
    plt = plots._pyplot()
    original = plt.close

    def record(fig):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen[ax.get_title()] = DrawnAxes(
            ax.get_title(),
            ax.get_xlabel(),
            ax.get_ylabel(),
            [] if legend is None else [t.get_text() for t in legend.get_texts()],
            [t.get_text() for t in ax.texts],
        )
        original(fig)

    plt.close = record
    try:
        yield seen
    finally:
        plt.close = original
