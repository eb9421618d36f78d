"""What the peer drivers share: peer virtualenvs, the runner call, the bench's cached pieces
(seed-0 model, LDS ground truth) and the paired comparison of two score matrices."""

from __future__ import annotations

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

from datatrace.bench.cache import GroundTruthSpec, _store_path, default_cache_dir, lds_ground_truth
from datatrace.bench.groundtruth import SubsetGroundTruth
from datatrace.bench.settings import Setting
from datatrace.errors import StoreError
from datatrace.metrics import lds, paired_bootstrap, spearman, spearman_batched
from datatrace.store import Store

RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
# Peer versions the comparisons were written and run against (docs/peers.md).
PEERS = {"traker": "0.3.2", "dattri": "0.3.0", "kronfluence": "1.0.1"}
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # unpinned torch pulls a CUDA build


def setup_peer(name: str, root: Path, version: str | None = None) -> Path:
    """``root/peer-NAME/bin/python``: a venv with pinned torch + the peer, made when missing.

    Idempotent: an existing venv whose interpreter can import the peer is reused.
    """
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
        proc = subprocess.run(
            [*cmd, "--spec", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f}s"}
    sys.stdout.write(proc.stdout)
    if proc.returncode == 0 and out.exists():
        return torch.load(out, weights_only=True)
    why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
    message = f"{why}: {proc.stderr.strip()[-2000:]}"
    if not out.exists():
        return {"failed": message}
    partial = torch.load(out, weights_only=True)
    partial["crashed"] = message
    return partial


def kronfluence_ekfac(
    py: Path, inputs: Path, spec: dict[str, Any], timeout: float, label: str
) -> dict[str, Any]:
    """kronfluence EK-FAC runs (``spec["runs"]``) on ``inputs``; raises when any failed."""
    t0 = time.perf_counter()
    out = run_peer(
        "kronfluence", py, inputs, inputs.with_name("kronfluence.pt"),
        {"methods": ["if-ekfac"], **spec}, timeout,
    )  # fmt: skip
    problem = out.get("failed") or out.get("crashed") or out["errors"].get("if-ekfac")
    if problem:
        raise RuntimeError(f"kronfluence runner failed: {problem}")
    print(f"[kronfluence] {label}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The layers of an ``nn.Sequential``, for ``runner.build_sequential`` to rebuild."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the runner rebuilds nn.Sequential models; got {type(model).__name__}")
    layers: list[dict[str, Any]] = []
    for m in model:
        if isinstance(m, nn.Linear):
            layers.append(
                {
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                }
            )
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
                raise ValueError(f"{m} has groups/dilation/padding_mode the runner lacks")
            keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding")
            layers.append({k: getattr(m, k) for k in keys} | {"bias": m.bias is not None})
        elif isinstance(m, nn.Dropout):
            layers.append({"p": m.p})
        elif isinstance(m, nn.MaxPool2d):
            layers.append({"kernel_size": m.kernel_size, "stride": m.stride})
        elif type(m) is nn.Flatten and (m.start_dim, m.end_dim) != (1, -1):
            raise ValueError(f"{m}: the runner builds nn.Flatten() only")
        elif type(m) not in (nn.ReLU, nn.Flatten):
            raise ValueError(f"the runner cannot rebuild {type(m).__name__}; add it to both files")
        else:
            layers.append({})
        layers[-1]["type"] = type(m).__name__
    return layers


def cached_ground_truth(
    setting: Setting, spec: GroundTruthSpec, allow_retraining: bool
) -> SubsetGroundTruth:
    """The bench's LDS ground truth (``lds_ground_truth``); exits instead of retraining it
    unless allowed."""
    config = {"setting": setting.to_json(), "spec": spec.__dict__}
    try:
        store = Store(
            _store_path(default_cache_dir(), setting, spec),
            config=config,
            fingerprints={"recipe": setting.recipe_hash()},
            create=False,
        )
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
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, path.with_suffix(".tmp")
    )
    path.with_suffix(".tmp").replace(path)
    return model.eval()


def verdict(low: float, high: float) -> str:
    """DESIGN.md §9 on a paired 95% interval of A - B."""
    return "better" if low > 0 else ("not worse" if high >= 0 else "worse")


def compare(
    ours: torch.Tensor, peer: torch.Tensor, subsets: torch.Tensor, targets: torch.Tensor
) -> dict[str, Any]:
    """Agreement (Spearman, scale) and LDS of two ``(n_query, n_train)`` score matrices, with
    the paired-bootstrap interval of LDS ours - peer."""
    a, b = ours.double(), peer.double()
    scale = float((a * b).sum() / (a * a).sum())  # least-squares c in peer ~ c * ours
    lo_o, lo_p = lds(a, subsets, targets), lds(b, subsets, targets)
    low, high = paired_bootstrap(lo_o, lo_p)
    return {
        "spearman_per_query": float(spearman_batched(a, b, dim=1).nanmean()),
        "spearman_flat": spearman(a.flatten(), b.flatten()),
        "scale_peer_over_ours": scale,
        "rel_err_after_scale": float((b - scale * a).norm() / b.norm()),
        "lds_ours": lo_o.mean,
        "lds_ours_ci": list(lo_o.bootstrap_ci()),
        "lds_peer": lo_p.mean,
        "lds_peer_ci": list(lo_p.bootstrap_ci()),
        "lds_diff_ci": [low, high],
        "verdict": verdict(low, high),
    }


def load_line(wall: float, before: tuple[float, ...], after: tuple[float, ...]) -> str:
    def fmt(load: tuple[float, ...]) -> str:
        return "/".join(f"{x:.1f}" for x in load)

    return (
        f"\nwall time {wall:.0f}s; load average (1/5/15 min) before {fmt(before)}, after "
        f"{fmt(after)} on {os.cpu_count()} cores"
    )
