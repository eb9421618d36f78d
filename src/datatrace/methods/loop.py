"""The shared attribution loop (DESIGN.md §1, §4): members, batches, groups, store, scoring.

For every member ``m``: ``scores_m = transform_m(Q_m) @ F_m^T`` where ``F_m`` holds the train
features and ``Q_m`` the query features; members are then aggregated (mean by default). The
loop builds each member's :class:`~datatrace.methods.context.MemberContext` (its effective
task, weights, projector and train-feature form, decided here from the method's
``feature_forms``), asks the method for its state of the member
(``_prepare_member``, then ``_fit_member`` after featurization) and keeps that typed state
in the context; it owns everything else (:mod:`datatrace.methods.base` describes groups,
recomputed train features, ``torchrun``, devices and dtypes).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from datatrace import distributed
from datatrace._checks import finite_or_raise
from datatrace._progress import progress_bar
from datatrace.data import (
    Batch,
    batch_size_of,
    count_or_none,
    iter_batch_range,
    iter_batches,
    num_batches,
    num_examples,
)
from datatrace.ensemble import member_scope, member_states
from datatrace.errors import DataError, ModelError, NotFittedError
from datatrace.gradients import group_members
from datatrace.gradients.factored import ParamLayout
from datatrace.group import Grouping, take_examples
from datatrace.methods.context import FeatureForm, MemberContext, StateT, decide_feature_form
from datatrace.methods.hooks import MethodHooks
from datatrace.projection import make_projector
from datatrace.store import (
    RowsFingerprint,
    Store,
    fingerprint_batch,
    fingerprint_tensors,
    rows_per_shard,
)
from datatrace.task import Member, Task

__all__ = ["SharedLoop"]

_log = logging.getLogger("datatrace.methods.base")  # one logger name for the loop and its API


class SharedLoop(MethodHooks[StateT]):
    """The loop over members, batches, groups and store shards that every method shares."""

    _device_arg: torch.device | None
    _device: torch.device | None
    _store_path: Any
    _shard_bytes: int | None
    _shard_rows: dict[int, int]  # member index -> rows of its per-example store shards

    def _fit_members(self, members: list[Member], train: Any) -> None:
        self._recompute = self._recomputes_train_features(members)
        _log.info(
            "%s: fit on %d training examples (%d units, %d member(s))%s",
            self.name,
            self._n_train,
            self._n_units,
            len(members),
            "; train features recomputed at each scoring call" if self._recompute else "",
        )
        self._contexts = []
        self._shard_rows = {}
        self._check_cost(None)
        for index, member in enumerate(members):
            with self._member_task(member) as task:
                pairs = member_states(task, member)
                for checkpoint, state in pairs:
                    where = "the model" if checkpoint is None else f"checkpoint {checkpoint.step}"
                    task.check_finite_state(state, f"{where} (member {index})")
                projector = None
                if self.config.projector != "none":
                    projector = make_projector(
                        self.config.projector,
                        self.config.proj_dim,
                        seed=self.config.seed,
                        member=index,
                    )
                checkpoints = tuple(c for c, _ in pairs)
                form, layout = self._feature_form(task)
                states = tuple(s for _, s in pairs)
                ctx = MemberContext[StateT](
                    index, member, self.task, checkpoints, states, projector, form, layout
                )
                scoped = replace(ctx, task=task, scoped=True)
                scoped = scoped.with_state(self._prepare_member(scoped))
                if not self._recompute:
                    self._featurize_train(scoped, train)
                fitted = self._fit_member(scoped)
            # kept outside the scope: the attributor's task (a LoRA member's copy is dropped)
            self._contexts.append(ctx.with_state(fitted))

    def _feature_form(self, task: Task) -> tuple[FeatureForm, ParamLayout | None]:
        """This fit's train-feature form for a member's effective ``task`` (and its layout)."""
        forms, demand = self.feature_forms(self.config), self.form_demand(self.config)
        return decide_feature_form(forms, self.config, self._groups_arg is not None, task, demand)

    def _cached_arrays(
        self,
        ctx: MemberContext[StateT],
        tag: str,
        names: Sequence[str],
        fit: Callable[[], Mapping[str, torch.Tensor]],
        salt: bytes = b"",
    ) -> dict[str, torch.Tensor]:
        """A member's fitted arrays (curvature factors, a refit layer), through the store.

        Without a store ``fit()``; with one, :meth:`Store.cached` under the key
        ``"{tag}-m{member}-{digest}-"``, where the digest hashes the training batches and
        ``salt`` (whatever else the arrays depend on that the store's config and
        fingerprints do not name, e.g. a curvature subset), so arrays fitted on other data
        are never read back. Returns ``{name: tensor}`` in the order of ``names``; stored
        arrays come back on the CPU in their recorded dtype.
        """
        if self.store is None:
            arrays = fit()
            return {n: arrays[n] for n in names}
        h = hashlib.sha256()
        for batch in iter_batches(self._train, self.config.batch_size):
            h.update(fingerprint_batch(batch).encode())
        h.update(salt)
        return self.store.cached(f"{tag}-m{ctx.index}-{h.hexdigest()[:16]}-", names, fit)

    def _check_fitted(self) -> None:
        if not self._contexts or self._device is None:
            raise NotFittedError(
                f"{type(self).__name__}.attribute/self_attribute was called before fit(); call "
                "attributor.fit(train) first."
            )

    @contextmanager
    def _fitted_device(self) -> Iterator[None]:
        """Inside: the model is on the device the fitted state lives on, batches move to it.

        With ``device=`` a model moved elsewhere since ``fit`` is moved back (in place);
        without it, that is refused: features and curvature cannot follow it silently.
        """
        self._check_fitted()
        assert self._device is not None
        if self.task.device != self._device:
            if self._device_arg is None:
                raise ModelError(
                    f"the model is on {self.task.device} but {type(self).__name__} was fitted on "
                    f"{self._device}, where its features and curvature live; move the model back "
                    f"(model.to({str(self._device)!r})), fit again, or pass device= to the "
                    "attributor to have it moved."
                )
            self.task.to(self._device)
        with self.task.moving_batches():
            yield

    @contextmanager
    def _member_task(self, member: Member) -> Iterator[Task]:
        """The task of the member's effective model (dropout masks, LoRA adapter), valid
        inside the block; ``self.task`` stays the attributor's."""
        with member_scope(self.task, member) as effective:
            yield effective

    @contextmanager
    def _member_scope(self, ctx: MemberContext[StateT]) -> Iterator[MemberContext[StateT]]:
        """Inside: ``ctx`` with the member's effective task (``scoped``).

        Re-entering a scoped context changes nothing (a dropout member's masks must not be
        applied twice).
        """
        if ctx.scoped:
            yield ctx
            return
        with self._member_task(ctx.member) as task:
            yield replace(ctx, task=task, scoped=True)

    def _train_batches(self, local: bool) -> Iterator[tuple[int, int, Batch]]:
        """``(shard index, first example, batch)`` of each training batch (one shard each).

        With ``local=True`` this rank's contiguous slice of the batches (all of them in one
        process); shard indices stay global, so the store's layout does not depend on the
        world size.
        """
        count = num_batches(self._train, self.config.batch_size)
        lo, hi = distributed.local_range(count) if local else (0, count)
        batches = iter_batch_range(self._train, self.config.batch_size, lo, hi)
        for b, (offset, batch) in enumerate(batches, start=lo):
            yield b, offset, batch

    def _batch_train_features(
        self, ctx: MemberContext[StateT], offset: int, batch: Batch
    ) -> torch.Tensor:
        """The rows of one per-example shard: train features of the batch at ``offset``."""
        whole = self._fitted_train_features(ctx)
        if whole is not None:
            return self._to_feature_dtype(whole[offset : offset + batch_size_of(batch)])
        return self._unit_train_features(self._batch_context(ctx, offset, batch), batch)

    @staticmethod
    def _batch_context(ctx: MemberContext[StateT], offset: int, batch: Batch) -> Any:
        """``ctx`` with the training indices of the batch at ``offset`` (per-example masks)."""
        try:
            return replace(ctx, batch_indices=torch.arange(offset, offset + batch_size_of(batch)))
        except DataError:  # a batch whose size cannot be read: no indices
            return replace(ctx, batch_indices=None)

    def _featurize_train(self, ctx: MemberContext[StateT], train: Any) -> None:
        whole = self._fitted_train_features(ctx)
        if whole is not None and self.store is None:  # one block, on every rank
            ctx.features[:] = [self._to_feature_dtype(whole)]
            return
        if self._grouping is not None:
            self._featurize_train_groups(ctx, train, self._grouping)
            return
        if self.store is not None:
            self._featurize_train_shards(ctx, self.store)
            self._share_train_features(ctx)
            return
        lo, hi = distributed.local_range(num_batches(train, self.config.batch_size))
        it = progress_bar(
            self._train_batches(local=True),
            desc=f"{self.name}: train features (member {ctx.index})",
            enabled=self.config.progress,
            total=hi - lo,
            unit="batch",
        )
        for _, offset, batch in it:
            ctx.features.append(self._batch_train_features(ctx, offset, batch))
        self._share_train_features(ctx)

    def _featurize_train_shards(self, ctx: MemberContext[StateT], store: Store) -> None:
        """Train features into store shards of about ``shard_bytes`` each.

        Shard ``s`` holds the rows of examples ``s * R .. (s + 1) * R - 1``, ``R`` rows of
        ``shard_bytes`` (from the row size of a stored shard, else of the first batch's
        features), whatever the batch size: the features are computed ``batch_size`` examples
        at a time, a batch cut by a shard boundary is featurized once and its rows split, and
        a shard is written once full. Resume granularity is the shard: a complete shard whose
        examples hash as recorded is skipped (its inputs are read, not featurized); a batch
        reaching into an incomplete shard is featurized whole, so a resumed run's shards are
        bit-identical to an uninterrupted run's.
        """
        kind = f"train-m{ctx.index}"
        offsets = self._batch_offsets()
        last: dict[int, torch.Tensor] = {}  # the latest featurized batch, by batch index

        def features(j: int, offset: int, batch: Batch) -> torch.Tensor:
            if j not in last:
                last.clear()
                last[j] = self._batch_train_features(ctx, offset, batch)
            return last[j]

        def probe() -> int:  # rank 0: bytes per row, from the store or the first batch
            row_bytes = store.row_bytes(kind)
            if row_bytes is None:
                _, offset, batch = next(self._train_batches_between(offsets, 0, 1))
                feats = features(0, offset, batch)
                row_bytes = feats[:1].numel() * feats.element_size()
            return row_bytes

        me = distributed.rank()
        row_bytes = distributed.run_collectively(lambda: probe() if me == 0 else 0)
        rows = rows_per_shard(distributed.broadcast_object(row_bytes), self._shard_bytes)
        self._shard_rows[ctx.index] = rows
        n = offsets[-1]
        lo, hi = distributed.local_range(-(-n // rows))
        it = progress_bar(
            range(lo, hi),
            desc=f"{self.name}: train feature shards (member {ctx.index})",
            enabled=self.config.progress,
            unit="shard",
        )
        reused = 0
        # Each shard is written by one background thread while the next is featurized: at
        # most one write in flight, in shard order, each waited for before the next starts
        # (a write's error surfaces there, or when the pool closes, before fit returns).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="datatrace-store") as pool:
            writing: Future[None] | None = None
            for s in it:
                first, stop = s * rows, min(n, (s + 1) * rows)
                if store.has_shard(kind, s):  # complete: still ours if its examples are the same
                    fp = RowsFingerprint()
                    for _, offset, batch in self._train_batches_between(offsets, first, stop):
                        fp.update(_rows_of(batch, max(first, offset) - offset, stop - offset))
                    if store.has_shard(kind, s, fp.hexdigest()):
                        reused += 1
                        continue
                fp, parts = RowsFingerprint(), []
                for j, offset, batch in self._train_batches_between(offsets, first, stop):
                    a, b = max(first, offset) - offset, stop - offset  # rows of this shard
                    fp.update(_rows_of(batch, a, b))
                    parts.append(features(j, offset, batch)[a:b])
                block = parts[0] if len(parts) == 1 else torch.cat(parts)
                if writing is not None:
                    writing.result()
                writing = pool.submit(store.write_shard, kind, s, block, fp.hexdigest())
            if writing is not None:
                writing.result()
        if reused:
            _log.info(
                "%s: member %d: %d of %d train feature shards reused from the store at %s",
                self.name,
                ctx.index,
                reused,
                hi - lo,
                self._store_path,
            )

    def _batch_offsets(self) -> list[int]:
        """First example of every training batch, then the number of examples."""
        train = self._train
        if isinstance(train, DataLoader):
            sizes = [len(b) for b in train.batch_sampler]  # type: ignore[union-attr]
            out = [0]
            for size in sizes:
                out.append(out[-1] + size)
            return out
        n = num_examples(train)
        return [*range(0, n, self.config.batch_size), n]

    def _train_batches_between(
        self, offsets: list[int], first: int, stop: int
    ) -> Iterator[tuple[int, int, Batch]]:
        """``(batch index, first example, batch)`` of the batches holding examples
        ``first .. stop - 1`` (``offsets`` from :meth:`_batch_offsets`)."""
        lo = bisect.bisect_right(offsets, first) - 1
        hi = bisect.bisect_left(offsets, stop)
        batches = iter_batch_range(self._train, self.config.batch_size, lo, hi)
        for j, (offset, batch) in enumerate(batches, start=lo):
            yield j, offset, batch

    def _share_train_features(self, ctx: MemberContext[StateT]) -> None:
        """Distributed: give every rank every shard, so all of them fit the same state.

        With a store, rank 0 merges the ranks' journals and the others reload the manifest;
        in memory, the blocks are all-gathered (every rank then holds all train features).
        """
        if not distributed.is_distributed():
            return
        if self.store is not None:
            distributed.sync_store(self.store)
        else:
            ctx.features[:] = distributed.all_gather_blocks(ctx.features)

    def _unit_train_features(self, ctx: MemberContext[StateT], batch: Batch) -> torch.Tensor:
        feats = self._finish_train_features(ctx, self._train_features(ctx, batch)).detach()
        return self._to_feature_dtype(feats)

    def _featurize_train_groups(
        self, ctx: MemberContext[StateT], train: Any, grouping: Grouping
    ) -> None:
        """Group features, one chunk of whole groups (one shard) at a time.

        A chunk (one shard) holds about ``batch_size`` groups (``batch_size`` x the mean
        group size examples), as many rows as a per-example shard; its forward/backward
        passes take ``batch_size`` examples at a time (larger batches were slower, ~1.3x at
        16,384 examples: their activations leave the caches), a group cut by a batch
        boundary getting the sum of its two partial features.
        """
        kind = f"train-m{ctx.index}"
        chunks = list(self._group_chunks(grouping, local=True))
        it = progress_bar(
            chunks,
            desc=f"{self.name}: group features (member {ctx.index})",
            enabled=self.config.progress,
            unit="chunk",
        )
        for c, lo, hi, index_batches in it:
            batches = [take_examples(train, idx) for idx in index_batches]
            fp = ""
            if self.store is not None:
                h = hashlib.sha256(f"groups {lo}:{hi}".encode())
                for idx, batch in zip(index_batches, batches):
                    h.update(fingerprint_batch(batch).encode())
                    h.update(fingerprint_tensors([grouping.labels[idx]]).encode())
                fp = h.hexdigest()
                if self.store.has_shard(kind, c, fp):
                    continue
            feats = self._chunk_train_features(ctx, grouping, lo, hi, index_batches, batches)
            if self.store is not None:
                self.store.write_shard(kind, c, feats, fp)
            else:
                ctx.features.append(feats)
        self._share_train_features(ctx)

    def _group_chunks(
        self, grouping: Grouping, local: bool
    ) -> Iterator[tuple[int, int, int, list[torch.Tensor]]]:
        """``(shard index, first group, stop group, index batches)`` of each chunk of whole
        groups (one shard each); with ``local=True`` this rank's slice (global indices)."""
        mean_size = -(-grouping.n_train // grouping.n_groups)
        chunks = list(grouping.chunks(self.config.batch_size * mean_size, self.config.batch_size))
        first, last = distributed.local_range(len(chunks)) if local else (0, len(chunks))
        for c in range(first, last):
            yield (c, *chunks[c])

    def _chunk_train_features(
        self,
        ctx: MemberContext[StateT],
        grouping: Grouping,
        lo: int,
        hi: int,
        index_batches: Sequence[torch.Tensor],
        batches: Sequence[Batch],
    ) -> torch.Tensor:
        """The rows of one group shard: features of groups ``lo:hi``, partial sums added."""
        whole = self._fitted_train_features(ctx)
        if whole is not None:
            return self._to_feature_dtype(whole[lo:hi])
        feats: torch.Tensor | None = None
        for idx, batch in zip(index_batches, batches):
            present, local = torch.unique(grouping.labels[idx], return_inverse=True)
            members = group_members(local, int(present.numel()))
            unit_ctx = replace(ctx, unit_members=members, batch_indices=idx)
            # a group's partial sums in the working dtype, not in half precision
            part = self._train_features(unit_ctx, batch).detach().to(ctx.task.working_dtype)
            if feats is None:
                feats = part.new_zeros(hi - lo, part.shape[1])
            feats.index_add_(0, (present - lo).to(part.device), part)
        assert feats is not None
        return self._to_feature_dtype(self._finish_train_features(ctx, feats).detach())

    def _iter_train_features(
        self, ctx: MemberContext[StateT], local: bool = False
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first unit, block)`` of the train features, in order, on the model's device and
        upcast to the working dtype.

        With ``local=True`` under a distributed group, only this rank's contiguous slice of
        the blocks (the shards it featurized), still with global unit offsets. After a fit
        that kept no train features, the blocks are recomputed.
        """
        if self._recompute:
            yield from self._recomputed_train_features(ctx, local)
            return
        kind, store = f"train-m{ctx.index}", None if ctx.features else self.store
        device, dtype = self.task.device, self.task.working_dtype
        if store is None:
            count = len(ctx.features)
            lo, hi = distributed.local_range(count) if local else (0, count)
            start = 0
            for i, block in enumerate(ctx.features):
                if lo <= i < hi:
                    yield start, block.to(device=device, dtype=dtype)
                start += block.shape[0]
            return
        # exactly the shards this training set has (a store may hold more, e.g. written with
        # another shard size); skipped ones are not read, their sizes are in the manifest
        count = self._shard_count(ctx)
        lo, hi = distributed.local_range(count) if local else (0, count)
        start = 0
        for i in range(count):
            if lo <= i < hi:
                block = store.read_shard(kind, i)
                yield start, block.to(device=device, dtype=dtype)
            start += store.shard_rows(kind, i)

    def _shard_count(self, ctx: MemberContext[StateT]) -> int:
        """How many train-feature shards (of ``rows_per_shard`` examples, or chunks of groups)
        a fit writes."""
        if self._grouping is None:
            rows = self._shard_rows[ctx.index]  # set by _featurize_train_shards
            return -(-self._n_units // rows)
        return sum(1 for _ in self._group_chunks(self._grouping, local=False))

    def _count_train_blocks(self, ctx: MemberContext[StateT], local: bool) -> int | None:
        """How many blocks :meth:`_iter_train_features` yields (None: not known cheaply)."""
        if self._recompute:
            if self._grouping is not None:
                return None
            count = num_batches(self._train, self.config.batch_size)
        elif ctx.features or self.store is None:
            count = len(ctx.features)
        else:
            count = len(self.store.shard_indices(f"train-m{ctx.index}"))
        lo, hi = distributed.local_range(count) if local else (0, count)
        return hi - lo

    def _phase(self, what: str, ctx: MemberContext[StateT] | None = None) -> str:
        """A bar's description: method id, phase, member, and a note when recomputing."""
        desc = f"{self.name}: {what}"
        if ctx is not None and len(self._contexts) > 1:
            desc += f" (member {ctx.index})"
        if self._recompute and what in ("scoring", "self-influence"):
            desc += " (recomputing train features)"
        return desc

    def _recomputed_train_features(
        self, ctx: MemberContext[StateT], local: bool
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """:meth:`_iter_train_features` of a fit that kept none: each shard's rows computed
        from its batch (or chunk of groups), at the member's state, when it is reached."""
        device, dtype = self.task.device, self.task.working_dtype
        if self._grouping is None:  # the bars are the consumers' (scoring, self-influence)
            for _, offset, batch in self._train_batches(local):
                with self._recomputing(ctx) as scoped:
                    block = self._batch_train_features(scoped, offset, batch)
                yield offset, block.to(device=device, dtype=dtype)
            return
        grouping = self._grouping
        for _, lo, hi, index_batches in self._group_chunks(grouping, local):
            batches = [take_examples(self._train, idx) for idx in index_batches]
            with self._recomputing(ctx) as scoped:
                block = self._chunk_train_features(scoped, grouping, lo, hi, index_batches, batches)
            yield lo, block.to(device=device, dtype=dtype)

    @contextmanager
    def _recomputing(self, ctx: MemberContext[StateT]) -> Iterator[MemberContext[StateT]]:
        """Inside: ``ctx`` in the member's scope, batches moved to the model's device.

        Entered and left around each recomputed block, never across a ``yield``: the
        blocks of several members are interleaved (``_score_blocks`` zips them).
        """
        with self._member_scope(ctx) as scoped, scoped.task.moving_batches():
            yield scoped

    def _scoring_train_blocks(
        self, ctx: MemberContext[StateT], local: bool, queries: torch.Tensor
    ) -> Iterator[tuple[int, Any]]:
        """``(first unit, block)`` for ``_combine`` with the member's transformed ``queries``
        (default: the train features); a method's own form of block only its ``_combine`` reads."""
        return self._iter_train_features(ctx, local)

    def _count_scoring_blocks(self, ctx: MemberContext[StateT], local: bool) -> int | None:
        """How many blocks :meth:`_scoring_train_blocks` yields (None: not known cheaply)."""
        return self._count_train_blocks(ctx, local)

    def _all_train_features(self, ctx: MemberContext[StateT]) -> torch.Tensor:
        return torch.cat([b for _, b in self._iter_train_features(ctx)], 0)

    def _transformed_queries(self, queries: Any) -> list[torch.Tensor]:
        self._check_fitted()
        self.task.check_eval_mode()
        distributed.check_same_queries(queries, self.config.batch_size)
        n_queries = count_or_none(num_examples, queries)
        if n_queries is not None:
            self._check_cost(n_queries)
        out = []
        with self._fitted_device():
            self.task.check_data(queries, self.config.batch_size, "query")
            dtype = self.task.working_dtype
            for member_ctx in self._contexts:
                with self._member_scope(member_ctx) as ctx:
                    batches = progress_bar(
                        iter_batches(queries, self.config.batch_size),
                        desc=self._phase("query features", ctx),
                        enabled=self.config.progress,
                        total=count_or_none(num_batches, queries, self.config.batch_size),
                        unit="batch",
                    )
                    feats = [self._query_features(ctx, b).detach().to(dtype) for b in batches]
                    joined = self._join_query_features(ctx, feats)
                    out.append(self._transform_queries(ctx, joined))
        return out

    def _score_blocks(
        self, queries: Any, local: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        qs = self._transformed_queries(queries)
        iters = [self._scoring_train_blocks(ctx, local, q) for ctx, q in zip(self._contexts, qs)]
        bar = progress_bar(
            zip(*iters),
            desc=self._phase("scoring"),
            enabled=self.config.progress,
            total=self._count_scoring_blocks(self._contexts[0], local),
            unit="block",
        )
        for parts in bar:
            start = parts[0][0]
            blocks = [
                self._combine(ctx, q, block, start)
                for ctx, q, (_, block) in zip(self._contexts, qs, parts)
            ]
            size = blocks[0].shape[1]
            ids = torch.arange(start, start + size)
            if self._grouping is not None:
                ids = self._grouping.ids[start : start + size]
            yield ids, finite_or_raise(self._aggregate(blocks, start), "scores", start)


def _rows_of(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a batch (a tensor, a tuple/list or a dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return type(batch)(t[start:stop] for t in batch)
