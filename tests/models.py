"""Tiny float64 models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 6, hidden: int = 5, n_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
        .double()
        .eval()
    )


def bias_free_mlp(n_out: int = 3) -> nn.Module:
    """6-9-7-n_out tanh MLP whose first layer has no bias (factored-feature edge cases)."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, n_out)
        )
        .double()
        .eval()
    )


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2, dilation=1, padding=2, bias=False),
            nn.Flatten(),
            nn.LayerNorm(2 * 5 * 5),
            nn.Linear(2 * 5 * 5, 4),
        )
        .double()
        .eval()
    )


class TinyLM(nn.Module):
    """Embedding, one self-attention block with Linear projections, tied-free LM head."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.emb(input_ids)
        t = h.shape[1]
        att = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        h = self.ln(h + att @ self.v(h))
        return self.head(h)


def tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLM().double().eval()


def classification_data(
    n: int = 10, d_in: int = 6, n_classes: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def rounded_data(
    n: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float32 inputs of 6 features cast to ``dtype`` (a half model's inputs are rounded
    the same way) and labels of 3 classes: the half-precision tests and benchmarks/gpu_check.py."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def autograd_loop(model: nn.Module, fn, xs, ys, names: list[str] | None = None) -> torch.Tensor:
    """Reference per-sample gradients: one backward per example."""
    params = dict(model.named_parameters())
    names = names or list(params)
    rows = []
    for i in range(len(ys)):
        value = fn(model, xs[i : i + 1], ys[i : i + 1])
        grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(params[n])).flatten()
                    for g, n in zip(grads, names)
                ]
            )
        )
    return torch.stack(rows)
