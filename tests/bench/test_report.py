"""The generated results tables: rendering, block rewriting, and the README kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datatrace.bench.report import (
    BLOCK,
    load_results,
    main,
    render_table,
    result_differences,
    update_blocks,
)
from datatrace.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def payload(**extra: object) -> dict:
    rows = [
        {
            "method": "trak",
            "label": "trak",
            "setting": {"proj_dim": 512},
            "lds": 0.2,
            "ci": [0.18, 0.22],
            "bytes_stored": 3 * 2**20,
            "fit_s": 1.0,
            "attribute_s": 0.5,
            "peak_rss_bytes": 2**27,
            "mislabel_auroc": 0.9,
        },
        {
            "method": "if-ekfac",
            "label": "if-ekfac",
            "lds": 0.3,
            "ci": [0.28, 0.32],
            "setting": {"damping": "heuristic", "solver_options": {"rank": 4}},
            "bytes_stored": 2048,
            "fit_s": 2.0,
            "attribute_s": 0.25,
            "peak_rss_bytes": 2**26,
        },
        {"method": "rps", "label": "rps", "error": [{"error": "boom"}]},
    ]
    base = {
        "setting": {"name": "toy"},
        "protocol": "lds-half",
        "random_lds": 0.004,
        "noise_ceiling": 0.4,
        "rows": rows,
    }
    return {**base, **extra}


def test_rows_sorted_by_lds_best_bold_baselines_last() -> None:
    lines = render_table(payload()).splitlines()
    assert lines[0] == "| method | setting (chosen on val) | test LDS | 95% CI | stored |"
    assert (
        lines[2]
        == "| **if-ekfac** | damping heuristic, rank 4 | **0.300** | [0.280, 0.320] | 2.0K |"
    )
    assert lines[3] == "| trak | proj_dim 512 | 0.200 | [0.180, 0.220] | 3.0M |"
    assert lines[4].startswith("| random scores | — | 0.004 |")
    assert lines[5].startswith("| noise ceiling | — | 0.400 |")
    assert lines[-1] == "rps failed on every grid point."


def test_task_and_cost_columns_appear_only_when_asked_or_run() -> None:
    p = payload(mislabel={"memorised": True, "training_loss_auroc": 0.93})
    table = render_table(p, cost=True).splitlines()
    assert "mislabel AUROC" in table[0] and "peak mem" in table[0]
    assert "| 0.900 | 1.00 | 0.50 | 128.0M | 3.0M |" in table[3]
    assert table[-3].startswith("| training loss | — | — | — | 0.930 |")
    widths = {line.count("|") for line in table if line.startswith("|")}
    assert len(widths) == 1  # every row has the header's number of cells


def test_update_blocks_rewrites_between_markers_only(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps(payload()))
    text = "intro\n<!-- bench-table: r.json -->\nstale\n<!-- bench-table:end -->\noutro\n"
    new = update_blocks(text, tmp_path)
    assert new.startswith("intro\n<!-- bench-table: r.json -->\n| method |")
    assert new.endswith("<!-- bench-table:end -->\noutro\n")
    assert "stale" not in new
    assert update_blocks(new, tmp_path) == new
    cost = update_blocks(text.replace("r.json -->", "r.json cost -->"), tmp_path)
    assert "| fit s |" in cost


def test_bad_results_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="datatrace bench --json"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="not the output"):
        load_results(tmp_path / "x.json")


def test_main_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text(json.dumps(payload()))
    assert main([str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out.startswith("| method |")


def test_compare_ignores_times_and_memory_and_names_every_other_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = payload(threads=1)
    rerun = json.loads(json.dumps(old))
    rerun["threads"] = 2
    for row in rerun["rows"][:2]:
        row["fit_s"], row["attribute_s"], row["peak_rss_bytes"] = 9.0, 9.0, 1
    assert result_differences(old, rerun) == []
    changed = json.loads(json.dumps(rerun))
    changed["rows"][1]["ci"][0] = 0.2800000001  # one bit-level change in if-ekfac's interval
    changed["rows"][0]["setting"]["proj_dim"] = 1024
    del changed["rows"][2]
    assert result_differences(old, changed) == [
        "rows[rps]: only in the old result",
        "rows[if-ekfac].ci[0]: 0.28 != 0.2800000001",
        "rows[trak].setting.proj_dim: 512 != 1024",
    ]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(changed))
    (tmp_path / "same.json").write_text(json.dumps(rerun))
    assert main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "same.json")]) == 0
    assert main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert "rows[trak].setting.proj_dim: 512 != 1024" in capsys.readouterr().out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_stored_results_tables_are_generated(page: Path) -> None:
    """The README's and docs' bench tables equal what `make readme-table` writes."""
    text = page.read_text()
    blocks = list(BLOCK.finditer(text))
    if page.name == "README.md":
        assert blocks, "README.md has no <!-- bench-table: ... --> block"
    for block in blocks:
        assert (ROOT / block["path"]).is_file(), block["path"]
    assert update_blocks(text, ROOT) == text, (
        f"{page.name}'s bench tables differ from their JSON; run `make readme-table`"
    )
