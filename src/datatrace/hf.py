"""Hugging Face models: loading from a local directory (never a download) and peft adapters.

A ``transformers`` model is an ``nn.Module`` like any other (DESIGN.md §6): pass it to
:class:`~datatrace.Task` with dict batches (``input_ids``, ``attention_mask``, ``labels``
with ``-100`` masking). This module adds what is specific to the ecosystem:

- :func:`load_pretrained` loads a ``save_pretrained`` directory with ``local_files_only``
  and refuses anything that is not a local directory *before* transformers is asked, so no
  hub access is ever attempted (transformers itself retries the network for a hub id even
  with ``local_files_only=True``).
- :func:`peft_task` attributes a peft LoRA model through its adapter parameters or through
  the merged weights of the adapted layers.

transformers and peft are optional (``pip install "datatrace[hf]"``) and imported lazily.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch import nn

from datatrace.errors import ConfigError, ModelError
from datatrace.task import Task

__all__ = ["load_pretrained", "peft_task"]

ModelKind = Literal["causal-lm", "sequence-classification", "base"]
_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
_PEFT_PREFIX = "base_model.model."


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelError(
            f"this needs the optional package {name!r}, which is not installed; install it with "
            'pip install "datatrace[hf]".'
        ) from exc


def load_pretrained(path: str | Path, kind: ModelKind = "causal-lm", **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` from a local directory, in eval mode.

    Args:
        path: the directory ``model.save_pretrained(path)`` wrote.
        kind: ``"causal-lm"``, ``"sequence-classification"`` or ``"base"`` (the
            ``AutoModelFor...`` class to load with).
        **kwargs: passed to ``from_pretrained`` (e.g. ``torch_dtype``).

    Raises:
        ModelError: ``path`` is not a local directory holding a ``config.json`` (a hub id such
            as ``"gpt2"`` included: datatrace never downloads).

    Example:
        >>> import tempfile, transformers
        >>> cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)
        >>> d = tempfile.mkdtemp()
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        >>> type(load_pretrained(d)).__name__
        'GPT2LMHeadModel'
    """
    if kind not in _AUTO_CLASSES:
        raise ConfigError(f"kind must be one of {sorted(_AUTO_CLASSES)}; got {kind!r}.")
    where = Path(path)
    if not where.is_dir() or not (where / "config.json").is_file():
        what = "a directory without config.json" if where.is_dir() else "not a local directory"
        raise ModelError(
            f"{str(path)!r} is {what}; datatrace loads models only from a local "
            "save_pretrained directory and never downloads (no hub access is attempted). On a "
            "machine with network, run model.save_pretrained('DIR') (or huggingface-cli "
            "download) and pass DIR."
        )
    transformers = _require("transformers")
    auto = getattr(transformers, _AUTO_CLASSES[kind])
    model = auto.from_pretrained(str(where), local_files_only=True, **kwargs)
    return model.eval()


def peft_task(
    model: nn.Module, through: Literal["adapters", "merged"] = "adapters", **task_kwargs: Any
) -> Task:
    """A :class:`~datatrace.Task` attributing a peft LoRA model, by choice of parameters.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapters.
        through: ``"adapters"`` tracks the trainable parameters of the peft model (the LoRA
            ``A``/``B`` matrices, and trained heads in ``modules_to_save``); ``"merged"``
            tracks the weights of the adapted layers after ``W + (α/r) B A`` is merged, on a
            merged copy (the peft model is left as it is), plus the trained heads.
        **task_kwargs: other :class:`~datatrace.Task` arguments (``loss``, ``target``, ...).

    Example:
        >>> import peft, torch
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
        >>> peft_task(lora).tracked_names
        ['base_model.model.0.lora_A.default.weight', 'base_model.model.0.lora_B.default.weight']
        >>> peft_task(lora, through="merged").tracked_names
        ['0.weight']
    """
    peft = _require("peft")
    if not isinstance(model, peft.PeftModel):
        raise ModelError(
            f"peft_task needs a peft.PeftModel; got {type(model).__name__}. Wrap the model with "
            "peft.get_peft_model(model, LoraConfig(...)), or use Task(model) for a plain one."
        )
    if through not in ("adapters", "merged"):
        raise ConfigError(f"through must be 'adapters' or 'merged'; got {through!r}.")
    model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if through == "adapters":
        if not trainable:
            raise ModelError("the peft model has no trainable (adapter) parameters to track.")
        return Task(model, params=trainable, **task_kwargs)
    lora_layer = peft.tuners.lora.LoraLayer
    targets = [n for n, m in model.named_modules() if isinstance(m, lora_layer)]
    if not targets:
        raise ModelError("the peft model has no LoRA layers to merge; use through='adapters'.")
    saved = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    merged = copy.deepcopy(model).merge_and_unload().eval()
    names = dict(merged.named_parameters())
    params = [f"{_strip(t)}.weight" for t in targets]
    for s in saved:
        prefix = f"{_strip(s)}."
        params += [n for n in names if n.startswith(prefix)]
    missing = [p for p in params if p not in names]
    if missing:
        raise ModelError(f"merged model lacks the adapted parameters {missing[:5]}.")
    return Task(merged, params=params, **task_kwargs)


def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
