"""Time writing many small shards to a Store (the cost per shard must not grow with the count).

python benchmarks/store_write.py --shards 800
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from datatrace.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=800)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = Store(d, config={"bench": 1}, fingerprints={"m": "x"})
        x = torch.randn(args.rows, args.dim)
        start = last = time.perf_counter()
        for i in range(args.shards):
            store.write_shard("train-m0", i, x, f"fp{i}")
            if (i + 1) % max(1, args.shards // 4) == 0:
                now = time.perf_counter()
                print(
                    f"{i + 1:6d} shards  total {now - start:6.2f} s  last quarter {now - last:5.2f} s"
                )
                last = now
        t = time.perf_counter()
        Store(d, config={"bench": 1}, fingerprints={"m": "x"})
        print(f"reopen (folds the journal into the manifest): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
