"""Scores save/load (safetensors, no pickle) and NumPy export."""

import builtins

import pytest
import torch

from datatrace import DataError, GradDotAttributor, MissingDependencyError, Scores, Task
from tests.models import classification_data, mlp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    values = torch.randn(3, 5, dtype=torch.float64).to(dtype)
    scores = Scores(
        values, torch.tensor([4, 0, 2, 9, 7]), torch.tensor([1, 2, 3]), "trak", {"proj_dim": 64}
    )
    path = tmp_path / "s.safetensors"
    scores.save(path)
    back = Scores.load(path)
    assert back.values.dtype == dtype and torch.equal(back.values, values)
    assert torch.equal(back.unit_ids, scores.unit_ids)
    assert torch.equal(back.query_ids, scores.query_ids)
    assert back.method == "trak" and back.config == {"proj_dim": 64}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left
    assert back.to_numpy().shape == (3, 5)


def test_attributor_scores_survive_a_round_trip(tmp_path):
    model = mlp()
    train, queries = classification_data(n=8), classification_data(n=3, seed=3)
    scores = GradDotAttributor(Task(model)).fit(train).attribute(queries)
    scores.save(tmp_path / "g.safetensors")
    back = Scores.load(tmp_path / "g.safetensors")
    assert torch.equal(back.values, scores.values) and back.config == scores.config
    assert torch.equal(back.topk(2).proponent_ids, scores.topk(2).proponent_ids)


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match="no scores file"):
        Scores.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="could not be read as a safetensors file"):
        Scores.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"values": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a datatrace scores file"):
        Scores.load(tmp_path / "other.safetensors")


def test_to_pandas_has_queries_as_rows_and_units_as_columns():
    pd = pytest.importorskip("pandas")
    values = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]], dtype=torch.float64)
    scores = Scores(values, torch.tensor([7, 3, 9]), torch.tensor([4, 1]), "grad-dot")
    df = scores.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert df.index.tolist() == [4, 1] and df.columns.tolist() == [7, 3, 9]
    assert (df.index.name, df.columns.name) == ("query", "unit")
    assert df.loc[1, 9] == -3.0 and df.to_numpy().dtype == "float64"
    assert torch.equal(torch.tensor(df.to_numpy()), values)


def test_to_pandas_without_pandas_names_the_package(monkeypatch):
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(MissingDependencyError, match="pip install pandas") as info:
        Scores(torch.zeros(1, 2)).to_pandas()
    assert isinstance(info.value, ImportError)  # `except ImportError` still catches it
