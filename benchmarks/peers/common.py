"""What the peer drivers share: peer venvs, the runner call, the bench's cached seed-0 model
and LDS ground truth, the paired comparison of two score matrices, tables and JSON."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datatrace._io import atomic_write
from datatrace.bench.cache import GroundTruthSpec, _store_path, default_cache_dir, lds_ground_truth
from datatrace.bench.report import markdown_table
from datatrace.bench.settings import Setting
from datatrace.errors import StoreError
from datatrace.metrics import lds, paired_bootstrap, spearman, spearman_batched
from datatrace.store import Store

RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
# Peer versions the comparisons were written and run against (docs/peers.md).
PEERS = {"traker": "0.3.2", "dattri": "0.3.0", "kronfluence": "1.0.1"}
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # unpinned torch pulls a CUDA build


def setup_peer(name: str, root: Path, version: str | None = None) -> Path:
    """``root/peer-NAME/bin/python``: a venv with pinned torch + the peer, made unless one
    that imports the peer is there."""
    py = root / f"peer-{name}" / "bin" / "python"
    module = "trak" if name == "traker" else name
    if py.exists() and subprocess.run([py, "-c", f"import {module}"]).returncode == 0:
        return py
    print(f"setting up {py.parent.parent} (torch 2.14.1 + {name}) ...", flush=True)
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(py.parent.parent)], check=True)
    spec = f"{name}=={version or PEERS[name]}"
    subprocess.run([py, "-m", "pip", "install", "-q", *TORCH_PINS, spec], check=True)
    return py


def run_peer(
    name: str, py: Path, inputs: Path, out: Path, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run ``peer_runner.py`` in the peer's venv: its result, ``{"failed": why}`` when it wrote
    none, or the methods that finished before a crash with ``"crashed": why``."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(py), str(RUNNER), "--peer", name, "--inputs", str(inputs), "--out", str(out)]
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run([*cmd, "--spec", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f}s"}
    sys.stdout.write(proc.stdout)
    if proc.returncode == 0 and out.exists():
        return torch.load(out, weights_only=True)
    why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
    message = f"{why}: {proc.stderr.strip()[-2000:]}"
    if not out.exists():
        return {"failed": message}
    return {**torch.load(out, weights_only=True), "crashed": message}


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The layers of an ``nn.Sequential`` of ``torch.nn`` layers, as their types and constructor
    arguments, for ``peer_runner.build_sequential`` to rebuild."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the runner rebuilds nn.Sequential models; got {type(model).__name__}")
    layers: list[dict[str, Any]] = []
    for m in model:
        if getattr(nn, type(m).__name__, None) is not type(m) or list(m.children()):
            raise ValueError(f"the runner rebuilds torch.nn layers without children; got {m}")
        names = [k for k in inspect.signature(type(m)).parameters if k not in ("device", "dtype")]
        layers.append({"type": type(m).__name__, **{k: getattr(m, k) for k in names}})
        if "bias" in names:
            layers[-1]["bias"] = m.bias is not None
    return layers


def cached_ground_truth(setting: Setting, spec: GroundTruthSpec, allow_retraining: bool) -> Any:
    """The bench's LDS ground truth (``lds_ground_truth``); exits instead of retraining it
    unless allowed."""
    config = {"setting": setting.to_json(), "spec": spec.__dict__}
    try:
        store = Store(_store_path(default_cache_dir(), setting, spec), config=config,
                      fingerprints={"recipe": setting.recipe_hash()}, create=False)  # fmt: skip
        done = sum(store.has_shard(f"seed{s}", j) for j in range(spec.m) for s in range(spec.seeds))
        store.close()
    except StoreError:
        done = 0
    if done < spec.m * spec.seeds and not allow_retraining:
        sys.exit(
            f"the cache holds {done} of the {spec.m * spec.seeds} retrainings of the "
            f"{setting.name} ground truth; run `datatrace groundtruth --setting {setting.name} "
            f"--m {spec.m} --seeds {spec.seeds}` first (minutes for digits, 12+ for "
            "pydoc-charlm) or pass --allow-retraining."
        )
    return lds_ground_truth(setting, spec, workers=2, progress=True)


def seed0_model(setting: Setting) -> nn.Module:
    """The bench's seed-0 model (``setting.train_trajectory(seed=0)``), in eval mode; its state
    is cached beside the ground truth, as ``NAME-RECIPEHASH-seed0.pt``."""
    path = default_cache_dir() / f"{setting.name}-{setting.recipe_hash()}-seed0.pt"
    model = setting.build_model(0)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    model, _ = setting.train_trajectory(seed=0)
    print(f"trained the seed-0 model in {time.perf_counter() - t0:.1f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    return model.eval()


def verdict(low: float, high: float) -> str:
    """DESIGN.md §9 on a paired 95% interval of A - B."""
    return "better" if low > 0 else ("not worse" if high >= 0 else "worse")


def compare(ours: torch.Tensor, peer: torch.Tensor, subsets: torch.Tensor,
            targets: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """Agreement (Spearman, scale) and LDS of two ``(n_query, n_train)`` score matrices, with
    the paired-bootstrap interval of LDS ours - peer."""
    a, b = ours.double(), peer.double()
    scale = float((a * b).sum() / (a * a).sum())  # least-squares c in peer ~ c * ours
    lo_o, lo_p = lds(a, subsets, targets), lds(b, subsets, targets)
    low, high = paired_bootstrap(lo_o, lo_p)
    return dict(
        spearman_per_query=float(spearman_batched(a, b, dim=1).nanmean()),
        spearman_flat=spearman(a.flatten(), b.flatten()), scale_peer_over_ours=scale,
        rel_err_after_scale=float((b - scale * a).norm() / b.norm()),
        lds_ours=lo_o.mean, lds_ours_ci=list(lo_o.bootstrap_ci()),
        lds_peer=lo_p.mean, lds_peer_ci=list(lo_p.bootstrap_ci()),
        lds_diff_ci=[low, high], verdict=verdict(low, high),
    )  # fmt: skip


def load_line(wall: float, before: tuple[float, ...], after: tuple[float, ...]) -> str:
    before_, after_ = ("/".join(f"{x:.1f}" for x in load) for load in (before, after))
    return (f"\nwall time {wall:.0f}s; load average (1/5/15 min) before {before_}, after "
            f"{after_} on {os.cpu_count()} cores")  # fmt: skip


def fmt_ci(mean: float, ci: list[float]) -> str:
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_diff(c: dict[str, Any]) -> str:
    """A paired interval of ours - peer and its verdict (``compare``'s fields)."""
    lo, hi = c["lds_diff_ci"]
    return f"[{lo:+.3f}, {hi:+.3f}] {c['verdict']}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table (docs/peers.md's tables are these, edited)."""
    print(markdown_table(header, rows))


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
