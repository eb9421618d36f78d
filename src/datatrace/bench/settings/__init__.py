"""Benchmark settings, registered by name (DESIGN.md §7).

A setting bundles a data builder (training examples, validation and test queries), a model
builder, a deterministic training recipe that trains on any subset of the training examples,
the target to attribute and how to measure it::

    >>> import torch
    >>> from datatrace import GradDotAttributor
    >>> from datatrace.bench.settings import get_setting, list_settings
    >>> list_settings()  # doctest: +NORMALIZE_WHITESPACE
    ['breast-cancer-mlp', 'digits-cnn', 'digits-lr', 'digits-mlp', 'digits-mlp-dropout',
     'digits-mlp-short', 'digits-mlp-twostage', 'pydoc-charlm', 'pydoc-gpt2']
    >>> setting = get_setting("digits-mlp", size="small")      # fields can be overridden
    >>> model = setting.train(seed=0)                           # eval mode, deterministic
    >>> task = setting.make_task(model)                         # loss and target of the setting
    >>> scores = GradDotAttributor(task).fit(setting.data.train).attribute(
    ...     setting.data.test_queries)
    >>> scores.values.shape == (setting.n_test, setting.n_train)
    True
    >>> subset_model = setting.train(indices=torch.arange(100), seed=1)  # ground truth retrains
    >>> setting.measure(subset_model, "test").shape             # margins: higher is better
    torch.Size([100])

Registered settings (each docstring states the accuracy or loss it reaches):

- ``digits-lr``: :class:`DigitsLR`, multinomial logistic regression trained to convergence
  (convex: leave-one-out ground truth is exact).
- ``digits-mlp``: :class:`DigitsMLP`, MLP with dropout.
- ``digits-mlp-dropout``: :class:`DigitsMLPDropout`, wider MLP with three ``Dropout(0.5)``
  layers on 1,000 examples.
- ``digits-cnn``: :class:`DigitsCNN`, small conv net on the 8x8 images.
- ``breast-cancer-mlp``: :class:`BreastCancerMLP`, tabular.
- ``pydoc-charlm``: :class:`PydocCharLM`, character-level transformer language model.
- ``pydoc-gpt2``: :class:`PydocGPT2`, the same data on a Hugging Face GPT-2 built from its
  config (needs transformers).

Registering your own setting: subclass :class:`Setting` (or :class:`ClassifierSetting`,
which brings Adam minibatch training of a classifier) as a frozen, keyword-only dataclass,
give it a default ``name``, declare the recipe as fields, build data and model, and decorate
it with :func:`register_setting`::

    >>> from dataclasses import dataclass
    >>> from torch import nn
    >>> from datatrace.bench.settings import (
    ...     ClassifierSetting, SettingData, get_setting, register_setting)
    >>> @register_setting
    ... @dataclass(frozen=True, kw_only=True)
    ... class Blobs(ClassifierSetting):
    ...     '''Two Gaussian blobs in 2-D, separated by ``gap``.'''
    ...     name: str = "blobs"
    ...     n_train: int = 64
    ...     n_val: int = 8
    ...     n_test: int = 16
    ...     lr: float = 0.1
    ...     gap: float = 3.0
    ...     def _build_data(self) -> SettingData:
    ...         g = torch.Generator().manual_seed(self.split_seed)
    ...         n = self.n_train + self.n_val + self.n_test
    ...         y = torch.arange(n) % 2
    ...         x = torch.randn(n, 2, generator=g) + self.gap * y[:, None]
    ...         a, b = self.n_train, self.n_train + self.n_val
    ...         return SettingData((x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]))
    ...     def _build_model(self) -> nn.Module:
    ...         return nn.Linear(2, 2)
    >>> blobs = get_setting("blobs", gap=4.0, epochs=30)
    >>> blobs.evaluate(blobs.train(seed=0)).accuracy > 0.9
    True
    >>> Setting.from_json(blobs.to_json()) == blobs      # JSON round trip, via the registry
    True

A setting must be deterministic given its fields and the training seed: build data from
``split_seed`` only, draw model initialisation from the global generator (it is seeded for
you), and bump the class attribute ``recipe_version`` when a code change alters what the
recipe trains, so that ground truth cached under :meth:`Setting.recipe_hash` is rebuilt.
A prepared instance can be registered too (``register_setting(Blobs(name="wide", gap=9.0))``),
as can a function ``(**overrides) -> Setting``.
"""

from datatrace.bench.settings.base import Evaluation, Setting, SettingData, take
from datatrace.bench.settings.charlm import CharTransformer, PydocCharLM, pydoc_corpus
from datatrace.bench.settings.digits import DigitsCNN, DigitsLR, DigitsMLP, DigitsMLPDropout
from datatrace.bench.settings.gpt2 import PydocGPT2
from datatrace.bench.settings.registry import get_setting, list_settings, register_setting
from datatrace.bench.settings.tabular import BreastCancerMLP
from datatrace.bench.settings.training import ClassifierSetting, fit_minibatch
from datatrace.bench.settings.trajectory import DigitsMLPShort, DigitsMLPTwoStage  # noqa: F401

__all__ = [
    "BreastCancerMLP",
    "CharTransformer",
    "ClassifierSetting",
    "DigitsCNN",
    "DigitsLR",
    "DigitsMLP",
    "DigitsMLPDropout",
    "Evaluation",
    "PydocCharLM",
    "PydocGPT2",
    "Setting",
    "SettingData",
    "fit_minibatch",
    "get_setting",
    "list_settings",
    "pydoc_corpus",
    "register_setting",
    "take",
]
