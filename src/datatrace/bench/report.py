"""Markdown tables from the JSON that ``datatrace bench --json PATH`` writes.

The README's results table and the per-setting tables of ``docs/benchmarks.md`` are
generated, never typed: each sits between two markers that name the JSON it comes from,

.. code-block:: text

    <!-- bench-table: docs/results/bench-default.json -->
    ...the generated table...
    <!-- bench-table:end -->

and ``python -m datatrace.bench.report --update README.md docs/benchmarks.md`` (``make
readme-table``) rewrites every such block from its JSON. ``python -m datatrace.bench.report
PATH`` prints the table of one results file; ``--compare OLD NEW`` lists every result that
differs between two runs (exit status 1), ignoring times and memory: the check that a
refactor left every score the same (:func:`result_differences`).

Columns: the row's label, the grid point chosen on the validation queries, test LDS and its
95% bootstrap interval (DESIGN.md §9), mislabel AUROC and LOO Pearson where the run has those
tasks, and the bytes of fitted state; ``cost=True`` adds fit and attribute seconds and peak
memory (single cold runs: compare them within one table only). Rows are sorted by test LDS,
the best in bold; random scores, the noise ceiling and the training-loss ranking follow.

Example:
    >>> payload = {"setting": {"name": "toy"}, "protocol": "lds-half", "random_lds": 0.01,
    ...            "noise_ceiling": None, "rows": [{"method": "grad-dot", "setting": {},
    ...            "lds": 0.2, "ci": [0.1, 0.3], "bytes_stored": 2048}]}
    >>> print(render_table(payload).splitlines()[2])
    | **grad-dot** | — | **0.200** | [0.100, 0.300] | 2.0K |
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datatrace.errors import ConfigError

__all__ = [
    "load_results",
    "markdown_row",
    "markdown_table",
    "print_table",
    "render_table",
    "update_blocks",
    "update_file",
]

BLOCK = re.compile(
    r"(?P<start><!-- bench-table: (?P<path>\S+?)(?P<cost> cost)? -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- bench-table:end -->)",
    re.S,
)
DASH = "—"


def load_results(path: str | Path) -> dict[str, Any]:
    """The payload of a ``datatrace bench --json`` file.

    Raises:
        ConfigError: When the file is missing or is not a bench results file.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read bench results {str(path)!r} ({exc}); write one with "
            "`datatrace bench --json PATH`."
        ) from exc
    if not isinstance(payload, dict) or "rows" not in payload or "setting" not in payload:
        raise ConfigError(
            f"{str(path)!r} is not the output of `datatrace bench --json` (no 'rows' or "
            "'setting' key)."
        )
    return payload


def _size(value: int | None) -> str:
    if value is None:
        return DASH
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value}B"


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return DASH
    return f"{value:{spec}}"


def _options(chosen: dict[str, Any] | None) -> str:
    """``{"fisher": "empirical", "solver_options": {"rank": 100}}`` -> ``fisher empirical, rank 100``."""
    if not chosen:
        return DASH
    flat: dict[str, Any] = {}
    for key, value in chosen.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return ", ".join(f"{k} {'—' if v is None else v}" for k, v in flat.items())


def markdown_row(cells: Iterable[Any]) -> str:
    """``| a | b |``: one row of a markdown table."""
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Iterable[Any]] = ()) -> str:
    """A markdown table: the header, its ``|---|`` rule and ``rows`` (none: the header alone,
    for rows printed as they come)."""
    return "\n".join([markdown_row(header), "|" + "---|" * len(header), *map(markdown_row, rows)])


