"""What a method sees of one ensemble member: :class:`MemberContext` (DESIGN.md §3, §4).

The shared loop (:mod:`datatrace.methods.loop`) builds one context per member and hands it to
every hook of a method. It carries the member's *effective* task (its dropout masks or LoRA
adapter applied while the loop is inside the member's scope), its checkpoints and their
states, its projector, the form of its train features (:func:`decide_feature_form`) and the
method's own typed state of that member (``fitted``: the frozen dataclass the method's
``_prepare_member`` / ``_fit_member`` return). A method never swaps or inspects member
kinds: what it needs of them is a property here.

This module is the loop's side of the ensemble layer: it is the only part of
:mod:`datatrace.methods` that knows a member kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

import torch

from datatrace.ensemble import DropoutMember
from datatrace.errors import ConfigError, ModelError
from datatrace.gradients.factored import ParamLayout, covers_tracked
from datatrace.methods.config import MethodConfig
from datatrace.projection import Projector
from datatrace.task import Checkpoint, Member, Task

__all__ = [
    "FeatureForm",
    "FormChoice",
    "FormDemand",
    "MemberContext",
    "StateT",
    "check_dropout_masks",
    "decide_feature_form",
]

StateT = TypeVar("StateT")
"""A method's per-member state: the frozen dataclass its file declares."""

FeatureForm = Literal["flat", "projected", "factored", "layer-projected"]
"""How a member's train features represent per-example gradients: flattened, randomly
projected (``projector=``), factored per layer (each Linear/Conv2d layer's inputs and
output gradients, :class:`~datatrace.gradients.factored.ParamLayout`), or each layer's
gradient projected on both sides and flattened (LoGra's ``P_gᵀ D P_a``; the method owns
the projections, the loop the layout)."""

FormChoice = Literal["factored", "layer-projected", "flat"]
"""A form a method can score, as it declares them
(:meth:`~datatrace.methods.hooks.MethodHooks.feature_forms`): ``"flat"`` means gradients,
projected when the config has a projector."""

# what each per-layer form holds, for refusals
_LAYER_FORMS = {
    "factored": "each example's layer factors",
    "layer-projected": "each Linear/Conv2d layer's gradient projected on both sides",
}


@dataclass(frozen=True)
class FormDemand:
    """What the loop's refusal names when a method's settings admit factored train features
    only (:meth:`~datatrace.methods.hooks.MethodHooks.form_demand`).

    Attributes:
        setting: the setting that demands them, as received (``"query_rank=2"``).
        fix: the other settings to suggest (``"drop query_rank"``).
    """

    setting: str
    fix: str


def decide_feature_form(
    preferred: tuple[FormChoice, ...],
    config: MethodConfig,
    grouped: bool,
    task: Task,
    demand: FormDemand | None = None,
) -> tuple[FeatureForm, ParamLayout | None]:
    """The first of a method's ``preferred`` forms this fit allows, and its layer layout.

    Both per-layer forms need every tracked parameter of ``task`` (the member's effective
    task) in a Linear/Conv2d layer and no projector; factored features also need
    per-example gradients (no ``groups=``: a group's features are summed gradients) and the
    hook engine (layer-projected ones are projected gradients, which sum and which the
    functional engine's dense gradients give too). Where the last form a method declares is
    ruled out (no flat fallback), it gets an error naming ``demand`` (the setting that asks
    for the form and the fix): ``ConfigError`` for the settings, ``ModelError`` (naming the
    parameters) for the layers.
    """
    if not preferred or any(c != "flat" and c not in _LAYER_FORMS for c in preferred):
        raise ConfigError(
            f"a method declares one or more train-feature forms among 'factored', "
            f"'layer-projected' and 'flat'; got {preferred!r}."
        )
    for k, choice in enumerate(preferred):
        if choice == "flat":
            return ("flat" if config.projector == "none" else "projected"), None
        blockers = [  # the setting as received, and why it rules the form out
            (name, why)
            for name, present, why in (
                (
                    "groups=",
                    grouped and choice == "factored",
                    "they cannot be summed into a group's gradient",
                ),
                (
                    f"projector={config.projector!r}",
                    config.projector != "none",
                    "a projection mixes every layer into each column",
                ),
                (
                    "engine='functional'",
                    config.engine == "functional" and choice == "factored",
                    "only the hook engine records layer factors",
                ),
            )
            if present
        ]
        if k < len(preferred) - 1:  # another form follows: take this one only where it fits
            if not blockers and covers_tracked(task):
                return choice, ParamLayout(task)
            continue
        demand = demand or FormDemand("these settings", "use settings that score flat gradients")
        needs = f"{demand.setting} needs {choice} train features ({_LAYER_FORMS[choice]})"
        if blockers:
            names = " and ".join(name for name, _ in blockers)
            why = "; ".join(reason for _, reason in blockers)
            verb = "rules" if len(blockers) == 1 else "rule"
            raise ConfigError(
                f"{needs}, which {names} {verb} out: {why}; drop {names}, or {demand.fix}."
            )
        try:
            return choice, ParamLayout(task)
        except ModelError as err:  # names the parameters outside Linear/Conv2d layers
            raise ModelError(f"{needs}, and {err} Or {demand.fix}.") from None
    raise AssertionError("unreachable: the last form returns or raises")


