"""Process-group setup from torchrun or Slurm environment variables, or none for a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist_initialized() -> bool:
    """True when a process group exists; every collective in the package is guarded by this."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _launcher_env(local_rank_flag: int = 0) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm srun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", local_rank_flag))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank = int(os.environ["SLURM_PROCID"])
        return rank, int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` = this process's GPU when CUDA is available, else the CPU; ``cuda`` picks the local-rank GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if device.index is None:
            # A launcher may already restrict CUDA_VISIBLE_DEVICES to this process's GPU.
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(requested_device: str = "auto", dist_url: str = "env://",
                     local_rank_flag: int = 0) -> DistributedContext:
    """Joins the process group the launcher describes (NCCL on GPUs, gloo on CPUs) or, with no launcher
    variables, returns a single-process context without creating any process group."""
    env = _launcher_env(local_rank_flag)
    if env is None:
        return DistributedContext(device=resolve_device(requested_device))
    rank, world_size, local_rank = env
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistributedContext(rank, world_size, local_rank, device)
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ and dist_url == "env://":
        raise ValueError("running under Slurm without MASTER_ADDR/MASTER_PORT: launch with srun + torchrun or "
                         "run_with_submitit.py, or pass --dist_url tcp://HOST:PORT")
    if not is_dist_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=dist_url,
                                world_size=world_size, rank=rank,
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    if is_dist_initialized():
        dist.destroy_process_group()
