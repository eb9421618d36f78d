"""The hook-based path never materialises anything near n_train x n_params."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from datatrace import (
    Checkpoint,
    GradCosAttributor,
    GradDotAttributor,
    InfluenceAttributor,
    Task,
    TracInAttributor,
    TRAKAttributor,
)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()
    n_train = 2048
    x, y = torch.randn(n_train, 32), torch.randint(0, 10, (n_train,))
    n_params = sum(p.numel() for p in model.parameters())
    return model, (x, y), (x[:8], y[:8]), n_train * n_params // 8


@pytest.mark.parametrize(
    "make",
    [
        lambda m: TRAKAttributor(
            Task(m, target="margin"), projector="sjlt", proj_dim=256, batch_size=16
        ),
        lambda m: TRAKAttributor(
            Task(m, target="margin"), projector="factored", proj_dim=64, batch_size=16
        ),
        lambda m: GradDotAttributor(Task(m), projector="gaussian", proj_dim=128, batch_size=16),
        lambda m: InfluenceAttributor(
            Task(m), curvature="fisher", projector="rademacher", proj_dim=128, batch_size=16
        ),
        # unprojected, exact: factored features (the default for Linear layers); at batch 256
        # flat gradients would be (256, n_params), exactly the limit
        lambda m: GradDotAttributor(Task(m), batch_size=256),
        lambda m: GradCosAttributor(Task(m), batch_size=256),
        lambda m: TracInAttributor(
            Task(
                m,
                checkpoints=[Checkpoint(m.state_dict(), step=s, learning_rate=0.1) for s in (1, 2)],
            ),
            batch_size=256,
        ),
    ],
    ids=[
        "trak-sjlt",
        "trak-factored",
        "grad-dot-gaussian",
        "if-fisher-rademacher",
        "grad-dot-factored",
        "grad-cos-factored",
        "tracin-factored",
    ],
)
def test_no_tensor_reaches_an_eighth_of_n_train_times_n_params(make):
    model, train, queries, limit = _setup()
    attributor = make(model)
    with LargestTensor() as watch:
        attributor.fit(train)
        attributor.attribute(queries)
    assert watch.largest < limit, (watch.largest, watch.op, limit)


def test_watch_detects_materialisation():
    model, train, _, limit = _setup()
    with LargestTensor() as watch:
        GradDotAttributor(Task(model), batch_size=2048, train_features="gradients").fit(train)
    assert watch.largest >= limit
