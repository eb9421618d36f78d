"""Settings a method ignores cannot be passed to it (issue 17): the ``APPLIES`` tables.

A setting that a configuration would not read is refused with a ``ConfigError`` naming it,
what decides and the fix; at its default it is always accepted, and every bench grid point
is a configuration that reads all of its settings.
"""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from datatrace import METHODS, Task, make_attributor
from datatrace.bench.benchmark import DEFAULT_GRIDS, SETTING_GRIDS
from datatrace.errors import ConfigError
from datatrace.methods.config import MethodConfig

REFUSED = [
    (
        "grad-dot",
        {"proj_dim": 8},
        r"proj_dim=8 applies only with a projector; got projector='none'",
    ),
    ("if-cg", {"fisher": "true"}, r"fisher='true' applies only with curvature='kfac' or 'ekfac'"),
    ("if-cg", {"fisher_samples": 2, "fisher": "true"}, r"fisher='true' applies only"),
    ("if-explicit", {"curvature_examples": 0.5}, r"curvature_examples=0.5 applies only"),
    (
        "if-ekfac",
        {"projector": "gaussian"},
        r"projector='gaussian' applies only with curvature='fisher'",
    ),
    ("if-cg", {"query_rank": 2}, r"query_rank=2 applies only with the factored training-score"),
    # values only some configurations take (the rules InfluenceConfig.__post_init__ held)
    (
        "if-cg",
        {"damping": "heuristic"},
        r"damping='heuristic' applies only with curvature='kfac' or 'ekfac' and "
        r"solver='explicit'; got curvature='ggn', solver='cg'.*pass a number",
    ),
    (
        "if-ekfac",
        {"solver": "cg"},  # the id's per-layer damping stays: the message says what to pass
        r"damping='heuristic' applies only .* got curvature='ekfac', solver='cg'",
    ),
    (
        "if-cg",
        {"solver": "datainf"},
        r"solver='datainf' applies only with curvature='fisher'; got curvature='ggn'.*DataInf",
    ),
    (
        "if-datainf",
        {"train_features": "recompute"},
        r"train_features='recompute' applies only with a curvature other than 'fisher'",
    ),
    (
        "if-explicit",
        {"train_features": "factored", "curvature": "fisher"},
        r"train_features='factored' applies only with a curvature other than 'fisher'",
    ),
    (
        "if-ekfac",
        {"train_features": "factored", "engine": "functional"},
        r"engine='functional' applies only with train_features other than 'factored'",
    ),
    (
        "if-ekfac",
        {"fisher_samples": 2},
        r"fisher_samples=2 applies only with .* and fisher='true'; got curvature='ekfac', "
        r"fisher='empirical'",
    ),
    ("trak", {"damping": 0.1, "relative_damping": 0.5}, r"relative_damping=0.5 .* damping=None"),
    ("trak", {"q_dropout_rate": 0.3}, r"q_dropout_rate=0.3 applies only with q_dropout >= 1"),
    (
        "trak",
        {"q_dropout_layers": ("1",)},
        r"q_dropout_layers=\('1',\) applies only with q_dropout",
    ),
    (
        "logra",
        {"proj_dim": 8},
        r"LoGraConfig does not use proj_dim: .* proj_dim_in and proj_dim_out",
    ),
    ("logra", {"projector": "gaussian"}, r"LoGra projects each layer itself"),
    (
        "logra",
        {"preconditioner": "identity", "fisher": "true"},
        r"fisher='true' applies only with preconditioner=",
    ),
    (
        "source",
        {"curvature": "ggn", "fisher": "empirical"},
        r"fisher='empirical' applies only with curvature=",
    ),
    ("source", {"projector": "sjlt"}, r"SourceConfig does not use projector"),
    (
        "rps",
        {"engine": "functional"},
        r"RepresenterConfig does not use engine: .*; got engine='functional'",
    ),
    ("rps", {"projector": "gaussian"}, r"RepresenterConfig does not use projector"),
    ("rps", {"seed": 3}, r"RepresenterConfig does not use seed"),
]


def task() -> Task:
    return Task(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval())


@pytest.mark.parametrize(("method_id", "settings", "match"), REFUSED, ids=lambda x: str(x)[:40])
def test_a_setting_the_configuration_ignores_is_refused(method_id, settings, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_attributor(method_id, task(), **settings)
    assert "Drop " in str(info.value)  # the fix


@pytest.mark.parametrize(
    "name", ["engine", "seed", "feature_dtype", "projector", "proj_dim"], ids=str
)
def test_unrolled_refuses_the_shared_settings_it_never_reads(name):
    from datatrace.methods.unrolled import UnrolledConfig

    value = {"engine": "hooks", "seed": 1, "feature_dtype": "float32"}.get(name)
    value = value or {"projector": "gaussian", "proj_dim": 8}[name]
    with pytest.raises(ConfigError, match=f"UnrolledConfig does not use {name}"):
        UnrolledConfig(**{name: value})


def test_value_rules_accept_the_values_they_are_not_about():
    # a number is read by every solver; 'gradients' and the functional engine by every path
    make_attributor("if-cg", task(), damping=0.5)
    make_attributor("if-datainf", task(), train_features="gradients")
    make_attributor("if-cg", task(), train_features="recompute", engine="functional")
    make_attributor("if-ekfac", task(), fisher="true", fisher_samples=3)


def test_influence_config_post_init_checks_each_field_alone():
    """Cross-field rules live in APPLIES: a bad single field is reported as such first."""
    from datatrace.methods.influence_config import InfluenceConfig

    with pytest.raises(ConfigError, match="fisher_samples must be an integer >= 1; got 0"):
        InfluenceConfig(fisher_samples=0, curvature="ggn")
    with pytest.raises(ConfigError, match="query_rank must be None or an integer >= 1"):
        InfluenceConfig(query_rank=0)
    with pytest.raises(ConfigError, match="damping must be a number >= 0, 'heuristic'"):
        InfluenceConfig(damping="tiny", solver="cg")


def test_the_check_runs_after_the_config_s_own_validation():
    with pytest.raises(ConfigError, match="proj_dim must be an integer >= 1; got 0"):
        make_attributor("rps", task(), proj_dim=0)
    with pytest.raises(ConfigError, match="fisher must be 'true', 'empirical' or 'exact'"):
        make_attributor("if-cg", task(), fisher="sampled")
    with pytest.raises(ConfigError, match="proj_dim=3 applies only with a projector"):
        MethodConfig(proj_dim=3)  # a method's own config class (toy methods use it)


CONFIGS = sorted({cls.Config for cls, _ in METHODS.values()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_given_explicitly_are_accepted_and_rules_name_fields(config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(config.APPLIES) <= set(fields)
    assert all(set(rule.on) <= set(fields) for rule in config.APPLIES.values())
    defaults = {
        name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for name, f in fields.items()
    }
    assert config(**defaults) == config()


@pytest.mark.parametrize("method_id", sorted(METHODS))
def test_every_registered_method_builds_with_its_defaults(method_id):
    cls, defaults = METHODS[method_id]
    cls.Config(**defaults)


GRID_POINTS = [
    (method_id, point)
    for grids in (DEFAULT_GRIDS, *SETTING_GRIDS.values())
    for method_id, grid in grids.items()
    for point in grid
]


@pytest.mark.parametrize(("method_id", "point"), GRID_POINTS, ids=lambda x: str(x)[:60])
def test_every_bench_grid_point_passes_only_settings_its_configuration_reads(method_id, point):
    cls, defaults = METHODS[method_id]
    cls.Config(**{**defaults, **point})
