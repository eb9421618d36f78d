"""Fingerprints: content hashes of tensors and batches that the store records.

A store keeps, beside each shard, the hash of the inputs that produced it, and beside its
config the hashes of the model weights, members and training data; reuse after a change is
refused by comparing them (DESIGN.md §5). Hashes are SHA-256 over names, dtypes, shapes and
raw bytes (bfloat16 included), so they do not depend on the device or on how batches split
the rows (:class:`RowsFingerprint`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datatrace.errors import DataError

__all__ = ["RowsFingerprint", "fingerprint_batch", "fingerprint_tensors"]


def _cpu_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DataError(
            f"cannot fingerprint entry {name!r} of type {type(t).__name__}; every entry must be "
            "a torch.Tensor (convert labels/ids with torch.as_tensor first)."
        )
    return t.detach().to("cpu").contiguous()


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> str:
    """SHA-256 hex digest of the names, dtypes, shapes and bytes of ``tensors``.

    A mapping (e.g. ``model.state_dict()``) is hashed in sorted key order; a sequence in its
    own order. Any dtype works, bfloat16 included, on any device.
    """
    if isinstance(tensors, Mapping):
        items = [(str(k), tensors[k]) for k in sorted(tensors, key=str)]
        tag = b"mapping"
    else:
        items = [(str(i), t) for i, t in enumerate(tensors)]
        tag = b"sequence"
    h = hashlib.sha256(tag)
    for name, t in items:
        t = _cpu_tensor(name, t)
        header = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|"
        h.update(len(header).to_bytes(8, "little") + header.encode())
        # Reinterpret as raw bytes: works for bfloat16, which .numpy() refuses.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint_batch(batch: Any) -> str:
    """Fingerprint of a batch: a tensor, a tuple/list of tensors or a dict (key order ignored)."""
    if isinstance(batch, torch.Tensor):
        return fingerprint_tensors([batch])
    if isinstance(batch, Mapping):
        return fingerprint_tensors({str(k): v for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return fingerprint_tensors(list(batch))
    raise DataError(
        f"cannot fingerprint a batch of type {type(batch).__name__}; pass a tensor, a tuple/list "
        "of tensors or a dict of tensors."
    )


def _leaves(batch: Any) -> list[tuple[str, Any]]:
    if isinstance(batch, torch.Tensor):
        return [("0", batch)]
    if isinstance(batch, Mapping):
        return [(str(k), batch[k]) for k in sorted(batch, key=str)]
    if isinstance(batch, (tuple, list)):
        return [(str(i), t) for i, t in enumerate(batch)]
    raise DataError(
        f"cannot fingerprint a batch of type {type(batch).__name__}; pass a tensor, a tuple/list "
        "of tensors or a dict of tensors."
    )


class RowsFingerprint:
    """SHA-256 of consecutive rows of a batch (tensor, tuple/list or dict of tensors) fed in
    pieces: the digest does not depend on where the rows were split, so a shard's inputs
    hash the same whatever the compute batch size that delivered them.

    Example:
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> a, b = RowsFingerprint(), RowsFingerprint()
        >>> a.update((x[:2],)); a.update((x[2:],)); b.update((x,))
        >>> a.hexdigest() == b.hexdigest()
        True
    """

    def __init__(self) -> None:
        self._hashers: dict[str, Any] = {}
        self._shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._rows = 0

    def update(self, rows: Any) -> None:
        """Add the next rows (the leading dimension of every tensor of ``rows``)."""
        leaves = _leaves(rows)
        if self._hashers and sorted(self._hashers) != sorted(name for name, _ in leaves):
            raise DataError(
                f"batches have different keys: {sorted(self._hashers)} then "
                f"{sorted(name for name, _ in leaves)}; every batch must have the same structure."
            )
        for name, t in leaves:
            t = _cpu_tensor(name, t)
            h = self._hashers.setdefault(name, hashlib.sha256(name.encode()))
            kind = (str(t.dtype), tuple(t.shape[1:]))
            if self._shapes.get(name) != kind:  # hashed where it changes (e.g. padding)
                self._shapes[name] = kind
                h.update(f"|{kind[0]}|{kind[1]}|@{self._rows}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        self._rows += int(leaves[0][1].shape[0]) if leaves else 0

    def hexdigest(self) -> str:
        h = hashlib.sha256(f"rows {self._rows}".encode())
        for name in sorted(self._hashers):
            h.update(f"|{name}|{self._hashers[name].hexdigest()}".encode())
        return h.hexdigest()
