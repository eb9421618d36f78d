"""The manifest and journal format of a store (:mod:`datatrace.store`): file names, entries
and their checks, journal records, and how two jobs' settings differ.

A manifest entry records one file's name, shape, dtype, size and checksum; a journal line
records one completed (or retracted) shard. File names are derived from an entry's kind and
index, never taken from the manifest.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from datatrace.errors import ConfigError, StoreError
from datatrace.store_lock import LOCK

FORMAT_VERSION = 2  # 2: entries carry nbytes and checksum (version 1 stores are upgraded)
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
_RANK_JOURNAL = re.compile(r"^journal-rank[0-9]+\.jsonl$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# torch dtype name -> (torch dtype, dtype of the .npy file holding it)
_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.int16),  # NumPy has no bfloat16: keep the bit pattern
    "int64": (torch.int64, torch.int64),
    "int32": (torch.int32, torch.int32),
    "bool": (torch.bool, torch.bool),
}


def _json_normalise(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the store {what} must be JSON-serialisable ({exc}); convert dataclasses with "
            "dataclasses.asdict, enums to their .value and tensors to lists."
        ) from exc


_MISSING = object()


def _short(value: Any, limit: int = 48) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys at which two JSON values differ, with both values (shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, _MISSING), new.get(key, _MISSING), f"{prefix}.{key}")
        return out
    if old is _MISSING or new is _MISSING or json.dumps(old) != json.dumps(new):
        return [f"{prefix}: stored {_short(old)}, given {_short(new)}"]
    return []


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid {what} name {name!r}; use letters, digits, '_', '-' and '.', starting with "
            "a letter or digit (e.g. 'features' or 'member_0'); it becomes part of a file name."
        )


def _shard_file(kind: str, index: int) -> str:
    return f"shard-{kind}-{index:06d}.npy"


def _array_file(name: str) -> str:
    return f"array-{name}.npy"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: Any, file: str, legacy: bool = False) -> str | None:
    """Why ``entry`` is not a valid record of ``file`` (None when it is)."""
    if not isinstance(entry, dict):
        return f"an entry must be an object, got {type(entry).__name__}"
    if entry.get("file") != file:
        return f"it names file {entry.get('file')!r}, expected {file!r}"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if entry.get("dtype") not in _DTYPES:
        return f"unknown dtype {entry.get('dtype')!r} (known: {sorted(_DTYPES)})"
    if not legacy and not (
        _is_count(entry.get("nbytes")) and isinstance(entry.get("checksum"), str)
    ):
        return "it lacks nbytes/checksum"
    if file.startswith("shard-") and not isinstance(entry.get("data_fingerprint", ""), str):
        return "its data_fingerprint is not a string"
    return None


def _is_datatrace_manifest(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("format_version"), int)
        and all(
            isinstance(data.get(k), dict) for k in ("config", "fingerprints", "shards", "arrays")
        )
    )


def _journal_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """``(kind, index, entry)`` of every whole, well-formed line of a journal."""
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError:
        return
    for raw in raw_lines:
        try:
            record = json.loads(raw)
            kind, index, entry = record["kind"], record["index"], record["entry"]
        except (ValueError, KeyError, TypeError):
            continue  # empty, torn or malformed line: that shard is not complete
        if isinstance(kind, str) and _NAME.match(kind) and _is_count(index):
            yield kind, index, entry


def _is_our_journal(path: Path) -> bool:
    """Whether ``path`` is a journal a store wrote (its first line is one of our records)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return False
    if not first.endswith(b"\n"):
        return not first  # empty: ours (a torn single line too short to be anyone's data)
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and set(record) == {"kind", "index", "entry"}


def _close_enough(stored: Any, given: list[float], rtol: float) -> float | None:
    """Largest relative difference of two probe vectors, None when within ``rtol``."""
    if not isinstance(stored, list) or len(stored) != len(given):
        return math.inf
    try:
        a = torch.tensor(stored, dtype=torch.float64)
    except (TypeError, ValueError):
        return math.inf
    b = torch.tensor(given, dtype=torch.float64)
    if torch.allclose(a, b, rtol=rtol, atol=rtol, equal_nan=True):
        return None
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1.0)
    diff = ((a - b).abs() / scale).nan_to_num(nan=math.inf)
    return float(diff.max())


