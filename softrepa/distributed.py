"""Data-parallel processes for ``softrepa train`` (``torchrun`` / ``accelerate launch``).

Both launchers start one process per device and describe it in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); :func:`from_env` joins the process group they set up:
NCCL when the process has a GPU, gloo on CPU. Without those variables it
returns a one-process :class:`Group` whose collectives are no-ops, so a
plain ``softrepa train`` needs no launcher and no ``torch.distributed``.

The soft tokens are the only trainable tensors (a few thousand numbers), so
the trainer averages their gradients with one explicit ``all_reduce`` of a
flat buffer instead of wrapping the frozen denoiser in
``DistributedDataParallel`` (which would register hooks on, and broadcast,
billions of frozen weights for nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Group:
    """This process's place in the run; collectives are no-ops when ``world == 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" / "gloo" when this module started the group
    owned: bool = False  # True when :func:`from_env` initialised it (and :meth:`close` tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all processes in place (the tensor's own device; NCCL needs CUDA)."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> None:
        if self.active:
            import torch.distributed as dist

            dist.broadcast(t, src)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def launched() -> bool:
    """True when a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_env(device: str = "auto") -> Group:
    """Join the launcher's process group (or return the one-process group).

    ``device``: the trainer's ``--device``. ``auto``/``cuda`` under a launcher
    means ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else CPU with
    gloo; ``cpu`` forces gloo.
    """
    if not launched():
        return Group()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owned = True
    return Group(rank=rank, world=world, local_rank=local, backend=backend, owned=owned)


def process_device(group: Group, device: str) -> str:
    """The device this process trains on: each launched GPU process takes ``cuda:LOCAL_RANK``."""
    if group.active and group.backend == "nccl" and device in ("auto", "cuda"):
        return f"cuda:{group.local_rank}"
    return device
