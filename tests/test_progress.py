"""Progress bars: one rule (datatrace._progress), a bar on every long phase, one switch."""

from __future__ import annotations

import pytest
import torch

from datatrace import InfluenceAttributor, Task, make_attributor
from datatrace._progress import ENV_VAR, progress_bar, resolve_progress
from datatrace.methods.base import MethodConfig


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def _data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _task() -> Task:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return Task(model.double().eval())


def _run(attr) -> None:
    train, queries = _data(), _data(6, seed=1)
    attr.fit(train).attribute(queries)
    attr.self_attribute()


@pytest.mark.parametrize(
    ("enabled", "env", "tqdm_env", "expected"),
    [
        (None, None, None, None),  # tqdm's rule: bars where stderr is a terminal
        (True, None, None, True),
        (False, None, None, False),
        (False, "1", None, False),  # the code's explicit False wins over the switch
        (None, "1", None, True),
        (None, "yes", None, True),
        (True, "0", None, False),  # the global switch wins over the code's True
        (True, "off", None, False),
        (True, None, "1", False),  # tqdm's own switch too
        (True, None, "0", True),
        (True, "", "", True),
    ],
)
def test_the_rule(monkeypatch, enabled, env, tqdm_env, expected):
    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    if tqdm_env is not None:
        monkeypatch.setenv("TQDM_DISABLE", tqdm_env)
    assert resolve_progress(enabled) is expected


def test_progress_bar_draws_on_stderr_when_enabled(capfd):
    assert list(progress_bar(range(3), desc="counting things", enabled=True)) == [0, 1, 2]
    assert "counting things" in capfd.readouterr().err
    list(progress_bar(range(3), desc="counting things", enabled=False))
    list(progress_bar(range(3), desc="counting things", enabled=None))  # stderr is no tty here
    assert capfd.readouterr().err == ""


EKFAC_PHASES = [
    "if-ekfac: train features",
    "K-FAC covariance pass",
    "EK-FAC eigenvalue pass",
    "if-ekfac: query features",
    "if-ekfac: scoring",
    "if-ekfac: self-influence",
]


def test_every_phase_of_if_ekfac_has_a_bar(capfd):
    _run(make_attributor("if-ekfac", _task(), batch_size=8, progress=True))
    err = capfd.readouterr().err
    missing = [phase for phase in EKFAC_PHASES if phase not in err]
    assert missing == []


def test_recomputed_train_features_are_counted_by_scoring_and_self_influence(capfd):
    attr = make_attributor(
        "if-ekfac", _task(), batch_size=8, progress=True, train_features="recompute"
    )
    _run(attr)
    err = capfd.readouterr().err
    assert "if-ekfac: scoring (recomputing train features)" in err
    assert "if-ekfac: self-influence (recomputing train features)" in err
    assert "if-ekfac: train features" not in err  # fit featurizes nothing


def test_the_environment_variable_silences_every_bar(capfd, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    _run(make_attributor("if-ekfac", _task(), batch_size=8, progress=True))
    _run(InfluenceAttributor(_task(), solver="cg", progress=True))
    assert capfd.readouterr().err == ""


def test_tqdm_disable_silences_every_bar(capfd, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _run(make_attributor("if-ekfac", _task(), batch_size=8, progress=True))
    assert capfd.readouterr().err == ""


def test_default_draws_nothing_where_stderr_is_not_a_terminal(capfd):
    _run(make_attributor("if-ekfac", _task(), batch_size=8))
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("settings", "phase"),
    [
        ({"solver": "cg"}, "CG iterations (6 right-hand sides)"),
        ({"solver": "lissa", "solver_options": {"depth": 20}}, "LiSSA iterations"),
        ({"solver": "arnoldi", "solver_options": {"rank": 4}}, "Arnoldi iterations"),
        ({"solver": "explicit"}, "dense curvature (39 columns)"),
    ],
)
def test_solvers_draw_their_iterations(capfd, settings, phase):
    attr = InfluenceAttributor(_task(), damping=0.1, progress=True, **settings)
    attr.fit(_data()).attribute(_data(6, seed=1))
    assert phase in capfd.readouterr().err


def test_progress_is_a_display_option_not_a_setting():
    on, off = MethodConfig(progress=True), MethodConfig(progress=False)
    assert on == off == MethodConfig()  # equal configs: the same store, the same scores
    assert "progress" not in on.to_json()
    with pytest.raises(Exception, match="progress must be True, False or None"):
        MethodConfig(progress="yes")  # type: ignore[arg-type]
