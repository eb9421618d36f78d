"""Helpers shared by the speed and scale scripts: warm medians and one process per config."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of warm runs (DESIGN.md §9) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run ``script args`` in its own process (peak memory is per process, DESIGN.md §9).

    Returns the JSON of the last ``RESULT {...}`` line it prints, or, when it failed,
    ``{"error": last stderr lines, "returncode": ...}``.
    """
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": tail, "returncode": proc.returncode}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result
