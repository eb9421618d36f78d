"""GPU smoke check: attribution on a device equals attribution on the CPU (DESIGN.md §6).

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on cuda
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu    # the same checks, CPU vs CPU

For grad-dot, trak, if-ekfac and logra (``--methods``) on a tiny MLP and a tiny causal
language model (plain torch: embedding, one attention block of nn.Linear, LM head), with
the model built on the CPU, the data left on the CPU and ``device=`` given to the
attributor (so the loop must move the model and every batch):

- ``float64``: scores and self-influence on the device equal the CPU's, elementwise
  ``|dev - cpu| <= 1e-8 * (|cpu| + max |cpu|)`` (rtol 1e-8 with an absolute floor at the
  scale of the scores, for entries near 0);
- ``float32``: the same with rtol 1e-3 (TF32 is switched off: GPU and CPU sum in other
  orders, and kernels/curvature amplify float32 rounding);
- ``bfloat16``: the half-precision model runs on the device, scores are finite float32 on
  it, and rank-correlate with float32 scores of the same (rounded) weights, Spearman >= 0.99
  per query (>= 0.998 measured on the CPU; tests/methods/test_dtypes.py). K-FAC methods
  use the empirical Fisher here: labels sampled from bf16 and float32 logits differ now and
  then, which is sampling noise, not precision (the LM's if-ekfac gave 0.969 with it);
- ``store``: features written to a store from the device (float64, and bfloat16 feature
  storage) are read back onto it and give bit-identical scores; a CPU attributor reusing that
  store gives the float64 scores within rtol 1e-8 (stores are device-independent).

Prints one row per check and exits 1 if any fails. Needs only torch, numpy and tqdm.
``--throughput`` (cuda only) also times TRAK on a 1M-parameter MLP with 50k examples.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from datatrace import Task, make_attributor
from datatrace.devices import resolve_device
from datatrace.metrics.lds import spearman_batched

METHODS = ("grad-dot", "trak", "if-ekfac", "logra")
OPTIONS: dict[str, dict[str, Any]] = {
    "grad-dot": {},
    "trak": {"proj_dim": 32},
    "if-ekfac": {"damping": "heuristic"},
    "logra": {"proj_dim_in": 4, "proj_dim_out": 4},
}
RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
MIN_SPEARMAN_HALF = 0.99


class TinyLM(nn.Module):
    """Embedding, one causal self-attention block of nn.Linear, LayerNorm, LM head."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.emb(input_ids)
        t = h.shape[1]
        att = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.head(self.ln(h + att @ self.v(h)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _mlp_data(n: int, seed: int, dtype: torch.dtype) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _lm_data(n: int, seed: int, dtype: torch.dtype) -> Any:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[::3, -2:] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gpt2() -> nn.Module:
    """A 1-layer GPT-2 from a config (Conv1D layers, default SDPA attention), if installed."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=13, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


# (model builder, data builder, Task keyword arguments)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Any], dict[str, Any]]] = {
    "mlp": (_mlp, _mlp_data, {}),
    "lm": (TinyLM, _lm_data, {"loss": "lm", "module_types": (nn.Linear,)}),
    "gpt2": (_gpt2, _lm_data, {"loss": "lm", "module_types": "layers"}),
}


def _task(model_name: str, dtype: torch.dtype) -> Task:
    build, _, kwargs = MODELS[model_name]
    torch.manual_seed(0)
    # rounded through dtype first: float32 and bfloat16 runs then share their weights
    model = build().to(dtype).eval()
    return Task(model, **kwargs)


def _scores(
    model_name: str,
    method: str,
    dtype: torch.dtype,
    device: torch.device,
    store: str | None = None,
    **extra: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, self-influence)`` with the model built on the CPU and CPU data."""
    _, data, _ = MODELS[model_name]
    task = _task(model_name, dtype)
    attr = make_attributor(
        method, task, batch_size=8, device=device, store=store, **OPTIONS[method], **extra
    )
    attr.fit(data(24, 1, dtype))
    return attr.attribute(data(5, 2, dtype)).values, attr.self_attribute()


def _close(dev: torch.Tensor, cpu: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """Elementwise ``|dev - cpu| <= rtol (|cpu| + max|cpu|)``; returns (ok, worst ratio)."""
    dev, cpu = dev.detach().cpu().double(), cpu.detach().cpu().double()
    bound = rtol * (cpu.abs() + cpu.abs().max())
    ratio = float(((dev - cpu).abs() / bound.clamp_min(1e-300)).max()) * rtol
    return bool(((dev - cpu).abs() <= bound).all()), ratio


def _checks(device: torch.device, model_name: str, method: str) -> list[tuple[str, str, bool]]:
    """``(check, measured, ok)`` rows of one model and method."""
    cpu = torch.device("cpu")
    rows = []
    for dtype, rtol in RTOL.items():
        (dev_s, dev_self), (cpu_s, cpu_self) = (
            _scores(model_name, method, dtype, device),
            _scores(model_name, method, dtype, cpu),
        )
        ok_on = dev_s.device == device and dev_s.dtype == dtype
        ok_s, worst_s = _close(dev_s, cpu_s, rtol)
        ok_self, worst_self = _close(dev_self, cpu_self, rtol)
        name = str(dtype).removeprefix("torch.")
        rows.append(
            (
                f"{name} {device.type} == cpu (rtol {rtol:g})",
                f"scores {worst_s:.1e}, self {worst_self:.1e}",
                ok_on and ok_s and ok_self,
            )
        )
    # the empirical Fisher: sampled labels would differ between bf16 and float32 logits
    kw = {"fisher": "empirical"} if method in ("if-ekfac", "logra") else {}
    half, _ = _scores(model_name, method, torch.bfloat16, device, **kw)
    single, _ = _scores(model_name, method, torch.float32, device, **kw)
    rho = float(spearman_batched(half.T.cpu(), single.T.cpu()).min())
    ok = half.device == device and half.dtype == torch.float32 and bool(half.isfinite().all())
    rows.append(
        (
            f"bfloat16 model, Spearman vs float32 >= {MIN_SPEARMAN_HALF}",
            f"min per query {rho:.4f}",
            ok and rho >= MIN_SPEARMAN_HALF,
        )
    )
    for feature_dtype in (None, "bfloat16"):
        with tempfile.TemporaryDirectory() as d:
            kw = {"feature_dtype": feature_dtype}
            first, _ = _scores(model_name, method, torch.float64, device, d, **kw)
            again, _ = _scores(model_name, method, torch.float64, device, d, **kw)
            on_cpu, _ = _scores(model_name, method, torch.float64, cpu, d, **kw)
        ok_cpu, worst = _close(first, on_cpu, RTOL[torch.float64])
        rows.append(
            (
                f"store from {device.type}, features {feature_dtype or 'float64'}",
                f"reread equal {bool(torch.equal(first, again))}, on cpu {worst:.1e}",
                bool(torch.equal(first, again)) and ok_cpu,
            )
        )
    return rows


def _throughput() -> None:
    """TRAK on a 1.06M-parameter MLP, 50k examples, float32 (cuda only)."""
    torch.manual_seed(0)
    net = (
        nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)
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
        attr.topk((x[:200], y[:200]), 10)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"  TRAK {projector}:{k}: fit+topk(200 queries) {dt:.1f}s "
            f"({50_000 / dt:.0f} examples/s); peak GPU memory {peak:.2f} GiB"
        )
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated ids")
    parser.add_argument(
        "--models", default=",".join(MODELS), help="mlp, lm, gpt2 (comma-separated)"
    )
    parser.add_argument("--throughput", action="store_true", help="also time TRAK (cuda)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # ConfigError (naming the fix) without CUDA
    assert device is not None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device)}")
    else:
        print(f"torch {torch.__version__} on {device} (compared with the CPU)")
    failures = 0
    print(f"{'model':5s} {'method':9s} {'check':44s} {'measured':40s} result")
    for model_name in filter(None, args.models.split(",")):
        for method in filter(None, args.methods.split(",")):
            try:
                rows = _checks(device, model_name, method)
            except Exception as exc:  # report every method, not just the first failure
                rows = [("runs", f"{type(exc).__name__}: {exc}"[:200], False)]
            for check, measured, ok in rows:
                failures += not ok
                print(
                    f"{model_name:5s} {method:9s} {check:44s} {measured:40s} "
                    f"{'ok' if ok else 'FAIL'}"
                )
    if args.throughput and device.type == "cuda":
        _throughput()
    print(f"{failures} failed check(s)" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