def render_table(payload: dict[str, Any], *, cost: bool = False) -> str:
    """The markdown table of one bench run (see the module docstring for the columns)."""
    rows = [r for r in payload["rows"] if "error" not in r]
    failed = [r for r in payload["rows"] if "error" in r]
    mislabel = bool(payload.get("mislabel", {}).get("memorised"))
    loo = "loo" in payload
    head = ["method", "setting (chosen on val)", "test LDS", "95% CI"]
    head += ["mislabel AUROC"] * mislabel + ["LOO Pearson"] * loo
    head += ["fit s", "attr s", "peak mem"] * cost + ["stored"]
    lines = [markdown_table(head)]
    rows.sort(key=lambda r: -r["lds"])
    best = rows[0]["lds"] if rows else None
    for r in rows:
        bold = r["lds"] == best
        label = r.get("label") or r["method"]
        cells = [
            f"**{label}**" if bold else label,
            _options(r.get("setting")),
            f"**{r['lds']:.3f}**" if bold else f"{r['lds']:.3f}",
            f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
        ]
        if mislabel:
            cells.append(_num(r.get("mislabel_auroc")))
        if loo:
            cells.append(_num(r.get("loo_pearson")))
        if cost:
            cells += [
                _num(r.get("fit_s"), ".2f"),
                _num(r.get("attribute_s"), ".2f"),
                _size(r.get("peak_rss_bytes")),
            ]
        cells.append(_size(r.get("bytes_stored")))
        lines.append(markdown_row(cells))
    blank = [DASH] * (len(head) - 3)
    lines.append(markdown_row(["random scores", DASH, f"{payload['random_lds']:.3f}", *blank]))
    if payload.get("noise_ceiling") is not None:
        ceiling = f"{payload['noise_ceiling']:.3f}"
        lines.append(markdown_row(["noise ceiling", DASH, ceiling, *blank]))
    if mislabel:
        auroc = _num(payload["mislabel"].get("training_loss_auroc"))
        cells = ["training loss", DASH, DASH, DASH, auroc] + [DASH] * (len(head) - 5)
        lines.append(markdown_row(cells))
    for r in failed:
        lines.append(f"\n{r.get('label') or r['method']} failed on every grid point.")
    return "\n".join(lines)


def update_blocks(text: str, root: str | Path = ".") -> str:
    """``text`` with every bench-table block regenerated from the JSON its marker names.

    Paths in the markers are relative to ``root`` (the repository root). A marker ending in
    `` cost -->`` gets the cost columns.
    """
    root = Path(root)

    def fill(match: re.Match[str]) -> str:
        payload = load_results(root / match["path"])
        table = render_table(payload, cost=bool(match["cost"]))
        return f"{match['start']}{table}\n{match['end']}"

    return BLOCK.sub(fill, text)


def update_file(path: str | Path, root: str | Path = ".") -> bool:
    """Rewrite the bench-table blocks of ``path`` in place; True when it changed."""
    path = Path(path)
    text = path.read_text()
    new = update_blocks(text, root)
    if new != text:
        path.write_text(new)
    return new != text


