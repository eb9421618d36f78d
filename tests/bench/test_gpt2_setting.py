"""Tests of the ``pydoc-gpt2`` setting: a transformers GPT-2 on ``pydoc-charlm``'s data."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from datatrace import make_attributor
from datatrace.bench.settings import PydocCharLM, PydocGPT2, get_setting, list_settings
from datatrace.errors import ModelError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> tuple[PydocGPT2, torch.nn.Module]:
    setting = get_setting("pydoc-gpt2", size="small")
    return setting, setting.train(seed=0)


def test_registered_with_charlm_data_and_a_gpt2_model() -> None:
    setting = get_setting("pydoc-gpt2", size="small")
    assert "pydoc-gpt2" in list_settings() and isinstance(setting, PydocGPT2)
    charlm = PydocCharLM(size="small")
    assert setting.data_fingerprint() == charlm.data_fingerprint()
    assert setting.recipe_hash() != charlm.recipe_hash()
    model = setting.build_model(seed=0)
    cfg = model.config
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (
        len(setting.vocab),
        setting.chunk_len,
        32,
        1,
        2,
    )
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    full = get_setting("pydoc-gpt2")
    assert (full.n_train, full.chunk_len, full.d_model, full.n_layers, full.n_heads) == (
        1000,
        64,
        64,
        2,
        4,
    )


def test_training_is_deterministic_and_learns(trained) -> None:
    setting, model = trained
    again = setting.train(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert setting.evaluate(model).loss < 3.0  # unigram entropy of the corpus: 3.25 nats


def test_target_shifts_labels_once(trained) -> None:
    setting, model = trained
    ids = setting.data.test_queries["input_ids"]
    with torch.no_grad():
        hf_mean_nll = model(input_ids=ids, labels=ids).loss  # transformers shifts internally
    measured = setting.measure(model, "test")
    assert torch.allclose(-measured.sum() / (ids.numel() - len(ids)), hf_mean_nll, atol=1e-5)
    with torch.no_grad():
        unshifted = -F.cross_entropy(
            model(input_ids=ids).logits.flatten(0, 1), ids.flatten(), reduction="none"
        )
    assert not torch.allclose(measured, unshifted.view_as(ids).sum(1), atol=1e-2)


def test_layers_task_tracks_the_conv1d_block_layers_not_the_tied_head(trained) -> None:
    setting, model = trained
    task = setting.make_task(model, module_types="layers")
    expected = [
        f"transformer.h.0.{layer}.{p}"
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    assert sorted(task.tracked_params()) == sorted(expected)


def test_ekfac_influence_runs_and_finds_self_influence(trained) -> None:
    setting, model = trained
    task = setting.make_task(model, module_types="layers")
    train = setting.data.train
    attr = make_attributor("if-ekfac", task, batch_size=64).fit(train)
    queries = {k: v[:8] for k, v in train.items()}
    scores = attr.attribute(queries).values
    assert scores.shape == (8, setting.n_train) and torch.isfinite(scores).all()
    # a training chunk is its own strongest proponent
    assert int((scores.argmax(1) == torch.arange(8)).sum()) >= 6
    test = attr.attribute(setting.data.test_queries).values
    assert test.shape == (setting.n_test, setting.n_train) and test.abs().sum() > 0


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    setting = get_setting("pydoc-gpt2", size="small")  # fields and data need no transformers
    assert setting.n_train == 256
    with pytest.raises(ModelError, match=r"datatrace\[hf\]"):
        setting.build_model(seed=0)
