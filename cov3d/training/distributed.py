"""Distributed data-parallel training under torchrun: ranks, process groups, sharding, gathering.

cov3d uses plain `torch.distributed` DistributedDataParallel rather than
fastai.distributed (see docs/distributed.md for why). A process started by
torchrun (or any launcher that sets WORLD_SIZE, RANK and LOCAL_RANK) joins the
group on its own; nothing here does anything in a single-process run.

Two process groups: the default one (nccl on CUDA, gloo on CPU) carries DDP's
gradients and the BatchNorm statistics; a gloo group carries Python objects
(validation outputs, random states, the preprocessing result) on the CPU, with a
long timeout because the other ranks wait in it while rank 0 preprocesses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cov3d.errors import Cov3dError

log = logging.getLogger(__name__)

# Ranks wait this long for rank 0 to preprocess a data set (large ones take hours). A rank that dies is
# seen much sooner: torchrun stops the others, and gloo fails at once when a peer's connection closes.
OBJECT_TIMEOUT = timedelta(hours=24)

_objects: dist.ProcessGroup | None = None
_device: torch.device | None = None


@dataclass(frozen=True)
class Launch:
    """Where this process sits among those a launcher started."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_environment(environ: dict[str, str] | None = None) -> Launch:
    """The launcher's WORLD_SIZE, RANK and LOCAL_RANK; a plain process is rank 0 of 1."""
    environ = os.environ if environ is None else environ
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = environ.get(name, "")
        if text == "":
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise Cov3dError(f"the environment variable {name}={text!r} is not a whole number; "
                             "start distributed runs with torchrun, which sets it") from None
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    local = values.get("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise Cov3dError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local} do not describe a process group; "
                         "start distributed runs with torchrun, which sets them")
    return Launch(world, rank, local)


def start(launch: Launch, device_name: str) -> torch.device:
    """Join the process group of `launch` and return this process's device.

    On CUDA each process takes the GPU of its local rank, and the group uses
    nccl; on CPU, gloo. `device_name` is the run's --device: 'auto' picks CUDA
    when available; 'cuda:N' is refused, since the local rank picks the GPU.
    """
    global _objects, _device
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name not in ("auto", "cpu", "cuda"):
        raise Cov3dError(f"--device {device_name}: under torchrun each process takes the GPU of its local rank; "
                         "use --device auto, cuda or cpu")
    if use_cuda:
        if not torch.cuda.is_available():
            raise Cov3dError("--device cuda asked for CUDA, but torch sees no GPU; use --device cpu")
        if launch.local_rank >= torch.cuda.device_count():
            raise Cov3dError(f"local rank {launch.local_rank} has no GPU: torch sees {torch.cuda.device_count()} on "
                             "this machine; start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, **options)
        _objects = dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
        log.info("rank %d of %d joined the %s process group on %s", launch.rank, launch.world_size, backend, device)
    _device = device
    return device


def stop() -> None:
    """Leave the process group, if this process joined one."""
    global _objects, _device
    if dist.is_initialized():
        dist.destroy_process_group()
    _objects = _device = None


# How a collective fails when another rank has died (gloo over TCP; NCCL when its watchdog notices).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited")


def peer_lost(error: BaseException) -> bool:
    """Whether `error` says that another rank has gone, rather than that this one went wrong."""
    return dist.is_initialized() and any(text in str(error) for text in _PEER_LOST)


def device() -> torch.device:
    """The device `start` gave this process."""
    if _device is None:
        raise RuntimeError("distributed.start() has not run in this process")
    return _device


def barrier() -> None:
    """Wait until every rank gets here (through the object group, which tolerates rank 0's slow writes)."""
    if dist.is_initialized():
        dist.barrier(group=_objects)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return rank() == 0


def gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a one-item list in a single process)."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_objects)
    return values


def from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank; the others wait for it as long as rank 0 takes."""
    if not dist.is_initialized():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_objects)
    return box[0]


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` across ranks in place (on its own device); return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def shard(length: int, epoch: int | None, seed: int, rank_: int, world: int) -> list[int]:
    """This rank's item indices of a split of `length` items.

    Training (`epoch` given): a permutation drawn from (seed, epoch), the same
    on every rank, cut to a multiple of `world` so that every rank takes the
    same number of steps, then dealt out round-robin: each epoch the ranks see
    disjoint shards, and the few scans cut off differ from epoch to epoch.
    Validation (`epoch` None): every item exactly once, in order, dealt
    round-robin with no padding, so gathered outputs rebuild the split exactly.
    """
    if epoch is None:
        return list(range(rank_, length, world))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(length, generator=generator).tolist()
    return order[rank_:length - length % world:world]


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo the validation `shard`: rank r's k-th item is item r + k·world of the split."""
    world = len(parts)
    total = sum(len(part) for part in parts)
    merged: list[Any] = [None] * total
    for rank_, part in enumerate(parts):
        merged[rank_:total:world] = part
    return merged
