"""Per-module scores: which layers carry a method's scores.

A method whose score is a linear function of its transformed query features,
``score = combine(Q̃, F)`` (influence, Source, LoGra: an inner product of preconditioned
query gradients with training gradients), splits exactly over a partition of the query
feature columns: keeping only module ``m``'s columns of ``Q̃`` gives module ``m``'s term, and
the terms sum to the total. For a block-diagonal preconditioner (K-FAC, EK-FAC, LoGra) the
term of ``m`` is the score computed with module ``m``'s parameters alone; for a dense one
(GGN with CG, Hessian) it is module ``m``'s share of ``∇L_iᵀ (H + λI)⁻¹ ∇f_q``, the
training gradient's parameters of ``m`` against the full preconditioned query.

Per-token scores (language models): the query objective of a sequence is a sum over its
predicted tokens (``loss="lm"`` with the training-loss or ``log_prob`` target), so its
gradient, and any score linear in it, splits exactly into one term per token. Token ``t``'s
term is the score of the same sequence with every label but position ``t`` ignored (-100).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datatrace.errors import ConfigError, DataError
from datatrace.gradients import PerSampleGrads
from datatrace.gradients.factored import ParamLayout, unpack_low_rank
from datatrace.methods.base import Attributor
from datatrace.scores import Scores

__all__ = ["module_param_spans", "per_module_scores", "per_token_scores", "train_token_terms"]


def module_param_spans(names: Sequence[str], sizes: Sequence[int]) -> dict[str, list[slice]]:
    """``{module: [slices]}`` of flat parameter vectors, modules named by parameter prefixes.

    Example:
        >>> module_param_spans(["0.weight", "0.bias", "2.weight"], [6, 3, 3])
        {'0': [slice(0, 6, None), slice(6, 9, None)], '2': [slice(9, 12, None)]}
    """
    out: dict[str, list[slice]] = {}
    pos = 0
    for name, size in zip(names, sizes):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        out.setdefault(module, []).append(slice(pos, pos + size))
        pos += size
    return out


Spans = Mapping[str, Sequence[slice]]


def _masks(spans: Spans, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    masks, cover = {}, torch.zeros(width, dtype=torch.long)
    for module, slices in spans.items():
        mask = torch.zeros(width, dtype=torch.bool)
        for sl in slices:
            mask[sl] = True
        cover += mask.long()
        masks[module] = mask.to(device)
    if not bool((cover == 1).all()):  # an internal invariant, not a user error
        raise AssertionError("per-module column spans must partition the query features")
    return masks


def per_module_scores(
    attributor: Attributor, queries: Any, spans: Spans | Sequence[Spans]
) -> dict[str, Scores]:
    """``{module: Scores}`` from the columns of the transformed query features per module.

    Args:
        attributor: a fitted attributor whose ``_combine`` is linear in the query features.
        queries: the query data.
        spans: ``{module: [column slices of the transformed query features]}``, a partition
            of the columns (every column in exactly one module); or one such mapping per
            ensemble member, the same modules in each.

    Returns:
        One :class:`~datatrace.scores.Scores` per module, summing to ``attribute(queries)``.
    """
    qs = attributor._transformed_queries(queries)
    per_member = [spans] * len(qs) if isinstance(spans, Mapping) else list(spans)
    masks = [_masks(s, q.shape[1], q.device) for s, q in zip(per_member, qs)]
    modules = list(per_member[0])
    values: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    ids = []
    grouping = attributor.grouping
    iters = [attributor._iter_train_features(ctx) for ctx in attributor._contexts]
    for parts in zip(*iters):
        start = parts[0][0]
        size = 0
        for module in modules:
            blocks = [
                attributor._combine(ctx, q * mask[module], block, start)
                for ctx, q, mask, (_, block) in zip(attributor._contexts, qs, masks, parts)
            ]
            size = blocks[0].shape[1]
            values[module].append(attributor._aggregate(blocks, start))
        unit_ids = torch.arange(start, start + size)
        ids.append(unit_ids if grouping is None else grouping.ids[start : start + size])
    unit_ids = torch.cat(ids)
    describe = attributor.describe()
    return {
        m: Scores(torch.cat(v, 1), unit_ids, None, attributor.name, describe)
        for m, v in values.items()
    }


def per_token_scores(attributor: Attributor, queries: Any) -> torch.Tensor:
    """``(n_query, T, n_units)`` scores per predicted query token; they sum to the scores.

    Entry ``[q, t]`` is the score of the objective term of token ``t`` of query ``q`` (its
    next-token loss given tokens ``< t``); ``t = 0`` and tokens outside the attention mask or
    labelled -100 are never predicted and score 0.

    Args:
        attributor: a fitted attributor whose scores are linear in the query gradient
            (influence, Source, LoGra, grad-dot).
        queries: a dict batch with ``input_ids`` (and optionally ``attention_mask``,
            ``labels``) of an ``loss="lm"`` task.

    Raises:
        ConfigError: the task is not a language model with a per-token additive target.
        DataError: the queries are not a dict batch with ``input_ids``.
    """
    task = attributor.task
    if task.loss_name != "lm" or task.target.name not in ("loss", "log_prob"):
        raise ConfigError(
            f"per-token scores split a query objective summed over tokens: they need "
            f"loss='lm' and target 'loss' or 'log_prob'; got loss={task.loss_name!r}, target="
            f"{task.target.name!r}."
        )
    if not isinstance(queries, Mapping) or "input_ids" not in queries:
        kind = sorted(queries) if isinstance(queries, Mapping) else type(queries).__name__
        raise DataError(
            f"per-token scores need the queries as one dict batch with 'input_ids'; got {kind}."
        )
    ids = queries["input_ids"]
    labels = queries.get("labels", ids)
    n, t = labels.shape
    # one copy of each query per position, every label but that position ignored
    keep = torch.eye(t, dtype=torch.bool, device=labels.device)  # (t, t)
    expanded = {k: v.repeat_interleave(t, 0) for k, v in queries.items() if k != "labels"}
    base = labels.repeat_interleave(t, 0)
    expanded["labels"] = torch.where(keep.repeat(n, 1), base, torch.full_like(base, -100))
    values = attributor.attribute(expanded).values
    return values.reshape(n, t, -1)


def train_token_terms(
    layout: ParamLayout, psg: PerSampleGrads, q: torch.Tensor, rank: int | None
) -> torch.Tensor:
    """``(k, n, T)``: ``sum_layers g_{n,t}ᵀ P_q a_{n,t}`` for the preconditioned queries ``q``
    (flat rows, or low-rank pairs packed at ``rank``) and the training factors ``psg``.

    Raises:
        ConfigError: the layers have different numbers of positions (conv patches).
    """
    by_module = {f.module: f for f in psg.factors}
    lengths = {by_module[m].a.shape[1] for m in layout.modules}
    if len(lengths) != 1:
        raise ConfigError(
            f"per-token training scores need every tracked layer applied once per "
            f"token; the layers have {sorted(lengths)} positions per example."
        )
    mats = None if rank is not None else layout.to_matrices(q)
    low = unpack_low_rank(layout, q, rank) if rank is not None else None
    total = None
    for j, m in enumerate(layout.modules):
        f = by_module[m]
        a, g = f.a.to(q.dtype), f.g.to(q.dtype)
        if low is None:
            assert mats is not None
            term = torch.einsum("koi,bti,bto->kbt", mats[j], a, g)
        else:
            left, right = low[j]
            gl = torch.einsum("bto,kor->kbtr", g, left)
            term = (gl * torch.einsum("bti,kri->kbtr", a, right)).sum(3)
        total = term if total is None else total + term
    assert total is not None
    return total
