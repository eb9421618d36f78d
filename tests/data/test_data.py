"""Data forms the shared loop accepts (datatrace.data), and what it says about the others."""

import pytest
import torch

from datatrace import DataError, GradDotAttributor, Task, make_attributor
from datatrace.data import as_data, iter_batch_range, iter_batches, num_examples
from tests.models import classification_data, mlp


class DictModel(torch.nn.Module):
    """The tests' MLP, called with a dict batch's ``features``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features)


class Rows:
    """A plain map-style dataset: ``__len__`` and ``__getitem__`` returning dict rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def case():
    x, y = classification_data(n=10)
    x = x.float()  # datasets' torch format gives float32 rows (as models usually are)
    task = Task(DictModel(mlp().float()).eval())
    ref = GradDotAttributor(task, batch_size=4).fit({"features": x, "labels": y})
    return task, x, y, ref.attribute({"features": x, "labels": y}).values


def test_duck_typed_map_style_dataset_is_accepted(case):
    task, x, y, ref = case
    rows = Rows(x, y)
    assert num_examples(rows) == 10
    got = GradDotAttributor(task, batch_size=4).fit(rows).attribute(rows).values
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    ranged = [(o, b["labels"].tolist()) for o, b in iter_batch_range(rows, 4, 1, 3)]
    assert ranged == [(4, y[4:8].tolist()), (8, y[8:].tolist())]


def test_hugging_face_dataset_is_accepted_directly(case):
    datasets = pytest.importorskip("datasets")
    task, x, y, ref = case
    ds = datasets.Dataset.from_dict({"features": x.numpy(), "labels": y.numpy()})
    batch = next(iter_batches(ds, 4))
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (4, 6)
    got = GradDotAttributor(task, batch_size=4).fit(ds).attribute(ds)
    torch.testing.assert_close(got.values, ref, rtol=1e-6, atol=1e-9)
    # self-influence and a method that re-reads training rows by index (Source)
    attr = make_attributor("source", task, batch_size=4, horizon=10.0).fit(ds)
    plain = make_attributor("source", task, batch_size=4, horizon=10.0)
    plain.fit({"features": x, "labels": y})
    torch.testing.assert_close(attr.self_attribute(), plain.self_attribute(), rtol=1e-6, atol=1e-9)


def test_text_column_advice_works(case):
    datasets = pytest.importorskip("datasets")
    task, x, y, ref = case
    ds = datasets.Dataset.from_dict(
        {"features": x.numpy(), "labels": y.numpy(), "text": [f"ex{i}" for i in range(10)]}
    )
    with pytest.raises(DataError, match=r"dataset.remove_columns\(\['text'\]\)"):
        GradDotAttributor(task).fit(ds)
    ds = ds.remove_columns(["text"])  # the advice, as written
    got = GradDotAttributor(task, batch_size=4).fit(ds).attribute(ds).values
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_refusals_do_not_contradict_themselves_and_their_advice_works(case):
    _, x, y, ref = case
    with pytest.raises(DataError, match="cannot use data of type object; pass a DataLoader"):
        as_data(object())
    with pytest.raises(DataError, match="has no len\\(\\) or indexing"):
        as_data(iter(Rows(x, y)))
    plain = Task(mlp().float())
    with pytest.raises(DataError, match=r"torch.from_numpy\(x\)"):
        GradDotAttributor(plain).fit(x.numpy())
    xs = torch.from_numpy(x.numpy())  # the advice, as written
    got = GradDotAttributor(plain, batch_size=4).fit((xs, y)).attribute((xs, y)).values
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
