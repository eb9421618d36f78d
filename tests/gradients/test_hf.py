"""Per-sample gradients of Hugging Face models (built from configs) against an autograd loop."""

import pytest
import torch
from torch import nn

from datatrace import ModelError, Task
from datatrace.gradients import compute_group_grads, compute_per_sample_grads, hookable_modules
from datatrace.gradients.engine import group_members
from datatrace.projection import make_projector
from datatrace.task import cross_entropy, lm_loss, log_prob
from tests.hf_models import bert, cls_batch, gpt2, linearized, llama, lm_batch, take


def loop_grads(model, task, batch, fn):
    """``{name: (B, *shape)}``: one batch-of-one forward/backward per example."""
    params = task.tracked_params()
    rows = {n: [] for n in params}
    for i in range(batch["input_ids"].shape[0]):
        one = take(batch, i)
        kwargs = {k: v for k, v in one.items() if k != "labels"}
        value = fn(model(**kwargs).logits, one["labels"], one["attention_mask"]).sum()
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def assert_grads_equal(got, ref):
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_causal_lm_padded_batch_matches_autograd_loop(build):
    # default attention (SDPA), every parameter (embeddings, norms, tied head), padding and -100
    model = build()
    assert model.config._attn_implementation == "sdpa"
    batch = lm_batch()
    task = Task(model, loss="lm", target="log_prob")
    for which, fn in (("loss", lm_loss), ("query", lambda o, y, m: -log_prob(o, y, m))):
        got = compute_per_sample_grads(task, batch, which=which).as_dict()
        assert_grads_equal(got, loop_grads(model, task, batch, fn))


def test_gpt2_conv1d_layers_are_factored_and_tied_head_sums_both_uses():
    model = gpt2()
    task = Task(model, loss="lm")
    layers = hookable_modules(task)
    assert "transformer.h.0.attn.c_attn" in layers and "transformer.h.1.mlp.c_proj" in layers
    assert "lm_head" not in layers  # tied to the embedding: its gradient sums both uses
    psg = compute_per_sample_grads(task, lm_batch())
    assert {f.module for f in psg.factors} == set(layers)
    assert all(f.transposed for f in psg.factors)
    assert "transformer.wte.weight" in psg.dense
    # the tied gradient is the embedding's plus the head's: neither alone
    untied = loop_grads(model, task, lm_batch(), lm_loss)["transformer.wte.weight"]
    torch.testing.assert_close(psg.dense["transformer.wte.weight"], untied, rtol=1e-10, atol=0)


def test_bert_classifier_matches_autograd_loop():
    model = bert()
    batch = cls_batch()
    task = Task(model)
    got = compute_per_sample_grads(task, batch).as_dict()
    ref = loop_grads(model, task, batch, lambda o, y, m: cross_entropy(o, y))
    assert_grads_equal(got, ref)


def test_conv1d_projection_and_flat_order_match_linear_copy():
    # Conv1D weights are (I, O): flat rows and projections follow the parameter's layout,
    # i.e. the transpose of an equivalent nn.Linear's
    model = gpt2()
    ref_model = linearized(model)
    batch = lm_batch()
    task = Task(model, loss="lm", module_types="layers")
    ref_task = Task(ref_model, loss="lm", module_types="layers")
    assert task.tracked_names == ref_task.tracked_names
    got = compute_per_sample_grads(task, batch).as_dict()
    ref = compute_per_sample_grads(ref_task, batch).as_dict()
    for n in got:
        expect = ref[n].transpose(1, 2) if ref[n].ndim == 3 else ref[n]
        torch.testing.assert_close(got[n], expect, rtol=1e-10, atol=1e-12, msg=n)
    psg = compute_per_sample_grads(task, batch)
    for kind in ("rademacher", "sjlt"):
        proj = make_projector(kind, 64, seed=0)
        torch.testing.assert_close(
            proj.project(psg), proj.project_flat(psg.flat()), rtol=1e-10, atol=1e-12
        )


def test_group_gradients_sum_members_with_embeddings():
    model = gpt2()
    task = Task(model, loss="lm")
    batch = lm_batch(n=6)
    members = group_members(torch.tensor([0, 1, 0, 2, 1, 0]))
    got = compute_group_grads(task, batch, members).flat()
    per = compute_per_sample_grads(task, batch).flat()
    ref = torch.stack([per[[0, 2, 5]].sum(0), per[[1, 4]].sum(0), per[[3]].sum(0)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_tied_head_selection():
    model = gpt2()
    by_alias = Task(model, loss="lm", params=["lm_head.weight"])
    assert by_alias.tracked_names == ["transformer.wte.weight"]
    assert Task(model, loss="lm", params=["lm_head"]).tracked_names == ["transformer.wte.weight"]
    layers = Task(model, loss="lm", module_types="layers").tracked_names
    assert "transformer.wte.weight" not in layers
    assert len(layers) == 2 * 4 * 2  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x w, b
    with pytest.raises(ModelError, match=r"lm_head\.weight.*params="):
        Task(model, loss="lm", module_types=(nn.Linear,))


def test_llama_module_types_linear_selects_projections():
    model = llama()
    task = Task(model, loss="lm", module_types=(nn.Linear,))
    assert set(hookable_modules(task)) == {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def test_dense_gradients_that_cannot_fit_are_refused_with_the_fix(monkeypatch):
    import datatrace.gradients.engine as engine

    model = gpt2()
    batch = lm_batch()
    # every parameter: the tied embedding alone is 23 x 16 float64 per example
    need = 5 * sum(p.numel() * 8 for n, p in model.named_parameters() if "h." not in n)
    monkeypatch.setattr(engine, "memory_of", lambda device: 4 * need // 2)
    with pytest.raises(ModelError, match=r"transformer\.wte\.weight.*module_types='layers'"):
        compute_per_sample_grads(Task(model, loss="lm"), batch)
    # the layers alone need no dense gradient at all
    psg = compute_per_sample_grads(Task(model, loss="lm", module_types="layers"), batch)
    assert not psg.dense
