"""Where do our EK-FAC influence and kronfluence's differ on a digits setting? Factor swaps.

    .venv/bin/python benchmarks/kronfluence_digits_diagnose.py --setting digits-mlp-dropout

Same bench pieces as ``kronfluence_digits.py`` (seed-0 model, test queries, cached ground
truth). kronfluence fits its EK-FAC factors ``--kfx-runs`` times (true Fisher, unseeded labels)
and returns them; ours fits ``fit_kfac(kind="ekfac", fisher="true")`` with label seeds
``--label-seeds``. Every curvature below is scored by the same code (our ``if-ekfac``
attributor with ``damping="heuristic"``, its fitted inverse replaced), so differences come
from the factors alone:

- ``kfx factors``: kronfluence's eigenbases and corrected eigenvalues (``lambda_matrix /
  num_lambda_processed``). Its LDS next to kronfluence's own scores checks that scoring,
  measurement, sign and damping rule agree.
- ``ours``: our factors (the README's call for seed 0).
- ``kfx basis + our eigenvalues``: kronfluence's bases, eigenvalues refitted by our pass
  (labels from ``eigen_pass_seed(seed)``); ``ours basis + exact eigenvalues`` etc. isolate the
  basis from the eigenvalues.
- ``exact``: ``fisher="exact"`` bases and eigenvalues (no sampling).

Per layer it prints the relative Frobenius difference of the activation factor ``A`` (the
same definition in both: a deterministic check), each sampled ``G``'s relative distance to
the exact-Fisher ``G`` (both scaled to unit trace), and the heuristic damping
``0.1 x mean(Λ)`` of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kronfluence_digits import Bench, bench_pieces, kronfluence_runs
from benchmarks.peers import setup_peer
from datatrace import make_attributor
from datatrace.kfac import (
    KFACCurvature,
    KFACLayer,
    eigen_pass_seed,
    fit_ekfac_eigenvalues,
    fit_kfac_layers,
)


def kfx_layers(
    factors: dict[str, Any], ours: list[KFACLayer], dtype: torch.dtype
) -> list[KFACLayer]:
    """kronfluence's fitted factors as our layers (same module names and layouts)."""
    out = []
    for layer in ours:
        m = layer.module

        def get(kind: str, m: str = m) -> torch.Tensor:
            return factors[kind][m].to(torch.float64)

        def div(kind: str, count: str) -> torch.Tensor:
            return (get(kind) / get(count)).to(dtype)

        out.append(
            KFACLayer(
                m,
                layer.weight,
                layer.bias,
                layer.weight_shape,
                div("activation_covariance", "num_activation_covariance_processed"),
                div("gradient_covariance", "num_gradient_covariance_processed"),
                get("activation_eigenvectors").to(dtype),
                get("gradient_eigenvectors").to(dtype),
                div("lambda_matrix", "num_lambda_processed"),
            )
        )
    return out


