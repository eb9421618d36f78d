"""Every bad argument to ``datatrace`` ends in one line naming the problem and exit status 2,
never a traceback, and before any training (issue 18, deliverable 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datatrace.cli import main
from tests.bench.test_cache import Blobs  # registers "test-blobs"

assert Blobs

ROOT = Path(__file__).parents[2]
BENCH = ["bench", "--setting", "test-blobs", "--m", "2", "--seeds", "1", "--workers", "1"]
GROUNDTRUTH = ["groundtruth", "--setting", "test-blobs", "--m", "2", "--seeds", "1"]


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


def _read_only(tmp_path: Path) -> Path:
    path = tmp_path / "read-only.json"
    path.write_text("{}")
    path.chmod(0o444)
    return path


# (argv, what the error line must name); paths are built in tmp_path
CASES = {
    "unknown setting": (["bench", "--setting", "nope"], "'nope'"),
    "unknown setting (groundtruth)": (["groundtruth", "--setting", "nope"], "'nope'"),
    "no threads (groundtruth)": ([*GROUNDTRUTH, "--threads", "0"], "--threads must be"),
    "unknown method": ([*BENCH, "--methods", "grad-dot,trek"], "'trek'"),
    "empty --methods": ([*BENCH, "--methods", ","], "--methods is empty"),
    "option without =": ([*BENCH, "--methods", "trak:proj_dim"], "'proj_dim'"),
    "option without key": ([*BENCH, "--methods", "trak:=3"], "'=3'"),
    "unknown option": ([*BENCH, "--methods", "trak:proj_dims=8"], "'proj_dims'"),
    "runner-owned option": ([*BENCH, "--methods", "trak:batch_size=8"], "batch_size"),
    "invalid option value": ([*BENCH, "--methods", "trak:proj_dim=0"], "proj_dim"),
    "option of the wrong type": ([*BENCH, "--methods", "if-cg:damping=abc"], "damping"),
    "unknown ensemble": ([*BENCH, "--ensembles", "bagging:3"], "bagging"),
    "unknown task": ([*BENCH, "--tasks", "lds,bogus"], "bogus"),
    "bad removal budgets": ([*BENCH, "--removal-ks", "a"], "--removal-ks"),
    "bad threads": ([*BENCH, "--threads", "0"], "threads"),
    "bad alpha": ([*GROUNDTRUTH, "--alpha", "2"], "alpha"),
    "bad seeds": ([*GROUNDTRUTH, "--seeds", "0"], "seeds"),
    "--json is a directory": ([*BENCH, "--json", "{tmp}"], "is a directory"),
    "--json is read-only": ([*BENCH, "--json", "{read_only}"], "not writable"),
    "--json under a file": ([*BENCH, "--json", "{file}/x.json"], "cannot write"),
    "--out is a file": ([*BENCH, "--out", "{file}"], "cannot write"),
    "--out under a file": ([*BENCH, "--out", "{file}/plots"], "cannot write"),
    "not an int (argparse)": ([*BENCH, "--m", "many"], "--m"),
    "unknown size (argparse)": ([*BENCH, "--size", "huge"], "--size"),
    "unknown command (argparse)": (["benchmark"], "benchmark"),
    "unknown flag (argparse)": ([*BENCH, "--metods", "trak"], "--metods"),
}


def _argv(argv: list[str], tmp_path: Path) -> list[str]:
    paths = {"tmp": tmp_path, "file": _file(tmp_path), "read_only": _read_only(tmp_path)}
    out = [a.format(**paths) for a in argv]
    return [*out, "--cache", str(tmp_path / "cache")] if out[0] in ("bench", "groundtruth") else out


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


def _check_one_line(err: str, names: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("datatrace"), err
    assert names.lower() in last.lower(), err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_end_in_one_line_and_exit_status_2(case, tmp_path, capsys, monkeypatch):
    argv, names = CASES[case]
    if case == "--json is read-only" and os.geteuid() == 0:
        pytest.skip("root writes read-only files")

    def no_training(*args, **kwargs):  # every case is refused before any work
        raise AssertionError("training started")

    monkeypatch.setattr("datatrace.bench.cache._run_split", no_training)
    monkeypatch.setattr("datatrace.bench.benchmark.run_benchmark", no_training)
    assert _exit_code(_argv(argv, tmp_path)) == 2
    _check_one_line(capsys.readouterr().err, names)


def _cached_ground_truth(tmp_path: Path, capsys) -> Path:
    """A small ground-truth cache built by the command; its store directory."""
    argv = [*GROUNDTRUTH, "--workers", "1", "--quiet", "--cache", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    (store,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return store


def test_a_corrupted_ground_truth_manifest_is_one_line_and_exit_status_2(tmp_path, capsys):
    store = _cached_ground_truth(tmp_path, capsys)
    (store / "manifest.json").write_text('{"format": 1, "config": ')  # cut mid-write
    argv = [*GROUNDTRUTH, "--workers", "1", "--quiet", "--cache", str(tmp_path)]
    assert _exit_code(argv) == 2
    _check_one_line(capsys.readouterr().err, "manifest")


def test_a_ground_truth_manifest_that_is_a_directory_is_one_line(tmp_path, capsys):
    store = _cached_ground_truth(tmp_path, capsys)
    (store / "manifest.json").unlink()
    (store / "manifest.json").mkdir()
    argv = [*GROUNDTRUTH, "--workers", "1", "--quiet", "--cache", str(tmp_path)]
    assert _exit_code(argv) == 2
    _check_one_line(capsys.readouterr().err, "manifest.json")


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real entry point in a fresh process: one line on stderr, exit status 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    code = "import sys; from datatrace.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["bench", "--methods", "trak:proj_dim", "--json", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "proj_dim" in done.stderr


def test_a_truncated_ground_truth_shard_is_recomputed_or_one_line(tmp_path, capsys):
    store = _cached_ground_truth(tmp_path, capsys)
    next(store.glob("shard-*")).write_bytes(b"")
    argv = [*GROUNDTRUTH, "--workers", "1", "--quiet", "--cache", str(tmp_path)]
    try:
        code = _exit_code(argv)
    except Exception as exc:  # an internal error escaped main(): the traceback case
        pytest.fail(f"{type(exc).__name__} escaped: {exc}")
    captured = capsys.readouterr()
    if code == 0:  # recomputed
        assert "2 subsets" in captured.out
    else:
        assert code == 2
        _check_one_line(captured.err, "shard")


def test_a_reader_that_leaves_early_ends_the_cli_quietly():
    """`datatrace settings | head -1`: no 'Broken pipe' error or traceback, SIGPIPE's status."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "datatrace", "settings"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err
