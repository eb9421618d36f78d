"""Per-sample gradients of Linear/Conv2d layers kept as layer factors, as feature rows.

A layer ``z = W a (+ b)`` applied at positions ``t`` (tokens, conv patches) has the
per-sample gradient ``D_n = sum_t g_{n,t} a_{n,t}ᵀ`` (``O x I'``; the bias is a trailing
ones column of ``a``), so inner products of two examples' gradients never need ``D``:

    <D_q, D_n> = sum_{t,s} (a_{q,t} · a_{n,s}) (g_{q,t} · g_{n,s}),

``T_q T_n (I' + O)`` flops per pair instead of ``O I'`` — for ``T = 1`` (MLPs) two small inner
products. :class:`FactorCodec` packs a batch's factors into one tensor row per example, so the
shared loop can store, stream and concatenate them like any features:

    [T_1 .. T_L | layer 1 | ... | layer L]   (one *segment*; TracIn concatenates one per checkpoint)

``T_l`` is layer l's number of positions in this batch, which makes every shard
self-describing (sequence lengths may differ between batches). A layer holds ``a`` (``T I'``)
then ``g`` (``T O``) when the codec's *rule* ``rule(T, O, I')`` says so, else its gradient
matrix (``O I'``): :func:`stores_factors` keeps factors where they are the smaller storage,
:func:`pairs_factors` where they are also the cheaper pairwise product (``T^2 (I' + O) <
O I'``), so layers with many positions (long sequences, conv patches) fall back to the matrix.
Rules must be monotone: keeping factors at ``T`` keeps them at every smaller ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from datatrace.errors import ModelError
from datatrace.gradients.hooks import (
    LayerFactors,
    _matrix_shape,
    _outer_sum,
    hookable_modules,
    is_transposed,
)
from datatrace.task import Task

__all__ = [
    "FactorCodec",
    "GradientBlock",
    "LayerSlot",
    "ParamLayout",
    "contract_low_rank",
    "contract_preconditioned",
    "covers_tracked",
    "factored_modules",
    "pack_low_rank",
    "pairs_factors",
    "stores_factors",
    "unpack_low_rank",
]

Rule = Callable[[int, int, int], bool]  # (T, O, I') -> keep the layer's factors?
LayerPart = tuple[torch.Tensor, ...]  # (a (B, T, I'), g (B, T, O)) or (gradient (B, O, I'),)

_CHUNK = 1 << 24  # elements of the (queries, T_q, B, T_n) intermediate per step


def stores_factors(t: int, o: int, i: int) -> bool:
    """Factors are no larger than the gradient matrix: ``T (I' + O) <= O I'``."""
    return t * (i + o) <= o * i


def pairs_factors(t: int, o: int, i: int) -> bool:
    """Factors also make the cheaper pairwise inner product: ``T^2 (I' + O) < O I'``."""
    return t * t * (i + o) < o * i


def covers_tracked(task: Task) -> bool:
    """Whether the hook engine covers every tracked parameter (Linear/Conv2d layers only)."""
    covered = {n for pair in hookable_modules(task).values() for n in pair if n is not None}
    return all(n in covered for n in task.tracked_names)


def factored_modules(task: Task) -> dict[str, tuple[str | None, str | None]]:
    """Linear/Conv2d/Conv1D modules holding the tracked parameters; refuses any other one.

    Raises:
        ModelError: a tracked parameter is outside supported layers.
    """
    modules = hookable_modules(task)
    covered = {n for pair in modules.values() for n in pair if n is not None}
    rest = [n for n in task.tracked_names if n not in covered]
    if rest:
        raise ModelError(
            f"the layer-factor path (K-FAC/EK-FAC, LoGra, factored features) covers the weights "
            f"and biases of nn.Linear, nn.Conv2d (groups=1, zero padding) and transformers' "
            f"Conv1D layers, each used by one module only; tracked parameters {rest[:10]}"
            f"{' ...' if len(rest) > 10 else ''} are not. Track only those layers: "
            "Task(model, module_types='layers') (a tied LM head is left out), or "
            "Task(model, params=[...])."
        )
    return modules


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's parameters sit in the flat tracked-parameter vector.

    Attributes:
        module: the module's name.
        weight: tracked weight name, or None.
        bias: tracked bias name, or None.
        out_features: ``O``, rows of the gradient matrix.
        in_width: ``I'``, its columns (inputs, plus one for a tracked bias).
        weight_slice: flat slice of the weight, or None.
        bias_slice: flat slice of the bias, or None.
        transposed: the weight is stored ``(I, O)`` (transformers' ``Conv1D``).
    """

    module: str
    weight: str | None
    bias: str | None
    out_features: int
    in_width: int
    weight_slice: slice | None
    bias_slice: slice | None
    transposed: bool = False


class ParamLayout:
    """Flat tracked-parameter vectors <-> per-layer ``(O, I')`` gradient matrices.

    A Linear/Conv2d layer's gradient is a matrix ``[W | b]`` (conv weights flattened to
    ``(O, C * kh * kw)``, the order of ``F.unfold``); the flat vector holds ``W`` then ``b``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
        >>> layout = ParamLayout(Task(model))
        >>> [m.shape for m in layout.to_matrices(torch.zeros(2, layout.dim))]
        [torch.Size([2, 3, 5])]
    """

    def __init__(self, task: Task) -> None:
        offsets, pos = {}, 0
        for name, p in task.tracked_params().items():
            offsets[name] = slice(pos, pos + p.numel())
            pos += p.numel()
        self.dim = pos
        mods = dict(task.model.named_modules())
        self.slots: list[LayerSlot] = []
        for mname, (w, b) in factored_modules(task).items():
            module = mods[mname]
            n_out, n_in = _matrix_shape(module)
            width = (n_in if w is not None else 0) + (b is not None)
            self.slots.append(
                LayerSlot(
                    mname,
                    w,
                    b,
                    n_out,
                    int(width),
                    offsets[w] if w is not None else None,
                    offsets[b] if b is not None else None,
                    is_transposed(module),
                )
            )
        spans = [
            [s for s in (slot.weight_slice, slot.bias_slice) if s is not None]
            for slot in self.slots
        ]
        contiguous = all(len(sp) == 1 or sp[0].stop == sp[1].start for sp in spans)
        bounds = sorted((sp[0].start, sp[-1].stop) for sp in spans)
        tiled = all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
        # contiguous per-layer slices in order, for block-diagonal solvers
        self.blocks = [slice(*b) for b in bounds] if contiguous and tiled else None
        # the layers' slices cover every column (no tracked parameter outside them)
        self._covers = self.blocks is not None and bool(bounds) and bounds[0][0] == 0
        self._covers = self._covers and bounds[-1][1] == pos

    @property
    def modules(self) -> list[str]:
        """Module names, in order."""
        return [slot.module for slot in self.slots]

    def to_matrices(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split ``(k, dim)`` flat rows into per-layer ``(k, O, I')`` matrices."""
        k, out = v.shape[0], []
        for slot in self.slots:
            parts = []
            if slot.weight_slice is not None:
                w = v[:, slot.weight_slice]
                if slot.transposed:  # Conv1D: the flat weight is (I, O)
                    w = w.reshape(k, -1, slot.out_features).transpose(1, 2)
                parts.append(w.reshape(k, slot.out_features, -1))
            if slot.bias_slice is not None:
                parts.append(v[:, slot.bias_slice].reshape(k, slot.out_features, 1))
            out.append(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
        return out

    def from_matrices(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer ``(k, O, I')`` matrices to ``(k, dim)`` flat rows."""
        k = mats[0].shape[0]
        # every column is written when the layers tile the parameters: no zero fill then
        out = mats[0].new_empty(k, self.dim) if self._covers else mats[0].new_zeros(k, self.dim)
        for slot, m in zip(self.slots, mats):
            if slot.weight_slice is not None:
                w = m[:, :, : slot.in_width - (slot.bias is not None)]
                w = w.transpose(1, 2) if slot.transposed else w
                out[:, slot.weight_slice] = w.reshape(k, -1)
            if slot.bias_slice is not None:
                out[:, slot.bias_slice] = m[:, :, -1]
        return out


# ----------------------------------------------------------------------------- rows
class FactorCodec:
    """Factored feature rows of one layout under one rule (see the module docstring).

    Args:
        layout: the task's layer layout.
        rule: which layers keep their factors, from ``(T, O, I')``.

    Example:
        >>> from datatrace.gradients import compute_per_sample_grads
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)).eval()
        >>> task = Task(model)
        >>> psg = compute_per_sample_grads(task, (torch.randn(4, 8), torch.tensor([0, 1, 2, 0])))
        >>> codec = FactorCodec(ParamLayout(task), pairs_factors)
        >>> rows = codec.encode(psg.factors)
        >>> rows.shape[1] < psg.flat().shape[1]
        True
        >>> torch.allclose(codec.inner(rows, rows), psg.flat() @ psg.flat().T, atol=1e-6)
        True
    """

    def __init__(self, layout: ParamLayout, rule: Rule = stores_factors) -> None:
        self.layout, self.rule = layout, rule

    def encode(self, factors: Sequence[LayerFactors]) -> torch.Tensor:
        """One segment per example from the hook engine's factors: ``(B, width)``."""
        by_module = {f.module: f for f in factors}
        parts = [(by_module[m].a, by_module[m].g) for m in self.layout.modules]
        return self._encode_parts([p[0].shape[1] for p in parts], parts)

    def decode(self, rows: torch.Tensor) -> list[LayerPart]:
        """Per layer ``(a (B, T, I'), g (B, T, O))`` or ``(gradient (B, O, I'),)`` of the
        first segment (views into ``rows``)."""
        return self._decode_at(rows, 0)[1]

    def segments(self, rows: torch.Tensor) -> list[list[LayerPart]]:
        """:meth:`decode` for each segment of rows holding several (TracIn's checkpoints)."""
        return [parts for _, parts in self._segments(rows)]

    def inner(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``(k, B)`` gradient inner products of rows ``left`` (k) and ``right`` (B),
        summed over layers and segments; each layer takes the cheaper of the pairwise
        factor product and a product of gradient matrices."""
        total = left.new_zeros(left.shape[0], right.shape[0])
        for lsegs, rsegs in zip(self.segments(left), self.segments(right), strict=True):
            for lpart, rpart in zip(lsegs, rsegs):
                total += _layer_inner(lpart, rpart)
        return total

    def sq_norms(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B,)`` squared gradient norms ``sum_{t,s} (a_t · a_s)(g_t · g_s)``, all segments."""
        total = rows.new_zeros(rows.shape[0])
        for parts in self.segments(rows):
            for part in parts:
                total += _layer_sq_norms(part)
        return total

    def paired_inner(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``(B,)`` inner products of row ``b`` of ``left`` with row ``b`` of ``right`` (the
        diagonal of :meth:`inner`), both in this codec's layout, all segments."""
        total = left.new_zeros(left.shape[0])
        for lsegs, rsegs in zip(self.segments(left), self.segments(right), strict=True):
            for lp, rp in zip(lsegs, rsegs):
                if len(lp) == 2 and len(rp) == 2:  # sum_{t,s} (a_t · a'_s)(g_t · g'_s)
                    aa = torch.bmm(lp[0], rp[0].transpose(1, 2))
                    total += (aa * torch.bmm(lp[1], rp[1].transpose(1, 2))).sum((1, 2))
                else:
                    total += (_matrix(lp) * _matrix(rp)).sum((1, 2))
        return total

    def scale(self, rows: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
        """Rows whose gradients are multiplied by ``factor`` (a number or ``(B,)``): only
        the output-gradient (or matrix) columns change."""
        out = rows.clone()
        col = factor.reshape(-1, 1, 1) if isinstance(factor, torch.Tensor) else factor
        for parts in self.segments(out):
            for part in parts:
                part[-1].mul_(col)  # g, or the matrix: views into out
        return out

    def transform(
        self,
        rows: torch.Tensor,
        maps: Sequence[tuple[torch.Tensor, torch.Tensor]],
        factor: float = 1.0,
    ) -> torch.Tensor:
        """Rows of ``factor L_l D R_l`` for each layer's gradient ``D`` and ``maps[l] =
        (L_l (O, O), R_l (I', I'))``: factors map to ``(a R_l, factor g L_lᵀ)`` (the same
        number of positions: ``L (sum g aᵀ) R = sum (L g)(Rᵀ a)ᵀ``), matrices to
        ``factor L_l D R_l``."""
        out = rows.clone()
        for parts in self.segments(out):
            for part, (left, right) in zip(parts, maps, strict=True):
                left, right = left.to(rows.dtype), right.to(rows.dtype)
                if len(part) == 2:  # views into out
                    part[0].copy_(part[0] @ right)
                    part[1].copy_((part[1] @ left.T).mul_(factor))
                else:
                    part[0].copy_((left @ part[0] @ right).mul_(factor))
        return out

    def matrices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per layer ``(B, O, I')`` gradient matrices of the first segment of ``rows``."""
        return [_matrix(part) for part in self.decode(rows)]

    def join(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate row blocks along the examples, re-encoding them at common ``T``s
        when their positions differ (zero positions add nothing to a gradient)."""
        decoded = [self._segments(b) for b in blocks]
        headers = [[ts for ts, _ in d] for d in decoded]
        if all(h == headers[0] for h in headers):  # the usual case: one layout
            return torch.cat(list(blocks), 0)
        segments = []
        for j in range(len(headers[0])):
            ts = [max(h[j][k] for h in headers) for k in range(len(self.layout.slots))]
            rows = []
            for d in decoded:
                parts = [
                    _pad(part, t) if self.rule(t, s.out_features, s.in_width) else (_matrix(part),)
                    for part, t, s in zip(d[j][1], ts, self.layout.slots)
                ]
                rows.append(self._encode_parts(ts, parts))
            segments.append(torch.cat(rows, 0))
        return torch.cat(segments, 1)

    # ------------------------------------------------------------------ internals
    def _encode_parts(self, ts: Sequence[int], parts: Sequence[LayerPart]) -> torch.Tensor:
        ref = parts[0][0]
        b = ref.shape[0]
        out = [ref.new_tensor([float(t) for t in ts]).expand(b, -1)]
        for slot, t, part in zip(self.layout.slots, ts, parts):
            if self.rule(t, slot.out_features, slot.in_width):
                out += [part[0].reshape(b, -1), part[1].reshape(b, -1)]
            else:
                out.append(_matrix(part).reshape(b, -1))
        return torch.cat(out, 1)

    def _header(self, rows: torch.Tensor, pos: int) -> tuple[list[int], int]:
        n_layers = len(self.layout.slots)
        if rows.shape[0] == 0:
            return [1] * n_layers, pos + n_layers
        return [int(t) for t in rows[0, pos : pos + n_layers].tolist()], pos + n_layers

    def _decode_at(self, rows: torch.Tensor, pos: int) -> tuple[list[int], list[LayerPart], int]:
        b = rows.shape[0]
        ts, pos = self._header(rows, pos)
        out: list[LayerPart] = []
        for slot, t in zip(self.layout.slots, ts):
            o, i = slot.out_features, slot.in_width
            if self.rule(t, o, i):
                a = rows[:, pos : pos + t * i].view(b, t, i)
                g = rows[:, pos + t * i : pos + t * (i + o)].view(b, t, o)
                out.append((a, g))
                pos += t * (i + o)
            else:
                out.append((rows[:, pos : pos + o * i].view(b, o, i),))
                pos += o * i
        return ts, out, pos

    def _segments(self, rows: torch.Tensor) -> list[tuple[list[int], list[LayerPart]]]:
        out, pos = [], 0
        while pos < rows.shape[1]:
            ts, parts, pos = self._decode_at(rows, pos)
            out.append((ts, parts))
        return out


def _matrix(part: LayerPart) -> torch.Tensor:
    return part[0] if len(part) == 1 else _outer_sum(part[1], part[0])


def _pad(part: LayerPart, t: int) -> LayerPart:
    a, g = part
    extra = t - a.shape[1]
    return (
        torch.cat([a, a.new_zeros(a.shape[0], extra, a.shape[2])], 1),
        torch.cat([g, g.new_zeros(g.shape[0], extra, g.shape[2])], 1),
    )


def _layer_inner(left: LayerPart, right: LayerPart) -> torch.Tensor:
    """``(k, B)`` inner products of one layer's gradients, in either representation."""
    if len(left) == 2 and len(right) == 2:
        (aq, gq), (an, gn) = left, right
        k, tq, i = aq.shape
        b, tn, o = gn.shape
        if tq == 1 and tn == 1:
            return (aq[:, 0] @ an[:, 0].T) * (gq[:, 0] @ gn[:, 0].T)
        if tq * tn * (i + o) < o * i:
            out = aq.new_empty(k, b)
            a_n, g_n = an.reshape(b * tn, i), gn.reshape(b * tn, o)
            step = max(1, _CHUNK // max(1, tq * b * tn))
            for s in range(0, k, step):
                aa = aq[s : s + step].reshape(-1, i) @ a_n.T
                gg = gq[s : s + step].reshape(-1, o) @ g_n.T
                out[s : s + step] = (aa * gg).reshape(-1, tq, b, tn).sum((1, 3))
            return out
    lm, rm = _matrix(left), _matrix(right)
    return lm.reshape(lm.shape[0], -1) @ rm.reshape(rm.shape[0], -1).T


def _layer_sq_norms(part: LayerPart) -> torch.Tensor:
    if len(part) == 1:
        return part[0].square().sum((1, 2))
    a, g = part
    if a.shape[1] == 1:
        return a[:, 0].square().sum(1) * g[:, 0].square().sum(1)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


# ---------------------------------------------------------- preconditioned-query contractions
def contract_preconditioned(p: torch.Tensor, part: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``sum_t g_tᵀ P_q a_t`` (or ``<P_q, D_n>``) for ``P`` (k, O, I'): ``(k, B)``.

    Two equivalent orders: ``(P a) · g`` holds a ``(k, O, B, T)`` intermediate (chunked over
    queries), forming the block's gradients holds ``(B, O, I')`` and is one matrix product.
    The first is taken while ``k T < I'`` (fewer queries than inputs), the second otherwise.
    """
    k, o, i = p.shape
    if len(part) == 1:
        return p.reshape(k, -1) @ part[0].reshape(part[0].shape[0], -1).T
    a, g = part
    b, t = a.shape[0], a.shape[1]
    if k * t >= i:
        return p.reshape(k, -1) @ _outer_sum(g, a).reshape(b, -1).T
    out = p.new_empty(k, b)
    step = max(1, _CHUNK // max(1, o * b * t))
    g_obt = g.permute(2, 0, 1)
    for s in range(0, k, step):
        pa = (p[s : s + step].reshape(-1, i) @ a.reshape(b * t, i).T).reshape(-1, o, b, t)
        out[s : s + step] = (pa * g_obt).sum((1, 3))
    return out


class GradientBlock:
    """Training gradients of consecutive batches, per layer, contracted with the
    preconditioned queries at once (:meth:`contract`; a block of recomputed train features).

    Contracting batch by batch re-reads the ``(k, O, I')`` query matrices for every batch: for
    GPT-2's layers and 300 queries a 64-row product ran at ~60% of the rate of a 256-row one.
    A layer contracted through gradient matrices (as :func:`contract_preconditioned` does when
    ``k T >= I'``, decided at the block's first batch) gets one contiguous ``(capacity, O, I')``
    buffer, filled batch by batch; the others keep each batch's factors.

    Args:
        layout: the layers, in the order of the factors and query matrices.
        capacity: most rows the block takes.
        n_queries: ``k``, the number of queries it will be contracted with.
    """

    def __init__(self, layout: ParamLayout, capacity: int, n_queries: int) -> None:
        self.layout, self.capacity, self.k = layout, capacity, n_queries
        self.rows = 0
        self._mats: list[torch.Tensor | None] = [None] * len(layout.slots)
        self._factors: list[list[LayerPart] | None] = [None] * len(layout.slots)

    def add(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append one batch's per-layer factors ``(a (B, T, I'), g (B, T, O))``."""
        b = parts[0][0].shape[0]
        lo, hi = self.rows, self.rows + b
        if hi > self.capacity:
            raise ValueError(f"a block of {self.capacity} rows cannot take rows {lo}:{hi}")
        for j, (a, g) in enumerate(parts):
            mats, factors = self._mats[j], self._factors[j]
            if mats is None and factors is None:  # the first batch decides the layer's form
                if self.k * a.shape[1] >= a.shape[2]:
                    mats = a.new_empty(self.capacity, g.shape[2], a.shape[2])
                    self._mats[j] = mats
                else:
                    factors = self._factors[j] = []
            if mats is not None and a.shape[1] == 1:  # as _outer_sum: a broadcast product
                torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=mats[lo:hi])
            elif mats is not None:
                torch.bmm(g.transpose(1, 2), a, out=mats[lo:hi])
            else:
                assert factors is not None
                factors.append((a, g))
        self.rows = hi

    def contract(self, queries: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(k, rows)``: :func:`contract_preconditioned` of every layer, summed."""
        total: torch.Tensor | None = None
        for p, mats, factors in zip(queries, self._mats, self._factors, strict=True):
            k = p.shape[0]
            if mats is not None:
                term = p.reshape(k, -1) @ mats[: self.rows].reshape(self.rows, -1).T
            else:
                assert factors is not None
                term = torch.cat([contract_preconditioned(p, part) for part in factors], 1)
            total = term if total is None else total.add_(term)
        assert total is not None
        return total


def contract_low_rank(
    left: torch.Tensor, right: torch.Tensor, part: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """As :func:`contract_preconditioned` for ``P = L R`` with ``L`` (k, O, r), ``R`` (k, r, I')."""
    if len(part) == 1:
        return contract_preconditioned(left @ right, part)
    a, g = part
    gl = torch.einsum("bto,kor->kbtr", g, left)
    ra = torch.einsum("bti,kri->kbtr", a, right)
    return (gl * ra).sum((2, 3))


def pack_low_rank(layout: ParamLayout, pre: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows ``[L_1, R_1, ..., L_L, R_L]`` of each layer's truncated SVD ``P ≈ L R``."""
    parts = []
    for p in layout.to_matrices(pre):
        u, sv, vh = torch.linalg.svd(p, full_matrices=False)
        r = min(rank, sv.shape[1])
        parts += [(u[:, :, :r] * sv[:, None, :r]).flatten(1), vh[:, :r, :].flatten(1)]
    return torch.cat(parts, 1)


def unpack_low_rank(
    layout: ParamLayout, packed: torch.Tensor, rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(L, R)`` pairs of each layer packed by :func:`pack_low_rank`."""
    k, pos, out = packed.shape[0], 0, []
    for slot in layout.slots:
        o, i = slot.out_features, slot.in_width
        r = min(rank, o, i)
        left = packed[:, pos : pos + o * r].reshape(k, o, r)
        right = packed[:, pos + o * r : pos + r * (o + i)].reshape(k, r, i)
        out.append((left, right))
        pos += r * (o + i)
    return out
