import pytest
import torch
import torch.nn.functional as F

from datatrace import Checkpoint, Task
from datatrace.gradients import compute_per_sample_grads, hookable_modules
from datatrace.task import lm_loss, log_prob, margin
from tests.models import autograd_loop, classification_data, cnn, mlp, tiny_lm

ENGINES = ["hooks", "functional"]


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("engine", ENGINES)
def test_mlp_loss_grads_match_autograd_loop(engine):
    model = mlp()
    x, y = classification_data()
    got = compute_per_sample_grads(Task(model), (x, y), engine=engine).flat()
    ref = autograd_loop(model, ce, x, y)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_cnn_with_stride_padding_and_layernorm_fallback(engine):
    model = cnn()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    task = Task(model)
    if engine == "hooks":
        # conv and linear layers go through hooks, LayerNorm falls back to the functional engine
        assert set(hookable_modules(task)) == {"0", "2", "5"}
    got = compute_per_sample_grads(task, (x, y), engine=engine).flat()
    torch.testing.assert_close(got, autograd_loop(model, ce, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_margin_query_objective_is_negative_margin(engine):
    model = mlp()
    x, y = classification_data()
    task = Task(model, target="margin")
    got = compute_per_sample_grads(task, (x, y), which="query", engine=engine).flat()
    ref = autograd_loop(model, lambda m, a, b: -margin(m(a), b).sum(), x, y)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_sequence_model_dict_batches_and_log_prob(engine):
    model = tiny_lm()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 11, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    task = Task(model, loss="lm", target="log_prob")
    for which, fn in (("loss", lm_loss), ("query", lambda o, y, m: -log_prob(o, y, m))):
        got = compute_per_sample_grads(task, batch, which=which, engine=engine).flat()
        ref = torch.stack(
            [
                torch.cat(
                    [
                        gr.flatten()
                        for gr in torch.autograd.grad(
                            fn(model(ids[i : i + 1]), ids[i : i + 1], mask[i : i + 1]).sum(),
                            list(model.parameters()),
                        )
                    ]
                )
                for i in range(4)
            ]
        )
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_weight_shared_module_sums_its_calls():
    torch.manual_seed(0)

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    model = Twice().double().eval()
    x, y = classification_data(n=6, d_in=4)
    got = compute_per_sample_grads(Task(model), (x, y), engine="hooks").flat()
    torch.testing.assert_close(got, autograd_loop(model, ce, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_parameter_selection_by_name_and_module_type(engine):
    model = mlp()
    x, y = classification_data()
    task = Task(model, params=["2"])
    assert task.tracked_names == ["2.weight", "2.bias"]
    got = compute_per_sample_grads(task, (x, y), engine=engine).flat()
    torch.testing.assert_close(
        got, autograd_loop(model, ce, x, y, ["2.weight", "2.bias"]), rtol=1e-10, atol=1e-12
    )
    only_w = Task(model, params=["0.weight", "2.weight"])
    got = compute_per_sample_grads(only_w, (x, y), engine=engine).flat()
    torch.testing.assert_close(
        got, autograd_loop(model, ce, x, y, ["0.weight", "2.weight"]), rtol=1e-10, atol=1e-12
    )
    lm = tiny_lm()
    assert Task(lm, loss="lm", module_types=[torch.nn.LayerNorm]).tracked_names == [
        "ln.weight",
        "ln.bias",
    ]


def test_bias_only_tracking_uses_ones_column():
    model = mlp()
    x, y = classification_data()
    task = Task(model, params=["0.bias"])
    got = compute_per_sample_grads(task, (x, y), engine="hooks").flat()
    torch.testing.assert_close(
        got, autograd_loop(model, ce, x, y, ["0.bias"]), rtol=1e-10, atol=1e-12
    )


def test_engines_agree_on_checkpoint_state():
    model = mlp()
    other = mlp(seed=5)
    x, y = classification_data()
    task = Task(model)
    state = task.state(Checkpoint(other.state_dict()))
    a = compute_per_sample_grads(task, (x, y), state=state, engine="hooks").flat()
    b = compute_per_sample_grads(task, (x, y), state=state, engine="functional").flat()
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, autograd_loop(other, ce, x, y), rtol=1e-10, atol=1e-12)
