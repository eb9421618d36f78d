"""Attribution end to end on Hugging Face models built from configs (GPT-2, BERT, peft LoRA)."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datatrace import ModelError, Task, make_attributor
from datatrace.gradients import compute_per_sample_grads, hookable_modules
from datatrace.hf import load_pretrained, peft_task
from tests.hf_models import bert, cls_batch, gpt2, linearized, lm_batch

peft = pytest.importorskip("peft")

LAYER_METHODS = ["if-ekfac", "if-kfac", "logra", "grad-dot", "tracin"]


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_conv1d_scores_equal_linear_copy(method):
    # GPT-2's Conv1D layers are Linear layers with transposed weights: every method on the
    # layers must give the scores of the same model written with nn.Linear
    model = gpt2()
    train, queries = lm_batch(n=10, seed=3), lm_batch(n=3, seed=4)
    scores = []
    for m in (model, linearized(model)):
        task = Task(m, loss="lm", target="log_prob", module_types="layers")
        scores.append(make_attributor(method, task).fit(train).attribute(queries).values)
    assert scores[0].shape == (3, 10)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-9, atol=1e-12)


def test_explicit_ggn_influence_through_conv1d_equals_linear_copy():
    # the dense GGN (forward-mode products under the default SDPA attention) of one MLP block
    model = gpt2(n_embd=8, n_layer=1)
    train, queries = lm_batch(n=6, seed=3), lm_batch(n=2, seed=4)
    scores = []
    for m in (model, linearized(model)):
        task = Task(m, loss="lm", target="log_prob", params=["transformer.h.0.mlp"])
        scores.append(make_attributor("if-explicit", task).fit(train).attribute(queries).values)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-9, atol=1e-12)


def test_trak_on_gpt2_default_attention_all_parameters_is_batch_size_invariant():
    model = gpt2()
    assert model.config._attn_implementation == "sdpa"
    train, queries = lm_batch(n=10, seed=3), lm_batch(n=3, seed=4)
    task = Task(model, loss="lm", target="log_prob")  # embeddings, norms, tied head included
    values = [
        make_attributor("trak", task, proj_dim=64, batch_size=bs)
        .fit(train)
        .attribute(queries)
        .values
        for bs in (3, 10)
    ]
    assert values[0].shape == (3, 10) and bool(torch.isfinite(values[0]).all())
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-12)


def grads_of(model, task, batch, which):
    return compute_per_sample_grads(task, batch, which=which).flat()


def test_bert_classifier_grad_dot_equals_loop_and_layer_methods_run():
    model = bert()
    train, queries = cls_batch(n=8, seed=5), cls_batch(n=3, seed=6)
    task = Task(model, target="margin")
    g = compute_per_sample_grads(task, train).flat()
    gq = compute_per_sample_grads(task, queries, which="query").flat()
    dot = make_attributor("grad-dot", task).fit(train).attribute(queries).values
    torch.testing.assert_close(dot, gq @ g.T, rtol=1e-10, atol=1e-14)
    layers = Task(model, target="margin", module_types="layers")
    for method in ("trak", "if-ekfac"):
        values = make_attributor(method, layers).fit(train).attribute(queries).values
        assert values.shape == (3, 8) and bool(torch.isfinite(values).all())


def lora_bert():
    model = bert()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero: give the adapters a trained-looking value
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    return lora.eval()


def test_peft_through_adapters_equals_loop_and_factors_lora_layers():
    lora = lora_bert()
    task = peft_task(lora)
    assert task.tracked_names and all("lora_" in n for n in task.tracked_names)
    assert len(hookable_modules(task)) == len(task.tracked_names)  # every A and B a Linear
    train, queries = cls_batch(n=8, seed=5), cls_batch(n=3, seed=6)
    params = task.tracked_params()

    def loop(batch):
        rows = []
        for i in range(batch["labels"].shape[0]):
            kwargs = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
            loss = F.cross_entropy(lora(**kwargs).logits, batch["labels"][i : i + 1])
            rows.append(
                torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])
            )
        return torch.stack(rows)

    dot = make_attributor("grad-dot", task).fit(train).attribute(queries).values
    torch.testing.assert_close(dot, loop(queries) @ loop(train).T, rtol=1e-10, atol=1e-14)
    values = make_attributor("if-ekfac", task).fit(train).attribute(queries).values
    assert values.shape == (3, 8) and bool(torch.isfinite(values).all())


def test_peft_through_merged_weights_tracks_adapted_layers_of_a_merged_copy():
    lora = lora_bert()
    before = {n: p.clone() for n, p in lora.named_parameters()}
    task = peft_task(lora, through="merged")
    names = task.tracked_names
    assert names and all(n.endswith(("query.weight", "value.weight")) for n in names)
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters())  # untouched
    train, queries = cls_batch(n=8, seed=5), cls_batch(n=3, seed=6)
    # the merged model computes what the adapted one does
    kwargs = {k: v for k, v in queries.items() if k != "labels"}
    torch.testing.assert_close(task.model(**kwargs).logits, lora(**kwargs).logits)
    for method in ("grad-dot", "if-ekfac"):
        values = make_attributor(method, task).fit(train).attribute(queries).values
        assert values.shape == (3, 8) and bool(torch.isfinite(values).all())


def test_peft_task_refuses_plain_model():
    with pytest.raises(ModelError, match="PeftModel"):
        peft_task(bert())


def test_load_pretrained_round_trip_gives_identical_scores(tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    loaded = load_pretrained(tmp_path / "gpt2", torch_dtype=torch.float64)
    train, queries = lm_batch(n=6, seed=3), lm_batch(n=2, seed=4)
    scores = [
        make_attributor("grad-dot", Task(m, loss="lm")).fit(train).attribute(queries).values
        for m in (model, loaded)
    ]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=0)


def test_load_pretrained_refuses_hub_id_without_touching_the_network(monkeypatch):
    import transformers

    def no_call(*args, **kwargs):
        raise AssertionError("transformers was asked to load a hub id")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_call)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"'gpt2' is not a local directory.*never downloads"):
        load_pretrained("gpt2")
    assert time.perf_counter() - t0 < 1.0


class FunctionalWrapper(nn.Module):
    """Uses a GPT-2 Conv1D's weights without calling it: invisible to forward hooks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.inner.bias, x.reshape(-1, x.shape[-1]), self.inner.weight).view(
            *x.shape[:-1], -1
        )


