"""Tiny Hugging Face models built from configs (no download), float64, and their batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 0, vocab: int = 23, n_embd: int = 16, n_layer: int = 2) -> nn.Module:
    """A 2-layer GPT-2 (``Conv1D`` layers, head tied to the embedding), default attention."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def llama(seed: int = 0, vocab: int = 23) -> nn.Module:
    """A 2-layer Llama-style decoder (``nn.Linear``, RMSNorm, rotary), default attention."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def bert(seed: int = 0, vocab: int = 23, n_labels: int = 3) -> nn.Module:
    """A 2-layer BERT sequence classifier."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=n_labels,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(cfg).double().eval()


def lm_batch(n: int = 5, length: int = 9, vocab: int = 23, seed: int = 1) -> dict:
    """Right-padded token batch: varying lengths, mask 0 and labels -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cls_batch(n: int = 5, length: int = 8, vocab: int = 23, seed: int = 2) -> dict:
    batch = lm_batch(n, length, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["labels"] = torch.randint(0, 3, (n,), generator=g)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


def take(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def linearized(model: nn.Module) -> nn.Module:
    """A copy with every ``Conv1D`` replaced by the equivalent ``nn.Linear`` (weight ``Wᵀ``).

    The GPT-2 head stays tied to the embedding. Used as a reference: the Conv1D paths must
    give the same numbers as the Linear ones.
    """
    import copy

    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Conv1D):
            lin = nn.Linear(module.nx, module.nf, dtype=module.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(module.weight.T)
                lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, lin)
    return out.eval()
