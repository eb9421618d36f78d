"""GPU check: every method gives the same scores on CUDA as on CPU, and TRAK's GPU throughput.

    PYTHONPATH=src python benchmarks/gpu_check.py

Needs only torch, numpy and tqdm (no scikit-learn), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import sys
import time

import torch

from datatrace import METHODS, Checkpoint, Task, make_attributor

OPTIONS = {
    "trak": {"proj_dim": 64},
    "if-lissa": {"damping": 0.5, "solver_options": {"depth": 200}},
    "if-arnoldi": {"damping": 1e-2, "solver_options": {"rank": 50}},
}


def model_on(device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 5),
    )
    return net.double().to(device).eval()


def data_on(device: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64).to(device),
        torch.randint(0, 5, (n,), generator=g).to(device),
    )


def scores(method_id: str, device: str) -> torch.Tensor:
    model = model_on(device)
    member = Checkpoint({k: v.clone() for k, v in model_on(device, seed=1).state_dict().items()})
    task = Task(model, target="margin" if method_id == "trak" else "loss")
    opts = (
        {"damping": 1e-2, **OPTIONS.get(method_id, {})}
        if method_id.startswith(("if-", "influence"))
        else OPTIONS.get(method_id, {})
    )
    members = [member, Checkpoint(model.state_dict())] if method_id == "trak" else None
    attr = make_attributor(method_id, task, batch_size=16, members=members, **opts)
    attr.fit(data_on(device, 40, 1))
    out = attr.attribute(data_on(device, 6, 2)).values
    self_scores = attr.self_attribute()
    return torch.cat([out.flatten(), self_scores.flatten()]).cpu()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    failures = 0
    for method_id in sorted(METHODS):
        try:
            cpu, gpu = scores(method_id, "cpu"), scores(method_id, "cuda")
            rel = float((cpu - gpu).norm() / cpu.norm())
            ok = rel < 1e-8
        except Exception as exc:  # report every method, not just the first failure
            rel, ok = float("nan"), False
            print(f"  {method_id:12s} ERROR {type(exc).__name__}: {exc}")
        failures += not ok
        print(f"  {method_id:12s} relative CPU/GPU difference {rel:.2e} {'ok' if ok else 'FAIL'}")
    # Throughput: TRAK on a 1M-parameter MLP, 50k examples, float32.
    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(512, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )
        .cuda()
        .eval()
    )
    x = torch.randn(50_000, 512, device="cuda")
    y = net(x).argmax(1).detach()
    for projector, k in (("rademacher", 2048), ("sjlt", 4096), ("factored", 1024)):
        attr = make_attributor(
            "trak", Task(net, target="margin"), projector=projector, proj_dim=k, batch_size=1024
        )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        attr.fit((x, y))
        top = attr.topk((x[:200], y[:200]), 10)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(
            f"  TRAK {projector}:{k} 50k x 1.06M params: fit+topk(200 queries) {dt:.1f}s "
            f"({50_000 / dt:.0f} examples/s); peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
        assert top.proponent_ids.shape == (200, 10)
        torch.cuda.reset_peak_memory_stats()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