@dataclass(frozen=True)
class MemberContext(Generic[StateT]):
    """One ensemble member as a method sees it.

    Attributes:
        index: the member's position in ``members=`` (seeds its projector).
        member: the member itself (its kind is the loop's business, not the method's).
        task: the member's effective task: inside the loop's member scope, the task of the
            masked or adapted model (use it for every gradient, output and layer layout);
            outside (combining score blocks), the attributor's task.
        checkpoints: the member's checkpoints, final last (``None``: the task's model).
        states: the weights at each checkpoint, as the effective task names them.
        projector: the member's random projection (None without ``projector=``).
        form: the form of the member's train (and, for methods that match them, query)
            features, decided once per fit by the loop from the method's
            :meth:`~datatrace.methods.hooks.MethodHooks.feature_forms`.
        layout: the layer layout of per-layer features (None for flat ones), taken
            in the member's scope (a LoRA member's adapter layers).
        features: the member's in-memory train feature blocks (the loop fills them; empty
            when they live in the store or are recomputed).
        unit_members: while a grouped train batch is featurized, the ``(G, k)`` batch
            indices of each group's members (None otherwise).
        batch_indices: while a train batch is featurized, the training-set indices of its
            examples (None otherwise).
        scoped: whether the loop is inside the member's scope (``task`` is effective).
    """

    index: int
    member: Member
    task: Task
    checkpoints: tuple[Checkpoint | None, ...]
    states: tuple[dict[str, torch.Tensor], ...]
    projector: Projector | None
    form: FeatureForm = "flat"
    layout: ParamLayout | None = None
    method_state: StateT | None = None
    features: list[torch.Tensor] = field(default_factory=list)
    unit_members: torch.Tensor | None = None
    batch_indices: torch.Tensor | None = None
    scoped: bool = False

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The member's final weights."""
        return self.states[-1]

    @property
    def fitted(self) -> StateT:
        """The method's state of this member: what ``_prepare_member`` returned while train
        features are computed, what ``_fit_member`` returned afterwards."""
        if self.method_state is None:
            raise RuntimeError(
                f"member {self.index} has no method state yet: a hook read ctx.fitted before "
                "_prepare_member/_fit_member returned one (override _prepare_member to make "
                "state needed while featurizing)."
            )
        return self.method_state

    def factor_layout(self) -> ParamLayout:
        """The layer layout of per-layer train features (``"factored"``, ``"layer-projected"``)."""
        if self.layout is None:
            raise RuntimeError(
                f"member {self.index} has {self.form} train features, not per layer."
            )
        return self.layout

    def with_state(self, state: StateT | None) -> MemberContext[StateT]:
        """This context holding the method's ``state``."""
        return replace(self, method_state=state)

    @property
    def dropout_masked(self) -> bool:
        """Whether the member's model is seen through fixed dropout masks (a ``dropout``
        ensemble member): its masks already enter every feature and output."""
        return isinstance(self.member, DropoutMember)

    @contextmanager
    def under_dropout_mask(
        self,
        index: int,
        *,
        seed: int,
        rate: float | None,
        layers: tuple[str, ...] | None,
    ) -> Iterator[MemberContext[StateT]]:
        """This member seen through dropout mask ``index`` of ``seed`` (what the ``dropout``
        ensemble's member ``index`` applies), e.g. TRAK's Q-only dropout ensemble."""
        mask = DropoutMember(index=index, seed=seed, rate=rate, layers=layers)
        with mask.applied(self.task) as task:
            yield replace(self, task=task)


def check_dropout_masks(seed: int, rate: float | None, layers: tuple[str, ...] | None) -> None:
    """Raise ``ConfigError`` now (not in ``fit``) for dropout-mask settings that
    :meth:`MemberContext.under_dropout_mask` would refuse."""
    DropoutMember(seed=seed, rate=rate, layers=layers)
