"""Cost of the store's checksums: write and read a ~200 MB store with and without them.

    PYTHONPATH=src python benchmarks/store_checksum.py [--mb 200] [--shards 4] [--repeats 3]

"Without" replaces the checksum by a constant (same code path otherwise). Medians of
``--repeats`` runs; reads are warm (page cache), the case where hashing costs most relative
to I/O.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from unittest import mock

import torch

import datatrace.store_files as store_module
from datatrace.store import Store


def run(mb: int, shards: int, checksums: bool) -> tuple[float, float, float]:
    rows = mb * 2**20 // 4 // 1024 // shards
    blocks = [torch.randn(rows, 1024) for _ in range(shards)]
    patch = (
        mock.patch.object(store_module, "_checksum", lambda chunks: "off")
        if not checksums
        else mock.patch.object(store_module, "_CHUNK", store_module._CHUNK)
    )
    with tempfile.TemporaryDirectory() as d, patch:
        store = Store(d, config={}, fingerprints={})
        t0 = time.perf_counter()
        for i, b in enumerate(blocks):
            store.write_shard("features", i, b)
        t1 = time.perf_counter()
        total = sum(float(t.sum()) for _, t in store.iter_shards("features", mmap=False))
        t2 = time.perf_counter()
        total += sum(float(t.sum()) for _, t in store.iter_shards("features", mmap=True))
        t3 = time.perf_counter()
        assert total == total
        return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for checksums in (False, True):
        runs = [run(args.mb, args.shards, checksums) for _ in range(args.repeats)]
        w, r, m = (statistics.median(x) for x in zip(*runs))
        label = "xxh3-128 checksums" if checksums else "no checksums     "
        print(f"{label}: write {w:.3f} s, read {r:.3f} s, read mmap+sum {m:.3f} s ({args.mb} MB)")


if __name__ == "__main__":
    main()
