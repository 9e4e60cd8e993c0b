"""The processes of a torchrun launch: the process group, this rank's device, sums and gathers.

`torchrun --nproc-per-node N -m backends.torch_vit.train ...` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous in their environment; `init()` joins the group (NCCL
with a GPU per process, gloo on the CPU). Without that environment there is one process and
nothing here communicates.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Gloo's default 30 minutes would hide a rank that died before a collective for that long.
TIMEOUT = datetime.timedelta(minutes=10)


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group once per process, when launched; pins a GPU rank to its local GPU."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """Tear the process group down once every rank is done with it (a run's end). Left to the
    interpreter's exit, gloo's threads can be destroyed still holding tensors, and the process
    aborts ("terminate called without an active exception", pytorch/pytorch#190489): seen once, in
    one rank of a torchrun run that had finished and written everything. Only after a run that
    succeeded: a rank that failed leaves the others to their collective's timeout, as before."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over the ranks (the tensor itself in one process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank (each rank holds the same number)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
