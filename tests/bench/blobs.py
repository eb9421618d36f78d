"""A tiny two-blob classification setting shared by the benchmark tests (not registered)."""

from dataclasses import dataclass

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
