"""The ``datatrace`` command line."""

import json

import pytest

from datatrace import ConfigError
from datatrace.cli import main, parse_methods
from tests.bench.test_cache import Blobs  # registers "test-blobs"

assert Blobs


def test_parse_methods():
    assert parse_methods("trak:proj_dim=64:relative_damping=0.1,grad-cos") == [
        ("trak", {"proj_dim": 64, "relative_damping": 0.1}),
        ("grad-cos", None),
    ]
    with pytest.raises(ConfigError, match="unknown method 'trek'"):
        parse_methods("trek")
    with pytest.raises(ConfigError, match="key=value"):
        parse_methods("trak:proj_dim")


def _bench(tmp_path, methods, *extra):
    """Run ``datatrace bench`` on the tiny test-blobs setting with a small ground truth."""
    argv = ["bench", "--setting", "test-blobs", "--m", "6", "--seeds", "2", "--workers", "1"]
    argv += ["--quiet", "--cache", str(tmp_path / "cache"), "--methods", methods, *extra]
    return main(argv)


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _bench(tmp_path, "grad-dot,trak:proj_dim=4,rps", "--json", str(out))
    assert code == 0
    text = capsys.readouterr().out
    assert "grad-dot" in text and "noise ceiling" in text and "random scores" in text
    payload = json.loads(out.read_text())
    methods = [r["method"] for r in payload["rows"]]
    assert methods == ["grad-dot", "trak", "rps"]
    for row in payload["rows"]:
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


def test_settings_lists_registered(capsys):
    assert main(["settings"]) == 0
    text = capsys.readouterr().out
    for name in ("digits-lr", "digits-mlp", "digits-cnn", "breast-cancer-mlp", "pydoc-charlm"):
        assert name in text


def test_bench_writes_labelled_plots(tmp_path):
    from PIL import Image  # matplotlib depends on pillow

    import datatrace.bench.plots as plots

    titles: dict[str, tuple] = {}
    real_close = plots._pyplot().close

    def record(fig):
        ax = fig.axes[0]
        legend = ax.get_legend()
        titles[ax.get_title()] = (
            ax.get_xlabel(),
            ax.get_ylabel(),
            legend is not None and len(legend.get_texts()),
        )
        real_close(fig)

    plt = plots._pyplot()
    original = plt.close
    plt.close = record
    try:
        code = _bench(tmp_path, "grad-dot,rps", "--out", str(tmp_path / "out"))
    finally:
        plt.close = original
    assert code == 0
    for name in ("pareto.png", "lds_per_query.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    pareto = titles["test-blobs: efficacy vs cost"]
    assert pareto[0] and pareto[1] and pareto[2] == 2  # labelled axes, a legend with both methods
    dist = titles["test-blobs: per-query LDS"]
    assert dist[0] and dist[1]
