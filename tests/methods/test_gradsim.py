"""Grad-Dot, Grad-Cos and TracIn: the factored path equals the flat-gradient path (float64)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from datatrace import Checkpoint, ConfigError, ModelError, Task, make_attributor
from datatrace.gradients.factored import FactorCodec
from tests.models import TinyLM, bias_free_mlp, classification_data, mlp

RTOL = 1e-10
METHODS = ["grad-dot", "grad-cos", "tracin"]


def _lm() -> nn.Module:
    # d = 16, vocab 64: at T = 3 q/k/v keep gradient matrices and the head its factors
    torch.manual_seed(0)
    return TinyLM(vocab=64, d=16).double().eval()


def _ids(n: int, t: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": row} for row in torch.randint(0, 64, (n, t), generator=g)]


def _ragged(*parts: list[dict[str, torch.Tensor]]) -> DataLoader:
    # batches of 4 examples of equal length; lengths differ between batches
    return DataLoader([ex for part in parts for ex in part], batch_size=4)


def _trajectory(model: nn.Module) -> list[Checkpoint]:
    g = torch.Generator().manual_seed(5)
    state = model.state_dict()
    moved = {
        k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()
    }
    return [
        Checkpoint(moved, step=1, learning_rate=0.3),
        Checkpoint(state, step=2, learning_rate=0.1),
    ]


LM = {"loss": "lm", "module_types": (nn.Linear,)}
# model, Task settings, train, queries
CASES = {
    "mlp": lambda: (mlp(), {}, classification_data(n=12), classification_data(n=5, seed=7)),
    "linear-bias-free": lambda: (
        bias_free_mlp(),
        {"params": ["0.weight", "2.bias", "4.weight", "4.bias"]},  # layer 2: its bias only
        classification_data(n=12),
        classification_data(n=5, seed=7),
    ),
    "tiny-lm": lambda: (
        _lm(),
        LM,
        DataLoader(_ids(8, 3, 0), batch_size=4),
        DataLoader(_ids(6, 3, 1), batch_size=4),
    ),
    "tiny-lm-ragged": lambda: (
        _lm(),
        LM,
        _ragged(_ids(4, 3, 0), _ids(4, 2, 2), _ids(2, 3, 3)),
        _ragged(_ids(4, 2, 1), _ids(3, 3, 4)),
    ),
}


def _build(method_id: str, model: nn.Module, task_kwargs: dict, **kwargs):
    if method_id == "tracin":
        task_kwargs = {**task_kwargs, "checkpoints": _trajectory(model)}
    return make_attributor(method_id, Task(model, **task_kwargs), batch_size=4, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method_id", METHODS)
def test_factored_equals_flat_gradients(method_id, case):
    model, task_kwargs, train, queries = CASES[case]()
    auto = _build(method_id, model, task_kwargs).fit(train)
    flat = _build(method_id, model, task_kwargs, train_features="gradients").fit(train)
    assert isinstance(auto._contexts[0].fitted.codec, FactorCodec)  # auto: all Linear
    assert flat._contexts[0].fitted.codec is None
    a, b = auto.attribute(queries).values, flat.attribute(queries).values
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13)
    torch.testing.assert_close(auto.self_attribute(), flat.self_attribute(), rtol=RTOL, atol=1e-13)
    stored = sum(f.numel() for f in auto._contexts[0].features)
    assert stored < sum(f.numel() for f in flat._contexts[0].features)


def test_long_sequences_fall_back_to_gradient_matrices_per_layer():
    model, task_kwargs, train, _ = CASES["tiny-lm"]()
    attr = _build("grad-dot", model, task_kwargs).fit(train)
    codec = attr._contexts[0].fitted.codec
    kinds = [len(part) for part in codec.decode(attr._contexts[0].features[0])]
    assert kinds == [1, 1, 1, 2]  # q, k, v: T^2 (I' + O) >= O I'; head: factors


def test_auto_keeps_flat_gradients_where_factors_do_not_apply():
    x, y = classification_data(n=8)
    torch.manual_seed(0)
    lm_task = Task(_lm(), loss="lm")  # the embedding and LayerNorm are tracked too
    lm = make_attributor("grad-dot", lm_task).fit(DataLoader(_ids(8, 3, 0), batch_size=4))
    projected = make_attributor("grad-dot", Task(mlp()), projector="gaussian", proj_dim=8)
    grouped = make_attributor("grad-cos", Task(mlp()), groups=[0, 0, 1, 1, 2, 2, 3, 3])
    for attr in (lm, projected.fit((x, y)), grouped.fit((x, y))):
        assert attr._contexts[0].fitted.codec is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_features": "fast"}, "train_features must be"),
        ({"train_features": "factored", "projector": "sjlt"}, "needs projector='none'"),
        ({"train_features": "factored", "engine": "functional"}, "engine != 'functional'"),
        ({"train_features": "factored", "groups": [0, 1] * 6}, "cannot be summed"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_attributor("grad-dot", Task(mlp()), **kwargs)


def test_factored_refuses_parameters_outside_linear_layers():
    with pytest.raises(ModelError, match=r"emb\.weight"):
        make_attributor("tracin", Task(_lm(), loss="lm"), train_features="factored")
