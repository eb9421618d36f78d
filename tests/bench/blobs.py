"""A tiny two-blob classification setting shared by the benchmark tests (not registered)."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from datatrace.bench.settings import ClassifierSetting, SettingData


@dataclass(frozen=True, kw_only=True)
class BlobsBase(ClassifierSetting):
    """Two Gaussian blobs in 2-D, ``gap`` apart."""

    name: str = "blobs-base"
    n_train: int = 64
    n_val: int = 8
    n_test: int = 16
    epochs: int = 30
    lr: float = 0.1
    gap: float = 4.0

    def _build_data(self) -> SettingData:
        g = torch.Generator().manual_seed(self.split_seed)
        n = self.n_train + self.n_val + self.n_test
        y = torch.arange(n) % 2
        x = torch.randn(n, 2, generator=g) + self.gap * y[:, None]
        a, b = self.n_train, self.n_train + self.n_val
        return SettingData((x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]))

    def _build_model(self) -> nn.Module:
        return nn.Linear(2, 2)


@dataclass(frozen=True, kw_only=True)
class WideBase(ClassifierSetting):
    """Linear classifier on 32-D blobs with fewer training examples than inputs.

    Logistic regression is convex, and with ``n_train <= 32`` any labelling is linearly
    separable, so the flipped-label model memorises its flips (``memorise``).
    """

    name: str = "wide-base"
    n_train: int = 24
    n_val: int = 4
    n_test: int = 6
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.05
    gap: float = 1.5

    memorise: ClassVar = {"epochs": 60, "weight_decay": 0.0, "lr": 0.3}
    convex: ClassVar = True

    def _build_data(self) -> SettingData:
        g = torch.Generator().manual_seed(self.split_seed)
        n = self.n_train + self.n_val + self.n_test
        y = torch.arange(n) % 2
        x = torch.randn(n, 32, generator=g) + self.gap * y[:, None]
        a, b = self.n_train, self.n_train + self.n_val
        return SettingData((x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]))

    def _build_model(self) -> nn.Module:
        return nn.Linear(32, 2)
