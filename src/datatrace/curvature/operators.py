"""Curvature of the mean training loss as matrix-free linear operators.

Influence functions (Koh & Liang 2017, eq. 2) precondition gradients with the inverse Hessian
of the mean training loss ``L(θ) = (1/n) Σ_i loss(z_i, θ)``. This module exposes that curvature,
and its usual stand-ins, as :class:`LinearOperator` objects that only know how to multiply a
vector; the solvers in :mod:`datatrace.solvers` invert them.

- :class:`HessianOperator`: exact Hessian-vector products ``∇²L v`` (forward-over-reverse,
  Pearlmutter 1994), accumulated over batches.
- :class:`GGNOperator`: generalized Gauss-Newton ``(1/n) Σ_i J_iᵀ H_z,i J_i v`` (Schraudolph
  2002; Martens 2020), where ``J_i`` is the Jacobian of example i's outputs and ``H_z,i`` the
  Hessian of its loss w.r.t. those outputs. For cross-entropy this is the true Fisher.
- :class:`FisherOperator`: empirical Fisher ``(1/n) Gᵀ G`` from per-sample gradient rows.
- :class:`DenseOperator`: a materialised matrix (tests, small models).
- :class:`KernelOperator`: a materialised PSD Gram/kernel ``ΦᵀΦ`` (TRAK), inverted by Cholesky.
- :class:`CallableOperator`: any symmetric product function (e.g. the Hessian-vector products
  of RPS's last-layer refit objective).

Every operator has ``inverse(damping, solver=None)`` returning an
:class:`~datatrace.solvers.InverseOperator` of ``A + damping I`` and ``solve(b, damping)``;
the inverses themselves are computed in :mod:`datatrace.solvers` only.

Every vector is flat over the task's tracked parameters in canonical order
(``task.tracked_names``, each parameter flattened, concatenated).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from datatrace._progress import progress_bar
from datatrace.data import iter_batches, num_examples
from datatrace.devices import working_dtype
from datatrace.errors import ConfigError, DataError
from datatrace.gradients import compute_per_sample_grads
from datatrace.task import Task, _SplitBatch

if TYPE_CHECKING:
    from datatrace.solvers import InverseOperator, Solver

__all__ = [
    "CallableOperator",
    "DenseOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KernelOperator",
    "LinearOperator",
    "layer_blocks",
]


class LinearOperator(ABC):
    """A symmetric ``dim x dim`` matrix known through its products with vectors.

    Attributes:
        dim: number of rows (= tracked parameters, or feature dimension).
        dtype: dtype of the vectors it accepts and returns.
        device: device of those vectors.
        blocks: contiguous slices partitioning ``range(dim)`` (one per layer) for
            block-diagonal solvers, or None for a single block.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    blocks: list[slice] | None = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Product with ``v`` of shape ``(dim,)`` or ``(dim, k)``; returns the same shape."""
        out = self._matmat(as_columns(v, self, f"{type(self).__name__}.matvec"))
        return out.squeeze(1) if v.ndim == 1 else out

    @abstractmethod
    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        """Product with ``v`` of shape ``(dim, k)``."""

    def to_dense(self, chunk_size: int = 256, progress: bool | None = False) -> torch.Tensor:
        """The ``(dim, dim)`` matrix, by products with the identity ``chunk_size`` columns at a
        time (small ``dim`` only); ``progress``: a bar over the chunks (docs/conventions.md)."""
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1; got {chunk_size}.")
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        starts = progress_bar(
            range(0, self.dim, chunk_size),
            desc=f"dense curvature ({self.dim} columns)",
            enabled=progress,
            unit="chunk",
        )
        cols = [self._matmat(eye[:, s : s + chunk_size]) for s in starts]
        return torch.cat(cols, dim=1)

    def inverse(
        self, damping: float, solver: Solver | None = None, *, progress: bool | None = False
    ) -> InverseOperator:
        """``(A + damping I)⁻¹`` as an :class:`~datatrace.solvers.InverseOperator`.

        Args:
            damping: ``λ >= 0``.
            solver: any :class:`~datatrace.solvers.Solver`; default
                :class:`~datatrace.solvers.ExplicitSolver` (exact; materialises ``A`` unless
                the operator knows a cheaper factorisation).
            progress: bars over the preparation and solves (docs/conventions.md).
        """
        from datatrace.solvers import ExplicitSolver  # solvers act on operators: import late

        return (solver or ExplicitSolver()).prepare(self, damping, progress=progress)

    def solve(self, b: torch.Tensor, damping: float, solver: Solver | None = None) -> torch.Tensor:
        """``(A + damping I)⁻¹ b`` for ``b`` of shape ``(dim,)`` or ``(dim, k)`` (see :meth:`inverse`)."""
        return self.inverse(damping, solver).apply(b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"


def as_columns(v: torch.Tensor, like: Any, who: str) -> torch.Tensor:
    """``v`` of shape ``(dim,)`` or ``(dim, k)`` as a ``(dim, k)`` matrix of ``like``'s dtype/device."""
    if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or v.shape[0] != like.dim:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise DataError(f"{who} expects shape ({like.dim},) or ({like.dim}, k); got {shape}.")
    v = v.to(dtype=like.dtype, device=like.device)
    return v.unsqueeze(1) if v.ndim == 1 else v


