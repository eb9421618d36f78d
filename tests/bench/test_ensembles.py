"""Ensembles in ``datatrace bench``: parsing, checks before training, cost columns, plots."""

import re

import pytest
import torch

from datatrace import ConfigError, ModelError
from datatrace.bench.benchmark import BenchConfig, run_benchmark
from datatrace.bench.cache import GroundTruthSpec, lds_ground_truth
from datatrace.bench.ensembles import EnsembleSpec, MemberBank, parse_ensembles
from datatrace.bench.plots import plot_pareto
from datatrace.bench.runner import MethodJob, run_method, run_method_isolated
from datatrace.bench.settings import get_setting
from datatrace.bench.settings.digits import DigitsMLP
from datatrace.cli import main
from datatrace.ensemble import dropout_members
from datatrace.lora import train_lora_members
from tests.bench.test_cache import Blobs
from tests.plot_checks import recorded_figures


@pytest.fixture(autouse=True)
def _one_thread():
    # Trainings on a loaded 2-core machine spin-wait with 2 threads (BenchConfig.threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ENSEMBLES = "independent:1,independent:2,dropout:2,lora:2:epochs=1"
# rank-4 adapters on digits-mlp's Linear layers 64->128, 128->64, 64->10, float32
ADAPTER_BYTES = 4 * 4 * ((64 + 128) + (128 + 64) + (64 + 10))


def test_parse_ensembles():
    specs = parse_ensembles(" independent:4, dropout:2:rate=0.2:layers=5+7 ,lora:3:rank=8:lr=0.001")
    assert specs == [
        EnsembleSpec("independent", 4),
        EnsembleSpec("dropout", 2, rate=0.2, layers=("5", "7")),
        EnsembleSpec("lora", 3, rank=8, lr=0.001),
    ]
    assert [s.label for s in specs] == [
        "independent:4",
        "dropout:2:rate=0.2:layers=5+7",
        "lora:3:rank=8:lr=0.001",
    ]
    assert specs[1].to_json() == {"kind": "dropout", "k": 2, "rate": 0.2, "layers": ["5", "7"]}
    assert specs[2].lora_option("epochs") == 5 and specs[2].lora_option("rank") == 8
    assert parse_ensembles("") == []


