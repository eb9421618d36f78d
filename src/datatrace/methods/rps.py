"""Representer points (Yeh et al., 2018).

The final linear layer ``Φ = W f`` (bias folded in as a constant feature) is refit with an
L2 penalty λ to a stationary point of ``(1/n) Σ_i L(W f_i, y_i) + λ ||W||²``. Stationarity
gives the representer theorem ``W = Σ_i α_i f_i^T`` with
``α_i = -(1 / (2λn)) ∂L_i/∂Φ_i``, so every pre-activation splits exactly into training
contributions: ``Φ(x_q)_c = Σ_i α_{i,c} <f_i, f_q>``. The score of unit i for query q is
its contribution to the pre-activation of the query's label c (positive = excitatory,
i.e. a proponent). With ``groups=`` a group's score is the sum of its members' contributions
(the decomposition is exact, so this is the group's share of the pre-activation). Cost: one forward pass per example and a convex refit of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datatrace.data import Batch, iter_batches
from datatrace.errors import ConfigError, ModelError, NumericalError
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
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
    damping: float = 1e-3
    max_iter: int = 500

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


@register("rps")
class RepresenterAttributor(Attributor):
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
        self, state: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, _SplitBatch]:
        """Inputs of the final layer with a ones column: ``(B, d + 1)``; checks it is final."""
        name, layer = _final_linear(self.task, self.config.layer)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        split = self.task.split_batch(batch)
        try:
            with torch.no_grad():
                out = self.task.outputs(state, split)
        finally:
            handle.remove()
        if len(seen) != 1 or seen[0][1].shape != out.shape or not torch.equal(seen[0][1], out):
            raise ModelError(
                f"layer {name!r} does not produce the model's output directly; representer points "
                "need the final nn.Linear (pass layer= with its name)."
            )
        f = seen[0][0].reshape(out.shape[0], -1)
        return torch.cat([f, f.new_ones(f.shape[0], 1)], 1), split

    def _collect(self, ctx: MemberContext, data: Any) -> tuple[torch.Tensor, list[_SplitBatch]]:
        feats, splits = [], []
        for batch in iter_batches(data, self.config.batch_size):
            f, split = self._representations(ctx.state, batch)
            feats.append(f)
            splits.append(split)
        return torch.cat(feats), splits

    def _refit(self, ctx: MemberContext) -> None:
        feats, splits = self._collect(ctx, self._train)
        name, _ = _final_linear(self.task, self.config.layer)
        prefix = f"{name}." if name else ""
        w0 = ctx.state[f"{prefix}weight"]
        b0 = ctx.state.get(f"{prefix}bias", w0.new_zeros(w0.shape[0]))
        w = torch.cat([w0, b0.view(-1, 1)], 1).detach().clone().requires_grad_(True)
        lam, n = float(self.config.damping), feats.shape[0]
        sizes = [s.labels.shape[0] for s in splits if s.labels is not None]

        def objective() -> torch.Tensor:
            logits = feats @ w.T
            losses = [
                self.task.loss_from_outputs(chunk, s)
                for chunk, s in zip(torch.split(logits, sizes), splits)
            ]
            return torch.cat(losses).mean() + lam * (w**2).sum()

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
            value = objective()
            value.backward()
            return value

        opt.step(closure)
        w = w.detach()
        logits = (feats @ w.T).requires_grad_(True)
        losses = torch.cat(
            [self.task.loss_from_outputs(c, s) for c, s in zip(torch.split(logits, sizes), splits)]
        )
        (dl,) = torch.autograd.grad(losses.sum(), logits)
        if not torch.isfinite(dl).all():
            raise NumericalError("the representer refit produced NaN/inf gradients; raise damping.")
        alpha = -dl / (2 * lam * n)
        labels = torch.cat([s.labels for s in splits if s.labels is not None])
        ctx.fitted.update(weight=w, alpha=alpha, feats=feats, labels=labels)

    def _featurize_train(self, ctx: MemberContext, train: Any) -> None:
        self._refit(ctx)
        alpha, feats = ctx.fitted["alpha"], ctx.fitted["feats"]
        # Train feature α_i ⊗ f_i; a query's feature e_c ⊗ f_q picks α_{i,c} <f_i, f_q>.
        units = torch.einsum("nc,nd->ncd", alpha, feats).reshape(feats.shape[0], -1)
        if self._grouping is not None:  # the decomposition is additive: a group's share is a sum
            units = self._grouping.sum_rows(units)
        ctx.features = [units]

    def _fit_member(self, ctx: MemberContext) -> None:
        return None

    def _query_features(self, ctx: MemberContext, batch: Batch) -> torch.Tensor:
        f, split = self._representations(ctx.state, batch)
        if split.labels is None or split.labels.ndim != 1:
            raise ModelError(
                "representer points attribute classification queries with integer labels."
            )
        n_classes = ctx.fitted["alpha"].shape[1]
        onehot = torch.nn.functional.one_hot(split.labels, n_classes).to(f.dtype)
        return torch.einsum("nc,nd->ncd", onehot, f).reshape(f.shape[0], -1)

    def _self_scores(self, ctx: MemberContext, train: torch.Tensor, start: int) -> torch.Tensor:
        alpha, feats, labels = ctx.fitted["alpha"], ctx.fitted["feats"], ctx.fitted["labels"]
        if self._grouping is not None:
            # A group's share of its own members' label pre-activations:
            # sum_{i in g} sum_{j in g} α_{j, y_i} <f_j, f_i>.
            onehot = torch.nn.functional.one_hot(labels, alpha.shape[1]).to(feats.dtype)
            q = self._grouping.sum_rows(torch.einsum("nc,nd->ncd", onehot, feats).flatten(1))
            return (q[start : start + train.shape[0]] * train).sum(1)
        idx = torch.arange(start, start + train.shape[0])
        return alpha[idx, labels[idx]] * (feats[idx] ** 2).sum(1)

    def refit_preactivations(self, queries: Any) -> torch.Tensor:
        """``(n_query, n_classes)`` pre-activations of the refit last layer (first member)."""
        self._check_fitted()
        ctx = self._contexts[0]
        f, _ = self._collect(ctx, queries)
        return f @ ctx.fitted["weight"].T
