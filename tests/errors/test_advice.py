"""Every error's advice is executable as written: follow it literally and check it works.

(The stale store's ``overwrite=True`` is checked for every method in
tests/methods/test_conformance.py, the tied LM head's ``module_types='layers'`` in
tests/gradients/test_hf.py, and the data refusals in tests/data/test_data.py.)
"""

import pytest
import torch
import torch.nn.functional as F

from datatrace import ConfigError, ModelError, StoreError, Task, make_attributor
from datatrace.group import make_grouper
from datatrace.store import Store
from tests.models import classification_data, mlp


def test_missing_store_advice_create_true(tmp_path):
    kwargs = {"config": {"proj_dim": 8}, "fingerprints": {"model": "abc"}}
    with pytest.raises(StoreError, match="pass create=True to make one"):
        Store(tmp_path / "s", create=False, **kwargs)
    store = Store(tmp_path / "s", create=True, **kwargs)  # the advice, as written
    store.write_shard("features", 0, torch.ones(2, 3))
    assert Store(tmp_path / "s", create=False, **kwargs).shard_indices("features") == [0]


def test_grouper_without_task_advice_pass_task():
    x, y = classification_data(n=12)
    task = Task(mlp())
    grouper = make_grouper("class-random", group_size=4)
    with pytest.raises(ConfigError, match="needs the task; pass task="):
        grouper.group((x, y))
    grouping = grouper.group((x, y), task=task)  # the advice, as written
    assert grouping.n_groups >= 3  # at least one group per class


class Functional(torch.nn.Module):
    """Uses its layer's weights through F.linear, which the hook engine cannot see."""

    def __init__(self, inner: torch.nn.Sequential, direct: bool) -> None:
        super().__init__()
        self.inner, self.direct = inner, direct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.inner[1](self.inner[0](x))
        last = self.inner[2]
        return last(hidden) if self.direct else F.linear(hidden, last.weight, last.bias)


def test_hidden_layer_use_advice_engine_functional():
    train = classification_data(n=8)
    base = mlp()
    assert [type(m) for m in base] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    wrapped = Task(Functional(base, direct=False).eval())
    with pytest.raises(ModelError, match="pass engine='functional' to the attributor"):
        make_attributor("grad-dot", wrapped, engine="hooks").fit(train)
    got = make_attributor("grad-dot", wrapped, engine="functional").fit(train)  # as written
    ref = make_attributor("grad-dot", Task(Functional(base, direct=True).eval())).fit(train)
    torch.testing.assert_close(
        got.attribute(train).values, ref.attribute(train).values, rtol=1e-10, atol=1e-12
    )
