"""What the user tells datatrace about their model (DESIGN.md §2).

A :class:`Task` bundles the ``nn.Module``, how to get the per-example training loss from a
batch, the target (measurement) function to attribute, the checkpoints of the run and which
parameters to track. Everything that touches ``vmap`` or ``functional_call`` lives behind it.

Sign convention: every target declares a direction. Methods differentiate the *query
objective* ``-direction * target``, a loss-like quantity whose decrease is an improvement, so
that a positive score always means "training on this unit improves the query".
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from datatrace import task_checks
from datatrace.checkpoint import Checkpoint, Member
from datatrace.data import Batch
from datatrace.devices import cast_floating, move_to_device, resolve_device, working_dtype
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.targets import (
    _LOSSES,
    _TARGETS,
    Target,
    _IgnoresMask,
    cross_entropy,
    lm_loss,
    log_prob,
    margin,
    mse,
)

__all__ = [
    "Checkpoint",
    "Member",
    "Target",
    "Task",
    "cross_entropy",
    "layer_types",
    "lm_loss",
    "log_prob",
    "margin",
    "mse",
    "parameter_uses",
]


# ----------------------------------------------------------------------------- parameters
def _check_compute_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``compute_dtype=`` as a dtype: float32 or float64 (names accepted), or None."""
    allowed = {"float32": torch.float32, "float64": torch.float64}
    if value is None:
        return None
    if isinstance(value, str) and value in allowed:
        return allowed[value]
    if isinstance(value, torch.dtype) and value in allowed.values():
        return value
    raise ConfigError(
        f"compute_dtype must be torch.float32, torch.float64 (or 'float32'/'float64') or None; "
        f"got {value!r}. It widens a half-precision model's passes; it never narrows them."
    )


