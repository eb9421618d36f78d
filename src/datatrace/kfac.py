"""K-FAC and EK-FAC curvature of ``nn.Linear`` and ``nn.Conv2d`` layers.

For a layer ``z = W a`` (the bias is a trailing ones column of ``a``) applied at positions
``t`` (tokens, conv patches), example ``n``'s gradient is ``D_n = sum_t g_{n,t} a_{n,t}^T``
(``O x I'``) with ``g = d loss / d z``. The curvature block of the layer,
``F = E_n E_y[vec(D_n) vec(D_n)^T]`` (row-major ``vec``), is approximated by

- **K-FAC** (Martens & Grosse 2015, eq. 1; Grosse & Martens 2016 for conv patches;
  Eschenhagen et al. 2023 "K-FAC expand" for positions): ``F ≈ G ⊗ A`` with
  ``A = mean over positions of a aᵀ`` and ``G = (1/n) sum_{n,t} g gᵀ``. With eigenbases
  ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ`` its eigenvalues are ``λ_G λ_Aᵀ``.
- **EK-FAC** (George et al. 2018, eq. 10; Grosse et al. 2023, eq. 20): the same Kronecker
  eigenbasis with the eigenvalues refitted by a second pass over the data,
  ``Λ[o, i] = (1/n) sum_n E_y (Q_Gᵀ D_n Q_A)[o, i]²``: the diagonal of ``F`` in that basis,
  the best Frobenius fit of ``F`` among matrices with this eigenbasis.

``E_y`` is the Fisher kind: ``"true"`` samples one label per example from the model's
predictive distribution (``fisher_samples=k``: k labels, their contributions averaged; seeded
per example, so results do not depend on batching; losses ``cross_entropy``, ``mse``, ``lm``), ``"empirical"`` uses the training labels, and
``"exact"`` takes the expectation in closed form by back-propagating the columns of a square
root of each example's output Hessian (one backward pass per output dimension: small outputs
only). With ``"exact"`` the curvature is a block-diagonal approximation of the GGN that
:class:`datatrace.curvature.GGNOperator` computes exactly.

Padding: when a batch carries an ``attention_mask`` whose shape matches a layer's positions,
``A`` averages over unmasked positions only. Parameters outside Linear/Conv2d layers (norms,
embeddings) are refused with the list of them: select the layers with ``Task(params=...)`` or
``Task(module_types=(nn.Linear, nn.Conv2d))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from datatrace import distributed
from datatrace._progress import progress_bar
from datatrace.curvature import LinearOperator
from datatrace.data import iter_batch_range, num_batches, num_examples
from datatrace.devices import working_dtype
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.gradients.factored import ParamLayout, factored_modules
from datatrace.gradients.hooks import _layer_grad, _layer_input, _outer_sum
from datatrace.solvers import InverseOperator, KFACInverse, Solver
from datatrace.task import Task, _SplitBatch

__all__ = [
    "Damping",
    "FisherKind",
    "KFACCurvature",
    "KFACKind",
    "KFACLayer",
    "Projections",
    "check_curvature_examples",
    "check_damping",
    "check_fisher_samples",
    "compute_dtype",
    "curvature_subset",
    "eigen_pass_seed",
    "fit_ekfac_eigenvalues",
    "fit_kfac",
    "fit_kfac_layers",
    "layer_damping",
]

KFACKind = Literal["kfac", "ekfac"]
FisherKind = Literal["true", "empirical", "exact"]
Damping = float | Literal["heuristic"] | Mapping[str, float]
# per layer (P_a (I', k_in), P_g (O, k_out)); None keeps that side unprojected
Projections = Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]
HEURISTIC_DAMPING = 0.1  # damping="heuristic": 0.1 x the mean eigenvalue of each layer
# EK-FAC's eigenvalue pass draws its own labels (fisher="true"): seed + this offset.
EIGEN_SEED_OFFSET = 1_000_003


def eigen_pass_seed(seed: int) -> int:
    """Label seed of EK-FAC's eigenvalue-correction pass for bases fitted with ``seed``.

    With a sampled (true) Fisher, reusing the labels that estimated the factors makes the
    corrected eigenvalues fit the same samples that chose the eigenbasis: large eigenvalues
    come out too large and small ones too small, so the inverse over-weights the small
    directions. Fresh labels remove that bias (digits MLP, true Fisher, heuristic damping:
    test LDS 0.357 -> 0.406, mean of 4 seeds; docs/benchmarks.md).
    """
    return seed + EIGEN_SEED_OFFSET


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-batch products of the K-FAC passes for a task of ``dtype``.

    A float64 task computes in float64; any other (float32, half) in float32, as other EK-FAC
    implementations do: the per-batch products are where the flops are, and float32 halves
    their cost. Running sums over batches, eigendecompositions and inverses stay in float64;
    the fitted layers are kept in the task's working dtype
    (:func:`datatrace.devices.working_dtype`, the same rule): never in half precision.
    """
    return working_dtype(dtype)


