"""Data-parallel training under ``torchrun``: process group, sharding and the collectives a run needs.

``torchrun --nproc_per_node=N -m rkd_engine.cli student ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; each process then trains a DDP-wrapped model on its shard of every global batch,
and the per-class statistics are summed over processes (``all_reduce``) before each DRO weight
update, so ``lambda`` is the same on every rank. Rank 0 writes the run directory.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Process groups that ``DistContext.close`` destroyed, kept until the interpreter exits. Gloo's process group
# joins its worker threads in its destructor, and a worker may need the GIL at that moment: it frees each
# finished work object itself, and a work that holds a tensor whose Python object is gone (the buffers of
# ``all_gather_object``, an ``all_reduce`` of a temporary) must take the GIL to free it. Whatever drops the
# last reference to the group therefore has to release the GIL while it waits. The group's Python wrapper
# does (its destructor joins without the GIL); the DDP reducer, which also holds the group and is freed
# with the run's model, does not, and when it held the last reference a worker waiting for the GIL and the
# main thread joining it waited for each other forever (about one two-process run in 20; the stacks:
# ``Reducer::~Reducer -> ProcessGroupGloo::~ProcessGroupGloo -> thread::join`` on the main thread,
# ``AsyncAllreduceWork::~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil`` on the worker).
# Holding the wrapper here until exit, after the runs and their models are gone, makes the wrapper's destructor
# the one that joins, whatever the timing (a DDP model still referenced at exit would bring the old order
# back). ``tests/test_ddp_teardown.py`` checks both destructors and the teardown.
_RETIRED_GROUPS: list[Any] = []


def _release_retired_groups() -> None:
    """Drop the last references to the retired process groups, joining their threads without the GIL."""
    _RETIRED_GROUPS.clear()


atexit.register(_release_retired_groups)


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_(self, *tensors: Tensor) -> None:
        """Sum each tensor over the processes, in place (a no-op in a single process)."""
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in ``DistributedDataParallel`` when there are several processes."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Leave the process group this context created (a no-op otherwise); see ``_RETIRED_GROUPS``."""
        if self.owns_group and dist.is_initialized():
            _RETIRED_GROUPS.append(dist.group.WORLD)
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: str) -> DistContext:
    """Join the process group started by ``torchrun`` (gloo on CPU, nccl on CUDA), or run alone.

    ``device`` is ``"cpu"`` or ``"cuda"``; under torchrun on CUDA each process takes GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        return DistContext(0, 1, dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
