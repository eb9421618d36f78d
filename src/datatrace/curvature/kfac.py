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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from datatrace.curvature.operators import LinearOperator
from datatrace.devices import working_dtype
from datatrace.errors import ConfigError
from datatrace.gradients.factored import ParamLayout, factored_modules
from datatrace.task import Task

if TYPE_CHECKING:
    from datatrace.solvers import InverseOperator, Solver

__all__ = [
    "HEURISTIC_DAMPING",
    "Damping",
    "FisherKind",
    "KFACCurvature",
    "KFACKind",
    "KFACLayer",
    "Projections",
    "check_curvature_examples",
    "check_damping",
    "check_fisher_samples",
    "check_relative_damping",
    "compute_dtype",
    "curvature_subset",
    "eigen_pass_seed",
    "factored_damping",
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

    def factor_eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ_G (O,), λ_A (I',))`` in float64: the eigenvalues of ``G`` and ``A`` in the
        order of :attr:`q_g` and :attr:`q_a` (``diag(Qᵀ F Q)``; a K-FAC layer's
        :attr:`eigenvalues` are their outer product, an EK-FAC layer's are not)."""
        out = []
        for q, f in ((self.q_g, self.g_factor), (self.q_a, self.a_factor)):
            q64 = q.to(torch.float64)
            out.append((q64 * (f.to(torch.float64) @ q64)).sum(0).clamp_min(0))
        return out[0], out[1]

    def rotate(self, mats: torch.Tensor) -> torch.Tensor:
        """``Q_Gᵀ M Q_A`` for ``(k, O, I')`` matrices."""
        return _sandwich(self.q_g.T, mats, self.q_a)

    def unrotate(self, mats: torch.Tensor) -> torch.Tensor:
        """``Q_G M Q_Aᵀ`` for ``(k, O, I')`` matrices."""
        return _sandwich(self.q_g, mats, self.q_a.T)

    def spectral(self, mats: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        """``Q_G (mult ⊙ (Q_Gᵀ M Q_A)) Q_Aᵀ`` for ``(k, O, I')`` matrices: contiguous.

        :meth:`unrotate` of ``mult *`` :meth:`rotate`, as four large products on two work
        buffers: between the two left products (``(O, O) x (O, k I')``) the matrices stay in
        ``(O, k, I')`` storage, where the right products (``(O k, I') x (I', I')``) need no
        copy either; one transposing copy on the way in and one on the way out (the two
        sandwiches took four copies and six fresh buffers: for 300 GPT-2 queries, ~120 MB each).
        """
        k, o, i = mats.shape
        x = mats.reshape(k * o, i) @ self.q_a  # M Q_A, (k, O, I') storage
        y = x.new_empty(o, k, i)  # (O, k, I') storage; a reshape would alias x when k == 1
        y.copy_(x.view(k, o, i).transpose(0, 1))
        y = y.view(o, k * i)
        torch.mm(self.q_g.T, y, out=x.view(o, k * i))  # the eigenbasis, in x's buffer
        x.view(o, k, i).mul_(mult.unsqueeze(1))
        torch.mm(self.q_g, x.view(o, k * i), out=y)
        torch.mm(y.view(o * k, i), self.q_a.T, out=x.view(o * k, i))
        return x.view(o, k, i).transpose(0, 1).contiguous()


def _sandwich(left: torch.Tensor, mats: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ M @ right`` for ``(k, O, I)`` matrices ``M``, as two large matrix products.

    ``left @ mats`` would broadcast ``left`` into ``k`` small products (a batched product
    about 2x slower on a CPU core for GPT-2's layers and 300 queries); stacking the ``k``
    matrices side by side makes it one ``(O, O) x (O, k I)`` product. The result is a
    ``(k, O, I)`` view of ``(O, k, I)`` storage.
    """
    k, o, i = mats.shape
    out_o, out_i = left.shape[0], right.shape[1]
    x = mats.reshape(k * o, i) @ right
    x = left @ x.view(k, o, out_i).transpose(0, 1).reshape(o, k * out_i)
    return x.view(out_o, k, out_i).transpose(0, 1)


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
    if not _finite_nonnegative(damping):
        raise ConfigError(f"damping must be a finite number >= 0; got {damping!r}.")


def _finite_nonnegative(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and 0 <= value < float("inf")


def check_fisher_samples(fisher_samples: Any, fisher: str | None = None) -> None:
    """Validate ``fisher_samples``: an integer >= 1, above 1 only with ``fisher="true"``
    (not checked without ``fisher``: a config's ``APPLIES`` rule says it)."""
    ok = isinstance(fisher_samples, int) and not isinstance(fisher_samples, bool)
    if not ok or fisher_samples < 1:
        raise ConfigError(f"fisher_samples must be an integer >= 1; got {fisher_samples!r}.")
    if fisher is not None and fisher_samples > 1 and fisher != "true":
        raise ConfigError(
            f"fisher_samples={fisher_samples} samples labels, which only fisher='true' does; "
            f"got fisher={fisher!r}; pass fisher='true' with it."
        )


def check_curvature_examples(curvature_examples: Any, name: str = "curvature_examples") -> None:
    """Validate ``curvature_examples`` (or the setting ``name``): None, an integer >= 1 (a
    count) or a float in (0, 1] (a fraction of the training set)."""
    value = curvature_examples
    if value is None:
        return
    expected = "None, an integer >= 1 (a count) or a float in (0, 1] (a fraction)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be {expected}; got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"{name} must be {expected}; got {value!r}.")
    if isinstance(value, float) and not 0 < value <= 1:
        whole = value > 1 and value.is_integer()  # inf and nan are neither
        hint = f"; pass the integer {int(value)} for a count" if whole else ""
        raise ConfigError(f"{name} must be {expected}; got the float {value!r}{hint}.")


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


def layer_damping(
    layers: Sequence[KFACLayer], damping: Damping, relative: float = HEURISTIC_DAMPING
) -> dict[str, float]:
    """``{module: λ}``: a number for all, ``"heuristic"`` (``relative`` x each layer's mean
    eigenvalue; default 0.1) or a ``{module: number}`` dict naming every layer."""
    modules = [layer.module for layer in layers]
    check_damping(damping, modules)
    if isinstance(damping, Mapping):
        return {m: float(damping[m]) for m in modules}
    if damping == "heuristic":
        check_relative_damping(relative)
        return {layer.module: relative * float(layer.eigenvalues.mean()) for layer in layers}
    return {m: float(damping) for m in modules}


def check_relative_damping(relative: Any) -> None:
    """Validate the factor of the heuristic damping: a finite number >= 0."""
    if not _finite_nonnegative(relative):
        raise ConfigError(
            f"relative_damping (heuristic damping as a multiple of each layer's mean "
            f"eigenvalue) must be a finite number >= 0; got {relative!r}."
        )


def factored_damping(layer: KFACLayer, damping: float) -> tuple[float, float]:
    """``(δ_G, δ_A)``: a layer's damping λ split over its two factors (Martens & Grosse 2015,
    §6.3, factored Tikhonov damping): ``(G + δ_G I)⁻¹ ⊗ (A + δ_A I)⁻¹`` with
    ``δ_A = π √λ``, ``δ_G = √λ / π`` and ``π = sqrt((tr A / I') / (tr G / O))``, which
    balances the two factors' mean eigenvalues; ``δ_G δ_A = λ``. With the heuristic λ
    (0.1 x the mean of ``λ_G λ_Aᵀ``) each factor gets ``√0.1`` x its own mean eigenvalue.

    Example:
        >>> layer = KFACLayer.from_factors("fc", "fc.weight", None, (2, 2),
        ...                                4 * torch.eye(2), torch.eye(2))
        >>> factored_damping(layer, 0.04)
        (0.1, 0.4)
    """
    mean_a = float(layer.a_factor.diagonal().sum()) / layer.a_factor.shape[0]
    mean_g = float(layer.g_factor.diagonal().sum()) / layer.g_factor.shape[0]
    pi = (mean_a / mean_g) ** 0.5 if mean_a > 0 and mean_g > 0 else 1.0
    root = damping**0.5
    return root / pi, root * pi


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
        >>> from datatrace.curvature import fit_kfac
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
        return [layer.spectral(m, fn(layer)) for layer, m in zip(self.layers, mats)]

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        mats = self.apply_spectral(self.to_matrices(v.T), lambda layer: layer.eigenvalues)
        return self.from_matrices(mats).T

    def matrix(self) -> torch.Tensor:
        """The dense ``(dim, dim)`` approximate curvature (small models)."""
        return self.to_dense()

    def layer_damping(
        self, damping: Damping, relative: float = HEURISTIC_DAMPING
    ) -> dict[str, float]:
        """Per-layer damping values: a number for all, ``"heuristic"`` (``relative`` x each
        layer's mean eigenvalue) or a ``{module: number}`` dict naming every layer."""
        return layer_damping(self.layers, damping, relative)

    def inverse(
        self,
        damping: Damping,
        solver: Solver | None = None,
        *,
        progress: bool | None = False,
        factored: bool = False,
        relative_damping: float = HEURISTIC_DAMPING,
    ) -> InverseOperator:
        """``(F + damping I)⁻¹``: with no ``solver``, in closed form in the eigenbasis
        (per-layer damping, see :meth:`layer_damping`; a :class:`~datatrace.solvers.KFACInverse`
        whose damped eigenvalues :func:`datatrace.solvers.inverse_eigenvalues` inverts); with a
        solver, that solver's inverse of this operator (``damping`` a number). ``factored``
        (K-FAC, no solver): ``(G + δ_G I)⁻¹ ⊗ (A + δ_A I)⁻¹`` instead, each layer's λ split
        by :func:`factored_damping`. ``relative_damping``: the factor of
        ``damping="heuristic"``.
        """
        if factored and (solver is not None or self.kind != "kfac"):
            raise ConfigError(
                f"factored damping inverts each Kronecker factor in closed form: it needs "
                f"kind='kfac' and no solver; got kind={self.kind!r}, solver="
                f"{type(solver).__name__ if solver is not None else None}. (EK-FAC's "
                "eigenvalues are no Kronecker product.)"
            )
        if solver is None:
            from datatrace.solvers import KFACInverse  # solvers import operators: import late

            layers = self.layer_damping(damping, relative_damping)
            return KFACInverse(self, layers, factored=factored)
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