@pytest.mark.parametrize(
    "spec, match",
    [
        ("bagging:4", "unknown ensemble kind 'bagging'"),
        ("dropout", "needs its number of members: dropout:K"),
        ("dropout:0", "K >= 1"),
        ("independent:-2", "K >= 1"),
        ("lora:four", "K must be an int >= 1 (written lora:4); got 'four'"),
        ("independent:2:rate=0.1", "takes no option 'rate'"),
        ("dropout:2:rank=4", "takes no option 'rank'"),
        ("dropout:2:rate", "must look like key=value"),
        ("dropout:2:layers=3", "needs a rate: add :rate=0.1"),
        ("dropout:2:rate=1.5", "got 1.5"),
        ("lora:2:rank=0", "LoRA rank must be an int >= 1; got 0"),
        ("lora:2:lr=abc", "must be a number"),
        ("dropout:2,dropout:2", "given twice"),
    ],
)
def test_bad_ensemble_specs_are_clear_errors(spec, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        parse_ensembles(spec)


def test_specs_are_checked_against_the_model():
    cnn = get_setting("digits-cnn", size="small")  # no dropout layers
    with pytest.raises(ConfigError, match=r"no nn.Dropout layers.*dropout:4:rate=0.1:layers="):
        EnsembleSpec("dropout", 4).check(cnn)
    EnsembleSpec("dropout", 4, rate=0.1, layers=("5", "7")).check(cnn)  # injection is fine
    with pytest.raises(ModelError, match=r"layers \['fc9'\] are not modules"):
        EnsembleSpec("dropout", 4, rate=0.1, layers=("fc9",)).check(cnn)
    EnsembleSpec("dropout", 4).check(get_setting("digits-mlp", size="small"))
    with pytest.raises(ModelError, match=r"no nn\.Linear submodule"):
        EnsembleSpec("lora", 2).check(Blobs())  # the model is one Linear layer


@pytest.mark.parametrize(
    "ensembles, match",
    [("dropout:2", "no nn.Dropout layers"), ("bagging:2", "unknown ensemble kind")],
)
def test_bench_refuses_bad_ensembles_before_training(tmp_path, capsys, ensembles, match):
    argv = ["bench", "--setting", "digits-cnn", "--size", "small", "--cache", str(tmp_path)]
    assert main([*argv, "--ensembles", ensembles, "--quiet"]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no ground truth was built


def test_member_bank_trains_each_model_once(monkeypatch):
    setting = get_setting("digits-mlp", size="small")
    calls = []
    real = DigitsMLP.train_trajectory

    def counted(self, indices=None, seed=0):
        calls.append(seed)
        return real(self, indices, seed)

    model, trajectory = setting.train_trajectory(seed=0)
    monkeypatch.setattr(DigitsMLP, "train_trajectory", counted)
    bank = MemberBank(setting, trajectory, seed0_s=1.5)
    two = bank.cost(EnsembleSpec("independent", 2), reads_trajectory=False)
    three = bank.cost(EnsembleSpec("independent", 3), reads_trajectory=False)
    again = bank.cost(EnsembleSpec("independent", 2), reads_trajectory=True)
    assert calls == [1, 2]  # seed 0 is the bench's model; seeds 1 and 2 trained once each
    assert two.train_s == again.train_s > 1.5 and three.train_s > two.train_s
    assert [len(m.trajectory) for m in two.members] == [1, 1]  # final weights only
    assert [len(m.trajectory) for m in again.members] == [len(trajectory)] * 2  # TracIn
    assert again.weight_bytes == len(trajectory) * two.weight_bytes
    torch.testing.assert_close(two.members[0].final.load(), model.state_dict(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.manual_seed(0)
    setting = get_setting("digits-mlp", size="small")
    cfg = BenchConfig(
        setting=setting,
        methods=[("trak", {"proj_dim": 32}), ("grad-cos", {})],
        ensembles=parse_ensembles(ENSEMBLES),
        spec=GroundTruthSpec(m=6, seeds=1),
        tasks=("lds",),
        cache_dir=tmp_path_factory.mktemp("cache"),
        workers=1,
        isolate=False,
        progress=False,
    )
    outcome = run_benchmark(cfg)
    rows = {r["label"]: r for r in outcome.payload["rows"]}
    return outcome, rows


def test_bench_ensemble_rows_and_cost_columns(bench):
    outcome, rows = bench
    labels = [r["label"] for r in outcome.payload["rows"]]
    assert labels == [
        f"{m}{e}"
        for m in ("trak", "grad-cos")
        for e in ["", *(f" {s}" for s in ENSEMBLES.split(","))]
    ]
    for r in rows.values():
        assert "error" not in r
        assert r["train_s"] > 0 and r["serve_s"] > 0 and r["fit_s"] > 0
        assert r["serve_s"] == r["fit_s"] + r["attribute_s"]
        assert r["weight_bytes"] > 0 and r["bytes_stored"] > 0
        assert r["total_bytes"] == r["weight_bytes"] + r["bytes_stored"]
    for m in ("trak", "grad-cos"):
        plain = rows[m]
        assert plain["ensemble"] is None and plain["trainings"] == 1
        # one independent member is the plain method on the same model, exactly
        one = rows[f"{m} independent:1"]
        assert one["lds"] == plain["lds"]
        assert torch.equal(outcome.values[f"{m} independent:1"], outcome.values[m])
        two = rows[f"{m} independent:2"]
        assert two["trainings"] == 2 and two["train_s"] > plain["train_s"]
        assert two["weight_bytes"] == 2 * plain["weight_bytes"]
        assert two["bytes_stored"] == 2 * plain["bytes_stored"]
        assert not torch.equal(outcome.values[f"{m} independent:2"], outcome.values[m])
        # dropout: no training beyond the seed-0 model, no weights beyond it, 2x the features
        drop = rows[f"{m} dropout:2"]
        assert drop["ensemble"] == {"kind": "dropout", "k": 2}
        assert (drop["trainings"], drop["adapters"]) == (1, 0)
        assert drop["train_s"] == plain["train_s"]
        assert drop["weight_bytes"] == plain["weight_bytes"]
        assert drop["bytes_stored"] == 2 * plain["bytes_stored"]
        assert not torch.equal(outcome.values[f"{m} dropout:2"], outcome.values[m])
        # LoRA: one training plus two adapters, one model's weights plus the adapters
        lora = rows[f"{m} lora:2:epochs=1"]
        assert (lora["trainings"], lora["adapters"]) == (1, 2)
        assert lora["train_s"] > plain["train_s"]
        assert lora["weight_bytes"] == plain["weight_bytes"] + 2 * ADAPTER_BYTES
    # the same models serve every method: identical training cost per ensemble
    for label in ("independent:2", "dropout:2", "lora:2:epochs=1"):
        assert rows[f"trak {label}"]["train_s"] == rows[f"grad-cos {label}"]["train_s"]


def test_pareto_plots_draw_ensembles(bench, tmp_path):
    outcome, _ = bench
    rows = outcome.payload["rows"]
    with recorded_figures() as drawn:
        plot_pareto(rows, tmp_path / "serve.png", "serving")
        plot_pareto(rows, tmp_path / "train.png", "training", cost="train")
    assert (tmp_path / "serve.png").stat().st_size > 0 and (tmp_path / "train.png").exists()
    series = [
        f"{m}{s}"
        for m in ("trak", "grad-cos")
        for s in ("", " independent", " dropout", " lora:epochs=1")
    ]
    for title, word in (("serving", "fit + attribute"), ("training", "training")):
        axes = drawn[title]
        assert axes.legend == series and word in axes.xlabel and "LDS" in axes.ylabel
        # independent K = 1, 2 and one K = 2 for dropout and lora, per method
        assert sorted(axes.texts) == sorted(["K=1", "K=2", "K=2", "K=2"] * 2)
    with pytest.raises(ConfigError, match="cost must be 'serve' or 'train'"):
        plot_pareto(rows, tmp_path / "x.png", "x", cost="memory")


def test_isolated_run_takes_dropout_and_lora_members(tmp_path):
    setting = get_setting("digits-mlp", size="small")
    gt = lds_ground_truth(
        setting, GroundTruthSpec(m=4, seeds=1), cache_dir=tmp_path, progress=False
    )
    model, trajectory = setting.train_trajectory(seed=0)
    lora = train_lora_members(setting.make_task(model), setting.data.train, 1, epochs=1)
    job = MethodJob(
        setting=setting,
        method="grad-dot",
        grid=[{}],
        model_state=model.state_dict(),
        trajectory=trajectory,
        subsets=gt.subsets,
        val_targets=gt.targets[:, : setting.n_val],
        members=[*dropout_members(1), *lora],  # kinds may be mixed
    )
    here, there = run_method(job), run_method_isolated(job, threads=1)
    assert there.values is not None and here.values is not None
    torch.testing.assert_close(there.values, here.values, rtol=1e-4, atol=1e-5)  # float32
    plain = run_method(MethodJob(**{**vars(job), "members": None}))
    assert not torch.allclose(plain.values, here.values)


def test_dropout_models_option_trains_and_counts_each_model():
    """dropout:K:models=M: masks round robin over the models of seeds 0..M-1."""
    spec = parse_ensembles("dropout:3:models=2")[0]
    assert spec.models == 2 and spec.label == "dropout:3:models=2"
    with pytest.raises(ConfigError, match="dropout models must be an int >= 1; got 0"):
        EnsembleSpec("dropout", 2, models=0)
    with pytest.raises(ConfigError, match="takes no option"):
        parse_ensembles("lora:2:models=2")
    setting = get_setting("digits-mlp", size="small")
    bank = MemberBank(setting, setting.train_trajectory(seed=0)[1], seed0_s=0.5)
    cost = bank.cost(spec, reads_trajectory=False)
    assert (len(cost.members), cost.trainings) == (3, 2) and cost.train_s > 0.5
    states = [m.final.load() for m in cost.members]
    first = next(iter(states[0]))
    # members 0 and 2 mask the seed-0 model, member 1 the seed-1 model
    assert torch.equal(states[0][first], states[2][first])
    assert not torch.equal(states[0][first], states[1][first])
