"""Synthetic jobs of the scale, store and group questions (built here, nothing downloaded).

- an MLP on Gaussian inputs ``x ~ N(0, I_d)`` labelled by the argmax of a fixed random linear
  teacher, trained for one epoch with Adam (:func:`trained_mlp`);
- chunks of 32 bytes of Python's own docs (``pydoc_data.topics``) for a 2-layer GPT-2 with
  random weights (:func:`tiny_gpt2`, :func:`pydoc_sequences`): throughput does not depend on
  training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datatrace.bench.digits import mlp

__all__ = ["SEQ", "pydoc_sequences", "teacher_data", "tiny_gpt2", "trained_mlp"]

SEQ = 32  # bytes per GPT-2 sequence


def teacher_data(n: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs of ``d_in`` features, labelled by a fixed random linear teacher."""
    teacher = torch.randn(d_in, 10, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(1)


def trained_mlp(d_in: int, hidden: tuple[int, ...], n: int, batch_size: int) -> nn.Module:
    """The ReLU MLP ``d_in -> hidden -> 10`` (init seed 0) trained one epoch with Adam (lr 1e-3)
    on ``teacher_data(n, d_in, seed=1)`` in batches of ``batch_size``; in eval mode."""
    torch.manual_seed(0)
    model = mlp(d_in, hidden, 10)
    x, y = teacher_data(n, d_in, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(batch_size):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def tiny_gpt2(**sizes: int) -> nn.Module:
    """A GPT-2 (``Conv1D`` layers, default SDPA attention), random weights drawn from the global
    generator: 2 layers, ``n_embd=64``, 4 heads and a byte vocabulary, unless ``sizes`` (fields
    of ``GPT2Config``) say otherwise (benchmarks/gpu_check.py builds a 1-layer one)."""
    import transformers

    config: dict[str, Any] = {"vocab_size": 256, "n_positions": SEQ, "n_embd": 64, "n_layer": 2}
    config |= {"n_head": 4, **sizes, "bos_token_id": 0, "eos_token_id": 0}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


def pydoc_sequences(n: int, offset: int) -> dict[str, torch.Tensor]:
    """``n`` windows of ``SEQ`` bytes of ``pydoc_data.topics``, starting ``SEQ // 2`` apart from
    window ``offset`` on and cycling over the corpus; labels are the inputs (causal LM)."""
    from datatrace.bench.settings.charlm import pydoc_corpus

    corpus = torch.tensor(list(pydoc_corpus().encode("utf-8")), dtype=torch.long)
    starts = (torch.arange(offset, offset + n) * (SEQ // 2)) % (corpus.numel() - SEQ)
    ids = corpus[starts[:, None] + torch.arange(SEQ)]
    return {"input_ids": ids, "labels": ids}
