"""Data-parallel training under ``torchrun --nproc_per_node=N edgeus train ...`` (gloo on CPU, NCCL on GPU).

Nothing changes in the user's command beyond the launcher: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK and :func:`setup` joins the process group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "cpu") -> bool:
    """Join the process group when launched by torchrun; returns whether training is distributed."""
    if not is_launched():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
