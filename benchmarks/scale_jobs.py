"""Scale on one machine: 1,000,000 training examples, and 100,000 token sequences through GPT-2.

    python benchmarks/scale_jobs.py --job million                 # MLP, 1,000,000 examples
    python benchmarks/scale_jobs.py --job gpt2 --n-train 100000   # GPT-2, 100,000 sequences
    python benchmarks/scale_jobs.py --job million --n-train 20000 --configs grad-dot  # quick

Jobs (synthetic data, built here, nothing downloaded):

- ``million``: inputs ``x ~ N(0, I_32)`` labelled by a random linear teacher; an MLP
  32-64-10 (2,762 parameters) trained for one epoch; 100 queries.
- ``gpt2``: chunks of 32 bytes of Python's own docs (``pydoc_data.topics``, windows cycling
  over the corpus), a 2-layer GPT-2 (``n_embd=64``, 4 heads, byte vocabulary, ``Conv1D``
  layers, default SDPA attention) with random weights (throughput does not depend on
  training); ``Task(loss="lm", target="log_prob", module_types="layers")``; 100 queries.

Each config runs in its own process (peak memory is per process, DESIGN.md §9) and writes its
features through a store (shards of about ``SHARD_BYTES``): ``fit``, then the streaming top-10 of the
queries (``attributor.topk``, never holding ``n_query x n_train``). Reported: fit seconds and
train examples featurized per second, top-k seconds and scores per second
(``n_query x n_train / topk s``), bytes stored and the process's peak resident memory
(``ru_maxrss``: torch, the data and everything else included). The goal is a peak under 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_child

N_QUERY, TOPK, D_IN, SEQ = 100, 10, 32, 32

# job -> config -> (method id, settings)
CONFIGS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "million": {
        "grad-dot": ("grad-dot", {"batch_size": 8192}),
        "trak-factored": (
            "trak",
            {
                "projector": "factored",
                "proj_dim": 256,
                "relative_damping": 1e-3,
                "batch_size": 8192,
            },
        ),
        "if-ekfac": (
            "if-ekfac",
            {"damping": "heuristic", "fisher": "empirical", "batch_size": 8192},
        ),
    },
    "gpt2": {
        "trak-factored": (
            "trak",
            {"projector": "factored", "proj_dim": 256, "relative_damping": 1e-3, "batch_size": 512},
        ),
        "logra": ("logra", {"batch_size": 512}),
    },
}


# ----------------------------------------------------------------------------- jobs
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn(D_IN, 10, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(1)


def gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def gpt2_data(n: int, offset: int) -> dict[str, torch.Tensor]:
    from datatrace.bench.settings.charlm import pydoc_corpus

    corpus = torch.tensor(list(pydoc_corpus().encode("utf-8")), dtype=torch.long)
    starts = (torch.arange(offset, offset + n) * (SEQ // 2)) % (corpus.numel() - SEQ)
    ids = corpus[starts[:, None] + torch.arange(SEQ)]
    return {"input_ids": ids, "labels": ids}


def prepare(job: str, n: int, path: Path) -> None:
    """Train the MLP for one epoch (the GPT-2 keeps its random weights) and save it."""
    torch.manual_seed(0)
    if job == "gpt2":
        torch.save(gpt2().state_dict(), path)
        return
    model = mlp()
    x, y = mlp_data(n, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(1024):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    torch.save(model.state_dict(), path)


def child(job: str, config: str, n: int, model_path: Path, store_dir: Path) -> dict[str, Any]:
    from datatrace import Task, make_attributor

    method, settings = CONFIGS[job][config]
    model = gpt2() if job == "gpt2" else mlp()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    if job == "gpt2":
        train: Any = gpt2_data(n, 0)
        queries: Any = gpt2_data(N_QUERY, n)
        task = Task(model, loss="lm", target="log_prob", module_types="layers")
    else:
        train, queries = mlp_data(n, seed=1), mlp_data(N_QUERY, seed=2)
        task = Task(model, target="margin" if method == "trak" else "loss")
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attributor = make_attributor(method, task, store=store_dir, **settings)
    t0 = time.perf_counter()
    attributor.fit(train)
    t_fit = time.perf_counter() - t0
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    top = attributor.topk(queries, TOPK)
    t_topk = time.perf_counter() - t0
    assert tuple(top.proponent_ids.shape) == (N_QUERY, TOPK)
    assert attributor.store is not None
    return {
        "job": job,
        "config": config,
        "method": method,
        "settings": settings,
        "n_train": n,
        "n_params": task.num_tracked,
        "fit_s": t_fit,
        "train_per_s": n / t_fit,
        "topk_s": t_topk,
        "scores_per_s": N_QUERY * n / t_topk,
        "store_bytes": attributor.store.nbytes(),
        "peak_rss_mib_after_data": rss_data,
        "peak_rss_mib_after_fit": rss_fit,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=sorted(CONFIGS), default="million")
    ap.add_argument("--configs", default=None, help="comma-separated (default: all of the job)")
    ap.add_argument("--n-train", type=int, default=None, help="default 1,000,000 / 100,000")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n_train or (1_000_000 if args.job == "million" else 100_000)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        out = child(
            args.job, args.child, n, args.dir / "model.pt", args.dir / f"store-{args.child}"
        )
        print("RESULT " + json.dumps(out))
        return
    configs = args.configs.split(",") if args.configs else list(CONFIGS[args.job])
    rows = []
    with tempfile.TemporaryDirectory(prefix="datatrace-scale-") as tmp:
        t0 = time.perf_counter()
        prepare(args.job, n, Path(tmp) / "model.pt")
        print(
            f"job {args.job}: {n:,} training examples; model prepared in {time.perf_counter() - t0:.1f} s"
        )
        print(
            "| config | method | n_train | fit s | train ex/s | top-10 s | scores/s | "
            "stored MiB | peak RSS MiB | < 8 GiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for config in configs:
            cmd = [sys.executable, __file__, "--job", args.job, "--child", config, "--dir", tmp]
            cmd += ["--n-train", str(n)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = run_child(cmd[1], cmd[2:])
            if "error" in r:
                print(f"| {config} | failed (exit {r['returncode']}): {' / '.join(r['error'])} |")
                rows.append({"config": config, **r})
                continue
            rows.append(r)
            print(
                f"| {config} | {r['method']} | {r['n_train']:,} | {r['fit_s']:.1f} | "
                f"{r['train_per_s']:,.0f} | {r['topk_s']:.1f} | {r['scores_per_s']:.3g} | "
                f"{r['store_bytes'] / 2**20:,.0f} | {r['peak_rss_mib']:,.0f} | "
                f"{'yes' if r['peak_rss_mib'] < 8192 else 'no'} |",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
