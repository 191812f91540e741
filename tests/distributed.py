"""Run a function on several real processes (gloo backend, CPU) and collect what each returns."""

import datetime
import gc
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, directory: str, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(directory, f"result_{rank}.pt"))
        # Leave together, holding nothing of the groups (as examples/train_sae.py's _leave_group): the function's
        # reference cycles (device meshes, DTensors, metrics) are freed while the groups exist, and no rank tears its
        # groups down while a peer is still busy with them. A rank that raised skips this and leaves at once.
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(function: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """Call ``function(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results.

    ``function`` must be importable (defined at module level). An exception on any rank fails the call.
    """
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(world_size, directory, function, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(directory, f"result_{rank}.pt")) for rank in range(world_size)]