def _check_blocks(blocks: Sequence[slice] | None, dim: int) -> list[slice] | None:
    if blocks is None:
        return None
    out: list[slice] = []
    pos = 0
    for b in blocks:
        if not isinstance(b, slice) or b.step not in (None, 1) or b.start != pos or b.stop is None:
            raise ConfigError(
                f"blocks must be contiguous slices partitioning range({dim}) in order; got {b!r} "
                f"where slice({pos}, ...) was expected."
            )
        if b.stop <= b.start:
            raise ConfigError(f"blocks must be non-empty; got {b!r}.")
        out.append(slice(b.start, b.stop))
        pos = b.stop
    if pos != dim:
        raise ConfigError(
            f"blocks cover range({pos}) but the operator has dim {dim}; they must cover it all."
        )
    return out


def layer_blocks(task: Task) -> list[slice]:
    """Flat slices of the tracked parameters grouped by owning module (weight + bias together).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        >>> layer_blocks(Task(model.eval()))
        [slice(0, 25, None), slice(25, 43, None)]
    """
    blocks: list[slice] = []
    owner_prev: str | None = None
    pos = 0
    for name, p in task.tracked_params().items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if blocks and owner == owner_prev:
            blocks[-1] = slice(blocks[-1].start, pos + p.numel())
        else:
            blocks.append(slice(pos, pos + p.numel()))
        owner_prev = owner
        pos += p.numel()
    return blocks


class DenseOperator(LinearOperator):
    """A materialised symmetric matrix as an operator.

    Args:
        matrix: ``(dim, dim)`` floating tensor.
        blocks: optional per-layer slices (see :class:`LinearOperator`).

    Example:
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0])))
        >>> op.matvec(torch.ones(2))
        tensor([1., 2.])
    """

    def __init__(self, matrix: torch.Tensor, blocks: Sequence[slice] | None = None) -> None:
        if (
            not isinstance(matrix, torch.Tensor)
            or matrix.ndim != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            shape = (
                tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            )
            raise ConfigError(f"DenseOperator needs a square 2-D tensor; got {shape}.")
        if not matrix.is_floating_point():
            raise ConfigError(f"DenseOperator needs a floating matrix; got dtype {matrix.dtype}.")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.blocks = _check_blocks(blocks, self.dim)

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v

    def to_dense(self, chunk_size: int = 256, progress: bool | None = False) -> torch.Tensor:
        return self.matrix.clone()


class KernelOperator(DenseOperator):
    """A materialised PSD Gram/kernel ``K = ΦᵀΦ`` (e.g. TRAK's, accumulated over streamed rows).

    With no solver, :meth:`inverse` factors ``K + λI`` by Cholesky in float64
    (:meth:`datatrace.solvers.GramInverse.from_gram`; ``λ >= 0``), several times cheaper
    than an eigendecomposition; results come back in ``K``'s dtype.

    Example:
        >>> op = KernelOperator(torch.eye(2, dtype=torch.float64))
        >>> op.solve(torch.ones(2, dtype=torch.float64), damping=1.0)
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def inverse(
        self, damping: float, solver: Solver | None = None, *, progress: bool | None = False
    ) -> InverseOperator:
        if solver is not None:
            return super().inverse(damping, solver, progress=progress)
        from datatrace.solvers import GramInverse

        return GramInverse.from_gram(self.matrix, damping)


class CallableOperator(LinearOperator):
    """A symmetric operator known by a function that multiplies one vector.

    Args:
        product: maps a ``(dim,)`` vector to the ``(dim,)`` product.
        dim: the size of the vectors.
        dtype: their dtype.
        device: their device.

    Example:
        >>> op = CallableOperator(lambda v: 2 * v, 3, torch.float64, torch.device("cpu"))
        >>> op.solve(torch.ones(3, dtype=torch.float64), damping=0.0)
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(
        self,
        product: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.product, self.dim, self.dtype, self.device = product, dim, dtype, device

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.product(v[:, j]) for j in range(v.shape[1])], 1)