def check_entries(manifest: dict[str, Any], file: Path, fix: str, legacy: bool) -> None:
    """Refuse a manifest with a malformed shard kind, shard or array entry (``StoreError``)."""
    for kind, shards in manifest["shards"].items():
        if not (isinstance(kind, str) and _NAME.match(kind) and isinstance(shards, dict)):
            raise StoreError(f"{file} has a malformed shard kind {kind!r}; {fix}")
        for i, entry in shards.items():
            problem = None if str(i).isdigit() else f"index {i!r} is not a number"
            problem = problem or _entry_problem(entry, _shard_file(kind, int(i)), legacy)
            if problem is None and entry.get("index", int(i)) != int(i):
                problem = f"it records index {entry.get('index')!r}"
            if problem:
                raise StoreError(f"{file}: shard {kind!r} #{i} is malformed ({problem}); {fix}")
    for name, entry in manifest["arrays"].items():
        ok = isinstance(name, str) and _NAME.match(name)
        problem = _entry_problem(entry, _array_file(name), legacy) if ok else "bad name"
        if problem:
            raise StoreError(f"{file}: array {name!r} is malformed ({problem}); {fix}")


def owned_files(root: Path) -> list[str]:
    """Files a store at ``root`` wrote, manifest last; refuses a foreign manifest."""
    names: list[str] = []
    manifest = root / MANIFEST
    data: Any = None
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            data = None
        ours = _is_datatrace_manifest(data) or (
            data is None and ((root / LOCK).exists() or (root / JOURNAL).exists())
        )  # damaged JSON in a directory a store demonstrably used
        if not ours:
            raise StoreError(
                f"{manifest} is not a datatrace store manifest, so datatrace will not delete "
                "it or anything beside it; give the store a directory of its own."
            )
    if isinstance(data, dict):
        for kind, shards in (data.get("shards") or {}).items():
            if isinstance(kind, str) and _NAME.match(kind) and isinstance(shards, dict):
                names += [_shard_file(kind, int(i)) for i in shards if str(i).isdigit()]
        for name in data.get("arrays") or {}:
            if isinstance(name, str) and _NAME.match(name):
                names.append(_array_file(name))
    for journal in journal_files(root):
        if journal.is_file() and _is_our_journal(journal):
            names += [_shard_file(kind, index) for kind, index, _ in _journal_records(journal)]
            names.append(journal.name)
    if manifest.is_file():
        names.append(MANIFEST)
    return list(dict.fromkeys(names))


def job_differences(
    manifest: dict[str, Any], wanted: dict[str, Any], probes: dict[str, list[float]], rtol: float
) -> list[str]:
    """What differs between the job a manifest was written for and ``wanted`` (and the probes
    both sides name), one line each; empty when the store may be reused."""
    stored = {k: manifest.get(k, _MISSING) for k in wanted}
    if manifest["format_version"] == 1:  # no checksums yet: upgraded when loaded
        stored["format_version"] = FORMAT_VERSION
    diffs = [d for k in wanted for d in _diff(stored[k], wanted[k], k)]
    old: Any = manifest.get("probes") or {}
    for name in sorted(set(old) & set(probes) if isinstance(old, dict) else ()):
        gap = _close_enough(old[name], probes[name], rtol)
        if gap is not None:
            diffs.append(
                f"probes.{name}: values differ by up to {gap:.2g} (relative; tolerance "
                f"{rtol:.0e}), so the code that produced them changed"
            )
    return diffs


def journal_files(root: Path) -> list[Path]:
    """The journal files of a store at ``root``: rank 0's first, then the other ranks' by name."""
    ranks = sorted(f for f in root.iterdir() if _RANK_JOURNAL.match(f.name))
    return [root / JOURNAL, *ranks]


def apply_journal(manifest: dict[str, Any], journal: Path) -> None:
    """Fold the whole, well-formed records of ``journal`` into ``manifest`` (in place)."""
    for kind, index, entry in _journal_records(journal):
        shards = manifest["shards"].setdefault(kind, {})
        if entry is None:
            shards.pop(str(index), None)
        elif _entry_problem(entry, _shard_file(kind, index)) is None:
            shards[str(index)] = entry
        # else: a malformed record counts as not written; the shard is recomputed


def read_manifest(file: Path, fix: str) -> dict[str, Any]:
    """The manifest at ``file``; a ``StoreError`` (ending in ``fix``) when it is unreadable or
    not a datatrace manifest."""
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"top level is a {type(manifest).__name__}, not an object")
    except (OSError, ValueError) as exc:
        raise StoreError(f"the manifest {file} is unreadable ({exc}); {fix}") from exc
    if not _is_datatrace_manifest(manifest):
        raise StoreError(
            f"{file} is not a datatrace store manifest (it lacks format_version, config, "
            "fingerprints, shards or arrays); give the store a directory of its own."
        )
    return manifest
