"""The few torch.distributed pieces the evaluations need; every helper also works with no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and the device it computes on."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Joins the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK in the environment: nccl on
    CUDA, gloo on CPU); a plain ``python script.py`` runs as a world of one with no process group."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistContext(rank=get_rank(), world_size=get_world_size(), device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo (and no process group) works on CPU tensors."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of rank ``rank``: every item belongs to exactly one rank, no padding."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_sizes(count: int) -> list[int]:
    """``count`` of every rank, in rank order."""
    if not is_distributed():
        return [count]
    local = torch.tensor([count], dtype=torch.long, device=collective_device())
    gathered = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(gathered, local)
    return [int(t.item()) for t in gathered]


def all_gather_equal(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), on the tensor's device, in rank order."""
    if not is_distributed():
        return [tensor]
    moved = tensor.to(collective_device()).contiguous()
    gathered = [torch.empty_like(moved) for _ in range(get_world_size())]
    dist.all_gather(gathered, moved)
    return [t.to(tensor.device) for t in gathered]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation, in rank order, of every rank's ``tensor`` whose first dimension may differ by rank."""
    sizes = all_gather_sizes(tensor.shape[0])
    if len(sizes) == 1:
        return tensor
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return torch.cat([part[:size] for part, size in zip(all_gather_equal(padded), sizes)])


def broadcast_from(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """``tensor`` of rank ``src`` on every rank (others pass a buffer of the right shape and dtype)."""
    if not is_distributed():
        return tensor
    moved = tensor.to(collective_device()).contiguous()
    dist.broadcast(moved, src)
    return moved.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks."""
    if not is_distributed():
        return tensor
    moved = tensor.to(collective_device()).clone()
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
