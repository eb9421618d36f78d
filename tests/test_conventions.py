"""Ecosystem conventions: python -m datatrace, __version__, the SPDX license, no print in
library code, logging through the "datatrace" logger (docs/conventions.md)."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datatrace
from datatrace.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "datatrace"

# Modules whose printed output is the product (the command line's tables and listings, the
# demo, the maintainers' ground-truth export); everything else logs or warns.
# the CLI, the demo and the benchmark's reports: each prints its tables to stdout
PRINTING_MODULES = {"cli.py", "demo.py", "bench/shipped.py", "bench/report.py"} | {
    f"bench/questions/{name}.py"
    for name in ("group_tasks", "groups", "precision", "scale", "speed")
}


def test_version_agrees_with_the_installed_metadata():
    assert datatrace.__version__ == importlib.metadata.version("datatrace")


def test_pyproject_declares_an_spdx_license_and_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # PEP 639 expression, not a table
    assert (ROOT / project["project"]["license-files"][0]).is_file()
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "datatrace.__version__"}


def test_python_m_datatrace_is_the_cli(capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-m", "datatrace", "methods"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    assert main(["methods"]) == 0
    assert run.stdout == capsys.readouterr().out
    version = subprocess.run(
        [sys.executable, "-m", "datatrace", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f"datatrace {datatrace.__version__}"


def _print_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]


def test_library_code_does_not_print():
    found = {
        str(p.relative_to(PACKAGE)): _print_calls(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if str(p.relative_to(PACKAGE)) not in PRINTING_MODULES
    }
    assert {k: v for k, v in found.items() if v} == {}
    # the allowlist is not stale: each listed module still prints
    assert all(_print_calls(PACKAGE / name) for name in PRINTING_MODULES)


def test_the_library_logger_has_a_null_handler_and_no_level():
    log = logging.getLogger("datatrace")
    assert any(isinstance(h, logging.NullHandler) for h in log.handlers)
    assert log.level == logging.NOTSET  # the application decides


def test_fit_and_store_resume_are_logged(caplog, tmp_path):
    model = torch.nn.Linear(4, 3).eval()
    train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with caplog.at_level(logging.INFO, logger="datatrace"):
        datatrace.GradDotAttributor(datatrace.Task(model), store=tmp_path, batch_size=4).fit(train)
        datatrace.GradDotAttributor(datatrace.Task(model), store=tmp_path, batch_size=4).fit(train)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("datatrace.")]
    assert "grad-dot: fit on 8 training examples (8 units, 1 member(s))" in messages
    # 8 rows fit one byte-sized shard: the second fit reuses it
    assert any("1 of 1 train feature shards reused from the store" in m for m in messages)


def test_cli_verbose_shows_the_log_on_stderr(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(
        "datatrace.cli._cmd_methods",
        lambda args: seen.append(logging.getLogger("datatrace.test").info("hello")) or 0,
    )
    assert main(["-v", "methods"]) == 0
    assert "datatrace.test: hello" in capsys.readouterr().err
    assert main(["methods"]) == 0  # the handler is gone again
    assert capsys.readouterr().err == ""
