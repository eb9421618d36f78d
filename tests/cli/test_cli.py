"""The ``datatrace`` command line."""

import json
import re
from pathlib import Path

import pytest
import torch

from datatrace import ConfigError
from datatrace.bench.benchmark import DEFAULT_METHODS, grid_for
from datatrace.cli import build_parser, main, parse_methods
from datatrace.methods import METHODS
from tests.bench.test_cache import Blobs  # registers "test-blobs"
from tests.bench.test_mislabel import Wide  # registers "test-wide"
from tests.plot_checks import recorded_figures

assert Blobs and Wide


def test_parse_methods():
    assert parse_methods("trak:proj_dim=64:relative_damping=0.1,grad-cos") == [
        ("trak", {"proj_dim": 64, "relative_damping": 0.1}),
        ("grad-cos", None),
    ]
    with pytest.raises(ConfigError, match="unknown method 'trek'"):
        parse_methods("trek")
    with pytest.raises(ConfigError, match="key=value"):
        parse_methods("trak:proj_dim")


def _bench(tmp_path, methods, *extra, setting="test-blobs", isolate=False):
    """Run ``datatrace bench`` on a tiny test setting with a small ground truth.

    ``methods`` None leaves ``--methods`` out (the default list).
    """
    argv = ["bench", "--setting", setting, "--m", "6", "--seeds", "2", "--workers", "1"]
    argv += ["--quiet", "--cache", str(tmp_path / "cache"), *extra]
    if methods is not None:
        argv += ["--methods", methods]
    return main(argv if isolate else [*argv, "--in-process"])