class _TaskOperator(LinearOperator):
    """Shared plumbing: the data, the state, and flattening between vectors and param dicts."""

    def __init__(
        self,
        task: Task,
        data: Any,
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigError(f"{type(self).__name__} needs a Task; got {type(task).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        self.task = task
        self.data = data
        self.batch_size = batch_size
        self.n = num_examples(data)
        if self.n == 0:
            raise DataError("the dataset is empty; curvature needs at least one example.")
        full = task.state() if state is None else dict(state)
        self._names = task.tracked_names
        missing = [n for n in self._names if n not in full]
        if missing:
            raise ConfigError(
                f"state lacks tracked parameters {missing[:5]}; pass a full state dict."
            )
        self._params = {n: full[n].detach() for n in self._names}
        self._rest = {k: v.detach() for k, v in full.items() if k not in self._params}
        self._shapes = [tuple(p.shape) for p in self._params.values()]
        self.dim = sum(p.numel() for p in self._params.values())
        first = next(iter(self._params.values()))
        # products run in the model's dtype; vectors and sums in the working dtype (float32
        # for a half-precision model), which the solvers then iterate in
        self._param_dtype = first.dtype
        self.dtype = working_dtype(first.dtype)
        self.device = first.device

    def _unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        # (dim, k) -> {name: (k, *shape)}: the leading k is the vmap dimension.
        k = v.shape[1]
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for name, shape in zip(self._names, self._shapes):
            size = int(torch.Size(shape).numel())
            out[name] = v[pos : pos + size].T.reshape(k, *shape)
            pos += size
        return out

    def _flatten(self, tree: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        return torch.cat([tree[n].reshape(k, -1) for n in self._names], dim=1).T

    def _batches(self) -> Any:
        for batch in iter_batches(self.data, self.batch_size):
            self.task.check_batch(batch)
            yield self.task.split_batch(batch)

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        tangents = self._unflatten(v.to(self._param_dtype))
        total = torch.zeros_like(v)
        # Forward-mode products need attention kernels that support them: PyTorch's fused
        # SDPA kernels (transformers' default attention) do not, its math kernel does.
        with sdpa_kernel([SDPBackend.MATH]):
            for split in self._batches():
                product = self._batch_product(split, tangents)
                total += self._flatten(product, v.shape[1]).to(v.dtype)
        return total / self.n

    @abstractmethod
    def _batch_product(
        self, split: _SplitBatch, tangents: dict[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """Curvature of the *summed* batch loss times each of the k tangents."""


class HessianOperator(_TaskOperator):
    """Exact Hessian of the mean training loss, via Hessian-vector products.

    Each product is a forward-mode derivative of the reverse-mode gradient (``jvp`` of
    ``grad``), vectorised over the columns with ``vmap``; one pass over ``data`` per product.

    Args:
        task: the task (model, loss, tracked parameters).
        data: training data in any form :func:`datatrace.data.iter_batches` accepts.
        state: parameters and buffers to evaluate at (default: ``task.state()``).
        batch_size: examples per batch.

    Example:
        >>> model = torch.nn.Linear(3, 2).eval()
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> op = HessianOperator(Task(model), data)
        >>> op.matvec(torch.randn(op.dim)).shape
        torch.Size([8])
    """

    def _batch_product(
        self, split: _SplitBatch, tangents: dict[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        task, rest = self.task, self._rest

        def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return task.loss_from_outputs(task.outputs({**rest, **p}, split), split).sum()

        grad_fn = grad(loss)

        def hvp(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return jvp(grad_fn, (self._params,), (t,))[1]

        return vmap(hvp)(tangents)


class GGNOperator(_TaskOperator):
    """Generalized Gauss-Newton ``(1/n) Σ_i J_iᵀ H_z,i J_i`` of the mean training loss.

    ``J v`` is a ``jvp`` of the model outputs, ``H_z (J v)`` a ``jvp`` of the loss gradient
    w.r.t. the outputs, and ``Jᵀ u`` a ``vjp``; the Jacobian is never formed. The GGN is
    positive semi-definite for convex losses; for cross-entropy it equals the true Fisher, for
    mean squared error on a linear model it equals the Hessian.

    Args:
        task: the task (model, loss, tracked parameters).
        data: training data in any form :func:`datatrace.data.iter_batches` accepts.
        state: parameters and buffers to evaluate at (default: ``task.state()``).
        batch_size: examples per batch.

    Example:
        >>> model = torch.nn.Linear(3, 2).eval()
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> op = GGNOperator(Task(model), data)
        >>> bool((op.to_dense().diagonal() >= 0).all())
        True
    """

    def _batch_product(
        self, split: _SplitBatch, tangents: dict[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        task, rest = self.task, self._rest

        def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return task.outputs({**rest, **p}, split)

        def loss_of_outputs(z: torch.Tensor) -> torch.Tensor:
            return task.loss_from_outputs(z, split).sum()

        # vjp's typing allows an aux output; there is none here.
        z, pullback = vjp(outputs, self._params)[:2]
        z = z.detach()
        grad_z = grad(loss_of_outputs)

        def ggn_vp(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            jv = jvp(outputs, (self._params,), (t,))[1]
            hjv = jvp(grad_z, (z,), (jv,))[1]
            return pullback(hjv)[0]

        return vmap(ggn_vp)(tangents)


class FisherOperator(LinearOperator):
    """Empirical Fisher ``(1/n) Gᵀ G`` from per-sample gradient (or projected feature) rows.

    Args:
        grads: ``(n, dim)`` rows ``g_i``; kept as ``.grads`` (DataInf inverts per row).
        blocks: optional per-layer slices of the columns (see :func:`layer_blocks`).

    Example:
        >>> op = FisherOperator(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> op.to_dense()
        tensor([[1., 1.],
                [1., 2.]])
    """

    def __init__(self, grads: torch.Tensor, blocks: Sequence[slice] | None = None) -> None:
        if not isinstance(grads, torch.Tensor) or grads.ndim != 2 or grads.shape[0] < 1:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ConfigError(f"FisherOperator needs a (n, dim) tensor with n >= 1; got {shape}.")
        if not grads.is_floating_point():
            raise ConfigError(f"FisherOperator needs floating gradients; got dtype {grads.dtype}.")
        self.grads = grads
        self.n = int(grads.shape[0])
        self.dim = int(grads.shape[1])
        self.dtype = grads.dtype
        self.device = grads.device
        self.blocks = _check_blocks(blocks, self.dim)

    @classmethod
    def from_task(
        cls,
        task: Task,
        data: Any,
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 64,
        blocks: Sequence[slice] | None = None,
    ) -> FisherOperator:
        """Build it from the training loss's per-sample gradients (holds ``n x dim``: small models).

        Example:
            >>> model = torch.nn.Linear(3, 2).eval()
            >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
            >>> FisherOperator.from_task(Task(model), data).grads.shape
            torch.Size([8, 8])
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        rows = [
            compute_per_sample_grads(task, batch, state=state).flat()
            for batch in iter_batches(data, batch_size)
        ]
        return cls(torch.cat(rows, dim=0), blocks=blocks)

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        return self.grads.T @ (self.grads @ v) / self.n

    def to_dense(self, chunk_size: int = 256, progress: bool | None = False) -> torch.Tensor:
        return self.grads.T @ self.grads / self.n
