"""The digits setting: scikit-learn's bundled 8x8 digits (no download) and an MLP recipe.

Used by the demo, by the registered digits settings (:func:`load_digits_split`) and by the
legacy recipe of the peer comparison (``benchmarks/peers/digits.py``); ``datatrace bench``
runs the registered ``digits-mlp`` setting instead. The 64-128-64-10 ReLU MLP trained 30
epochs with Adam reaches about 97% test accuracy on the fixed 80/20 split.
"""

from __future__ import annotations

import torch
from torch import nn

from datatrace.errors import ConfigError
from datatrace.task import Checkpoint

__all__ = ["digits_mlp", "load_digits_split", "train_digits_mlp", "train_digits_mlp_trajectory"]

Split = tuple[torch.Tensor, torch.Tensor]


def load_digits_split(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Split, Split]:
    """Digits scaled to [0, 1]: ``(train, test)`` with a fixed 80/20 split (1437 / 360)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the digits setting needs scikit-learn: pip install 'datatrace[bench]'"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def digits_mlp(hidden: tuple[int, ...] = (128, 64), seed: int = 0) -> nn.Module:
    """A ReLU MLP 64 -> hidden -> 10 with seeded initialisation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def train_digits_mlp(
    train: Split,
    *,
    seed: int = 0,
    epochs: int = 30,
    hidden: tuple[int, ...] = (128, 64),
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
) -> nn.Module:
    """Train the MLP with Adam; deterministic given ``seed`` (init and data order)."""
    model, _ = train_digits_mlp_trajectory(
        train,
        seed=seed,
        epochs=epochs,
        hidden=hidden,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
    )
    return model


def train_digits_mlp_trajectory(
    train: Split,
    *,
    seed: int = 0,
    epochs: int = 30,
    hidden: tuple[int, ...] = (128, 64),
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    every: int | None = None,
) -> tuple[nn.Module, list[Checkpoint]]:
    """Train as :func:`train_digits_mlp` and keep a checkpoint every ``every`` epochs."""
    model = digits_mlp(hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    checkpoints: list[Checkpoint] = []
    step = 0
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
        if every is not None and (epoch + 1) % every == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoints.append(Checkpoint(state, step=step, learning_rate=lr, optimizer="adam"))
    return model.eval(), checkpoints
