"""Devices: validation of ``device=``, batches moved by the loop, refused by low-level calls.

The suite runs without a GPU. A second device is stood in for by the meta device where only
tensor placement matters (moving a batch, the refusal message); the real CPU/GPU comparison
is ``benchmarks/gpu_check.py`` (its ``--device cpu`` run is tested in
``tests/methods/test_dtypes.py``).
"""

import pytest
import torch

from datatrace import GradDotAttributor, Task, TRAKAttributor
from datatrace.devices import move_to_device, resolve_device
from datatrace.errors import ConfigError, DataError, ModelError
from datatrace.gradients import compute_per_sample_grads
from tests.models import classification_data, mlp

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
META = torch.device("meta")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda_is_refused_naming_value_and_fix(device):
    with pytest.raises(ConfigError, match=r"device=.*cuda.* CUDA is not available.*device='cpu'"):
        resolve_device(device)
    model = mlp()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Task(model, device=device)
    assert next(model.parameters()).device.type == "cpu"  # nothing moved
    with pytest.raises(ConfigError, match="CUDA is not available"):
        GradDotAttributor(Task(model), device=device)  # at __init__, not in fit


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"device='gpu' is not a device torch understands"),
        ("meta", r"kind 'meta' \(meta tensors hold no data"),
        (0, r"device must be a string .* got 0 \(int\)"),
        (True, r"device must be a string"),
    ],
)
def test_bad_device_values_are_refused(device, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)
    with pytest.raises(ConfigError, match=message):
        GradDotAttributor(Task(mlp()), device=device)


def test_cpu_spellings_resolve_to_the_cpu():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_explicit_cpu_equals_default():
    train, queries = classification_data(n=12), classification_data(n=3, seed=4)
    model = mlp()
    default = TRAKAttributor(Task(model), proj_dim=8).fit(train).attribute(queries).values
    for device in ("cpu", torch.device("cpu")):
        task = Task(model, device=device)
        assert task.model is model and task.device == torch.device("cpu")  # moved in place
        attr = TRAKAttributor(task, proj_dim=8, device=device)
        assert torch.equal(attr.fit(train).attribute(queries).values, default)


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ModelError, match=r"meta device.*to_empty"):
        Task(model)


def test_low_level_call_refuses_batch_on_another_device_naming_both_and_fix():
    x, y = classification_data()
    with pytest.raises(DataError, match=r"is on meta but the model is on cpu.*x\.to\('cpu'\)"):
        compute_per_sample_grads(Task(mlp()), (x.to(META), y))
    with pytest.raises(DataError, match="is on meta but the model is on cpu"):
        compute_per_sample_grads(Task(mlp()), (x, y.to(META)))


def test_moving_batches_moves_every_tensor_to_the_model_device(monkeypatch):
    """Under ``moving_batches`` a CPU batch is moved to the model's device (meta stands in
    for a GPU), and the device check is off; outside it the batch is refused."""
    monkeypatch.setattr(Task, "device", property(lambda self: META))
    x, y = classification_data()
    batch = {"x": x, "labels": y, "attention_mask": torch.ones(10, 2)}
    task = Task(mlp(), batch_to_inputs=lambda b: ((b["x"],), {}))
    with pytest.raises(DataError, match="is on cpu but the model is on meta"):
        task.check_batch(batch)
    with task.moving_batches():
        task.check_batch(batch)
        split = task.split_batch(batch)
    assert split.args[0].device == META and split.labels.device == META
    assert split.mask is not None and split.mask.device == META
    assert task.split_batch(batch).args[0].device.type == "cpu"  # off again after the block


def test_move_to_device_keeps_structure():
    t = torch.ones(2)
    out = move_to_device({"a": (t, [t, 3]), "b": None}, META)
    assert out["a"][0].device == META and out["a"][1][0].device == META
    assert out["a"][1][1] == 3 and out["b"] is None and isinstance(out["a"], tuple)


def test_scores_on_model_device_in_working_dtype_ids_on_cpu():
    train = classification_data(n=8)
    for dtype in (torch.float64, torch.float32):
        model = mlp().to(dtype)
        data = (train[0].to(dtype), train[1])
        scores = GradDotAttributor(Task(model)).fit(data).attribute(data)
        assert scores.values.dtype == dtype and scores.values.device == torch.device("cpu")
        assert scores.unit_ids.device.type == "cpu" and scores.query_ids.device.type == "cpu"


def test_model_moved_after_fit_is_refused_or_moved_back(monkeypatch):
    train = classification_data(n=8)
    plain = GradDotAttributor(Task(mlp())).fit(train)
    pinned = GradDotAttributor(Task(mlp()), device="cpu").fit(train)
    expected = plain.attribute(train).values
    where = {"device": META}  # the model "moved" to another device after fit
    moves = []

    def fake_to(self, device):
        moves.append(device)
        where["device"] = torch.device("cpu")
        return self

    monkeypatch.setattr(Task, "device", property(lambda self: where["device"]))
    monkeypatch.setattr(Task, "to", fake_to)
    with pytest.raises(ModelError, match=r"on meta but GradDotAttributor was fitted on cpu"):
        plain.attribute(train)
    assert torch.equal(pinned.attribute(train).values, expected)
    assert moves == [torch.device("cpu")]
