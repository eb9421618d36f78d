"""Fitting K-FAC / EK-FAC: the covariance pass (factors ``A``, ``G``), their
eigendecompositions and EK-FAC's eigenvalue pass (the theory: :mod:`datatrace.curvature.kfac`).

Each pass runs the model over the data once with hooks capturing every layer's inputs and
output gradients (:func:`_capture`); under ``torch.distributed`` the running sums are
all-reduced, so every rank ends with the same curvature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datatrace import distributed
from datatrace._progress import progress_bar
from datatrace.curvature.kfac import (
    FisherKind,
    KFACCurvature,
    KFACKind,
    KFACLayer,
    Projections,
    _check_choice,
    check_fisher_samples,
    compute_dtype,
    eigen_pass_seed,
)
from datatrace.curvature.kfac_labels import _output_hessian_sqrt, _sample_labels
from datatrace.data import iter_batch_range, num_batches, num_examples
from datatrace.devices import working_dtype
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.gradients.factored import ParamLayout, factored_modules
from datatrace.gradients.hooks import _layer_grad, _layer_input, _outer_sum
from datatrace.task import Task

__all__ = ["fit_ekfac_eigenvalues", "fit_kfac", "fit_kfac_layers"]


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
    eigenvalue_data: Any = None,
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
    if eigenvalue_data is not None and kind != "ekfac":
        raise ConfigError(
            "eigenvalue_data feeds EK-FAC's eigenvalue pass, which K-FAC does not run; got "
            f"kind={kind!r}. Use kind='ekfac' or leave eigenvalue_data out."
        )
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
            data if eigenvalue_data is None else eigenvalue_data,
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
    eigenvalue_data: Any = None,
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
        eigenvalue_data: EK-FAC only: the data of the eigenvalue pass (default: ``data``),
            e.g. a subset of it: the eigenvalues of the Kronecker basis settle on fewer
            examples than the factors that define it (kronfluence's ``lambda_max_examples``).

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
        eigenvalue_data=eigenvalue_data,
    )
    return KFACCurvature(task, layers, kind=kind, fisher=fisher)