MAX_EXACT_OUTPUTS = 4096  # fisher="exact": one backward pass per output dimension


@dataclass
class KFACLayer:
    """The factored curvature of one layer (see the module docstring).

    Attributes:
        module: the module's name.
        weight: tracked weight parameter name, or None.
        bias: tracked bias parameter name, or None.
        weight_shape: shape of the weight.
        a_factor: ``(I', I')`` input covariance ``A``.
        g_factor: ``(O, O)`` output-gradient covariance ``G``.
        q_a: ``(I', I')`` eigenvectors of ``A`` (columns).
        q_g: ``(O, O)`` eigenvectors of ``G`` (columns).
        eigenvalues: ``(O, I')`` eigenvalues in the basis ``q_g ⊗ q_a``: ``λ_G λ_Aᵀ`` for
            K-FAC, the corrected ``Λ`` for EK-FAC.
    """

    module: str
    weight: str | None
    bias: str | None
    weight_shape: tuple[int, ...]
    a_factor: torch.Tensor
    g_factor: torch.Tensor
    q_a: torch.Tensor
    q_g: torch.Tensor
    eigenvalues: torch.Tensor

    def __post_init__(self) -> None:
        # eigh returns column-major eigenvectors; the store writes row-major arrays. One
        # layout everywhere keeps a reloaded curvature bit-identical to the fitted one (BLAS
        # sums in a layout-dependent order).
        for f in ("a_factor", "g_factor", "q_a", "q_g", "eigenvalues"):
            setattr(self, f, getattr(self, f).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I')`` of the layer's gradient matrices."""
        return int(self.q_g.shape[0]), int(self.q_a.shape[0])

    @property
    def params(self) -> list[str]:
        """Tracked parameter names of the layer (weight first)."""
        return [n for n in (self.weight, self.bias) if n is not None]

    @classmethod
    def from_factors(
        cls,
        module: str,
        weight: str | None,
        bias: str | None,
        weight_shape: tuple[int, ...],
        a_factor: torch.Tensor,
        g_factor: torch.Tensor,
    ) -> KFACLayer:
        """Eigendecompose ``A`` and ``G`` (in float64) into a K-FAC layer (``Λ = λ_G λ_Aᵀ``).

        Example:
            >>> layer = KFACLayer.from_factors("fc", "fc.weight", None, (2, 2),
            ...                                torch.eye(2), torch.diag(torch.tensor([1.0, 3.0])))
            >>> layer.eigenvalues
            tensor([[1., 1.],
                    [3., 3.]], dtype=torch.float64)
        """
        a, g = a_factor.to(torch.float64), g_factor.to(torch.float64)
        la, qa = torch.linalg.eigh((a + a.T) / 2)
        lg, qg = torch.linalg.eigh((g + g.T) / 2)
        # the factors are PSD: rounding may leave eigenvalues at -1e-17
        evals = lg.clamp_min(0).unsqueeze(1) * la.clamp_min(0).unsqueeze(0)
        return cls(module, weight, bias, weight_shape, a, g, qa, qg, evals)

    def rotate(self, mats: torch.Tensor) -> torch.Tensor:
        """``Q_Gᵀ M Q_A`` for ``(k, O, I')`` matrices."""
        return self.q_g.T @ mats @ self.q_a

    def unrotate(self, mats: torch.Tensor) -> torch.Tensor:
        """``Q_G M Q_Aᵀ`` for ``(k, O, I')`` matrices."""
        return self.q_g @ mats @ self.q_a.T


def _check_choice(label: str, value: Any, options: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{label} must be one of {list(options)}; got {value!r}.")


def check_damping(damping: Any, modules: Sequence[str] | None = None) -> None:
    """Validate a damping: a number >= 0, ``"heuristic"`` or ``{module: number >= 0}``."""
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ConfigError(
                f"damping must be a number >= 0, 'heuristic' or a dict {{module: number}}; got "
                f"{damping!r}."
            )
        return
    if isinstance(damping, Mapping):
        for k, v in damping.items():
            check_damping(v)
            if isinstance(v, str):
                raise ConfigError(f"per-layer damping of {k!r} must be a number; got {v!r}.")
        if modules is not None:
            missing = [m for m in modules if m not in damping]
            extra = [k for k in damping if k not in modules]
            if missing or extra:
                raise ConfigError(
                    f"per-layer damping must name every K-FAC layer {list(modules)}; missing "
                    f"{missing}, unknown {extra}."
                )
        return
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool)
    if not (ok and 0 <= damping < float("inf")):
        raise ConfigError(f"damping must be a finite number >= 0; got {damping!r}.")


def check_fisher_samples(fisher_samples: Any, fisher: str) -> None:
    """Validate ``fisher_samples``: an integer >= 1, above 1 only with ``fisher="true"``."""
    ok = isinstance(fisher_samples, int) and not isinstance(fisher_samples, bool)
    if not ok or fisher_samples < 1:
        raise ConfigError(f"fisher_samples must be an integer >= 1; got {fisher_samples!r}.")
    if fisher_samples > 1 and fisher != "true":
        raise ConfigError(
            f"fisher_samples={fisher_samples} samples labels, which only fisher='true' does; "
            f"got fisher={fisher!r}; pass fisher='true' with it."
        )


def check_curvature_examples(curvature_examples: Any) -> None:
    """Validate ``curvature_examples``: None, an integer >= 1 (a count) or a float in (0, 1]
    (a fraction of the training set)."""
    value = curvature_examples
    if value is None:
        return
    expected = "None, an integer >= 1 (a count) or a float in (0, 1] (a fraction)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"curvature_examples must be {expected}; got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"curvature_examples must be {expected}; got {value!r}.")
    if isinstance(value, float) and not 0 < value <= 1:
        whole = value > 1 and value.is_integer()  # inf and nan are neither
        hint = f"; pass the integer {int(value)} for a count" if whole else ""
        raise ConfigError(f"curvature_examples must be {expected}; got the float {value!r}{hint}.")


def curvature_subset(
    n_train: int, curvature_examples: int | float | None, seed: int
) -> torch.Tensor | None:
    """Training-set indices of the examples that fit the curvature (None: all of them).

    ``curvature_examples`` is a count or a fraction of ``n_train`` (rounded to the nearest
    count, at least 1; see :func:`check_curvature_examples`). The examples are the first
    ``m`` of a random permutation seeded by ``seed``, returned sorted (the passes read them in
    training-set order); so subsets of one seed are nested as ``m`` grows. A random subset
    rather than the first ``m``: training data is often ordered (by class, source, time), and
    its first examples are then a biased sample. Selecting every example returns None, so the
    curvature is the one fitted without the setting, bit for bit.

    Raises:
        ConfigError: a count above ``n_train``.

    Example:
        >>> curvature_subset(10, 0.3, seed=0).tolist()
        [1, 4, 7]
        >>> curvature_subset(10, 10, seed=0) is None
        True
    """
    check_curvature_examples(curvature_examples)
    if curvature_examples is None:
        return None
    if isinstance(curvature_examples, float):
        m = max(1, round(curvature_examples * n_train))
    else:
        m = curvature_examples
        if m > n_train:
            raise ConfigError(
                f"curvature_examples={m} exceeds the {n_train} training examples; pass at most "
                f"{n_train}, a fraction in (0, 1], or None (every example)."
            )
    if m >= n_train:
        return None
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return perm[:m].sort().values


# ----------------------------------------------------------------------------- data passes
def _example_generator(seed: int, index: int) -> torch.Generator:
    # One stream per example, so sampled labels do not depend on batching. The CPU generator
    # keeps 32 bits of its seed: mix (seed, index) with SplitMix64 so both change them.
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return torch.Generator().manual_seed((x ^ (x >> 31)) % 2**63)


def _sample_labels(
    task: Task, z: torch.Tensor, split: _SplitBatch, seed: int, offset: int, samples: int = 1
) -> list[Any]:
    """``samples`` label sets drawn from the model; draw ``j`` of example ``i`` is the ``j``-th
    from example ``i``'s own stream, so the first set does not depend on ``samples``."""
    labels = split.labels
    assert labels is not None
    gens = [_example_generator(seed, offset + i) for i in range(z.shape[0])]
    if task.loss_name not in ("cross_entropy", "mse", "lm"):
        raise ConfigError(
            f"fisher='true' samples labels from the model's predictive distribution, known for "
            f"the losses 'cross_entropy', 'mse' and 'lm'; the task's loss is {task.loss_name!r}. "
            "Use fisher='empirical' or fisher='exact'."
        )
    # Draws come from the examples' CPU streams, so labels do not depend on the device: one
    # transfer of the batch's outputs (in the working dtype: no half-precision softmax).
    z_cpu, labels_cpu = z.to("cpu", working_dtype(z.dtype)), labels.to("cpu")
    if task.loss_name == "mse":
        # per example all its draws in a row: its stream, not the batch, fixes them
        per_example = [
            [_draw_mse(z_cpu[i], labels_cpu[i], g) for _ in range(samples)]
            for i, g in enumerate(gens)
        ]
        drawn_sets = [torch.stack([draws[j] for draws in per_example]) for j in range(samples)]
    else:
        drawn_sets = list(_categorical_draws(task, z_cpu, gens, samples).unbind(1))
    out = []
    for drawn in drawn_sets:
        drawn = drawn.to(z.device)
        if task.loss_name == "lm":  # position t predicts token t + 1
            full = labels.clone()
            full[:, 1:] = torch.where(
                labels[:, 1:] == -100, labels[:, 1:], drawn[:, :-1].to(labels)
            )
            drawn = full
        out.append(drawn)
    return out


_DRAW_CHUNK = 1 << 22  # float64 CDF entries per step of _categorical_draws


def _categorical_draws(
    task: Task, z: torch.Tensor, gens: list[torch.Generator], samples: int
) -> torch.Tensor:
    """``(B, samples, ...)`` labels drawn from the softmax of each example's outputs.

    Inverse-CDF sampling: example ``i`` draws ``samples x P`` uniforms from its own stream
    (``P`` = 1 categorical over all its outputs for ``cross_entropy``, one per position for
    ``lm``), in a row, so a draw depends on the example's stream only; the CDF lookups of the
    whole batch are one vectorized ``searchsorted`` (float64, chunked over examples).
    """
    b = z.shape[0]
    per = z.reshape(b, 1, -1) if task.loss_name == "cross_entropy" else z
    p, v = per.shape[1], per.shape[2]
    u = torch.stack([torch.rand(samples, p, generator=g, dtype=torch.float64) for g in gens])
    out = torch.empty(b, samples, p, dtype=torch.long)
    step = max(1, _DRAW_CHUNK // max(1, p * v))
    for lo in range(0, b, step):
        cdf = torch.softmax(per[lo : lo + step].to(torch.float64), -1).cumsum(-1)
        # first class whose CDF exceeds u: class k with probability p_k, never a zero one
        idx = torch.searchsorted(cdf, u[lo : lo + step].transpose(1, 2).contiguous(), right=True)
        out[lo : lo + step] = idx.transpose(1, 2).clamp_max(v - 1)
    return out[:, :, 0] if task.loss_name == "cross_entropy" else out


def _draw_mse(z: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One target for one example: ``0.5 ||z - y||²`` is the NLL of ``y ~ N(z, I)``."""
    noise = torch.randn(label.shape, generator=gen, dtype=z.dtype).to(z.device)
    return z.reshape(label.shape) + noise


def _output_hessian_sqrt(task: Task, z: torch.Tensor, split: _SplitBatch) -> torch.Tensor:
    """``(B, D, D)`` square roots ``S`` with ``S Sᵀ`` = each example's output Hessian (PSD part).

    Computed in the working dtype (a half-precision model's outputs are upcast: no
    half-precision eigensolver) and returned in the outputs' dtype, for their backward pass.
    """
    out_dtype = z.dtype
    z = z.to(working_dtype(z.dtype))
    b, d = z.shape[0], z[0].numel()
    if d > MAX_EXACT_OUTPUTS:
        raise ConfigError(
            f"fisher='exact' back-propagates one vector per output dimension, here {d} per "
            f"example (more than {MAX_EXACT_OUTPUTS}); use fisher='true'."
        )

    def loss(zz: torch.Tensor) -> torch.Tensor:
        return task.loss_from_outputs(zz, split).sum()

    # The summed loss's Hessian is block-diagonal over examples: column d of every block at once.
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    tangents = eye.unsqueeze(1).expand(d, b, d).reshape(d, *z.shape)
    cols = vmap(lambda t: jvp(grad(loss), (z,), (t,))[1])(tangents)
    h = cols.reshape(d, b, d).permute(1, 2, 0)
    evals, evecs = torch.linalg.eigh((h + h.transpose(1, 2)) / 2)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).to(out_dtype)


@dataclass
class _Captured:
    a: torch.Tensor  # (B, T, I')
    gs: list[torch.Tensor]  # one (B, T, O) per Fisher sample / Hessian-root column
    valid: torch.Tensor | None  # (B, T) unmasked positions, or None


def _capture(
    task: Task,
    state: Mapping[str, torch.Tensor],
    batch: Any,
    modules: Mapping[str, tuple[str | None, str | None]],
    fisher: str,
    seed: int,
    offset: int,
    fisher_samples: int = 1,
) -> list[_Captured]:
    """One forward pass with hooks, then the backward pass(es) of the chosen Fisher kind."""
    task.check_batch(batch)
    split = task.split_batch(batch)
    mods = dict(task.model.named_modules())
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    handles = []
    for mname in modules:

        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, mname: str = mname) -> None:
            calls[mname].append((inp[0].detach(), out))

        handles.append(mods[mname].register_forward_hook(hook))
    names = {n for pair in modules.values() for n in pair if n is not None}
    live = {n: (v.detach().requires_grad_(True) if n in names else v) for n, v in state.items()}
    try:
        with torch.enable_grad():
            z = task.outputs(live, split)
            outs = [o for m in modules for _, o in calls[m]]
            if fisher == "exact":
                roots = _output_hessian_sqrt(task, z.detach(), split)
                vectors = [roots[:, :, k].reshape(z.shape) for k in range(roots.shape[2])]
                grads = [
                    torch.autograd.grad(z, outs, v, retain_graph=True, allow_unused=True)
                    for v in vectors
                ]
            elif fisher == "true":
                # k sampled labels: each gradient scaled by 1/sqrt(k), so that the factors and
                # eigenvalues (sums of squares over the gradients) average the k samples
                sets = _sample_labels(task, z.detach(), split, seed, offset, fisher_samples)
                grads = [
                    torch.autograd.grad(
                        task.loss_from_outputs(z, dataclasses.replace(split, labels=y)).sum()
                        / len(sets) ** 0.5,
                        outs,
                        retain_graph=j < len(sets) - 1,
                        allow_unused=True,
                    )
                    for j, y in enumerate(sets)
                ]
            else:
                loss = task.loss_from_outputs(z, split).sum()
                grads = [torch.autograd.grad(loss, outs, allow_unused=True)]
    finally:
        for h in handles:
            h.remove()
    out: list[_Captured] = []
    k = 0
    for mname, (w, b) in modules.items():
        module = mods[mname]
        pairs = calls[mname]
        if not pairs:
            raise ModelError(f"layer {mname!r} is tracked but was not called in the forward pass.")
        a = _cat1([_layer_input(module, x) for x, _ in pairs])
        gs = []
        for per_vector in grads:
            parts = [
                _layer_grad(module, torch.zeros_like(o) if g is None else g.detach())
                for g, (_, o) in zip(per_vector[k : k + len(pairs)], pairs)
            ]
            gs.append(_cat1(parts))
        k += len(pairs)
        if w is None:
            a = a.new_ones(a.shape[0], a.shape[1], 1)
        elif b is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], 2)
        valid = None
        if split.mask is not None and tuple(split.mask.shape) == tuple(a.shape[:2]):
            valid = split.mask.to(torch.bool)
        out.append(_Captured(a, gs, valid))
    return out


def _cat1(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls of a layer joined along positions (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _passes(
    task: Task,
    data: Any,
    state: Mapping[str, torch.Tensor],
    fisher: str,
    batch_size: int,
    seed: int,
    projections: Projections | None = None,
    fisher_samples: int = 1,
    progress: bool | None = False,
    desc: str = "K-FAC pass",
) -> Any:
    """Captured factors of every batch; under a distributed group, of this rank's slice.

    Each rank takes a contiguous slice of the batches with their global example offsets
    (which seed the sampled labels), so the union over ranks is the single-process pass;
    callers all-reduce what they sum.
    """
    modules = factored_modules(task)
    lo, hi = distributed.local_range(num_batches(data, batch_size))
    batches = iter_batch_range(data, batch_size, lo, hi)
    for offset, batch in progress_bar(batches, desc=desc, enabled=progress, total=hi - lo):
        captured = _capture(task, state, batch, modules, fisher, seed, offset, fisher_samples)
        yield captured if projections is None else _project(captured, projections)


def _check_projections(projections: Projections, n_layers: int) -> None:
    if len(projections) != n_layers:
        raise ConfigError(
            f"projections must hold one (P_a, P_g) pair per K-FAC layer ({n_layers}); got "
            f"{len(projections)}."
        )


def _project(captured: list[_Captured], projections: Projections) -> list[_Captured]:
    """Project each layer's inputs by ``P_a`` and output gradients by ``P_g`` (None: keep)."""
    _check_projections(projections, len(captured))
    out = []
    for c, (pa, pg) in zip(captured, projections):
        # half-precision factors are projected in float32 (the projections' working dtype)
        dtype = working_dtype(c.a.dtype)
        a = c.a if pa is None else c.a.to(dtype) @ pa.to(dtype)
        gs = [g if pg is None else g.to(dtype) @ pg.to(dtype) for g in c.gs]
        out.append(_Captured(a, gs, c.valid))
    return out


def fit_ekfac_eigenvalues(
    task: Task,
    data: Any,
    layers: Sequence[KFACLayer],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    fisher: FisherKind = "true",
    batch_size: int = 64,
    seed: int = 0,
    projections: Projections | None = None,
    fisher_samples: int = 1,
    progress: bool | None = False,
) -> list[torch.Tensor]:
    """EK-FAC's eigenvalues ``(1/n) sum_n E_y (Q_Gᵀ D_n Q_A)²`` in the bases of ``layers``.

    The bases need not come from ``data`` or ``state`` (e.g. one basis shared by several
    checkpoints, as Source averages them). Returns float64 ``(O, I')`` tensors, one per layer.
    With ``projections`` (see :func:`fit_kfac`) ``D_n`` is the projected ``P_gᵀ D_n P_a`` and
    the layers are those of the projected factors. With ``fisher="true"`` pass a ``seed``
    other than the bases' (:func:`eigen_pass_seed` of it, as :func:`fit_kfac` does): labels
    reused from the factor pass bias the eigenvalues. ``progress``: a bar over the batches
    (True, False or None: where stderr is a terminal; see docs/conventions.md).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> curv = fit_kfac(Task(model), data, kind="ekfac", seed=0)
        >>> lam = fit_ekfac_eigenvalues(Task(model), data, curv.layers, seed=eigen_pass_seed(0))
        >>> torch.allclose(lam[0], curv.layers[0].eigenvalues)
        True
    """
    _check_choice("fisher", fisher, ("true", "empirical", "exact"))
    check_fisher_samples(fisher_samples, fisher)
    state = task.state() if state is None else dict(state)
    f64, cd = torch.float64, compute_dtype(task.dtype)
    bases = [(layer.q_g.to(cd), layer.q_a.to(cd)) for layer in layers]
    acc = [torch.zeros(layer.shape, dtype=f64, device=layer.q_a.device) for layer in layers]
    n = 0
    passes = _passes(
        task,
        data,
        state,
        fisher,
        batch_size,
        seed,
        projections,
        fisher_samples,
        progress,
        "EK-FAC eigenvalue pass",
    )
    for captured in passes:
        n += captured[0].a.shape[0]
        for (qg, qa), c, out in zip(bases, captured, acc):
            # Q_Gᵀ (sum_t g_t a_tᵀ) Q_A = sum_t (Q_Gᵀ g_t)(Q_Aᵀ a_t)ᵀ: rotate the factors, not
            # the (O, I') gradients; with one position the square is an outer product too.
            # Each batch in the compute dtype, the running sum in float64.
            a_rot = c.a.to(cd) @ qa
            for g in c.gs:
                g_rot = g.to(cd) @ qg
                if a_rot.shape[1] == 1:
                    out += ((g_rot[:, 0] ** 2).T @ (a_rot[:, 0] ** 2)).to(f64)
                else:
                    out += (_outer_sum(g_rot, a_rot) ** 2).sum(0).to(f64)
    if distributed.is_distributed():  # each rank summed its slice of the batches
        *acc, total = distributed.all_reduce_sum([*acc, torch.tensor(float(n), dtype=f64)])
        n = int(total)
    return [a / n for a in acc]


def fit_kfac_layers(
    task: Task,
    data: Any,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    kind: KFACKind = "ekfac",
    fisher: FisherKind = "true",
    batch_size: int = 64,
    seed: int = 0,
    projections: Projections | None = None,
    fisher_samples: int = 1,
    progress: bool | None = False,
) -> list[KFACLayer]:
    """The layers of :func:`fit_kfac`, optionally of projected gradients (LoGra).

    With ``projections`` (one ``(P_a, P_g)`` pair per layer of :func:`factored_modules`, None
    for an unprojected side) the factors are those of the projected inputs ``P_aᵀ a`` and
    output gradients ``P_gᵀ g``, and EK-FAC's eigenvalues those of the projected per-sample
    gradients ``P_gᵀ D_n P_a``: K-FAC/EK-FAC of the ``k_out x k_in`` projected gradients,
    without forming a full-size factor. Arguments otherwise as :func:`fit_kfac`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> proj = [(torch.randn(5, 2, dtype=torch.float64), None)]
        >>> fit_kfac_layers(Task(model), data, projections=proj)[0].eigenvalues.shape
        torch.Size([3, 2])
    """
    _check_choice("kind", kind, ("kfac", "ekfac"))
    _check_choice("fisher", fisher, ("true", "empirical", "exact"))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer; got {seed!r}.")
    check_fisher_samples(fisher_samples, fisher)
    modules = factored_modules(task)
    if fisher == "true" and task.loss_name not in ("cross_entropy", "mse", "lm"):
        raise ConfigError(
            f"fisher='true' samples labels from the model's predictive distribution, known for "
            f"the losses 'cross_entropy', 'mse' and 'lm'; the task's loss is {task.loss_name!r}. "
            "Use fisher='empirical' or fisher='exact'."
        )
    if num_examples(data) == 0:
        raise DataError("the dataset is empty; K-FAC needs at least one example.")
    state = task.state() if state is None else dict(state)
    f64, cd = torch.float64, compute_dtype(task.dtype)
    # (I', O) of each layer's factors (projected widths with projections), known up front so
    # that a rank with no batches still contributes zeros of the right shapes
    widths = [(slot.in_width, slot.out_features) for slot in ParamLayout(task).slots]
    if projections is not None:
        _check_projections(projections, len(widths))
        widths = [
            (w_in if pa is None else int(pa.shape[1]), w_out if pg is None else int(pg.shape[1]))
            for (w_in, w_out), (pa, pg) in zip(widths, projections)
        ]
    a_sum = [torch.zeros(i, i, dtype=f64, device=task.device) for i, _ in widths]
    g_sum = [torch.zeros(o, o, dtype=f64, device=task.device) for _, o in widths]
    tokens = torch.zeros(len(modules), dtype=f64)
    n = 0
    passes = _passes(
        task,
        data,
        state,
        fisher,
        batch_size,
        seed,
        projections,
        fisher_samples,
        progress,
        "K-FAC covariance pass",
    )
    for captured in passes:
        n += captured[0].a.shape[0]
        for j, c in enumerate(captured):
            # each batch's covariance in the compute dtype, the running sum in float64
            a = c.a.to(cd)
            if c.valid is not None:
                a = a * c.valid.unsqueeze(-1).to(cd)
                tokens[j] += float(c.valid.sum())
            else:
                tokens[j] += a.shape[0] * a.shape[1]
            a2 = a.reshape(-1, a.shape[-1])
            a_sum[j] += (a2.T @ a2).to(f64)
            for g in c.gs:
                g2 = g.to(cd).reshape(-1, g.shape[-1])
                g_sum[j] += (g2.T @ g2).to(f64)
    if distributed.is_distributed():  # each rank summed its slice of the batches: add them up
        count = torch.tensor(float(n), dtype=f64)
        reduced = distributed.all_reduce_sum([*a_sum, *g_sum, tokens, count])
        k = len(a_sum)
        a_sum, g_sum, tokens, n = reduced[:k], reduced[k : 2 * k], reduced[2 * k], int(reduced[-1])
    mods = dict(task.model.named_modules())
    shapes = [tuple(mods[m].weight.shape) for m in modules]
    if projections is not None:  # the layers are those of the projected gradients
        shapes = [(int(g.shape[0]), int(a.shape[0])) for a, g in zip(a_sum, g_sum)]
    layers = [
        KFACLayer.from_factors(
            mname,
            w,
            b,
            shapes[j],
            a_sum[j] / max(float(tokens[j]), 1.0),
            g_sum[j] / n,
        )
        for j, (mname, (w, b)) in enumerate(modules.items())
    ]
    if kind == "ekfac":
        values = fit_ekfac_eigenvalues(
            task,
            data,
            layers,
            state=state,
            fisher=fisher,
            batch_size=batch_size,
            seed=eigen_pass_seed(seed),
            projections=projections,
            fisher_samples=fisher_samples,
            progress=progress,
        )
        for layer, lam in zip(layers, values):
            layer.eigenvalues = lam
    dtype = task.working_dtype  # float32 for a half-precision model: eigenbases need it
    for layer in layers:
        for f in ("a_factor", "g_factor", "q_a", "q_g", "eigenvalues"):
            setattr(layer, f, getattr(layer, f).to(dtype))
    return layers


def fit_kfac(
    task: Task,
    data: Any,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    kind: KFACKind = "ekfac",
    fisher: FisherKind = "true",
    batch_size: int = 64,
    seed: int = 0,
    fisher_samples: int = 1,
    progress: bool | None = False,
) -> KFACCurvature:
    """Fit K-FAC (one pass over ``data``) or EK-FAC (two passes) for the task's tracked layers.

    Args:
        task: the task; every tracked parameter must belong to a Linear/Conv2d layer.
        data: training data in any form :func:`datatrace.data.iter_batches` accepts.
        state: parameters and buffers to evaluate at (default: ``task.state()``).
        kind: ``"kfac"`` or ``"ekfac"`` (eigenvalue-corrected).
        fisher: ``"true"`` (sampled labels), ``"empirical"`` (training labels) or ``"exact"``.
        batch_size: examples per batch (results do not depend on it).
        seed: seed of the sampled labels (``fisher="true"``).
        fisher_samples: ``fisher="true"`` only: labels sampled per example, their Fisher
            contributions averaged (less sampling noise, one backward pass each).
        progress: a bar over the batches of each pass: True, False or None (where stderr is
            a terminal); ``DATATRACE_PROGRESS=0`` turns it off (docs/conventions.md).

    Returns:
        The fitted :class:`KFACCurvature` (factors and eigendecompositions in float64, cast
        back to the task's working dtype: float32 for a half-precision model).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> curv = fit_kfac(Task(model), data, kind="ekfac")
        >>> curv.layers[0].eigenvalues.shape
        torch.Size([3, 5])
    """
    layers = fit_kfac_layers(
        task,
        data,
        state=state,
        kind=kind,
        fisher=fisher,
        batch_size=batch_size,
        seed=seed,
        fisher_samples=fisher_samples,
        progress=progress,
    )
    return KFACCurvature(task, layers, kind=kind, fisher=fisher)


def layer_damping(layers: Sequence[KFACLayer], damping: Damping) -> dict[str, float]:
    """``{module: λ}``: a number for all, ``"heuristic"`` (0.1 x each layer's mean eigenvalue)
    or a ``{module: number}`` dict naming every layer."""
    modules = [layer.module for layer in layers]
    check_damping(damping, modules)
    if isinstance(damping, Mapping):
        return {m: float(damping[m]) for m in modules}
    if damping == "heuristic":
        return {
            layer.module: HEURISTIC_DAMPING * float(layer.eigenvalues.mean()) for layer in layers
        }
    return {m: float(damping) for m in modules}


# ----------------------------------------------------------------------------- operator
class KFACCurvature(LinearOperator):
    """K-FAC / EK-FAC curvature: block-diagonal over layers, Kronecker-factored eigenbases.

    A :class:`~datatrace.curvature.LinearOperator` over the task's tracked parameters (flat,
    canonical order), so every solver and influence function accepts it; :meth:`inverse`
    applies ``(F + damping I)⁻¹`` in closed form in the eigenbasis. Build it with
    :func:`fit_kfac`, or from factors computed elsewhere (e.g. averaged over checkpoints).

    Args:
        task: the task whose tracked parameters the layers cover (each exactly once).
        layers: one :class:`KFACLayer` per layer.
        kind: ``"kfac"`` or ``"ekfac"`` (recorded; the eigenvalues decide the matrix).
        fisher: the Fisher kind the factors were fitted with (recorded).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
        >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> curv = fit_kfac(Task(model), data)
        >>> v = torch.randn(curv.dim, dtype=torch.float64)
        >>> x = curv.inverse(1e-2).apply(v)
        >>> torch.allclose(curv.matvec(x) + 1e-2 * x, v)
        True
    """

    def __init__(
        self, task: Task, layers: Sequence[KFACLayer], *, kind: str = "ekfac", fisher: str = "true"
    ) -> None:
        self.task, self.layers, self.kind, self.fisher = task, list(layers), kind, fisher
        self.layout = ParamLayout(task)
        if [layer.module for layer in self.layers] != self.layout.modules:
            raise ConfigError(
                f"KFACCurvature needs one layer per K-FAC module of the task, in order "
                f"{self.layout.modules}; got {[layer.module for layer in self.layers]}."
            )
        self.dim = self.layout.dim
        self.dtype = task.working_dtype
        self.device = task.device
        self.blocks = self.layout.blocks

    @property
    def modules(self) -> list[str]:
        """Layer (module) names, in order."""
        return self.layout.modules

    def to_matrices(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split ``(k, dim)`` flat rows into per-layer ``(k, O, I')`` gradient matrices."""
        return self.layout.to_matrices(v)

    def from_matrices(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`to_matrices`."""
        return self.layout.from_matrices(mats)

    # -- spectral functions -------------------------------------------------------------------
    def apply_spectral(
        self, mats: Sequence[torch.Tensor], fn: Callable[[KFACLayer], torch.Tensor]
    ) -> list[torch.Tensor]:
        """``Q (fn(layer) ⊙ Qᵀ M) `` per layer: any function of the eigenvalues, e.g. an inverse.

        Args:
            mats: per-layer ``(k, O, I')`` matrices.
            fn: maps a layer to ``(O, I')`` multipliers in its eigenbasis.
        """
        return [layer.unrotate(fn(layer) * layer.rotate(m)) for layer, m in zip(self.layers, mats)]

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        mats = self.apply_spectral(self.to_matrices(v.T), lambda layer: layer.eigenvalues)
        return self.from_matrices(mats).T

    def matrix(self) -> torch.Tensor:
        """The dense ``(dim, dim)`` approximate curvature (small models)."""
        return self.to_dense()

    def layer_damping(self, damping: Damping) -> dict[str, float]:
        """Per-layer damping values: a number for all, ``"heuristic"`` (0.1 x each layer's
        mean eigenvalue) or a ``{module: number}`` dict naming every layer."""
        return layer_damping(self.layers, damping)

    def inverse(
        self, damping: Damping, solver: Solver | None = None, *, progress: bool | None = False
    ) -> InverseOperator:
        """``(F + damping I)⁻¹``: with no ``solver``, in closed form in the eigenbasis
        (per-layer damping, see :meth:`layer_damping`; a :class:`~datatrace.solvers.KFACInverse`
        whose damped eigenvalues :func:`datatrace.solvers.inverse_eigenvalues` inverts); with a
        solver, that solver's inverse of this operator (``damping`` a number).
        """
        if solver is None:
            return KFACInverse(self, self.layer_damping(damping))
        if not isinstance(damping, (int, float)) or isinstance(damping, bool):
            raise ConfigError(
                f"a solver inverts K-FAC with one number as damping; got {damping!r}. Pass a "
                "number, or no solver for the closed form (which takes 'heuristic' or a dict)."
            )
        return solver.prepare(self, float(damping), progress=progress)

    def solve(
        self, b: torch.Tensor, damping: Damping, solver: Solver | None = None
    ) -> torch.Tensor:
        """``(F + damping I)⁻¹ b`` for ``b`` of shape ``(dim,)`` or ``(dim, k)`` (see :meth:`inverse`)."""
        return self.inverse(damping, solver).apply(b)

    # -- persistence --------------------------------------------------------------------------
    FIELDS: ClassVar[tuple[str, ...]] = ("a_factor", "g_factor", "q_a", "q_g", "eigenvalues")

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of every fitted array (for :class:`datatrace.store.Store`)."""
        return {
            f"L{j}-{f}": getattr(lay, f) for j, lay in enumerate(self.layers) for f in self.FIELDS
        }

    @classmethod
    def from_arrays(
        cls, task: Task, arrays: Mapping[str, torch.Tensor], *, kind: str, fisher: str
    ) -> KFACCurvature:
        """Rebuild from :meth:`to_arrays` output for the same task."""
        mods = dict(task.model.named_modules())
        layers = []
        for j, (mname, (w, b)) in enumerate(factored_modules(task).items()):
            vals = {f: arrays[f"L{j}-{f}"].to(task.device, task.working_dtype) for f in cls.FIELDS}
            shape = tuple(mods[mname].weight.shape)
            layers.append(KFACLayer(mname, w, b, shape, **vals))
        return cls(task, layers, kind=kind, fisher=fisher)

    def __repr__(self) -> str:
        return f"KFACCurvature(kind={self.kind!r}, fisher={self.fisher!r}, layers={self.modules})"
