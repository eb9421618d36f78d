"""Ground truth that ships with the package, and the check that it still matches retraining.

The default setting's LDS ground truth (``digits-mlp``, the default protocol) ships as
package data in ``datatrace/bench/shipped/``, so that ``datatrace bench`` on a fresh
install scores methods without its 100 retrainings. A file is a compressed NumPy archive
(``.npz``, read with ``allow_pickle=False``) named after the cache store it fills,
``<setting>-<recipe hash>-lds-<protocol>.npz``: the recipe hash in the name means a changed
recipe, data or protocol never picks it up. It holds the retrained targets in the setting's
dtype (exactly what the retrainings produced), the recipe hash and the protocol key.

:func:`verify_ground_truth` (``datatrace groundtruth --verify``) retrains a few subsets and
compares them with the stored targets. The recipes are deterministic given the seed (the
same weights with 1 or 2 threads on the machine that built the file), so on the same torch
build they match exactly; across builds, BLAS kernels may round differently, so the check
passes when every target is within ``rtol * (1 + |stored|)`` (default ``rtol = 1e-4``).

Regenerate the shipped file after a recipe change with ``python -m datatrace.bench.shipped``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from datatrace.bench.cache import (
    GroundTruthSpec,
    _retrain,
    _store_path,
    default_cache_dir,
    lds_ground_truth,
)
from datatrace.bench.groundtruth import sample_subsets
from datatrace.bench.settings import Setting, get_setting
from datatrace.errors import ConfigError, DataError
from datatrace.store import Store

__all__ = [
    "VerifyResult",
    "export_ground_truth",
    "shipped_file",
    "verify_ground_truth",
]

DEFAULT_SETTING = "digits-mlp"


def shipped_dir() -> Path:
    """The package folder holding shipped ground truth."""
    return Path(str(resources.files("datatrace.bench") / "shipped"))


def shipped_file(setting: Setting, spec: GroundTruthSpec) -> Path | None:
    """The shipped archive for ``setting`` under ``spec``, or None when none ships."""
    path = shipped_dir() / f"{_store_path(Path('.'), setting, spec).name}.npz"
    return path if path.is_file() else None


def load_shipped(setting: Setting, spec: GroundTruthSpec, path: Path) -> torch.Tensor:
    """``(m, seeds, n_query)`` float64 targets of a shipped archive, after checking its keys."""
    with np.load(path, allow_pickle=False) as archive:
        recipe = str(archive["recipe_hash"])
        key = str(archive["spec_key"])
        per_seed = torch.from_numpy(archive["per_seed"].copy()).to(torch.float64)
    if recipe != setting.recipe_hash() or key != spec.key():
        raise DataError(
            f"shipped ground truth {path.name} was built for recipe {recipe} / {key}, not "
            f"{setting.recipe_hash()} / {spec.key()}; delete it or regenerate it with "
            "`python -m datatrace.bench.shipped`."
        )
    n_query = setting.n_val + setting.n_test
    if tuple(per_seed.shape) != (spec.m, spec.seeds, n_query):
        raise DataError(
            f"shipped ground truth {path.name} holds shape {tuple(per_seed.shape)}; expected "
            f"{(spec.m, spec.seeds, n_query)}."
        )
    return per_seed


def export_ground_truth(
    setting: Setting, spec: GroundTruthSpec, out_dir: str | Path, cache_dir: str | Path | None
) -> Path:
    """Write the (cached) ground truth of ``setting`` as a shippable compressed archive."""
    gt = lds_ground_truth(setting, spec, cache_dir=cache_dir, workers=2)
    stored = gt.per_seed.to(setting.torch_dtype)
    if not torch.equal(stored.to(torch.float64), gt.per_seed):
        raise DataError(
            f"the targets of {setting.name} do not round-trip through {setting.dtype}; "
            "cannot ship them losslessly."
        )
    path = Path(out_dir) / f"{_store_path(Path('.'), setting, spec).name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        per_seed=stored.numpy(),
        recipe_hash=np.array(setting.recipe_hash()),
        spec_key=np.array(spec.key()),
    )
    return path


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_ground_truth`.

    Attributes:
        checked: ``(subset, seed index)`` pairs retrained.
        max_abs_diff: largest ``|retrained - stored|`` over their targets.
        max_rel_diff: largest ``|retrained - stored| / (1 + |stored|)``.
        rtol: the tolerance on ``max_rel_diff``.
    """

    checked: list[tuple[int, int]]
    max_abs_diff: float
    max_rel_diff: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.rtol


def verify_ground_truth(
    setting: Setting,
    spec: GroundTruthSpec,
    *,
    cache_dir: str | Path | None = None,
    n_subsets: int = 3,
    rtol: float = 1e-4,
) -> VerifyResult:
    """Retrain the first ``n_subsets`` subsets (first seed) and compare with the stored targets.

    Reads the cache (filled from the shipped archive if needed: no retraining beyond the
    check). Retrains with one thread, as the pool workers that build ground truth do.

    Raises:
        ConfigError: If ``n_subsets`` is not in ``[1, m]`` or ``rtol`` is negative.
    """
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int):
        raise ConfigError(f"n_subsets must be an int; got {n_subsets!r}.")
    if not 1 <= n_subsets <= spec.m:
        raise ConfigError(f"n_subsets must lie in [1, m={spec.m}]; got {n_subsets}.")
    if not rtol >= 0:
        raise ConfigError(f"rtol must be >= 0; got {rtol!r}.")
    gt = lds_ground_truth(setting, spec, cache_dir=cache_dir, progress=False)
    subsets = sample_subsets(setting.n_train, spec.m, spec.alpha, spec.subset_seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        abs_diff, rel_diff, checked = 0.0, 0.0, []
        for j in range(n_subsets):
            seed = int(gt.train_seeds[j, 0])
            fresh = _retrain(setting, subsets[j].nonzero().squeeze(1), seed)
            diff = (fresh - gt.per_seed[j, 0]).abs()
            abs_diff = max(abs_diff, float(diff.max()))
            rel_diff = max(rel_diff, float((diff / (1 + gt.per_seed[j, 0].abs())).max()))
            checked.append((j, 0))
    finally:
        torch.set_num_threads(threads)
    return VerifyResult(checked, abs_diff, rel_diff, rtol)


def _seed_store(store: Store, per_seed: torch.Tensor) -> None:
    for j in range(per_seed.shape[0]):
        for s in range(per_seed.shape[1]):
            if not store.has_shard(f"seed{s}", j):
                store.write_shard(f"seed{s}", j, per_seed[j, s])


def main(argv: list[str] | None = None) -> int:
    """Regenerate the shipped ground truth of the default setting under the default protocol."""
    args = sys.argv[1:] if argv is None else argv
    cache = Path(args[0]) if args else default_cache_dir()
    path = export_ground_truth(
        get_setting(DEFAULT_SETTING), GroundTruthSpec(), shipped_dir(), cache
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
