"""The trajectory settings ``digits-mlp-short`` and ``digits-mlp-twostage`` at reduced size."""

import pytest
import torch

from datatrace import ConfigError
from datatrace.bench.settings import Setting, get_setting, list_settings
from datatrace.bench.settings.trajectory import DigitsMLPShort, DigitsMLPTwoStage, pretrain_mask


def test_registered_by_name_and_json_round_trip():
    assert {"digits-mlp-short", "digits-mlp-twostage"} <= set(list_settings())
    for name, cls in (
        ("digits-mlp-short", DigitsMLPShort),
        ("digits-mlp-twostage", DigitsMLPTwoStage),
    ):
        setting = get_setting(name, size="small")
        assert isinstance(setting, cls) and setting.description
        assert Setting.from_json(setting.to_json()) == setting
        assert setting.replace(lr=0.01).recipe_hash() != setting.recipe_hash()
    two = get_setting("digits-mlp-twostage", size="small")
    assert two.replace(finetune_lr=0.01).recipe_hash() != two.recipe_hash()


def test_short_run_is_accurate_but_far_from_converged():
    setting = DigitsMLPShort(size="small")
    model, run = setting.train_trajectory(seed=0)
    held_out = setting.evaluate(model)
    assert held_out.accuracy > 0.8  # the docstring's 90.0% at this size
    # four times the steps still lowers the training loss a lot: not converged
    longer = setting.replace(epochs=4 * setting.epochs).train(seed=0)
    train_loss = setting.evaluate(model, setting.data.train).loss
    assert setting.evaluate(longer, setting.data.train).loss < 0.5 * train_loss
    # the trajectory: evenly spaced SGD checkpoints, the last one the final weights
    steps = setting.epochs * -(-setting.n_train // setting.batch_size)
    assert [c.step for c in run] == [15, 30, 45, 60, 75] == [steps * (k + 1) // 5 for k in range(5)]
    assert all(c.optimizer == "sgd" and c.learning_rate == setting.lr for c in run)
    assert all(c.train_indices == tuple(range(setting.n_train)) for c in run)
    for name, value in model.state_dict().items():
        assert torch.equal(run[-1].load()[name], value)
    # same seed, same weights; another seed, other weights
    again = setting.train(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = setting.train(seed=1)
    assert not torch.equal(model[0].weight, other[0].weight)


def test_two_stages_pretrain_on_one_half_and_fine_tune_on_the_other():
    setting = DigitsMLPTwoStage(size="small")
    model, run = setting.train_trajectory(seed=0)
    assert setting.evaluate(model).accuracy > 0.75  # the docstring's 84.2% at this size
    pre, fine = setting.stage_indices()
    assert (
        len(pre) + len(fine) == setting.n_train and len(set(pre.tolist()) & set(fine.tolist())) == 0
    )
    assert min(len(pre), len(fine)) > 0.4 * setting.n_train
    # every class appears in both halves
    labels = setting.data.train[1]
    assert set(labels[pre].tolist()) == set(labels[fine].tolist()) == set(range(10))
    stages = [c.train_indices for c in run]
    pretrain_steps = setting.pretrain_epochs * -(-len(pre) // setting.batch_size)
    end_of_pretraining = [c for c in run if c.step == pretrain_steps]
    assert len(end_of_pretraining) == 1 and end_of_pretraining[0].train_indices == tuple(
        pre.tolist()
    )
    assert stages[-1] == tuple(fine.tolist())  # pretraining examples are absent from the last stage
    assert {c.learning_rate for c in run if c.train_indices == stages[-1]} == {setting.finetune_lr}
    assert {c.learning_rate for c in run if c.train_indices != stages[-1]} == {setting.lr}
    # an example keeps its stage in a subset: the rule reads the image only
    subset = torch.arange(0, setting.n_train, 3)
    sub_pre, _ = setting.stage_indices(tuple(t[subset] for t in setting.data.train))
    assert torch.equal(subset[sub_pre], subset[pretrain_mask(setting.data.train[0][subset])])
    assert torch.equal(
        pretrain_mask(setting.data.train[0]), pretrain_mask(setting.data.train[0].double())
    )
    # fine-tuning changed the model: the checkpoint at the end of pretraining differs
    assert not torch.equal(end_of_pretraining[0].load()["0.weight"], model[0].weight)


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match=r"momentum must be a number in \[0, 1\); got 1.0"):
        DigitsMLPShort(momentum=1.0)
    with pytest.raises(ConfigError, match=r"hidden must be a non-empty tuple"):
        DigitsMLPShort(hidden=())
    with pytest.raises(ConfigError, match="finetune_lr"):
        DigitsMLPTwoStage(finetune_lr=0.0)
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        DigitsMLPTwoStage(pretrain_epochs=-1)


@pytest.mark.parametrize("name", ["digits-mlp-short", "digits-mlp-twostage"])
def test_train_recipe_is_the_seed_run_and_unrolled_replays_it(name):
    from datatrace import make_attributor

    setting = get_setting(name, size="small")
    model, _ = setting.train_trajectory(seed=0)
    replayed, recipe = setting.train_recipe(seed=0)
    # recording the recipe changes nothing about the run
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), replayed.parameters()))
    per_epoch = -(-setting.n_train // setting.batch_size)
    if name == "digits-mlp-short":  # an epoch's steps visit every example once
        assert recipe.num_steps == setting.epochs * per_epoch
        epoch = sorted(i for s in recipe.steps[:per_epoch] for i in s.indices)
        assert epoch == list(range(setting.n_train))
    assert recipe.optimizer.kind == "sgd" and recipe.optimizer.momentum == setting.momentum
    queries = setting.data.queries("val")
    attr = make_attributor("unrolled", setting.make_task(model), recipe=recipe, batch_size=64)
    values = attr.fit(setting.data.train).attribute(queries).values
    assert values.shape == (setting.n_val, setting.n_train) and torch.isfinite(values).all()
    # another seed's model is not the recipe's run: refused
    with pytest.raises(Exception, match="does not reproduce the model being attributed"):
        make_attributor("unrolled", setting.make_task(setting.train(seed=1)), recipe=recipe).fit(
            setting.data.train
        )


def test_a_setting_without_a_recorded_loop_refuses_a_recipe():
    with pytest.raises(ConfigError, match="does not record a replay recipe"):
        get_setting("digits-lr", size="small").train_recipe(seed=0)
