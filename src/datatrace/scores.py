"""Typed attribution results (DESIGN.md §1).

``Scores.values[q, i]`` estimates how much training on unit ``i`` improves the model on query
``q``: positive values are proponents, negative values opponents.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datatrace.errors import DataError, MissingDependencyError

__all__ = ["Scores", "TopK", "streaming_topk"]

SCORES_FORMAT = "datatrace-scores/1"


@dataclass(frozen=True)
class TopK:
    """The k strongest proponents and opponents of every query.

    Attributes:
        proponent_ids: ``(n_query, k)`` unit ids, highest score first.
        proponent_values: ``(n_query, k)`` their scores.
        opponent_ids: ``(n_query, k)`` unit ids, lowest score first.
        opponent_values: ``(n_query, k)`` their scores.
    """

    proponent_ids: torch.Tensor
    proponent_values: torch.Tensor
    opponent_ids: torch.Tensor
    opponent_values: torch.Tensor


@dataclass(frozen=True)
class Scores:
    """Attribution scores of shape ``(n_query, n_units)``.

    Example:
        >>> s = Scores(torch.tensor([[0.5, -1.0, 2.0]]), method="grad-dot")
        >>> s.topk(1).proponent_ids.tolist()
        [[2]]
    """

    values: torch.Tensor
    unit_ids: torch.Tensor | None = None
    query_ids: torch.Tensor | None = None
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise DataError(
                f"Scores.values must be 2-D (n_query, n_units); got shape {tuple(self.values.shape)}."
            )
        n_query, n_units = self.values.shape
        if self.unit_ids is None:
            object.__setattr__(self, "unit_ids", torch.arange(n_units))
        if self.query_ids is None:
            object.__setattr__(self, "query_ids", torch.arange(n_query))
        assert self.unit_ids is not None and self.query_ids is not None
        if self.unit_ids.shape != (n_units,) or self.query_ids.shape != (n_query,):
            raise DataError(
                f"Scores ids do not match values of shape {(n_query, n_units)}: got unit_ids "
                f"{tuple(self.unit_ids.shape)} and query_ids {tuple(self.query_ids.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def topk(self, k: int) -> TopK:
        """Return the ``k`` highest (proponents) and lowest (opponents) units per query."""
        assert self.unit_ids is not None
        return streaming_topk([(self.unit_ids, self.values)], k)

    def to_numpy(self) -> np.ndarray:
        """``values`` as a NumPy array (on the CPU; bfloat16 is widened to float32)."""
        values = self.values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()

    def to_pandas(self) -> Any:
        """``values`` as a ``pandas.DataFrame``: one row per query, one column per unit.

        The index holds ``query_ids`` (named ``"query"``), the columns ``unit_ids`` (named
        ``"unit"``); ``.stack()`` gives the long format. pandas is optional.

        Raises:
            MissingDependencyError: pandas is not installed.

        Example:
            >>> df = Scores(torch.tensor([[0.5, -1.0]]), method="grad-dot").to_pandas()
            >>> float(df.loc[0, 1])
            -1.0
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise MissingDependencyError(
                "Scores.to_pandas needs pandas, which is not installed; install it with "
                "pip install pandas, or use Scores.to_numpy()."
            ) from exc
        assert self.unit_ids is not None and self.query_ids is not None
        return pd.DataFrame(
            self.to_numpy(),
            index=pd.Index(self.query_ids.tolist(), name="query"),
            columns=pd.Index(self.unit_ids.tolist(), name="unit"),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the scores to one safetensors file (no pickle), atomically.

        Values and ids are tensors of the file; method and config are JSON in its metadata.

        Example:
            >>> import tempfile, pathlib
            >>> p = pathlib.Path(tempfile.mkdtemp()) / "scores.safetensors"
            >>> Scores(torch.tensor([[0.5, -1.0]]), method="grad-dot").save(p)
            >>> Scores.load(p).method
            'grad-dot'
        """
        from safetensors.torch import save_file

        assert self.unit_ids is not None and self.query_ids is not None
        tensors = {
            "values": self.values.detach().cpu().contiguous(),
            "unit_ids": self.unit_ids.detach().cpu().contiguous(),
            "query_ids": self.query_ids.detach().cpu().contiguous(),
        }
        metadata = {
            "format": SCORES_FORMAT,
            "method": self.method,
            "config": json.dumps(self.config, default=str),
        }
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent or ".")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        """Read scores written by :meth:`save`.

        Raises:
            DataError: the file is missing, not a safetensors file, or not datatrace scores.
        """
        from safetensors import SafetensorError, safe_open

        source = Path(path)
        if not source.is_file():
            raise DataError(f"no scores file at {str(source)!r}; write one with Scores.save(path).")
        try:
            with safe_open(str(source), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != SCORES_FORMAT:
                    raise DataError(
                        f"{str(source)!r} is not a datatrace scores file (format "
                        f"{metadata.get('format')!r}, expected {SCORES_FORMAT!r}); write it with "
                        "Scores.save(path)."
                    )
                tensors = {k: f.get_tensor(k) for k in ("values", "unit_ids", "query_ids")}
        except SafetensorError as exc:
            raise DataError(
                f"{str(source)!r} could not be read as a safetensors file ({exc}); write it with "
                "Scores.save(path)."
            ) from exc
        return cls(
            tensors["values"],
            tensors["unit_ids"],
            tensors["query_ids"],
            metadata.get("method", ""),
            json.loads(metadata.get("config", "{}")),
        )


def streaming_topk(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int) -> TopK:
    """Top-k over score blocks ``(unit_ids, values[n_query, n_block])`` seen one at a time.

    Never holds more than ``n_query x (k + n_block)`` scores, so the full
    ``n_query x n_train`` matrix need not exist.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DataError(f"k must be a positive integer; got {k!r}.")
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    worst_v: torch.Tensor | None = None
    worst_i: torch.Tensor | None = None
    for ids, values in _iter_blocks(blocks):
        ids_b = ids.to(values.device).unsqueeze(0).expand(values.shape[0], -1)
        if best_v is None:
            cand_v, cand_i = values, ids_b
            low_v, low_i = values, ids_b
        else:
            assert best_i is not None and worst_v is not None and worst_i is not None
            cand_v, cand_i = torch.cat([best_v, values], 1), torch.cat([best_i, ids_b], 1)
            low_v, low_i = torch.cat([worst_v, values], 1), torch.cat([worst_i, ids_b], 1)
        kk = min(k, cand_v.shape[1])
        top = torch.topk(cand_v, kk, dim=1)
        best_v, best_i = top.values, torch.gather(cand_i, 1, top.indices)
        bot = torch.topk(low_v, kk, dim=1, largest=False)
        worst_v, worst_i = bot.values, torch.gather(low_i, 1, bot.indices)
    if best_v is None:
        raise DataError("streaming_topk received no score blocks; the train set is empty.")
    assert best_i is not None and worst_v is not None and worst_i is not None
    return TopK(best_i, best_v, worst_i, worst_v)


def _iter_blocks(
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for ids, values in blocks:
        if values.ndim != 2 or ids.shape != (values.shape[1],):
            raise DataError(
                f"score block must be (unit_ids[n], values[n_query, n]); got ids "
                f"{tuple(ids.shape)} and values {tuple(values.shape)}."
            )
        yield ids, values
