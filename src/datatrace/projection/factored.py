"""LoGra's per-layer Kronecker projection (Choe et al. 2024), ``P_g^T G P_a`` from the layer
factors, without ever forming a layer's gradient."""

from __future__ import annotations

import torch

from datatrace._checks import check_int
from datatrace._seeds import stable_seed
from datatrace.errors import DataError, NotFittedError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.gradients.hooks import LayerFactors
from datatrace.projection._pieces import (
    _ChunkCache,
    _MiB,
    _psg_device,
    _psg_dtype,
    _randn,
    _work_dtype,
)
from datatrace.projection.base import Projector
from datatrace.projection.dense import GaussianProjector

__all__ = ["FactoredProjector"]


_Unit = LayerFactors | tuple[str, str | None, str | None] | str


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


class FactoredProjector(Projector):
    """LoGra's per-layer Kronecker projection ``P_g^T G P_a`` (Choe et al. 2024).

    Each layer's gradient ``G`` (``(O, I')``, bias as a last column) becomes ``proj_dim_out x
    proj_dim_in`` features; ``P_a`` (``I' x proj_dim_in``) and ``P_g`` (``O x proj_dim_out``) are
    ``N(0, 1/k)`` and seeded by ``(seed, member, layer name)``. Hook-engine layers are projected
    from their factors. Dense parameters ``<m>.weight`` with >= 2 dims (with ``<m>.bias`` when
    tracked), or a lone tracked ``<m>.bias``, are reshaped to that same matrix, so features do not
    depend on the gradient engine; any other parameter gets its own Gaussian projection to
    ``proj_dim_in * proj_dim_out`` features. Units are concatenated in canonical order, so
    :attr:`proj_dim` depends on the task: it is fixed by the first :meth:`project` call, and
    :meth:`output_dim` computes it beforehand.

    Args:
        proj_dim_in: ``k_in``, projected width of the layer inputs.
        proj_dim_out: ``k_out``, projected width of the layer output gradients.
        seed: seed of all layer matrices.
        member: ensemble member; each member gets independent matrices.
        cache_bytes: generated matrices are kept up to this many bytes.

    Example:
        >>> from datatrace.gradients import compute_per_sample_grads
        >>> from datatrace.task import Task
        >>> task = Task(torch.nn.Linear(5, 3).eval())
        >>> psg = compute_per_sample_grads(task, (torch.randn(4, 5), torch.tensor([0, 1, 2, 0])))
        >>> FactoredProjector(4, 2).project(psg).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        proj_dim_in: int,
        proj_dim_out: int,
        seed: int = 0,
        member: int = 0,
        cache_bytes: int = 256 * _MiB,
    ) -> None:
        self.proj_dim_in = check_int("proj_dim_in", proj_dim_in, 1)
        self.proj_dim_out = check_int("proj_dim_out", proj_dim_out, 1)
        self.seed = check_int("seed", seed, 0)
        self.member = check_int("member", member, 0)
        self._cache = _ChunkCache(check_int("cache_bytes", cache_bytes, 0))
        self._dense: dict[str, GaussianProjector] = {}
        self._proj_dim: int | None = None

    @property
    def dim_per_layer(self) -> int:
        return self.proj_dim_in * self.proj_dim_out

    @property
    def proj_dim(self) -> int:
        if self._proj_dim is None:
            raise NotFittedError(
                "FactoredProjector.proj_dim is known after project(); use output_dim(psg)."
            )
        return self._proj_dim

    def layer_matrices(
        self,
        layer: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_a`` (``(in_features, proj_dim_in)``) and ``P_g`` (``(out_features, proj_dim_out)``)."""

        def matrix(side: str, rows: int, k: int) -> torch.Tensor:
            def make() -> tuple[torch.Tensor, ...]:
                seed = stable_seed("factored", self.seed, self.member, layer, side)
                return (_randn(torch.Generator().manual_seed(seed), rows, k, dtype).to(device),)

            return self._cache.get((layer, side, rows, dtype, device), make)[0]

        p_a = matrix("a", in_features, self.proj_dim_in)
        return p_a, matrix("g", out_features, self.proj_dim_out)

    def _units(self, psg: PerSampleGrads) -> list[_Unit]:
        """Hook layers, dense ``(module, weight, bias)`` matrices and other parameter names."""
        unit: dict[str, _Unit] = {n: f for f in psg.factors for n in (f.weight, f.bias) if n}
        shapes, units = psg.shapes, dict[int, _Unit]()
        for name in psg.names:
            if name not in unit:
                prefix, _, leaf = name.rpartition(".")
                w, b = _join(prefix, "weight"), _join(prefix, "bias")
                wd = w in psg.dense and len(shapes[w]) >= 2
                # a bias joins its weight's matrix, or stands alone as (O, 1) like the hook engine's
                bd = b in psg.dense and len(shapes[b]) == 1
                bd = bd and (w not in shapes or (wd and shapes[b][0] == shapes[w][0]))
                if (leaf == "weight" and wd) or (leaf == "bias" and bd):
                    group = (prefix, w if wd else None, b if bd else None)
                    unit.update({n: group for n in group[1:] if n})
                else:
                    unit[name] = name
            units.setdefault(id(unit[name]), unit[name])
        return list(units.values())

    def output_dim(self, psg: PerSampleGrads) -> int:
        return len(self._units(psg)) * self.dim_per_layer

    def project(self, psg: PerSampleGrads) -> torch.Tensor:
        out_dtype, n = _psg_dtype(psg), psg.batch_size
        dtype, d = _work_dtype(out_dtype), self.dim_per_layer
        units = self._units(psg)
        total = len(units) * d
        if self._proj_dim is not None and total != self._proj_dim:
            raise DataError(
                f"these gradients give {total} features, earlier ones {self._proj_dim}; "
                "train and query gradients must track the same parameters."
            )
        if not units:
            raise DataError("these per-sample gradients hold no parameters.")
        # Each unit writes its columns of one output (no per-unit tensors and final cat).
        out = torch.empty(n, total, dtype=dtype, device=_psg_device(psg))
        for j, unit in enumerate(units):
            part = out[:, j * d : (j + 1) * d]
            if isinstance(unit, str):
                if unit not in self._dense:
                    seed = stable_seed("factored-dense", self.seed, self.member, unit)
                    self._dense[unit] = GaussianProjector(self.dim_per_layer, seed=seed)
                    self._dense[unit]._cache = self._cache  # one memory budget for all matrices
                part.copy_(self._dense[unit].project_flat(psg.dense[unit].reshape(n, -1)))
            elif isinstance(unit, LayerFactors):
                a, g = unit.a.to(dtype), unit.g.to(dtype)
                p_a, p_g = self.layer_matrices(unit.module, a.shape[2], g.shape[2], dtype, a.device)
                ga, aa = g @ p_g, a @ p_a
                if ga.shape[1] == 1:  # one position: the outer product, written in place
                    view = part.view(n, self.proj_dim_out, self.proj_dim_in)
                    torch.mul(ga[:, 0, :, None], aa[:, 0, None, :], out=view)
                else:
                    part.copy_(torch.einsum("btp,btq->bpq", ga, aa).reshape(n, -1))
            else:
                module, w, b = unit
                cols = [psg.dense[w].flatten(2)] if w else []
                mat = torch.cat(cols + ([psg.dense[b].unsqueeze(2)] if b else []), 2).to(dtype)
                p_a, p_g = self.layer_matrices(
                    module, mat.shape[2], mat.shape[1], dtype, mat.device
                )
                part.copy_((p_g.T @ mat @ p_a).reshape(n, -1))
        self._proj_dim = total
        return out.to(out_dtype)

    def project_flat(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError(
            "FactoredProjector projects per layer; call project(psg) instead."
        )
