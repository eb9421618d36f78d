"""``datatrace bench --question``: option parsing, and every question run at a tiny size."""

import json

import pytest

from datatrace import ConfigError
from datatrace.bench.questions import QUESTIONS
from datatrace.bench.questions.groups import GroupSpeedConfig
from datatrace.bench.questions.scale import ScaleConfig
from datatrace.cli import main
from datatrace.cli_specs import parse_question
from datatrace.methods import hooks
from tests.bench.test_cache import Blobs  # registers "test-blobs"
from tests.bench.test_mislabel import Wide  # registers "test-wide"

assert Blobs and Wide


def test_parse_question_reads_options_by_their_declared_type():
    name, config = parse_question("scale:job=million:configs=grad-dot,if-ekfac:n-train=300")
    assert name == "scale"
    assert config == ScaleConfig(job="million", configs=("grad-dot", "if-ekfac"), n_train=300)
    _, config = parse_question("group-speed:sizes=4,16:skip_kmeans_cost=true:setting=a:b")
    assert config == GroupSpeedConfig(sizes=(4, 16), skip_kmeans_cost=True, setting="a:b")
    assert parse_question("scale:device=cuda:1")[1].device == "cuda:1"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("scales", r"unknown question 'scales'; choose from \[.*'scale'"),
        ("scale:job", "must look like key=value"),
        ("scale:jobs=million", r"unknown option 'jobs' of question 'scale'; its options are"),
        ("scale:job=billion", r"job='billion' is not one of \['mlp1m', 'million', 'gpt2'\]"),
        ("speed-grads:models=small,huge", r"models='huge' is not one of"),
        ("scale:n_train=many", r"option n_train of question 'scale' takes .*; got 'many'"),
    ],
)
def test_bad_question_specs_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_question(spec)


def test_questions_lists_every_question_with_its_defaults(capsys):
    assert main(["questions"]) == 0
    out = capsys.readouterr().out
    for name in QUESTIONS:
        assert f"\n{name}: " in f"\n{out}"
    assert "    proj_dims=128,1024\n" in out and "    job=mlp1m\n" in out


def test_question_errors_are_one_line(capsys):
    assert main(["bench", "--question", "scale:job=billion"]) == 2
    assert capsys.readouterr().err.startswith("datatrace: error: job='billion'")
    assert main(["bench", "--question", "store-write", "--threads", "0"]) == 2
    assert "--threads must be an integer >= 1" in capsys.readouterr().err


def _run(tmp_path, spec, *extra):
    """``datatrace bench --question spec --json ...``: the JSON it wrote."""
    path = tmp_path / "out.json"
    assert main(["bench", "--question", spec, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def test_store_write(tmp_path, capsys):
    out = _run(tmp_path, "store-write:shards=4:rows=2:dim=3")
    assert len(out["quarters_s"]) == 4 and out["reopen_s"] > 0
    assert "reopen (folds the journal into the manifest)" in capsys.readouterr().out


def test_speed_grads_and_methods(tmp_path, capsys):
    spec = "speed-grads:n=8:batch_sizes=4:models=small:proj_dims=8:repeats=1"
    rows = _run(tmp_path, spec, "--threads", "1")
    assert [r["what"] for r in rows] == [
        "per-sample factors only",
        "sjlt k=8",
        "gaussian k=8",
        "rademacher k=8",
        "factored 16x16/layer",
        "factored 32x32/layer",
    ]
    assert all(r["ratio"] == r["seconds"] / r["plain_seconds"] for r in rows)
    assert "| 64-128-64-10 | 4 | sjlt k=8 |" in capsys.readouterr().out
    rows = _run(tmp_path, "speed-methods:n_train=20:n_query=3:repeats=1:methods=grad-cos")
    assert [r["method"] for r in rows] == ["grad-cos", "grad-cos"]
    assert all(r["total"] == pytest.approx(r["fit"] + r["attribute"]) for r in rows)


def test_scale_runs_each_config_in_its_own_process(tmp_path, capsys):
    rows = _run(tmp_path, "scale:job=million:n_train=200:configs=grad-dot", "--threads", "1")
    (row,) = rows
    assert row["config"] == "grad-dot" and row["n_train"] == 200 and row["threads"] == 1
    assert row["n_params"] == 2762 and row["store_bytes"] > 0 and row["peak_rss_mib"] > 0
    assert "attribute_s" not in row  # the million job does not hold n_query x n_train
    assert "| grad-dot | grad-dot | batch_size=8192 | 200 |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"unknown config\(s\) \['trak-sjlt'\] of job"):
        parse_question("scale:job=million:configs=trak-sjlt")


def test_store_fit(tmp_path, capsys):
    out = _run(tmp_path, "store-fit:n_train=100:config=grad-dot:repeats=2")
    assert [len(v) for v in out["seconds"].values()] == [2, 2]
    assert "best: memory" in capsys.readouterr().out


def test_group_speed_restores_what_it_timed(tmp_path):
    before = hooks.compute_per_sample_grads
    spec = "group-speed:setting=test-blobs:sizes=4:methods=grad-dot:projectors=none"
    out = _run(tmp_path, spec + ":skip_kmeans_cost=true")
    assert hooks.compute_per_sample_grads is before
    assert [(r["group_size"], r["n_units"]) for r in out["rows"]] == [(0, 24), (4, 6)]
    assert out["rows"][0]["phases"]["gradients"] > 0 and out["floor_s"] > 0


def test_group_lds_and_tasks(tmp_path):
    out = _run(tmp_path, "group-lds:setting=test-blobs:m=4:sizes=4")  # at 4: random, kmeans-grad
    assert [r["grouper"] for r in out["rows"]] == ["random", "kmeans-grad"] * 2
    assert out["rows"][0]["n_groups"] == 6
    assert [c["group_size"] for c in out["comparisons"]] == [4]
    spec = "group-tasks:task=prune:setting=test-blobs:fractions=1.0,0.5"
    out = _run(tmp_path, spec + ":train_seeds=1:random_seeds=1:method=grad-dot")
    assert out["prune"]["size1"]["n_kept"] == [24, 12]
    out = _run(tmp_path, "group-tasks:task=mislabel:setting=test-wide")
    assert set(out["mislabel"]["size4"]) >= {"self-influence trak", "random (mean of 50)"}
    with pytest.raises(ConfigError, match="fractions kept, strictly decreasing"):
        parse_question("group-tasks:fractions=0.2,0.6")


def test_half_precision(tmp_path):
    rows = _run(tmp_path, "half-precision:settings=test-blobs:methods=if-kfac")
    assert [(r["weights"], r["compute"]) for r in rows] == [
        ("bfloat16", "model's"),
        ("bfloat16", "float32"),
        ("float16", "model's"),
        ("float16", "float32"),
    ]
    assert all(0 <= r["relative_error"] < 1 for r in rows)
