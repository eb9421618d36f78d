"""One method's run: grid choice on validation queries, bytes stored, own-process memory."""

import torch

from datatrace.bench.cache import GroundTruthSpec, lds_ground_truth
from datatrace.bench.mislabel import mislabel_ground_truth
from datatrace.bench.runner import MethodJob, run_method, run_method_isolated
from datatrace.methods import make_attributor
from datatrace.metrics import lds
from tests.bench.test_cache import Blobs
from tests.bench.test_mislabel import Wide


def _job(setting, tmp_path, method, grid, **extra):
    gt = lds_ground_truth(setting, GroundTruthSpec(m=6, seeds=1), cache_dir=tmp_path)
    model, trajectory = setting.train_trajectory(seed=0)
    job = MethodJob(
        setting=setting,
        method=method,
        grid=grid,
        model_state=model.state_dict(),
        trajectory=trajectory,
        subsets=gt.subsets,
        val_targets=gt.targets[:, : setting.n_val],
        **extra,
    )
    return job, gt, model


def test_grid_choice_values_and_bytes(tmp_path):
    setting = Blobs()
    grid = [{"damping": 1e-3}, {"damping": 10.0}]
    job, gt, model = _job(setting, tmp_path, "rps", grid)
    result = run_method(job)
    # every grid point recomputed directly; the best validation LDS is chosen
    val = []
    for point in grid:
        attributor = make_attributor("rps", setting.make_task(model), batch_size=256, **point)
        values = attributor.fit(setting.data.train).attribute(setting.data.queries("all")).values
        val.append(lds(values[: setting.n_val], gt.subsets, gt.targets[:, : setting.n_val]).mean)
        if point == result.chosen:
            assert torch.equal(values, result.values)
    assert result.chosen == grid[max(range(2), key=lambda i: val[i])]
    assert [g["val_lds"] for g in result.grid] == val
    assert result.peak_rss is None  # in-process: no memory of its own
    # grad-dot keeps one float32 factored row of Linear(2, 2) per training example: T, the
    # input with a ones column (3) and the output gradient (2); its gradient would be 6 too
    dot = run_method(_job(setting, tmp_path, "grad-dot", [{}])[0])
    assert dot.bytes_stored == setting.n_train * (1 + 3 + 2) * 4


def test_isolated_run_matches_and_measures_memory(tmp_path):
    setting = Blobs()
    job = _job(setting, tmp_path, "grad-dot", [{}])[0]
    here = run_method(job)
    there = run_method_isolated(job)
    torch.testing.assert_close(there.values, here.values, rtol=1e-6, atol=1e-6)
    assert there.bytes_stored == here.bytes_stored
    assert there.peak_rss is not None and there.peak_rss_total is not None
    assert 0 <= there.peak_rss < there.peak_rss_total
    assert there.peak_rss_total > 50 * 2**20  # a process that imported torch


def test_self_influence_on_the_flipped_model(tmp_path):
    setting = Wide()
    mgt = mislabel_ground_truth(setting, cache_dir=tmp_path)
    noisy_model, noisy_trajectory = mgt.setting.train_trajectory(seed=0)
    job, _, _ = _job(
        setting,
        tmp_path,
        "grad-dot",
        [{}],
        mislabel_labels=mgt.labels,
        mislabel_setting=setting.replace(**setting.memorise),
        mislabel_state=noisy_model.state_dict(),
        mislabel_trajectory=noisy_trajectory,
    )
    result = run_method(job)
    direct = make_attributor("grad-dot", mgt.setting.make_task(noisy_model), batch_size=256)
    expected = direct.fit(mgt.setting.data.train).self_attribute()
    assert torch.equal(result.self_scores, expected)


def test_a_crashing_grid_point_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch):
    from datatrace.methods.rps import RepresenterAttributor

    setting = Blobs()
    real_fit = RepresenterAttributor.fit

    def fit(self, train):  # a library bug (not a DatatraceError) at one damping only
        if self.config.damping == 10.0:
            raise RuntimeError("shapes cannot be multiplied")
        return real_fit(self, train)

    monkeypatch.setattr(RepresenterAttributor, "fit", fit)
    job, _, _ = _job(setting, tmp_path, "rps", [{"damping": 10.0}, {"damping": 1e-3}])
    result = run_method(job)
    assert result.grid[0]["error"] == "RuntimeError: shapes cannot be multiplied"
    assert result.chosen == {"damping": 1e-3} and result.values is not None


def test_layer_methods_track_only_linear_layers_of_a_language_model():
    """K-FAC-based methods get a Task over the Linear layers (embeddings, LayerNorm excluded)."""
    import torch

    from datatrace.bench.runner import _attributor, layer_params_only, reads_trajectory
    from datatrace.bench.settings import get_setting
    from datatrace.methods import METHODS

    setting = get_setting("pydoc-charlm", size="small")
    model = setting.build_model(0).eval()
    linear = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        for p, _ in m.named_parameters(recurse=False)
    }
    assert linear and linear != {n for n, _ in model.named_parameters()}
    # the traits come from the method classes (no id lists in the bench)
    layer_methods = sorted(m for m in METHODS if layer_params_only(m))
    assert layer_methods == ["if-ekfac", "if-kfac", "logra", "source"]
    assert sorted(m for m in METHODS if reads_trajectory(m)) == ["source", "tracin"]
    for method in layer_methods:
        job = MethodJob(setting, method, [{}], {}, [], torch.zeros(1, 1), torch.zeros(1, 1))
        assert set(_attributor(setting, model, [], job, {}).task.tracked_names) == linear
    job = MethodJob(setting, "grad-dot", [{}], {}, [], torch.zeros(1, 1), torch.zeros(1, 1))
    assert len(_attributor(setting, model, [], job, {}).task.tracked_names) > len(linear)


def test_a_replaying_method_gets_the_recipe_of_the_run(tmp_path):
    setting = Blobs()
    recipe = setting.train_recipe(seed=0)[1]
    job, _, model = _job(setting, tmp_path, "unrolled", [{}], recipe=recipe)
    result = run_method(job)
    assert result.values is not None, result.grid
    direct = make_attributor("unrolled", setting.make_task(model), recipe=recipe, batch_size=256)
    expected = direct.fit(setting.data.train).attribute(setting.data.queries("all")).values
    torch.testing.assert_close(result.values, expected, rtol=1e-10, atol=1e-12)
    # without a recipe the grid point fails with the reason, and nothing else breaks
    failed = run_method(_job(setting, tmp_path, "unrolled", [{}])[0])
    assert failed.values is None and "recipe=" in failed.grid[0]["error"]
