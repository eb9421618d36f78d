"""kronfluence EK-FAC influence on the ``pydoc-gpt2`` GPT-2 (inputs from ``kronfluence_charlm.py``).

Runs inside kronfluence's own virtualenv (``/tmp/peer-kronfluence``, with ``transformers``
installed at datatrace's version), importing only the standard library, torch, transformers
and kronfluence -- never datatrace. It rebuilds ``GPT2LMHeadModel`` from the saved config
fields and state dict and replaces every transformers ``Conv1D`` by the equivalent
``nn.Linear`` (weight transposed, same bias: ``x W + b = x (W^T)^T + b``), because kronfluence
tracks ``nn.Linear``/``nn.Conv2d`` only (kronfluence's own GPT-2 example converts the same
way). kronfluence then tracks exactly the 4 projections of each block (``attn.c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), which is what datatrace's
``Task(module_types="layers")`` tracks on the unconverted model; the LM head, an
``nn.Linear`` tied to the token embedding, is left out on both sides.

Everything else (query log-likelihood check, EK-FAC with kronfluence's default true Fisher,
pairwise scores at every damping, timing, sign) is ``kronfluence_charlm_runner``'s.

Usage (``kronfluence_charlm.py --setting pydoc-gpt2`` does this)::

    /tmp/peer-kronfluence/bin/python benchmarks/peers/kronfluence_gpt2_runner.py \
        --inputs DIR/inputs.pt --out DIR/kronfluence.pt --spec '{"threads": 1, ...}'
"""

from __future__ import annotations

from typing import Any

import torch
from kronfluence_charlm_runner import kronfluence_ekfac  # same directory, no datatrace
from peer_runner import run_kronfluence_script
from torch import nn

BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by an equal ``nn.Linear``; the count."""
    from transformers.pytorch_utils import Conv1D

    swaps = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, Conv1D)
    ]
    for parent, child_name, conv in swaps:
        n_in, n_out = conv.weight.shape  # Conv1D stores its weight (in, out)
        linear = nn.Linear(n_in, n_out, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        setattr(parent, child_name, linear)
    return len(swaps)


def build_gpt2(data: dict[str, Any]) -> nn.Module:
    """The GPT-2 of the saved config fields and state, Conv1D layers as ``nn.Linear``, eval."""
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**data["arch"]))
    model.load_state_dict(data["state"])
    n = conv1d_to_linear(model)
    if n != len(BLOCK_LAYERS) * model.config.n_layer:
        raise RuntimeError(f"converted {n} Conv1D layers; expected 4 per block")
    return model.eval()


def tracked_modules(n_layer: int) -> list[str]:
    """The block projections both sides track (the tied LM head is not among them)."""
    return [f"transformer.h.{i}.{name}" for i in range(n_layer) for name in BLOCK_LAYERS]


def run(data: dict[str, Any], spec: dict[str, Any], work: Any) -> dict[str, Any]:
    tracked = tracked_modules(data["arch"]["n_layer"])
    return kronfluence_ekfac(data, spec, work, build_model=build_gpt2, tracked=tracked)


def main() -> None:
    run_kronfluence_script(__doc__.splitlines()[0], "peer-kronfluence-gpt2-", run)


if __name__ == "__main__":
    main()
