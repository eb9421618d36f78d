"""GPU smoke check: attribution on a device equals attribution on the CPU (DESIGN.md §6).

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on cuda
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu    # the same checks, CPU vs CPU

grad-dot, trak, if-ekfac and logra (``--methods``) on the tests' tiny MLP and causal LM and a
1-layer GPT-2 (``--models``), built on the CPU with ``device=`` given to the attributor; the
checks and their tolerances are those of docs/devices.md, "Checking a GPU". Prints one row
per check and exits 1 if any fails. Throughput on a GPU is the ``scale`` question's:
``datatrace bench --question scale:job=mlp1m:device=cuda``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datatrace import Task, make_attributor
from datatrace.bench.questions.jobs import tiny_gpt2
from datatrace.devices import resolve_device
from datatrace.metrics.lds import spearman_batched
from tests.models import TinyLM, mlp, rounded_data

OPTIONS: dict[str, dict[str, Any]] = {
    "grad-dot": {},
    "trak": {"proj_dim": 32},
    "if-ekfac": {"damping": "heuristic"},
    "logra": {"proj_dim_in": 4, "proj_dim_out": 4},
}
# float32: TF32 off, and still GPU and CPU sum in other orders (curvature amplifies rounding)
RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
MIN_SPEARMAN_HALF = 0.99  # bf16 vs float32, per query; >= 0.998 on the CPU (test_dtypes.py)


def _lm_data(n: int, seed: int, dtype: torch.dtype) -> Any:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[::3, -2:] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


_gpt2 = partial(tiny_gpt2, vocab_size=13, n_positions=8, n_embd=16, n_layer=1, n_head=2)
# (model builder, data builder, Task keyword arguments)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Any], dict[str, Any]]] = {
    "mlp": (partial(mlp, hidden=16), rounded_data, {}),
    "lm": (partial(TinyLM, vocab=13), _lm_data, {"loss": "lm", "module_types": (nn.Linear,)}),
    "gpt2": (_gpt2, _lm_data, {"loss": "lm", "module_types": "layers"}),  # Conv1D, SDPA
}


def _scores(
    model_name: str, method: str, dtype: torch.dtype, device: torch.device, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, self-influence)`` with the model built on the CPU and CPU data."""
    build, data, task_options = MODELS[model_name]
    torch.manual_seed(0)
    # rounded through dtype first: float32 and bfloat16 runs then share their weights
    task = Task(build().to(dtype).eval(), **task_options)
    attr = make_attributor(method, task, batch_size=8, device=device, **OPTIONS[method], **options)
    attr.fit(data(24, 1, dtype))
    return attr.attribute(data(5, 2, dtype)).values, attr.self_attribute()


def _close(dev: torch.Tensor, cpu: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """Elementwise ``|dev - cpu| <= rtol (|cpu| + max|cpu|)`` (an absolute floor at the scale
    of the scores, for entries near 0); returns (ok, worst ratio)."""
    dev, cpu = dev.detach().cpu().double(), cpu.detach().cpu().double()
    bound = rtol * (cpu.abs() + cpu.abs().max())
    ratio = float(((dev - cpu).abs() / bound.clamp_min(1e-300)).max()) * rtol
    return bool(((dev - cpu).abs() <= bound).all()), ratio


def _checks(device: torch.device, model_name: str, method: str) -> Iterator[tuple[str, str, bool]]:
    """``(check, measured, ok)`` rows of one model and method."""
    cpu = torch.device("cpu")
    for dtype, rtol in RTOL.items():
        dev_s, dev_self = _scores(model_name, method, dtype, device)
        cpu_s, cpu_self = _scores(model_name, method, dtype, cpu)
        ok_on = dev_s.device == device and dev_s.dtype == dtype
        ok_s, worst_s = _close(dev_s, cpu_s, rtol)
        ok_self, worst_self = _close(dev_self, cpu_self, rtol)
        check = f"{str(dtype).removeprefix('torch.')} {device.type} == cpu (rtol {rtol:g})"
        yield check, f"scores {worst_s:.1e}, self {worst_self:.1e}", ok_on and ok_s and ok_self
    # the empirical Fisher: labels sampled from bf16 and float32 logits differ now and then,
    # which is sampling noise, not precision (the LM's if-ekfac gave 0.969 with the true one)
    kw: dict[str, Any] = {"fisher": "empirical"} if method in ("if-ekfac", "logra") else {}
    half, _ = _scores(model_name, method, torch.bfloat16, device, **kw)
    single, _ = _scores(model_name, method, torch.float32, device, **kw)
    rho = float(spearman_batched(half.T.cpu(), single.T.cpu()).min())
    ok = half.device == device and half.dtype == torch.float32 and bool(half.isfinite().all())
    check = f"bfloat16 model, Spearman vs float32 >= {MIN_SPEARMAN_HALF}"
    yield check, f"min per query {rho:.4f}", ok and rho >= MIN_SPEARMAN_HALF
    # stores are device-independent: reread on the device, and reused by a CPU attributor
    for feature_dtype in (None, "bfloat16"):
        with tempfile.TemporaryDirectory() as d:
            kw = {"store": d, "feature_dtype": feature_dtype}
            first, _ = _scores(model_name, method, torch.float64, device, **kw)
            again, _ = _scores(model_name, method, torch.float64, device, **kw)
            on_cpu, _ = _scores(model_name, method, torch.float64, cpu, **kw)
        ok_cpu, worst = _close(first, on_cpu, RTOL[torch.float64])
        equal = bool(torch.equal(first, again))
        check = f"store from {device.type}, features {feature_dtype or 'float64'}"
        yield check, f"reread equal {equal}, on cpu {worst:.1e}", equal and ok_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU")
    parser.add_argument("--methods", default=",".join(OPTIONS), help="comma-separated ids")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # ConfigError (naming the fix) without CUDA
    assert device is not None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"{device} (compared with the CPU)"
    print(f"torch {torch.__version__} on {name}")
    failures = 0
    print(f"{'model':5s} {'method':9s} {'check':44s} {'measured':40s} result")
    for model_name in filter(None, args.models.split(",")):
        for method in filter(None, args.methods.split(",")):
            try:
                rows = list(_checks(device, model_name, method))
            except Exception as exc:  # report every method, not just the first failure
                rows = [("runs", f"{type(exc).__name__}: {exc}"[:200], False)]
            for check, measured, ok in rows:
                failures += not ok
                result = "ok" if ok else "FAIL"
                print(f"{model_name:5s} {method:9s} {check:44s} {measured:40s} {result}")
    print(f"{failures} failed check(s)" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