def with_values(layers: list[KFACLayer], values: list[torch.Tensor]) -> list[KFACLayer]:
    """The same bases with other eigenvalues."""
    return [
        dataclasses.replace(la, eigenvalues=v.to(la.q_a.dtype)) for la, v in zip(layers, values)
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rel_shape(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`rel` after scaling both to unit trace (kronfluence divides a conv layer's G by
    examples x positions, ours by examples: the scale differs, the eigenbasis does not)."""
    return rel(a / a.trace(), b / b.trace())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="digits-mlp-dropout")
    ap.add_argument("--kfx-runs", type=int, default=3)
    ap.add_argument("--label-seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="kronfluence's batch size")
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--gt-seeds", type=int, default=2)
    ap.add_argument("--allow-retraining", action="store_true")
    ap.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--peer-timeout", type=float, default=1800.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.label_seeds.split(",") if s]
    torch.set_num_threads(args.threads)
    py = setup_peer("kronfluence", args.venv_root)
    bench: Bench = bench_pieces(args.setting, args)
    task, train = bench.task, bench.setting.data.train
    queries = bench.setting.data.test_queries
    kron = kronfluence_runs(py, bench, args, factors=True)

    attr = make_attributor("if-ekfac", task, damping="heuristic").fit(train)
    ctx = attr._contexts[0]  # one member: its inverse is swapped for each curvature below

    def score(layers: list[KFACLayer]) -> float:
        inverse = KFACCurvature(task, layers).inverse("heuristic")
        attr._contexts[0] = ctx.with_state(dataclasses.replace(ctx.fitted, inverse=inverse))
        return bench.lds(attr.attribute(queries).values).mean

    def fit(fisher: str, seed: int = 0) -> list[KFACLayer]:
        return fit_kfac_layers(task, train, kind="ekfac", fisher=fisher, seed=seed)  # type: ignore[arg-type]

    rows: dict[str, list[float]] = {}
    exact = fit("exact")
    ours = {s: fit("true", s) for s in seeds}
    kfx = [kfx_layers(f, exact, task.working_dtype) for f in kron["factors"]]
    rows["kronfluence's own scores"] = [bench.lds(r["scores"]).mean for r in kron["runs"]]
    rows["kfx factors, our scoring"] = [score(la) for la in kfx]
    rows["ours (README)"] = [score(ours[s]) for s in seeds]
    rows["exact"] = [score(exact)]

    def ours_values(layers: list[KFACLayer], seed: int, fisher: str = "true") -> list[Any]:
        return fit_ekfac_eigenvalues(task, train, layers, fisher=fisher, seed=eigen_pass_seed(seed))  # type: ignore[arg-type]

    rows["kfx basis + our eigenvalues (true, seed i)"] = [
        score(with_values(la, ours_values(la, s))) for la, s in zip(kfx, seeds)
    ]
    rows["kfx basis + exact eigenvalues"] = [
        score(with_values(la, ours_values(la, 0, "exact"))) for la in kfx
    ]
    rows["our basis + exact eigenvalues"] = [
        score(with_values(ours[s], ours_values(ours[s], 0, "exact"))) for s in seeds
    ]
    rows["exact basis + our eigenvalues (true, seed i)"] = [
        score(with_values(exact, ours_values(exact, s))) for s in seeds
    ]
    print(f"\n{args.setting}: test LDS (noise ceiling {bench.ceiling:.3f})\n")
    print("| curvature (all scored by our code, heuristic damping) | LDS per run / seed | mean |")
    print("|---|---|---|")
    for name, values in rows.items():
        print(
            f"| {name} | {', '.join(f'{v:.3f}' for v in values)} | "
            f"{sum(values) / len(values):.3f} |"
        )

    print(
        "\n| layer | rel. diff A ours vs kfx | G/tr G vs exact: ours (seeds) | kfx (runs) | "
        "0.1 mean(Λ): exact | ours | kfx |"
    )
    print("|---|---|---|---|---|---|---|")
    stats = []
    for j, ex in enumerate(exact):
        o = [ours[s][j] for s in seeds]
        k = [la[j] for la in kfx]
        stats.append(
            {
                "layer": ex.module,
                "a_rel": rel(k[0].a_factor, o[0].a_factor),
                "g_ours": [rel_shape(x.g_factor, ex.g_factor) for x in o],
                "g_kfx": [rel_shape(x.g_factor, ex.g_factor) for x in k],
                "damp_exact": 0.1 * float(ex.eigenvalues.mean()),
                "damp_ours": [0.1 * float(x.eigenvalues.mean()) for x in o],
                "damp_kfx": [0.1 * float(x.eigenvalues.mean()) for x in k],
            }
        )
        st = stats[-1]
        print(
            f"| {ex.module} | {st['a_rel']:.1e} | "
            f"{', '.join(f'{v:.3f}' for v in st['g_ours'])} | "
            f"{', '.join(f'{v:.3f}' for v in st['g_kfx'])} | {st['damp_exact']:.3e} | "
            f"{', '.join(f'{v:.3e}' for v in st['damp_ours'])} | "
            f"{', '.join(f'{v:.3e}' for v in st['damp_kfx'])} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"lds": rows, "layers": stats}, indent=1))


if __name__ == "__main__":
    main()
