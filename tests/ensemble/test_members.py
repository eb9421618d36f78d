"""Member constructors, kinds and architecture checks."""

import pytest
import torch
from torch import nn

from datatrace import (
    ConfigError,
    ModelError,
    Task,
    dropout_members,
    independent_members,
    lora_members,
    make_attributor,
)
from datatrace.ensemble import member_kind, resolve_members
from tests.models import classification_data, mlp


def test_member_kinds_use_the_design_ids():
    adapter = {"0.lora_A.weight": torch.zeros(1, 6), "0.lora_B.weight": torch.zeros(5, 1)}
    kinds = [
        member_kind(m)
        for m in [*independent_members([mlp()]), *dropout_members(1), *lora_members([adapter])]
    ]
    assert kinds == ["independent", "dropout", "lora"]


def test_mismatched_independent_member_is_refused():
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(ModelError, match="architecture"):
        resolve_members(Task(mlp()), independent_members([other]))
    attr = make_attributor(
        "grad-dot", Task(mlp()), members=dropout_members(1, rate=0.1, layers=["1"], models=[other])
    )
    with pytest.raises(ModelError, match="architecture"):
        attr.fit(classification_data(n=4))


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="one per member"):
        independent_members([mlp(), mlp()], train_indices=[[0]])
    with pytest.raises(ConfigError, match="k must be"):
        independent_members([])
    with pytest.raises(ConfigError, match="list"):
        dropout_members(2, models=mlp())
    with pytest.raises(ConfigError, match="single DropoutMember"):
        resolve_members(Task(mlp()), dropout_members(1)[0])
