"""``pydoc-gpt2``: a Hugging Face GPT-2 (built from its config) on the data of ``pydoc-charlm``.

The data, character vocabulary, target and AdamW recipe are :class:`PydocCharLM`'s; only the
model differs: ``transformers.GPT2LMHeadModel(GPT2Config(...))`` with the vocabulary of the
corpus, ``n_positions = chunk_len``, every dropout 0 (training is deterministic and the
trained model needs no ``eval()`` for attribution), randomly initialised from the seed (never
downloaded). Its attention and MLP projections are transformers' ``Conv1D`` (a Linear with a
transposed weight), which K-FAC tracks through ``Task(module_types="layers")``; the LM head is
tied to the token embedding.

transformers is an optional dependency (``pip install "datatrace[hf]"``), imported when the
model is first built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from datatrace.bench.settings.charlm import PydocCharLM
from datatrace.bench.settings.registry import register_setting
from datatrace.hf import _require

__all__ = ["PydocGPT2"]


@register_setting
@dataclass(frozen=True, kw_only=True)
class PydocGPT2(PydocCharLM):
    """A GPT-2 (``transformers.GPT2LMHeadModel``, random init) on ``pydoc-charlm``'s data.

    Fields, data, batches (``{"input_ids", "labels"}``; the shift happens in the ``"lm"``
    loss: only ``input_ids`` reach the model, so transformers' own label shift never runs),
    target and training recipe (AdamW, cosine decay, mean next-character cross-entropy)
    are :class:`PydocCharLM`'s; its full preset trains on fewer chunks, in smaller batches
    at a lower rate. ``d_model``, ``n_heads`` and ``n_layers`` are GPT-2's ``n_embd``,
    ``n_head`` and ``n_layer``. Every dropout is 0. Needs transformers.

    Measured (torch 2.13, transformers 5.25, one thread of a shared 2-core machine at load
    6-10): full (1,000 chunks of 64, 2 blocks of width 64 with 4 heads, 8 epochs in batches
    of 8, peak rate 2e-3) reaches 2.08 nats per character (43% next-character accuracy) on
    the 400 held-out chunks in about 30 s (pydoc-charlm's 4,000 chunks in batches of 32 at
    5e-3: 1.99 nats, 45%, in 144 s, where the character transformer takes 69 s); small (256
    chunks of 32, 1 block of width 32 with 2 heads, 10 epochs) 2.84 nats (27%) in about 2 s.

    Example:
        >>> setting = PydocGPT2(size="small")
        >>> model = setting.build_model(seed=0)
        >>> type(model).__name__, model.config.n_embd, model.config.n_positions
        ('GPT2LMHeadModel', 32, 32)
    """

    name: str = "pydoc-gpt2"
    description: str = "Hugging Face GPT-2 (from config) on pydoc-charlm's data (AdamW)"

    # full: pydoc-charlm's full preset on 1,000 of its chunks, so that a training stays near
    # 25 s on one loaded thread (all 4,000 take 140 s, twice the character transformer), in
    # batches of 8 at a peak rate of 2e-3: 4x the steps at the same cost, 2.08 nats instead
    # of 2.58 (batches of 32 at 5e-3), and ground truth less dominated by the seed
    presets: ClassVar = {
        "full": {**PydocCharLM.presets["full"], "n_train": 1000, "batch_size": 8, "lr": 2e-3},
        "small": {**PydocCharLM.presets["small"]},
    }

    def _build_model(self) -> nn.Module:
        transformers = _require("transformers")
        config = transformers.GPT2Config(
            vocab_size=len(self.vocab),
            n_positions=self.chunk_len,
            n_embd=self.d_model,
            n_layer=self.n_layers,
            n_head=self.n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            # GPT-2's defaults (50256) lie outside the character vocabulary
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
