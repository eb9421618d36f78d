"""Stable seeds: the same numbers on every run, process and platform (unlike ``hash``).

Every random draw datatrace makes for itself (projection matrices, dropout masks, LoRA
initialisations, groupers, k-means) is seeded here from a tuple of settings, so that it
depends on those settings only and never on the process-wide RNG.

:func:`stable_seed` is the one to use. The two others are earlier derivations, kept bit for
bit because the streams they seed are part of results (dropout ensembles, LoRA members,
random and k-means groups): changing them would change every such score.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["dropout_lora_seed", "group_generator", "stable_seed"]

_MASK_63 = (1 << 63) - 1


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ints/strings (blake2b of their ``repr``).

    Example:
        >>> stable_seed("gaussian", 0, 0, 3) == stable_seed("gaussian", 0, 0, 3)
        True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def dropout_lora_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` joined by ``/`` (sha256): dropout masks and LoRA members."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK_63


def group_generator(kind: str, seed: int) -> torch.Generator:
    """A CPU generator for the grouper or k-means ``kind`` and ``seed``: salted, so ``seed=0``
    here draws another stream than ``torch.Generator().manual_seed(0)`` elsewhere (label flips,
    subset sampling), which would otherwise line random groups up with, e.g., the flipped
    examples."""
    digest = hashlib.blake2b(repr(("datatrace.group", kind, int(seed))).encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
