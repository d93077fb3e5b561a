"""torch.distributed for training and evaluation: process-group setup from torchrun or Slurm environment
variables (or none for a single process) and the few collectives the package uses, each of which also works
with no process group.

When one process of a job fails, the others must not hang: under torchrun the agent terminates the other
workers as soon as one exits non-zero; with gloo a peer that died makes the collectives of the others fail at
once ("Connection closed by peer"); with NCCL, torch's default ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` makes the
watchdog end a process whose collective stalls past the process-group timeout. The failing process itself
must destroy its process group on the way out (:func:`destroy_distributed` in the scripts' ``finally``), or
gloo's threads abort it with SIGABRT instead of its own error.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import PeerLost, UserError


@dataclass
class DistributedContext:
    """Where this process stands: its rank, the world size, its local rank and the device it computes on."""
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


def wrap_in_ddp(module: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``module`` in DistributedDataParallel (on ``ctx``'s GPU, or on the CPU with gloo) when a process group
    exists, else ``module`` itself."""
    if not is_dist_initialized():
        return module
    return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def _launcher_env(local_rank_flag: int = 0) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm srun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag))
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank = int(os.environ["SLURM_PROCID"])
        return rank, int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return None


def resolve_device(requested: str, local_rank: int = 0, flag: str = "--device") -> torch.device:
    """``auto`` = this process's GPU when CUDA is available, else the CPU; ``cuda`` picks the local-rank GPU.
    ``flag`` names the option in errors."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{flag} {requested!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {requested} was asked for but CUDA is not available")
        if device.index is None:
            # A launcher may already restrict CUDA_VISIBLE_DEVICES to this process's GPU.
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(requested_device: str = "auto", dist_url: str = "env://",
                     local_rank_flag: int = 0, timeout_s: float | None = None) -> DistributedContext:
    """Joins the process group the launcher describes (NCCL on GPUs, gloo on CPUs), also for a world of one
    under torchrun (as the reference does, so the collectives run there too), or, with no launcher variables,
    returns a single-process context without creating any process group. ``timeout_s``: how long a collective
    waits for the other processes (None: torch's default, 30 min for gloo, 10 min for NCCL). A set-up that
    cannot work is a :class:`UserError`."""
    env = _launcher_env(local_rank_flag)
    if env is None:
        return DistributedContext(device=resolve_device(requested_device))
    rank, world_size, local_rank = env
    device = resolve_device(requested_device, local_rank)
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ and dist_url == "env://":
        raise UserError("running under Slurm without MASTER_ADDR/MASTER_PORT: launch with srun + torchrun or "
                        "run_with_submitit.py, or pass --dist_url tcp://HOST:PORT")
    if not is_dist_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    world_size=world_size, rank=rank, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None,
                                    **_rendezvous(dist_url, rank, world_size, timeout))
        except (ValueError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot join the process group ({dist_url}): {first_line}") from None
    return DistributedContext(rank, world_size, local_rank, device)


def _rendezvous(dist_url: str, rank: int, world_size: int, timeout: datetime.timedelta | None) -> dict:
    """``init_process_group``'s rendezvous arguments. After a restart by ``torchrun --max-restarts`` the agent's
    store still holds the keys of the attempt before, among them the address of every process then, which the
    new processes would try to connect to: each attempt gets keys of its own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or dist_url != "env://":
        return {"init_method": dist_url}
    store, _, _ = next(dist.rendezvous(dist_url, rank, world_size, timeout=timeout or dist.default_pg_timeout))
    return {"store": dist.PrefixStore(f"attempt_{attempt}/", store)}


# How gloo and NCCL word a collective that failed because of another process (as of torch 2.x).
_PEER_TIMEOUT_SIGNS = ("Timed out waiting", "Socket Timeout", "Watchdog caught collective operation timeout")
_PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                    "NCCL communicator was aborted")


def peer_failure(error: BaseException, timeout_s: float | None) -> PeerLost | None:
    """A one-line :class:`PeerLost` when ``error`` is a collective that failed because another process of the job
    stopped responding or went away, else None (the error is something else)."""
    if not is_dist_initialized():
        return None
    message = str(error)
    if any(sign in message for sign in _PEER_TIMEOUT_SIGNS):
        waited = f"--dist_timeout {timeout_s:g} s" if timeout_s else "the process-group timeout (torch's default)"
        return PeerLost(f"no answer from another process of the job within {waited}: it hung or was stopped "
                        f"(SIGSTOP, a debugger, heavy swapping, a stalled file system or node); see its log, then "
                        f"run the same command again to resume from the last checkpoint")
    if any(sign in message for sign in _PEER_LOST_SIGNS):
        return PeerLost("another process of the job died or lost its connection (killed, out of memory, its node "
                        "or launcher gone); see its log, then run the same command again to resume from the last "
                        "checkpoint")
    return None


def destroy_distributed() -> None:
    if is_dist_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo (and no process group) works on CPU tensors."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of rank ``rank``: every item belongs to exactly one rank, no padding."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_sizes(count: int) -> list[int]:
    """``count`` of every rank, in rank order."""
    if not is_dist_initialized():
        return [count]
    local = torch.tensor([count], dtype=torch.long, device=collective_device())
    gathered = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(gathered, local)
    return [int(t.item()) for t in gathered]


def all_gather_equal(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), on the tensor's device, in rank order."""
    if not is_dist_initialized():
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
    if not is_dist_initialized():
        return tensor
    moved = tensor.to(collective_device()).contiguous()
    dist.broadcast(moved, src)
    return moved.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks."""
    if not is_dist_initialized():
        return tensor
    moved = tensor.to(collective_device()).clone()
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all ranks must call it)."""
    if not is_dist_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.long)).item() > 0)


def barrier() -> None:
    if is_dist_initialized():
        dist.barrier()
