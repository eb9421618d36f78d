import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datatrace import (
    Checkpoint,
    ConfigError,
    DataError,
    GradDotAttributor,
    ModelError,
    NotFittedError,
    NumericalError,
    Task,
)
from datatrace.data import iter_batches
from datatrace.gradients import compute_per_sample_grads
from datatrace.scores import Scores, streaming_topk
from tests.models import classification_data, mlp


def test_shuffled_loader_is_refused():
    x, y = classification_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(DataError, match="shuffle=False"):
        GradDotAttributor(Task(mlp())).fit(loader)


def test_sequential_loader_dataset_tuple_and_dict_give_same_scores():
    model = mlp()
    x, y = classification_data()
    ref = GradDotAttributor(Task(model)).fit((x, y)).attribute((x, y)).values
    for train in (DataLoader(TensorDataset(x, y), batch_size=3), TensorDataset(x, y)):
        got = GradDotAttributor(Task(model)).fit(train).attribute((x, y)).values
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)

    class DictModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return self.inner(features)

    dm = DictModel(model).eval()
    got = (
        GradDotAttributor(Task(dm))
        .fit({"features": x, "labels": y})
        .attribute({"features": x, "labels": y})
    )
    torch.testing.assert_close(got.values, ref, rtol=1e-10, atol=0)


def test_batch_arity_mismatch():
    x, _ = classification_data()
    with pytest.raises(DataError, match="batch has 1 tensor"):
        compute_per_sample_grads(Task(mlp()), (x,))


def test_dict_batch_without_labels():
    x, _ = classification_data()
    with pytest.raises(DataError, match="no 'labels'"):
        compute_per_sample_grads(Task(mlp()), {"features": x})


def test_unknown_parameter_or_module_names():
    with pytest.raises(ModelError, match="'fc9' is neither a parameter nor a module"):
        Task(mlp(), params=["fc9"])
    with pytest.raises(ModelError, match="no modules of type"):
        Task(mlp(), module_types=[torch.nn.Conv2d])


def test_unknown_loss_and_target():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        Task(mlp(), loss="hinge")
    with pytest.raises(ConfigError, match="unknown target 'accuracy'"):
        Task(mlp(), target="accuracy")


def test_model_in_train_mode_is_refused():
    model = mlp().train()
    with pytest.raises(ModelError, match="train mode"):
        GradDotAttributor(Task(model)).fit(classification_data())


def test_nan_gradients_are_reported():
    x, y = classification_data()
    x[2, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN/inf"):
        compute_per_sample_grads(Task(mlp()), (x, y))


def test_empty_dataset():
    x, y = classification_data()
    with pytest.raises(DataError, match="empty"):
        list(iter_batches((x[:0], y[:0]), 4))
    with pytest.raises(DataError, match="empty"):
        GradDotAttributor(Task(mlp())).fit((x[:0], y[:0]))


def test_wrong_dtype_and_device():
    x, y = classification_data()
    with pytest.raises(DataError, match=r"dtype torch.float32 .* torch.float64"):
        compute_per_sample_grads(Task(mlp()), (x.float(), y))
    with pytest.raises(DataError, match="is on meta"):
        compute_per_sample_grads(Task(mlp()), (x.to("meta"), y))


def test_attribute_before_fit():
    with pytest.raises(NotFittedError, match=r"call attributor.fit\(train\) first"):
        GradDotAttributor(Task(mlp())).attribute(classification_data())
    with pytest.raises(NotFittedError):
        GradDotAttributor(Task(mlp())).self_attribute()


def test_unknown_setting_named():
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['dampening'\]"):
        GradDotAttributor(Task(mlp()), dampening=1.0)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1; got 0"):
        GradDotAttributor(Task(mlp()), batch_size=0)


def test_checkpoints_load_weights_only(tmp_path):
    model = mlp()
    path = tmp_path / "ok.pt"
    torch.save(mlp(seed=3).state_dict(), path)
    task = Task(model, checkpoints=[path])
    state = task.state(task.checkpoints[0])
    torch.testing.assert_close(state["0.weight"], mlp(seed=3).state_dict()["0.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    torch.save({"0.weight": Evil()}, bad)
    with pytest.raises(ModelError, match="weights_only=True"):
        Checkpoint(bad).load()
    with pytest.raises(ModelError, match="does not exist"):
        Checkpoint(tmp_path / "missing.pt").load()


def test_checkpoint_with_other_architecture():
    task = Task(mlp())
    with pytest.raises(ModelError, match="shape"):
        task.state(Checkpoint(mlp(hidden=7).state_dict()))
    with pytest.raises(ModelError, match="missing"):
        GradDotAttributor(task, members=[{"0.weight": torch.zeros(5, 6)}]).fit(
            classification_data()
        )


def test_loss_with_wrong_reduction_is_named():
    task = Task(mlp(), loss=lambda out, y: torch.nn.functional.cross_entropy(out, y))
    with pytest.raises(ModelError, match="reduction='none'"):
        compute_per_sample_grads(task, classification_data())


def test_scores_topk_streaming_equals_full():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 30, generator=g)
    full = Scores(values).topk(5)
    blocks = [(torch.arange(s, min(s + 7, 30)), values[:, s : s + 7]) for s in range(0, 30, 7)]
    stream = streaming_topk(blocks, 5)
    assert torch.equal(full.proponent_ids, stream.proponent_ids)
    assert torch.equal(full.opponent_ids, stream.opponent_ids)
    assert torch.equal(full.proponent_ids, values.topk(5, dim=1).indices)
    assert torch.equal(full.opponent_values, values.topk(5, dim=1, largest=False).values)
    with pytest.raises(DataError, match="k must be a positive integer"):
        Scores(values).topk(0)
    with pytest.raises(DataError, match="2-D"):
        Scores(values[0])
