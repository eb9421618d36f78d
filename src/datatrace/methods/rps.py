"""Representer points (Yeh et al., 2018).

The final linear layer ``Φ = W f`` (bias folded in as a constant feature) is refit with an
L2 penalty λ to a stationary point of ``(1/n) Σ_i L(W f_i, y_i) + λ ||W||²``. Stationarity
gives the representer theorem ``W = Σ_i α_i f_i^T`` with
``α_i = -(1 / (2λn)) ∂L_i/∂Φ_i``, so every pre-activation splits exactly into training
contributions: ``Φ(x_q)_c = Σ_i α_{i,c} <f_i, f_q>``. The score of unit i for query q is
its contribution to the pre-activation of the query's label c (positive = excitatory,
i.e. a proponent). With ``groups=`` a group's score is the sum of its members' contributions
(the decomposition is exact, so this is the group's share of the pre-activation).

Sequence models (``loss="lm"``): the final layer maps every position's representation
``f_{i,t}`` to logits, the refit uses the summed next-token loss, and a query's value is the
sum over its predicted positions of the next token's pre-activation,
``Σ_t Φ(x_q)_{t, y_{t+1}} = Σ_i Σ_{s,t} α_{i,s,y_{t+1}} <f_{i,s}, f_{q,t}>`` — split exactly
into training sequences. Cost: one forward pass per example and a convex refit of one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from datatrace._progress import progress_bar
from datatrace.curvature import CallableOperator
from datatrace.data import Batch, iter_batches
from datatrace.errors import ConfigError, ModelError, NumericalError
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.config import Applies, no_projection, unused
from datatrace.solvers import CGSolver
from datatrace.task import Task, _SplitBatch

__all__ = ["RepresenterAttributor", "RepresenterConfig"]


@dataclass(frozen=True)
class RepresenterConfig(MethodConfig):
    """Representer-point settings.

    Attributes:
        layer: name of the final ``nn.Linear`` (default: the model's last ``nn.Linear``).
        damping: the L2 penalty λ of the last-layer refit, > 0.
        max_iter: L-BFGS iterations of the refit.
    """

    layer: str | None = None
    damping: float = 0.1  # the benchmark's choice on digits-mlp and digits-cnn
    max_iter: int = 500

    # shared settings this method never reads (MethodConfig.APPLIES)
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        **no_projection("its features are the final layer's inputs, not gradients"),
        "engine": unused("it takes no per-sample gradients (a forward pass and a refit)"),
        "seed": unused("it samples nothing (the refit is deterministic)"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damping, (int, float)) and self.damping > 0):
            raise ConfigError(
                f"damping (the L2 penalty of the refit) must be > 0; got {self.damping!r}."
            )
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1; got {self.max_iter!r}.")


def _final_linear(task: Task, name: str | None) -> tuple[str, nn.Linear]:
    modules = dict(task.model.named_modules())
    if name is None:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ModelError("representer points need a final nn.Linear layer; the model has none.")
        name = linears[-1]
    if name not in modules or not isinstance(modules[name], nn.Linear):
        raise ModelError(
            f"layer={name!r} is not an nn.Linear of the model; pass the final Linear's name."
        )
    return name, modules[name]


def _hessian_operator(g: torch.Tensor, w: torch.Tensor) -> CallableOperator:
    """Products with the Hessian, given the gradient ``g`` of the objective at ``w`` (built
    with ``create_graph=True``)."""

    def hvp(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad(g, w, v.reshape(w.shape), retain_graph=True)
        return hv.reshape(-1)

    return CallableOperator(hvp, w.numel(), w.dtype, w.device)


def _newton_polish(
    objective: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, steps: int = 3
) -> torch.Tensor:
    """A few Newton-CG steps from L-BFGS's end point, until the gradient is at rounding level.

    Each step solves ``H x = -g`` with :class:`~datatrace.solvers.CGSolver` on the objective's
    Hessian-vector products (a :class:`~datatrace.curvature.CallableOperator`).

    The representer decomposition is exact only at a stationary point. L-BFGS stops once the
    objective stops decreasing in floating point, which can leave a gradient far above
    rounding (seen: 1e-8 on a summed LM loss); Newton steps need only gradients and
    Hessian-vector products, so they go on to the stationary point (the refit is strongly
    convex: λ > 0).
    """
    for _ in range(steps):
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(w), w, create_graph=True)
        g_norm = float(g.detach().norm())
        if g_norm <= 1e3 * torch.finfo(w.dtype).eps * max(1.0, float(w.detach().norm())):
            break
        # CG on H x = -g, to ||r|| <= 1e-6 ||g||; the refit's λ is inside the objective
        hessian = _hessian_operator(g, w)
        x = CGSolver(max_iter=100, rtol=1e-6).prepare(hessian, 0.0).apply(-g.detach().reshape(-1))
        w = w.detach() + x.reshape(w.shape)
    return w.detach()


@dataclass(frozen=True)
class RepresenterState:
    """The refit last layer of one member (the refit is its featurization).

    Attributes:
        weight: the refit ``W`` with the bias as its last column, ``(C, d + 1)``.
        alpha: ``(n_train, T, C)`` representer values ``α``.
        feats: ``(n_train, T, d + 1)`` final-layer inputs of the training examples.
        selectors: ``(n_train, T, C)`` label (next-token) selectors of the training examples.
        units: ``(n_units, C (d + 1))`` train features ``Σ_t α_{i,t} ⊗ f_{i,t}`` (group sums
            with ``groups=``), handed to the loop while it featurizes (None afterwards: the
            loop keeps them, in memory or in the store).
    """

    ARRAYS: ClassVar[tuple[str, ...]] = ("weight", "alpha", "feats", "selectors")

    weight: torch.Tensor
    alpha: torch.Tensor
    feats: torch.Tensor
    selectors: torch.Tensor
    units: torch.Tensor | None = None


@register("rps")
class RepresenterAttributor(Attributor[RepresenterState]):
    """Representer point selection on the final linear layer.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()
        >>> train = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> RepresenterAttributor(Task(model)).fit(train).attribute(train).shape
        (16, 16)
    """

    method_id = "rps"
    Config = RepresenterConfig
    config: RepresenterConfig

    def _representations(
        self, task: Task, state: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, _SplitBatch]:
        """Inputs of the final layer with a ones column: ``(B, d + 1)``; checks it is final."""
        name, layer = _final_linear(task, self.config.layer)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        split = task.split_batch(batch)
        try:
            with torch.no_grad():
                out = task.outputs(state, split)
        finally:
            handle.remove()
        if len(seen) != 1 or seen[0][1].shape != out.shape or not torch.equal(seen[0][1], out):
            raise ModelError(
                f"layer {name!r} does not produce the model's output directly; representer points "
                "need the final nn.Linear (pass layer= with its name)."
            )
        f = seen[0][0]
        if out.ndim == 2:  # classification: one position per example
            f = f.reshape(out.shape[0], 1, -1)
        elif out.ndim == 3 and task.loss_name == "lm":  # (B, T, d): one row per position
            f = f.reshape(out.shape[0], out.shape[1], -1)
        else:
            raise ModelError(
                f"representer points need outputs of shape (batch, classes), or (batch, tokens, "
                f"vocab) with loss='lm'; got outputs of shape {tuple(out.shape)} with loss "
                f"{task.loss_name!r}."
            )
        # the refit (L-BFGS, Newton) and its scores run in the working dtype, not in half
        f = f.to(task.working_dtype)
        return torch.cat([f, f.new_ones(*f.shape[:2], 1)], 2), split

    def _selectors(
        self, task: Task, split: _SplitBatch, shape: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(B, T, C)``: 1 where a position's pre-activation counts toward the query's value.

        Classification: the label's class (T = 1). LM: at position t the next token
        ``labels[t + 1]``, for positions the loss keeps (labels != -100, attention mask).
        """
        labels = split.labels
        if labels is None:
            raise ModelError("representer points attribute labelled queries; the batch has none.")
        if task.loss_name != "lm":
            if labels.ndim != 1 or labels.dtype.is_floating_point:
                raise ModelError(
                    "representer points attribute classification queries with integer labels; "
                    f"got labels of shape {tuple(labels.shape)} and dtype {labels.dtype}."
                )
            return torch.nn.functional.one_hot(labels, shape[2]).to(dtype).unsqueeze(1)
        nxt = labels[:, 1:]
        keep = nxt != -100
        if split.mask is not None:
            keep = keep & split.mask[:, 1:].bool()
        sel = torch.nn.functional.one_hot(nxt.clamp_min(0), shape[2]).to(dtype)
        sel = sel * keep.unsqueeze(-1).to(dtype)
        return torch.cat([sel, sel.new_zeros(shape[0], 1, shape[2])], 1)

    def _collect(
        self, ctx: MemberContext[RepresenterState], data: Any
    ) -> tuple[torch.Tensor, list[_SplitBatch]]:
        feats, splits = [], []
        what = "train representations" if data is self._train else "query representations"
        batches = iter_batches(data, self.config.batch_size)
        for batch in progress_bar(
            batches, desc=self._phase(what, ctx), enabled=self.config.progress, unit="batch"
        ):
            f, split = self._representations(ctx.task, ctx.state, batch)
            feats.append(f)
            splits.append(split)
        return torch.cat(feats), splits

    def _prepare_member(self, ctx: MemberContext[RepresenterState]) -> RepresenterState:
        """The refit of the last layer (read from the store when it holds it), and the train
        features it makes."""
        arrays = self._cached_arrays(ctx, "rps", RepresenterState.ARRAYS, lambda: self._refit(ctx))
        state = RepresenterState(**{k: v.to(ctx.task.device) for k, v in arrays.items()})
        # Train feature Σ_t α_{i,t} ⊗ f_{i,t}; a query's feature Σ_t e_{y_t} ⊗ f_{q,t} picks
        # Σ_{s,t} α_{i,s,y_t} <f_{i,s}, f_{q,t}>.
        units = torch.einsum("ntc,ntd->ncd", state.alpha, state.feats)
        units = units.reshape(state.feats.shape[0], -1)
        if self._grouping is not None:  # the decomposition is additive: a group's share is a sum
            units = self._grouping.sum_rows(units)
        return replace(state, units=units)

    def _refit(self, ctx: MemberContext[RepresenterState]) -> dict[str, torch.Tensor]:
        """Refit the last layer on the training set: :attr:`RepresenterState.ARRAYS`."""
        task = ctx.task
        feats, splits = self._collect(ctx, self._train)
        name, _ = _final_linear(task, self.config.layer)
        prefix = f"{name}." if name else ""
        w0 = ctx.state[task.canonical_name(f"{prefix}weight")]  # a tied LM head too
        bias = task.canonical_name(f"{prefix}bias")
        b0 = ctx.state[bias] if bias in ctx.state else w0.new_zeros(w0.shape[0])
        w = torch.cat([w0, b0.view(-1, 1)], 1).detach().to(feats.dtype).requires_grad_(True)
        lam, n = float(self.config.damping), feats.shape[0]
        sizes = [s.labels.shape[0] for s in splits if s.labels is not None]

        lm = task.loss_name == "lm"

        def head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            out = x @ weight.T  # (n, T, C); classification outputs are (n, C)
            return out if lm else out.squeeze(1)

        def objective(weight: torch.Tensor) -> torch.Tensor:
            logits = head(feats, weight)
            losses = [
                task.loss_from_outputs(chunk, s)
                for chunk, s in zip(torch.split(logits, sizes), splits)
            ]
            return torch.cat(losses).mean() + lam * (weight**2).sum()

        opt = torch.optim.LBFGS(
            [w],
            lr=1,
            max_iter=self.config.max_iter,
            tolerance_grad=1e-12,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(w)
            value.backward()
            return value

        opt.step(closure)
        w = _newton_polish(objective, w.detach())
        logits = head(feats, w).requires_grad_(True)
        losses = torch.cat(
            [task.loss_from_outputs(c, s) for c, s in zip(torch.split(logits, sizes), splits)]
        )
        (dl,) = torch.autograd.grad(losses.sum(), logits)
        if not torch.isfinite(dl).all():
            raise NumericalError("the representer refit produced NaN/inf gradients; raise damping.")
        alpha = (dl if lm else dl.unsqueeze(1)) / (-2 * lam * n)
        selectors = torch.cat(
            [
                self._selectors(task, s, a.shape, a.dtype)
                for a, s in zip(torch.split(alpha, sizes), splits)
            ]
        )
        return {"weight": w, "alpha": alpha, "feats": feats, "selectors": selectors}

    def _fitted_train_features(self, ctx: MemberContext[RepresenterState]) -> torch.Tensor | None:
        return ctx.fitted.units

    def _fit_member(self, ctx: MemberContext[RepresenterState]) -> RepresenterState:
        return replace(ctx.fitted, units=None)  # the refit was the per-train-set work

    def _query_features(self, ctx: MemberContext[RepresenterState], batch: Batch) -> torch.Tensor:
        f, split = self._representations(ctx.task, ctx.state, batch)
        shape = torch.Size((f.shape[0], f.shape[1], ctx.fitted.alpha.shape[2]))
        sel = self._selectors(ctx.task, split, shape, f.dtype)
        return torch.einsum("ntc,ntd->ncd", sel, f).reshape(f.shape[0], -1)

    def _self_scores(
        self, ctx: MemberContext[RepresenterState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        feats, sel = ctx.fitted.feats, ctx.fitted.selectors
        if self._grouping is not None:
            # A group's share of its own members' label pre-activations:
            # sum_{i in g} sum_{j in g} <α_j ⊗ f_j, e_{y_i} ⊗ f_i>.
            q = self._grouping.sum_rows(torch.einsum("ntc,ntd->ncd", sel, feats).flatten(1))
            return (q[start : start + train.shape[0]] * train).sum(1)
        rows = slice(start, start + train.shape[0])
        q = torch.einsum("ntc,ntd->ncd", sel[rows], feats[rows]).flatten(1)
        return (q * train).sum(1)

    def refit_preactivations(self, queries: Any) -> torch.Tensor:
        """Pre-activations of the refit last layer (first member).

        ``(n_query, n_classes)`` for classification, ``(n_query, tokens, vocab)`` for LMs.
        """
        self._check_fitted()
        ctx = self._contexts[0]
        with self._fitted_device():
            f, _ = self._collect(ctx, queries)
        out = f @ ctx.fitted.weight.T
        return out.squeeze(1) if self.task.loss_name != "lm" else out
