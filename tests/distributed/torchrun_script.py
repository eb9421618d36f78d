"""Run by ``test_torchrun_two_processes_equal_single_process`` under real ``torchrun``.

Unchanged user code: init the default group from torchrun's environment, then fit and
attribute as in one process. Rank 0 saves the scores to ``argv[1]``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from datatrace import Task, make_attributor
from tests.distributed.scenarios import BATCH, data
from tests.models import mlp


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    try:
        train, queries = data()
        attr = make_attributor("if-ekfac", Task(mlp()), batch_size=BATCH, damping=1e-2)
        scores = attr.fit(train).attribute(queries)
        if dist.get_rank() == 0:
            torch.save({"scores": scores.values, "world_size": dist.get_world_size()}, sys.argv[1])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
