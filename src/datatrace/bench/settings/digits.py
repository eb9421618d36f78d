"""Settings on scikit-learn's bundled 8x8 digits: ``digits-lr``, ``digits-mlp``, ``digits-cnn``,
``digits-mlp-dropout``.

The 1797 images (pixels scaled to [0, 1]) are split 80/20 by ``split_seed``
(:func:`datatrace.bench.digits.load_digits_split`): the first ``n_train`` of the 1437
training images are the training examples, the first ``n_val`` of the 360 held-out images
the validation queries and the next ``n_test`` the test queries. Size presets: full 1437
training examples, 60 validation and 300 test queries; small 300, 20 and 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from datatrace._checks import check_int
from datatrace.bench.digits import load_digits_split, mlp
from datatrace.bench.settings.base import DType, Setting, SettingData, _check_float
from datatrace.bench.settings.registry import register_setting
from datatrace.bench.settings.training import ClassifierSetting, _check_hidden
from datatrace.data import Batch
from datatrace.errors import ConfigError, ConvergenceWarning, warn
from datatrace.task import Checkpoint

__all__ = ["DigitsCNN", "DigitsLR", "DigitsMLP", "DigitsMLPDropout"]

_N_TRAIN, _N_HELD_OUT = 1437, 360
_PRESETS = {
    "full": {"n_train": _N_TRAIN, "n_val": 60, "n_test": 300},
    "small": {"n_train": 300, "n_val": 20, "n_test": 100},
}


def _check_digits_sizes(setting: Setting) -> None:
    if setting.n_train > _N_TRAIN:
        raise ConfigError(
            f"n_train must be at most {_N_TRAIN} (the digits training split); got "
            f"{setting.n_train}."
        )
    if setting.n_val + setting.n_test > _N_HELD_OUT:
        raise ConfigError(
            f"n_val + n_test must be at most {_N_HELD_OUT} (the held-out digits); got "
            f"{setting.n_val} + {setting.n_test}."
        )


def _digits_data(setting: Setting, image: bool) -> SettingData:
    (x, y), (xq, yq) = load_digits_split(seed=setting.split_seed, dtype=setting.torch_dtype)
    if image:  # (n, 64) -> (n, 1, 8, 8): rows of the image are consecutive in sklearn's data
        x, xq = x.reshape(-1, 1, 8, 8), xq.reshape(-1, 1, 8, 8)
    v, t = setting.n_val, setting.n_test
    return SettingData(
        train=(x[: setting.n_train], y[: setting.n_train]),
        val_queries=(xq[:v], yq[:v]),
        test_queries=(xq[v : v + t], yq[v : v + t]),
    )


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsLR(Setting):
    """Multinomial logistic regression on digits, trained to convergence (convex).

    The objective is the mean cross-entropy plus ``weight_decay / 2 * ||θ||²`` over all
    parameters (biases included), minimised by L-BFGS from zero weights. It is strictly
    convex, so the optimum is unique: the training ``seed`` has no effect, retraining is
    exact, and leave-one-out effects are meaningful. Influence functions with
    ``curvature="hessian"`` and ``damping=weight_decay`` use exactly the objective's
    curvature (DESIGN.md §1: the LOO slope should be close to 1). float64 by default, so
    that leave-one-out differences stand clear of rounding.

    Measured (torch 2.13, one thread of a shared 2-core machine): full (1437 train)
    reaches 95.6% accuracy and 0.18 mean cross-entropy on the 360 held-out digits in 0.4 s;
    small (300 train) 95.8% and 0.20 on its 120 queries in 0.7 s. Influence
    (``if-explicit``, ``curvature="hessian"``, ``damping=weight_decay``) against retrained
    leave-one-out effects of 30 training points on 50 test queries: Pearson 0.997, slope 1.2
    (full); 0.95 (small).

    Attributes:
        weight_decay: λ of the L2 term of the objective.
        max_iter: most L-BFGS iterations (a RuntimeWarning says when it stops early).
        tolerance: stop when every gradient entry is below this in absolute value.

    Example:
        >>> setting = DigitsLR(size="small")
        >>> setting.evaluate(setting.train()).accuracy > 0.9
        True
    """

    name: str = "digits-lr"
    description: str = "multinomial logistic regression on sklearn digits (convex, L-BFGS)"
    dtype: DType = "float64"
    weight_decay: float = 1e-3
    max_iter: int = 1000
    tolerance: float = 1e-9

    image_shape: ClassVar = (8, 8)
    presets: ClassVar = _PRESETS
    convex: ClassVar[bool] = True

    def _check(self) -> None:
        super()._check()
        _check_digits_sizes(self)
        _check_float(self.weight_decay, "weight_decay", 0.0, strict=True)
        check_int("max_iter", self.max_iter, 1)
        _check_float(self.tolerance, "tolerance", 0.0, strict=True)

    def _build_data(self) -> SettingData:
        return _digits_data(self, image=False)

    def _build_model(self) -> nn.Module:
        model = nn.Linear(64, 10)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    def _fit(self, model: nn.Module, train: Batch, seed: int, record: bool) -> list[Checkpoint]:
        x, y = train
        params = list(model.parameters())
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=2 * self.max_iter,
            history_size=50,
            tolerance_grad=self.tolerance,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def objective() -> torch.Tensor:
            opt.zero_grad()
            penalty = sum((p**2).sum() for p in params)
            value = F.cross_entropy(model(x), y) + 0.5 * self.weight_decay * penalty
            value.backward()
            return value

        opt.step(objective)
        objective()
        worst = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
        if worst > 10 * self.tolerance:
            warn(
                f"L-BFGS stopped after {self.max_iter} iterations with gradient entries up to "
                f"{worst:.1e} (tolerance {self.tolerance:.0e}); raise max_iter or weight_decay.",
                ConvergenceWarning,
            )
        if not record:
            return []
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        steps = int(opt.state[params[0]].get("n_iter", 0))
        return [Checkpoint(state, step=steps, learning_rate=1.0, optimizer="lbfgs")]


@dataclass(frozen=True, kw_only=True)
class _DigitsMLPSetting(ClassifierSetting):
    """What the digits MLP settings share: flat digits in, 64 -> ``hidden`` -> 10 ReLU MLP."""

    hidden: tuple[int, ...] = (64,)
    epochs: int = 0

    image_shape: ClassVar = (8, 8)

    def _check(self) -> None:
        super()._check()
        _check_digits_sizes(self)
        _check_hidden(self.hidden)

    def _build_data(self) -> SettingData:
        return _digits_data(self, image=False)

    def _build_model(self) -> nn.Module:
        return mlp(64, self.hidden, 10)


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsMLP(_DigitsMLPSetting):
    """A ReLU MLP with dropout on digits, trained with Adam.

    64 -> ``hidden`` -> 10, each hidden layer followed by ReLU and ``Dropout(dropout)``.
    Dropout is active in training only; the trained model comes back in eval mode (the
    dropout ensemble of DESIGN.md §4 samples masks itself).

    Measured (torch 2.13, one thread of a shared 2-core machine): full (1437 train, 30
    epochs) reaches 96.7% accuracy and 0.10 mean cross-entropy on the 360 held-out digits in
    1.2 s; small (300 train, 20 epochs) 94.2% and 0.19 on its 120 queries in 0.2 s.

    Attributes:
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer, in [0, 1).
        epochs: passes over the training data (0: the size preset, full 30, small 20).

    Example:
        >>> setting = DigitsMLP(size="small")
        >>> setting.make_task(setting.train()).target.name
        'margin'
    """

    name: str = "digits-mlp"
    description: str = "ReLU MLP with dropout on sklearn digits (Adam)"
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1

    presets: ClassVar = {
        "full": {**_PRESETS["full"], "epochs": 30},
        "small": {**_PRESETS["small"], "epochs": 20},
    }
    # 10% flipped labels are memorised (100% training accuracy) without dropout and decay.
    memorise: ClassVar = {"epochs": 150, "dropout": 0.0, "weight_decay": 0.0}

    def _check(self) -> None:
        super()._check()
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"dropout must be a probability in [0, 1); got {self.dropout!r}.")

    def _build_model(self) -> nn.Module:
        return mlp(64, self.hidden, 10, dropout=self.dropout)


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsMLPDropout(DigitsMLP):
    """A wider ReLU MLP with heavy dropout: three ``Dropout(0.5)`` layers, 1,000 examples, Adam.

    64 -> 256 -> 128 -> 64 -> 10, each hidden layer followed by ReLU and ``Dropout(0.5)``;
    the recipe of :class:`DigitsMLP` otherwise (Adam, batch 64, lr 3e-3, L2 1e-4). The model
    is attributed in eval mode, where dropout is the identity but has shaped the weights
    (many redundant units). It is the dropout-MLP kind of model on which issue 16 saw EK-FAC
    implementations differ (docs/benchmarks.md, "EK-FAC side by side with kronfluence").

    Measured (torch 2.13, one thread of a shared 2-core machine): full (1,000 train, 20
    epochs) reaches 96.7% accuracy and 0.15 mean cross-entropy on the 360 held-out digits
    (98.7% and 0.04 on its training examples) in 2-8 s; small (300 train, 30 epochs) 95.8%
    and 0.17 on its 120 queries in 0.6 s.

    Example:
        >>> setting = DigitsMLPDropout(size="small")
        >>> sum(isinstance(m, nn.Dropout) for m in setting.build_model())
        3
    """

    name: str = "digits-mlp-dropout"
    description: str = "ReLU MLP with three Dropout(0.5) layers on 1,000 sklearn digits (Adam)"
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5

    presets: ClassVar = {
        "full": {**_PRESETS["full"], "n_train": 1000, "epochs": 20},
        "small": {**_PRESETS["small"], "epochs": 30},
    }


@register_setting
@dataclass(frozen=True, kw_only=True)
class DigitsCNN(ClassifierSetting):
    """A small conv net on the 8x8 digit images (inputs ``(n, 1, 8, 8)``), trained with Adam.

    Conv(1 -> c1, 3x3) -> ReLU -> Conv(c1 -> c2, 3x3) -> ReLU -> MaxPool 2 -> Flatten ->
    Linear(16 c2 -> hidden) -> ReLU -> Linear(hidden -> 10); convolutions are padded, so the
    pooled map is 4x4.

    Measured (torch 2.13, one thread of a shared 2-core machine): full (1437 train, 20
    epochs) reaches 98.1% accuracy and 0.06 mean cross-entropy on the 360 held-out digits in
    3.3 s; small (300 train, channels (8, 16), 20 epochs) 92.5% and 0.18 on its 120 queries
    in 0.5 s.

    Attributes:
        channels: output channels of the two convolutions (empty: the size preset, full
            (16, 32), small (8, 16)).
        hidden: width of the hidden fully-connected layer.
        epochs: passes over the training data (0: the size preset, 20 for both).

    Example:
        >>> DigitsCNN(size="small").data.train[0].shape[1:]
        torch.Size([1, 8, 8])
    """

    name: str = "digits-cnn"
    description: str = "small conv net on the 8x8 digit images (Adam)"
    channels: tuple[int, ...] = ()
    hidden: int = 64
    epochs: int = 0

    image_shape: ClassVar = (8, 8)
    presets: ClassVar = {
        "full": {**_PRESETS["full"], "epochs": 20, "channels": (16, 32)},
        "small": {**_PRESETS["small"], "epochs": 20, "channels": (8, 16)},
    }
    memorise: ClassVar = {"epochs": 60, "weight_decay": 0.0}

    def _check(self) -> None:
        super()._check()
        _check_digits_sizes(self)
        if len(self.channels) != 2 or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ConfigError(f"channels must be two ints >= 1; got {self.channels!r}.")
        check_int("hidden", self.hidden, 1)

    def _build_data(self) -> SettingData:
        return _digits_data(self, image=True)

    def _build_model(self) -> nn.Module:
        c1, c2 = self.channels
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * c2, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 10),
        )