def _fmt(value: Any, width: int, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return f"{'—':>{width}s}"
    return f"{value:{width}{spec}}"


def _mib(value: int | None) -> str:
    """Bytes in MiB, or in KiB below 1 MiB (a small model's weights would read 0.0M)."""
    if value is None:
        return "—"
    return f"{value / 2**20:.1f}M" if value >= 2**20 else f"{value / 2**10:.1f}K"


def print_table(payload: dict[str, Any]) -> None:
    """Print the benchmark table (one row per method and ensemble, then baselines and notes).

    Cost columns: ``train s`` (every training the row needs), ``fit s`` and ``attr s``,
    ``serve s`` (their sum), peak memory, member ``weights`` and fitted state ``stored``.
    """
    name = payload["setting"]["name"]
    mislabel = payload.get("mislabel", {}).get("memorised", False)
    loo = "loo" in payload
    width = max([14, *(len(r.get("label", r["method"])) for r in payload["rows"])])
    protocol = payload.get("protocol", "lds-half")
    print(
        f"\n{name}: LDS on test queries under protocol {protocol} (hyperparameters chosen on "
        "validation queries)"
    )
    head = f"{'method':{width}s} {'LDS':>7s} {'95% CI':>17s}"
    if mislabel:
        head += f" {'mislabel AUROC':>14s}"
    if loo:
        head += f" {'LOO r':>6s} {'slope':>6s}"
    head += (
        f" {'train s':>8s} {'fit s':>8s} {'attr s':>8s} {'serve s':>8s} {'peak mem':>9s}"
        f" {'weights':>9s} {'stored':>9s}  setting"
    )
    print(head)
    for r in payload["rows"]:
        label = r.get("label", r["method"])
        if "error" in r:
            print(f"{label:{width}s} failed on every grid point: {r['error'][0]['error']}")
            continue
        ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        line = f"{label:{width}s} {r['lds']:7.3f} {ci:>17s}"
        if mislabel:
            line += f" {_fmt(r.get('mislabel_auroc'), 14)}"
        if loo:
            line += f" {_fmt(r.get('loo_pearson'), 6)} {_fmt(r.get('loo_slope'), 6, '.2f')}"
        line += (
            f" {r['train_s']:8.2f} {r['fit_s']:8.2f} {r['attribute_s']:8.2f}"
            f" {r['serve_s']:8.2f} {_mib(r['peak_rss_bytes']):>9s}"
            f" {_mib(r['weight_bytes']):>9s} {_mib(r['bytes_stored']):>9s}"
            f"  {json.dumps(r['setting'])}"
        )
        print(line)
    print(f"{'random scores':{width}s} {payload['random_lds']:7.3f}")
    if payload["noise_ceiling"] is not None:
        print(f"{'noise ceiling':{width}s} {payload['noise_ceiling']:7.3f}")
    if mislabel:
        pad = " " * 25
        print(f"{'training loss':{width}s}{pad} {payload['mislabel']['training_loss_auroc']:14.3f}")
    removal = payload.get("removal")
    if removal:
        print(
            f"\nremoval: fraction of {len(removal['queries'])} correctly predicted test queries "
            f"flipped after removing their top-k proponents (k = {removal['ks']})"
        )
        for method, fractions in removal["fraction_flipped"].items():
            print(f"{method:{width}s} " + " ".join(f"{f:6.2f}" for f in fractions))
    for note in payload.get("notes", []):
        print(f"note: {note}")


# what a rerun of the same code may change: wall times, memory, the machine's threads
_COST_KEYS = frozenset({"threads", "peak_rss_bytes", "peak_rss_total_bytes", "seconds"})


def result_differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Every place where two ``datatrace bench --json`` results differ, timings and memory
    excluded (keys ending in ``_s``, ``seconds``, peak memory, threads); numbers compare
    exactly (JSON round-trips floats bit for bit). Rows are matched by their label.

    Example:
        >>> a = {"rows": [{"label": "trak", "lds": 0.25, "fit_s": 1.0}]}
        >>> result_differences(a, {"rows": [{"label": "trak", "lds": 0.25, "fit_s": 2.0}]})
        []
        >>> result_differences(a, {"rows": [{"label": "trak", "lds": 0.26, "fit_s": 1.0}]})
        ['rows[trak].lds: 0.25 != 0.26']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key in _COST_KEYS or str(key).endswith("_s"):
                continue
            here = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                out.append(f"{here}: only in the {'new' if key in new else 'old'} result")
            elif key == "rows" and isinstance(old[key], list) and isinstance(new[key], list):
                out += _row_differences(old[key], new[key], here)
            else:
                out += result_differences(old[key], new[key], here)
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: {len(old)} entries != {len(new)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(old, new))
            for d in result_differences(a, b, f"{where}[{i}]")
        ]
    return [] if old == new and type(old) is type(new) else [f"{where}: {old!r} != {new!r}"]


def _row_differences(old: list[Any], new: list[Any], where: str) -> list[str]:
    label = lambda r: str(r.get("label", r.get("method"))) if isinstance(r, dict) else repr(r)  # noqa: E731
    olds, news = {label(r): r for r in old}, {label(r): r for r in new}
    out = [
        f"{where}[{k}]: only in the {'new' if k in news else 'old'} result"
        for k in sorted(set(olds) ^ set(news))
    ]
    for k in sorted(set(olds) & set(news)):
        out += result_differences(olds[k], news[k], f"{where}[{k}]")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datatrace.bench.report",
        description="Markdown tables from `datatrace bench --json` results.",
    )
    parser.add_argument("results", nargs="?", type=Path, help="print the table of this JSON")
    parser.add_argument("--cost", action="store_true", help="add fit/attribute s, peak memory")
    parser.add_argument(
        "--update",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="rewrite the <!-- bench-table: PATH --> blocks of these markdown files",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="base of marker paths")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="list what differs between two results, times and memory excluded (exit 1 if any)",
    )
    args = parser.parse_args(argv)
    if args.compare:
        old, new = args.compare
        diffs = result_differences(load_results(old), load_results(new))
        for line in diffs:
            print(line)
        print(f"{len(diffs)} difference(s)", file=sys.stderr)
        return 1 if diffs else 0
    if args.results is None and not args.update:
        parser.error("give a results JSON to print, or --update FILE ...")
    if args.results is not None:
        print(render_table(load_results(args.results), cost=args.cost))
    for path in args.update:
        changed = update_file(path, args.root)
        print(f"{path}: {'updated' if changed else 'unchanged'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