def test_conv1d_used_by_an_unsupported_wrapper_is_refused():
    model = gpt2()
    block = model.transformer.h[0].mlp
    block.c_fc = FunctionalWrapper(block.c_fc)
    task = Task(model, loss="lm", module_types="layers")
    assert "transformer.h.0.mlp.c_fc.inner" in hookable_modules(task)
    with pytest.raises(ModelError, match=r"c_fc\.inner.*never called.*F\.linear"):
        compute_per_sample_grads(task, lm_batch())


def pad_more(batch: dict, extra: int) -> dict:
    """The same sequences with ``extra`` more padded positions (mask 0, label -100)."""
    n = batch["input_ids"].shape[0]
    return {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(n, extra, dtype=torch.long)], 1),
        "attention_mask": torch.cat(
            [batch["attention_mask"], torch.zeros(n, extra, dtype=torch.long)], 1
        ),
        "labels": torch.cat([batch["labels"], torch.full((n, extra), -100)], 1),
    }


@pytest.mark.parametrize("method", ["if-ekfac", "if-kfac", "logra", "grad-dot", "trak"])
def test_masked_positions_change_nothing(method):
    # padded positions enter no per-example gradient, no K-FAC covariance and no eigenvalue
    # correction: extra padding leaves every score as it was
    model = gpt2()
    train, queries = lm_batch(n=10, seed=3), lm_batch(n=3, seed=4)
    task = Task(model, loss="lm", target="log_prob", module_types="layers")
    scores = [
        make_attributor(method, task).fit(t).attribute(q).values
        for t, q in ((train, queries), (pad_more(train, 4), pad_more(queries, 2)))
    ]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-9, atol=1e-12)