def parameter_uses(model: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """``{parameter name: [(module name, local name), ...]}`` of every module owning it.

    A parameter is named as ``model.named_parameters()`` names it (its first registration);
    a tied parameter (an LM head sharing the embedding matrix) lists every module holding it.

    Example:
        >>> emb = nn.Embedding(5, 3); head = nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> parameter_uses(nn.ModuleDict({"emb": emb, "head": head}))["emb.weight"]
        [('emb', 'weight'), ('head', 'weight')]
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[tuple[str, str]]] = {n: [] for n in canonical.values()}
    for mname, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            pair = (mname, local)
            if pair not in out[canonical[id(p)]]:
                out[canonical[id(p)]].append(pair)
    return out


def layer_types() -> tuple[type[nn.Module], ...]:
    """Module types the layer-factor path handles: Linear, Conv2d and transformers' Conv1D."""
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    conv1d = conv1d_type()
    return types + ((conv1d,) if conv1d is not None else ())


def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2's Linear with a transposed weight), if transformers is
    loaded; a model holding one has imported it, so transformers is never imported here."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None)
    return cls if isinstance(cls, type) else None


# ----------------------------------------------------------------------------- task
@dataclass
class _SplitBatch:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    labels: torch.Tensor | None
    mask: torch.Tensor | None


class Task:
    """The model, its loss, the target to attribute, its checkpoints and tracked parameters.

    Args:
        model: any ``nn.Module``; it must be in eval mode.
        loss: per-example training loss: ``"cross_entropy"``, ``"mse"``, ``"lm"`` (summed
            next-token NLL) or a callable ``loss(outputs, labels) -> (B,)``.
        target: the function attributed for queries: ``"loss"`` (default), ``"margin"``,
            ``"log_prob"`` or a :class:`Target`.
        checkpoints: saved states of the training run (state dicts, paths or
            :class:`Checkpoint`); default: the model's current weights.
        params: names of parameters or modules to track (a module name selects all its
            parameters; a tied parameter may be named by any module holding it, e.g.
            ``"lm_head.weight"`` for GPT-2's head tied to ``"transformer.wte.weight"``);
            default: every trainable parameter.
        module_types: track only parameters of modules of these types (e.g. ``(nn.Linear,)``),
            or ``"layers"``: every layer the layer-factor path (K-FAC/EK-FAC, LoGra, factored
            features) handles — ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D``. A
            tied parameter is selected by type only when every module holding it has one of
            the types (a GPT-2 head tied to its embedding is not a layer); name it in
            ``params=`` to track it.
        batch_to_inputs: ``batch -> (args, kwargs)`` for the model call, if the default (tuple:
            all but the last entry; dict: every key except ``labels``) does not fit.
        device: where attribution runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a
            ``torch.device``. The model is moved there **in place** (``model.to(device)``;
            no copy is made). Default: wherever the model's parameters already are.
        compute_dtype: ``torch.float32`` or ``torch.float64`` (or their names) to run a
            bfloat16/float16 model's forward and backward passes in that precision: the task
            holds an upcast **copy** of the model (the user's model is untouched; the copy
            costs 2x/4x the half model's parameter memory) and casts floating inputs given in
            the model's dtype to it, so gradients, K-FAC factors and scores are those of the
            float32 (float64) model with the same weights. Default None: the model's dtype.

    The model's dtype is the task's (:attr:`dtype`): float64, float32, bfloat16 and float16
    weights are accepted. Gradients and features are computed in it (in ``compute_dtype``
    when given); curvature, kernels, solves and scores in :attr:`working_dtype` (float32 for
    half-precision models). Inputs must already be in the model's dtype (or in
    ``compute_dtype``); attributors move batches to the model's device
    themselves, while the low-level functions (``compute_per_sample_grads``, ``fit_kfac``,
    curvature operators) refuse a batch on another device.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> task = Task(model, loss="cross_entropy", target="margin")
        >>> list(task.tracked_params())
        ['0.weight', '0.bias']
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
        target: str | Target = "loss",
        *,
        checkpoints: Sequence[Checkpoint | Mapping[str, torch.Tensor] | str | Path] | None = None,
        params: Sequence[str] | None = None,
        module_types: Sequence[type[nn.Module]] | Literal["layers"] | None = None,
        batch_to_inputs: Callable[[Batch], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"Task needs an nn.Module; got {type(model).__name__}.")
        target_device = resolve_device(device)
        self.model = model
        # inputs given in the model's own dtype are cast to compute_dtype (None: no cast)
        self._input_cast: tuple[torch.dtype, torch.dtype] | None = None
        upcast = _check_compute_dtype(compute_dtype)
        self._moves_batches = False
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ConfigError(
                    f"unknown loss {loss!r}; choose one of {sorted(_LOSSES)} or pass a callable."
                )
            self.loss_name = loss
            self._loss = _LOSSES[loss]
        elif callable(loss):
            self.loss_name = getattr(loss, "__name__", "custom")
            self._loss = _IgnoresMask(loss)
        else:
            raise ConfigError(f"loss must be a name or a callable; got {type(loss).__name__}.")
        if isinstance(target, Target):
            self.target = target
        elif target == "loss":
            self.target = Target("loss", self._loss, -1)
        elif isinstance(target, str) and target in _TARGETS:
            self.target = _TARGETS[target]
        else:
            raise ConfigError(
                f"unknown target {target!r}; choose 'loss', 'margin', 'log_prob' or pass a Target."
            )
        self.batch_to_inputs = batch_to_inputs
        self._tracked = self._select_params(params, module_types)
        if upcast is not None and upcast.itemsize < self.dtype.itemsize:
            raise ConfigError(
                f"compute_dtype={upcast} is narrower than the model's {self.dtype}; it only "
                "widens half-precision passes. Leave it None for this model."
            )
        if upcast is not None and upcast != self.dtype:
            # the copy is taken before any move: the user's model keeps its dtype and device
            self._input_cast = (self.dtype, upcast)
            self.model = copy.deepcopy(model).to(upcast)
            self._tracked = self._select_params(params, module_types)
        self._check_weights()
        if target_device is not None:
            self.to(target_device)
        self.checkpoints = [
            c if isinstance(c, Checkpoint) else Checkpoint(c) for c in (checkpoints or [])
        ]

    # -- parameters ---------------------------------------------------------------------------
    def _select_params(
        self,
        params: Sequence[str] | None,
        module_types: Sequence[type[nn.Module]] | str | None,
    ) -> list[str]:
        named = dict(self.model.named_parameters())
        uses = parameter_uses(self.model)
        alias = {
            f"{m}.{local}" if m else local: canon
            for canon, pairs in uses.items()
            for m, local in pairs
        }
        if isinstance(params, str):
            params = [params]
        chosen: list[str] = []
        if params is not None:
            modules = dict(self.model.named_modules())
            for name in params:
                if name in alias:  # a parameter, by its own name or a tied alias (lm_head.weight)
                    chosen.append(alias[name])
                elif name in modules:
                    prefix = f"{name}." if name else ""
                    chosen.extend(c for a, c in alias.items() if a.startswith(prefix))
                else:
                    raise ModelError(
                        f"{name!r} is neither a parameter nor a module of the model; parameters are "
                        f"{list(named)[:20]}{' ...' if len(named) > 20 else ''}."
                    )
        else:
            chosen = [n for n, p in named.items() if p.requires_grad]
        if module_types is not None:
            chosen = self._filter_by_type(chosen, module_types, uses)
        order = list(named)
        chosen = sorted(set(chosen), key=order.index)
        if not chosen:
            raise ModelError("no parameters selected; check params= and module_types=.")
        return chosen

    def _filter_by_type(
        self,
        chosen: list[str],
        module_types: Sequence[type[nn.Module]] | str,
        uses: Mapping[str, list[tuple[str, str]]],
    ) -> list[str]:
        if isinstance(module_types, str):
            if module_types != "layers":
                raise ConfigError(
                    f"module_types must be a sequence of module classes or 'layers'; got "
                    f"{module_types!r}."
                )
            types: tuple[type[nn.Module], ...] = layer_types()
        else:
            types = tuple(module_types)
        mods = dict(self.model.named_modules())
        if not any(isinstance(m, types) for m in mods.values()):
            raise ModelError(
                f"the model has no modules of type {[t.__name__ for t in types]}; "
                "choose types the model contains."
            )
        # A tied parameter (an LM head sharing the embedding matrix) is selected by type only
        # when every module using it has one of the types; select it by name otherwise.
        owned = {
            canon
            for canon, pairs in uses.items()
            if all(isinstance(mods[m], types) for m, _ in pairs)
        }
        kept = [n for n in chosen if n in owned]
        if not kept:
            tied = {
                c: [f"{m}.{local}" if m else local for m, local in pairs]
                for c, pairs in uses.items()
                if len(pairs) > 1 and any(isinstance(mods[m], types) for m, _ in pairs)
            }
            hint = (
                f" Tied parameters {tied} are also used by modules of other types; select them "
                "by name (params=[...]), which tracks their whole gradient."
                if tied
                else ""
            )
            raise ModelError(
                f"module_types={[t.__name__ for t in types]} selects no tracked parameter.{hint}"
            )
        return kept

    def canonical_name(self, qualified: str) -> str:
        """The name ``named_parameters()`` gives the parameter ``qualified`` refers to.

        Equal to ``qualified`` unless the parameter is tied: GPT-2's ``"lm_head.weight"`` is
        ``"transformer.wte.weight"``.
        """
        module, _, local = qualified.rpartition(".")
        for canon, pairs in parameter_uses(self.model).items():
            if (module, local) in pairs:
                return canon
        return qualified

    def tracked_params(self) -> dict[str, torch.Tensor]:
        """Tracked parameters, in the model's parameter order."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self._tracked}

    @property
    def tracked_names(self) -> list[str]:
        return list(self._tracked)

    @property
    def num_tracked(self) -> int:
        return sum(p.numel() for p in self.tracked_params().values())

    def _check_weights(self) -> None:
        params = self.tracked_params().values()
        on_meta = sum(p.is_meta for p in params)
        if on_meta:
            raise ModelError(
                f"{on_meta} tracked parameter(s) are on the meta device, which holds no values; "
                "materialise the model first (model.to_empty(device=...) then "
                "model.load_state_dict(...))."
            )

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype (of its tracked parameters): gradients and features use it."""
        return next(iter(self.tracked_params().values())).dtype

    @property
    def working_dtype(self) -> torch.dtype:
        """The dtype of curvature, kernels, solves and scores: float64 for a float64 model,
        float32 otherwise (see :func:`datatrace.devices.working_dtype`)."""
        return working_dtype(self.dtype)

    @property
    def device(self) -> torch.device:
        """The device of the model's tracked parameters, where attribution runs."""
        return next(iter(self.tracked_params().values())).device

    def to(self, device: str | torch.device) -> Task:
        """Move the model to ``device`` **in place** (``model.to``) and return the task.

        Raises:
            ConfigError: an invalid or unavailable device (see
                :func:`datatrace.devices.resolve_device`).
        """
        target = resolve_device(device)
        if target is None:
            raise ConfigError("Task.to needs a device such as 'cpu' or 'cuda'; got None.")
        if self.device != target:
            self.model.to(target)
        return self

    @contextmanager
    def moving_batches(self) -> Iterator[None]:
        """Inside: :meth:`split_batch` moves batch tensors to the model's device.

        The shared attribution loop runs under it, so users may pass CPU data to a GPU model;
        outside it the low-level functions refuse a batch on another device
        (:meth:`check_batch`).
        """
        before = self._moves_batches
        self._moves_batches = True
        try:
            yield
        finally:
            self._moves_batches = before

    # -- states -------------------------------------------------------------------------------
    def check_eval_mode(self) -> None:
        """Refuse a model in train mode: dropout would make gradients random."""
        training = [
            n or type(self.model).__name__ for n, m in self.model.named_modules() if m.training
        ]
        if training:
            raise ModelError(
                f"the model is in train mode (modules {training[:5]}); call model.eval() before "
                "attribution so that dropout and batch-norm are deterministic."
            )

    def state(self, checkpoint: Checkpoint | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the model, overridden by ``checkpoint``'s state."""
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        base.update({n: b for n, b in self.model.named_buffers()})
        if checkpoint is None:
            return base
        loaded = checkpoint.load()
        missing = [k for k in base if k not in loaded]
        unexpected = [k for k in loaded if k not in base]
        if missing or unexpected:
            raise ModelError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; members must share the task model's architecture."
            )
        for k, v in loaded.items():
            if v.shape != base[k].shape:
                raise ModelError(
                    f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model's has "
                    f"{tuple(base[k].shape)}; members must share the task model's architecture."
                )
            base[k] = v.to(device=base[k].device, dtype=base[k].dtype)
        return base

    # -- batches ------------------------------------------------------------------------------
    def split_batch(self, batch: Batch) -> _SplitBatch:
        """Model inputs, labels and attention mask of ``batch`` (on the model's device inside
        :meth:`moving_batches`)."""
        split = self._split(batch)
        if not self._moves_batches:
            return split
        device = self.device
        return _SplitBatch(
            move_to_device(split.args, device),
            move_to_device(split.kwargs, device),
            move_to_device(split.labels, device),
            move_to_device(split.mask, device),
        )

    def _split(self, batch: Batch) -> _SplitBatch:
        split = self._split_uncast(batch)
        if self._input_cast is None:
            return split
        source, target = self._input_cast
        return _SplitBatch(
            cast_floating(split.args, source, target),
            cast_floating(split.kwargs, source, target),
            cast_floating(split.labels, source, target),
            split.mask,
        )

    def _split_uncast(self, batch: Batch) -> _SplitBatch:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if self.batch_to_inputs is not None:
            args, kwargs = self.batch_to_inputs(batch)
            labels = batch["labels"] if isinstance(batch, Mapping) else batch[-1]
            return _SplitBatch(tuple(args), dict(kwargs), labels, mask)
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                labels = batch.get("input_ids") if self.loss_name == "lm" else None
                if labels is None:
                    raise DataError(
                        f"dict batch has keys {sorted(batch)} but no 'labels'; add labels or pass "
                        "batch_to_inputs=."
                    )
            else:
                labels = batch["labels"]
            kwargs = {k: v for k, v in batch.items() if k != "labels"}
            return _SplitBatch((), kwargs, labels, mask)
        if isinstance(batch, (tuple, list)):
            if len(batch) < 2 and self.loss_name != "lm":
                raise DataError(
                    f"batch has {len(batch)} tensor(s) but the task's loss takes inputs and labels; "
                    "pass (inputs..., labels) tuples, or batch_to_inputs= to say how to split it."
                )
            if self.loss_name == "lm" and len(batch) == 1:
                return _SplitBatch((batch[0],), {}, batch[0], None)
            return _SplitBatch(tuple(batch[:-1]), {}, batch[-1], None)
        raise DataError(
            f"a batch must be a tuple/list or dict of tensors; got {type(batch).__name__}."
        )

    def check_batch(self, batch: Batch) -> None:
        """Refuse inputs whose dtype or device cannot meet the model's.

        Inside :meth:`moving_batches` (the attributors) the device is not checked: batches
        are moved.
        """
        task_checks.check_batch(self, batch)

    def check_data(self, data: Any, batch_size: int, what: str) -> None:
        """Refuse ``data`` the model cannot be attributed on, naming the bad value.

        Every batch: input dtypes (:meth:`check_batch`), NaN/inf in float inputs and labels
        (``NumericalError``), labels the loss or target cannot take (class labels outside
        ``[0, C)``, ``mse`` targets of another size: ``DataError``). The first batch also
        goes through one forward pass at the model's weights: inputs the model cannot take
        (a wrong feature size, a missing dict key) are a ``DataError`` naming their shapes,
        and non-finite outputs a ``NumericalError``. ``what`` names the data in messages
        ("training", "query").
        """
        task_checks.check_data(self, data, batch_size, what)

    def check_finite_state(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        """Refuse NaN/inf in the tracked parameters of ``state`` (``NumericalError``)."""
        task_checks.check_finite_state(self, state, what)

    @property
    def _builtin_loss(self) -> bool:
        return self._loss is _LOSSES.get(self.loss_name)

    def outputs(self, state: Mapping[str, torch.Tensor], split: _SplitBatch) -> torch.Tensor:
        """Model outputs (logits) under ``state``."""
        out = functional_call(self.model, dict(state), split.args, split.kwargs, strict=False)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"the model returned {type(out).__name__}; expected a tensor or .logits."
            )
        return out

    def loss_from_outputs(self, outputs: torch.Tensor, split: _SplitBatch) -> torch.Tensor:
        """Per-example training loss ``(B,)``."""
        assert split.labels is not None
        return self._checked(self._loss(outputs, split.labels, split.mask), outputs, "loss")

    def query_objective_from_outputs(
        self, outputs: torch.Tensor, split: _SplitBatch
    ) -> torch.Tensor:
        """``-direction * target``: loss-like, its decrease is an improvement of the query."""
        assert split.labels is not None
        value = self.target.fn(outputs, split.labels, split.mask)
        return self._checked(-float(self.target.direction) * value, outputs, "target")

    def negative_margin_from_outputs(
        self, outputs: torch.Tensor, split: _SplitBatch
    ) -> torch.Tensor:
        """``-margin``: TRAK's loss-like output function for classification."""
        assert split.labels is not None
        return self._checked(-margin(outputs, split.labels), outputs, "margin")

    def objective(self, which: str) -> Callable[[torch.Tensor, _SplitBatch], torch.Tensor]:
        """The per-example function differentiated for ``which``.

        ``"loss"``: the training loss; ``"query"``: ``-direction * target``; ``"margin"``:
        the negative classification margin. All are loss-like (lower is better).
        """
        if which == "loss":
            return self.loss_from_outputs
        if which == "query":
            return self.query_objective_from_outputs
        if which == "margin":
            return self.negative_margin_from_outputs
        raise ConfigError(f"objective must be 'loss', 'query' or 'margin'; got {which!r}.")

    @staticmethod
    def _checked(values: torch.Tensor, outputs: torch.Tensor, what: str) -> torch.Tensor:
        if values.ndim != 1 or values.shape[0] != outputs.shape[0]:
            raise ModelError(
                f"the {what} function returned shape {tuple(values.shape)}; it must return one "
                f"value per example, shape ({outputs.shape[0]},) — use reduction='none'."
            )
        return values

    def config(self) -> dict[str, Any]:
        """JSON-able description (goes into store manifests)."""
        return {
            "model": type(self.model).__name__,
            "loss": self.loss_name,
            "target": self.target.name,
            "params": self.tracked_names,
        }