def _which_method_ids() -> set[str]:
    """Method ids named in the README's "Which method?" part (up to "## Two commands")."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    paragraph = readme.split("Which method?", 1)[1].split("## Two commands", 1)[0]
    return {name for name in re.findall(r"`([a-z-]+)`", paragraph) if name in METHODS}


def test_default_methods_include_the_recommended_ones():
    assert build_parser().parse_args(["bench"]).methods == DEFAULT_METHODS
    default = {name for name, _ in parse_methods(DEFAULT_METHODS)}
    # what the README recommends, and the baselines its numbers are compared with
    assert {
        "if-ekfac",
        "if-kfac",
        "logra",
        "source",
        "trak",
        "grad-cos",
        "tracin",
        "rps",
    } <= default
    recommended = _which_method_ids()
    assert {"if-kfac", "if-ekfac"} <= recommended  # the paragraph still names its methods
    assert recommended <= default, f"README recommends {recommended - default}, not run by default"


@pytest.mark.filterwarnings("ignore:Source's closed form models SGD")  # test-blobs uses Adam
def test_default_bench_runs_every_default_method(tmp_path):
    out = tmp_path / "bench.json"
    assert _bench(tmp_path, None, "--tasks", "lds", "--json", str(out)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [name for name, _ in parse_methods(DEFAULT_METHODS)]
    for row in rows:
        assert "error" not in row, row
        grid = grid_for("test-blobs", row["method"])
        assert row["setting"] in grid and len(row["grid"]) == len(grid)
        assert len(row["per_query_lds"]) == 6 and -1 <= row["lds"] <= 1


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _bench(tmp_path, "grad-dot,trak:proj_dim=4,rps", "--json", str(out))
    assert code == 0
    text = capsys.readouterr().out
    assert "grad-dot" in text and "noise ceiling" in text and "random scores" in text
    assert "LDS on test queries under protocol lds-half" in text
    payload = json.loads(out.read_text())
    assert payload["protocol"] == "lds-half"
    assert payload["ground_truth"] == {
        "protocol": "lds-half",
        "m": 6,
        "alpha": 0.5,
        "seeds": 2,
        "subset_seed": 0,
    }
    methods = [r["method"] for r in payload["rows"]]
    assert methods == ["grad-dot", "trak", "rps"]
    for row in payload["rows"]:
        assert row["protocol"] == "lds-half"
        assert -1 <= row["lds"] <= 1 and row["ci"][0] <= row["lds"] <= row["ci"][1]
        assert row["fit_s"] >= 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bench", "--setting", "nope"], "nope"),
        (["bench", "--setting", "test-blobs", "--methods", "bogus"], "unknown method"),
        (["groundtruth", "--setting", "test-blobs", "--alpha", "2"], "alpha"),
        (["groundtruth", "--setting", "test-blobs", "--m", "1"], "m "),
        (["groundtruth", "--setting", "test-blobs", "--seeds", "0"], "seeds"),
        (["bench", "--setting", "test-blobs", "--tasks", "lds,bogus"], "unknown task(s) ['bogus']"),
        (["bench", "--setting", "test-blobs", "--mislabel-p", "1.5"], "got 1.5"),
        (["bench", "--setting", "test-blobs", "--loo-points", "1"], "n_points"),
        (["bench", "--setting", "test-blobs", "--removal-ks", "5,2"], "strictly increasing"),
        (["bench", "--setting", "test-blobs", "--removal-ks", "a"], "comma-separated ints"),
        (["bench", "--setting", "test-blobs", "--threads", "0"], "threads must be an int >= 1"),
        (["bench", "--setting", "test-blobs", "--removal-queries", "0"], "removal_queries"),
        (["bench", "--setting", "test-blobs", "--protocol", "lds"], "unknown protocol 'lds'"),
        (["bench", "--setting", "test-blobs", "--protocol", "fixed-seed-drop"], "the fraction"),
        (["groundtruth", "--setting", "test-blobs", "--protocol", "fixed-seed-drop:2"], "got 2"),
        (
            [
                "bench",
                "--setting",
                "test-blobs",
                "--protocol",
                "fixed-seed-drop:0.1",
                "--seeds",
                "2",
            ],
            "--seeds belong(s) to the lds-half protocol",
        ),
        (
            ["groundtruth", "--setting", "test-blobs", "--protocol", "fixed-seed-drop:0.01"],
            "drops round(0.01 x 24) = 0 of the 24 training examples",
        ),
        (
            [
                "groundtruth",
                "--setting",
                "test-blobs",
                "--protocol",
                "fixed-seed-drop:0.1",
                "--verify",
            ],
            "--verify checks lds-half ground truth",
        ),
        (
            [
                "bench",
                "--setting",
                "digits-lr",
                "--size",
                "small",
                "--protocol",
                "fixed-seed-drop:0.1",
            ],
            "setting 'digits-lr' records no replay recipe",
        ),
    ],
)
def test_bad_input_is_a_clear_error(argv, match, capsys, tmp_path):
    assert main([*argv, "--cache", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(
        [
            "bench",
            "--setting",
            "test-blobs",
            "--json",
            str(blocker / "sub" / "x.json"),
            "--cache",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "cannot write" in capsys.readouterr().err


def test_groundtruth_with_one_seed_has_no_noise_ceiling(tmp_path, capsys):
    argv = ["groundtruth", "--setting", "test-blobs", "--m", "2", "--seeds", "1"]
    assert main([*argv, "--workers", "1", "--cache", str(tmp_path), "--quiet"]) == 0
    assert (
        "2 subsets x 1 seeds, 10 queries; noise ceiling — (needs --seeds 2"
        in capsys.readouterr().out
    )


def test_groundtruth_fixed_seed_drop(tmp_path, capsys):
    argv = ["groundtruth", "--setting", "test-blobs", "--protocol", "fixed-seed-drop:0.1"]
    assert main([*argv, "--m", "3", "--workers", "1", "--cache", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 drop sets of 2 examples (seed-0 run replayed), 10 queries" in text
    assert "[protocol fixed-seed-drop:0.1]" in text
    assert [p.name.split("-", 2)[2] for p in tmp_path.iterdir()] == [
        f"{Blobs().recipe_hash()}-drop0.1-m3-r0"
    ]


def test_bench_fixed_seed_drop_end_to_end(tmp_path, capsys):
    """The tiny Adam setting under fixed-seed-drop: unrolled predicts the drops' effects."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--setting", "test-blobs", "--protocol", "fixed-seed-drop:0.25", "--m", "8"]
    argv += ["--methods", "unrolled,grad-dot", "--tasks", "lds", "--workers", "1", "--quiet"]
    argv += ["--cache", str(tmp_path / "cache"), "--json", str(out), "--in-process"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "test-blobs: LDS on test queries under protocol fixed-seed-drop:0.25" in text
    assert "\nnoise ceiling" not in text and "so there is no noise ceiling" in text
    payload = json.loads(out.read_text())
    assert payload["protocol"] == "fixed-seed-drop:0.25" and payload["noise_ceiling"] is None
    assert payload["ground_truth"] == {
        "protocol": "fixed-seed-drop:0.25",
        "fraction": 0.25,
        "m": 8,
        "subset_seed": 0,
    }
    rows = {r["method"]: r for r in payload["rows"]}
    assert all(r["protocol"] == "fixed-seed-drop:0.25" for r in rows.values())
    assert rows["unrolled"]["lds"] > 0.8, rows["unrolled"]["per_query_lds"]


def test_settings_lists_registered(capsys):
    assert main(["settings"]) == 0
    text = capsys.readouterr().out
    for name in ("digits-lr", "digits-mlp", "digits-cnn", "breast-cancer-mlp", "pydoc-charlm"):
        assert name in text


def test_bench_writes_labelled_plots(tmp_path):
    from PIL import Image  # matplotlib depends on pillow

    with recorded_figures() as drawn:
        code = _bench(tmp_path, "grad-dot,rps", "--out", str(tmp_path / "out"))
    assert code == 0
    for name in ("pareto.png", "lds_per_query.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    assert not (tmp_path / "out" / "pareto_training.png").exists()  # no ensemble: no plot
    pareto = drawn["test-blobs: efficacy vs cost"]
    assert pareto.xlabel and pareto.ylabel and pareto.legend == ["grad-dot", "rps"]
    dist = drawn["test-blobs: per-query LDS"]
    assert dist.xlabel and dist.ylabel


def test_bench_mislabel_loo_and_cost_columns(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _bench(
        tmp_path,
        "grad-dot",
        "--json",
        str(out),
        "--loo-points",
        "4",
        setting="test-wide",
        isolate=True,
    )
    assert code == 0
    text = capsys.readouterr().out
    for column in ("mislabel AUROC", "LOO r", "slope", "peak mem", "stored", "training loss"):
        assert column in text
    for column in ("train s", "serve s", "weights"):
        assert column in text
    payload = json.loads(out.read_text())
    assert payload["mislabel"]["memorised"] and payload["mislabel"]["n_flipped"] == 2
    assert 0 <= payload["mislabel"]["training_loss_auroc"] <= 1
    (row,) = payload["rows"]
    assert 0 <= row["mislabel_auroc"] <= 1 and 0 <= row["mislabel_auprc"] <= 1
    assert -1 <= row["loo_pearson"] <= 1 and -1 <= row["loo_spearman"] <= 1
    assert row["peak_rss_bytes"] >= 0 and row["peak_rss_total_bytes"] > 50 * 2**20
    # one float32 factored row of Linear(32, 2) each: T, input with a ones column (33), g (2)
    assert row["bytes_stored"] == 24 * (1 + 33 + 2) * 4
    # the plain method's cost: one training, one model's weights
    assert row["ensemble"] is None and row["trainings"] == 1 and row["train_s"] > 0
    assert row["weight_bytes"] == 66 * 4 and row["total_bytes"] == 24 * (1 + 33 + 2) * 4 + 66 * 4
    assert row["serve_s"] == row["fit_s"] + row["attribute_s"]


def test_bench_skips_tasks_with_a_note(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _bench(tmp_path, "grad-dot", "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert "mislabel AUROC" not in text and "LOO r" not in text
    assert "note: LOO task skipped: test-blobs is not convex" in text
    payload = json.loads(out.read_text())
    assert payload["mislabel"]["memorised"] is False
    assert any(n.startswith("mislabel task skipped") for n in payload["notes"])
    assert payload["rows"][0]["peak_rss_bytes"] is None  # --in-process: not measured


def test_bench_removal_task(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _bench(
        tmp_path,
        "grad-dot,rps",
        "--json",
        str(out),
        "--tasks",
        "removal",
        "--removal-ks",
        "1,4",
        "--removal-queries",
        "2",
    )
    assert code == 0
    assert "removal: fraction of 2 correctly predicted test queries" in capsys.readouterr().out
    removal = json.loads(out.read_text())["removal"]
    assert removal["ks"] == [1, 4] and len(removal["queries"]) == 2
    for fractions in removal["fraction_flipped"].values():
        assert len(fractions) == 2 and all(f in (0.0, 0.5, 1.0) for f in fractions)


def test_proponents_grid_is_labelled(tmp_path):
    from PIL import Image

    import datatrace.bench.plots as plots
    from datatrace.bench.settings import get_setting

    setting = get_setting("digits-mlp", size="small")
    values = torch.randn(
        setting.n_test, setting.n_train, generator=torch.Generator().manual_seed(0)
    )
    seen = {}
    plt = plots._pyplot()
    original = plt.close

    def record(fig):
        seen["suptitle"] = fig._suptitle.get_text() if fig._suptitle else ""
        seen["titles"] = [ax.get_title() for ax in fig.axes[:7]]
        seen["ylabels"] = [fig.axes[7 * r].get_ylabel() for r in range(4)]
        seen["xlabels"] = [ax.get_xlabel() for ax in fig.axes]
        seen["legends"] = [ax.get_legend() for ax in fig.axes]
        original(fig)

    plt.close = record
    try:
        plots.plot_proponents(setting, values, tmp_path / "p.png", "digits: proponents")
    finally:
        plt.close = original
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[0] > 300 and img.size[1] > 300
    assert seen["suptitle"] == "digits: proponents"
    assert seen["titles"] == [
        "query",
        *(f"proponent {i}" for i in (1, 2, 3)),
        *(f"opponent {i}" for i in (1, 2, 3)),
    ]
    assert seen["ylabels"] == [f"test query {r}" for r in range(4)]
    # each caption names the label and, for training images, the score; top proponent first
    best = int(torch.argmax(values[0]))
    assert (
        seen["xlabels"][1]
        == f"label {int(setting.data.train[1][best])}, {float(values[0, best]):+.2g}"
    )
    assert all(legend is None for legend in seen["legends"])  # one series: no legend
    with pytest.raises(ConfigError, match="image_shape"):
        plots.plot_proponents(get_setting("test-blobs"), values, tmp_path / "q.png", "t")


def test_version(capsys):
    import datatrace

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"datatrace {datatrace.__version__}"


def test_methods_lists_every_id_on_one_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHODS)
    by_id = {line.split()[0]: line for line in lines}
    for method_id, (cls, _) in METHODS.items():
        summary = cls.__doc__.strip().splitlines()[0].rstrip(".")
        assert summary in by_id[method_id]
    assert "(solver='cg')" in by_id["if-cg"]  # ids sharing a class say what they preset
    assert by_id["trak"].endswith("averaging")  # no preset, no parentheses


def test_method_options_are_read_as_the_settings_declared_types():
    from datatrace.cli import parse_methods

    parsed = dict(
        parse_methods(
            "if-ekfac:fisher=true:damping=heuristic,"
            "trak:proj_dim=2048:relative_damping=1.0:progress=true"
        )
    )
    # "true" is one of fisher's literal choices, not JSON's boolean
    assert parsed["if-ekfac"] == {"fisher": "true", "damping": "heuristic"}
    assert parsed["trak"] == {"proj_dim": 2048, "relative_damping": 1.0, "progress": True}
    ((_, opts),) = parse_methods("if-ekfac:damping=1e-3:query_rank=none")
    assert opts == {"damping": 1e-3, "query_rank": None}
    assert isinstance(opts["damping"], float)
