"""The learner's process group: joining (or starting) it, and the collectives the learner uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from diffrl.utils import free_port

Tensor = torch.Tensor


def init_distributed(backend: str, device: torch.device) -> tuple[int, int, bool]:
    """Join (or start) the default process group through ``deepspeed.init_distributed``.

    Without a launcher (no RANK/WORLD_SIZE in the environment) this is a one-rank group:
    MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK=LOCAL_RANK=0, WORLD_SIZE=1 are set if absent.
    Returns ``(rank, world_size, created_here)``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("several learner ranks need MASTER_ADDR/MASTER_PORT set by the launcher")
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def leave_distributed() -> None:
    """Destroy the default process group (barrier first: ZeRO-3 aborts otherwise)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    # DeepSpeed caches a clone of the world group; a later learner in this process (a new group)
    # would otherwise be handed the destroyed one ("Group ... is not registered").
    from deepspeed.utils import groups as ds_groups

    ds_groups._WORLD_GROUP = None


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's step generator (noise levels, ε)."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + 17) % (2**63 - 1)


def shared_seed(seed: int, step: int) -> int:
    """The seed of a step's generator shared by every rank (draws the ranks must agree on); unlike any
    rank's ``step_seed`` of the same step (17 + 101·rank is never 7919)."""
    return (seed * 1_000_003 + step * 10_007 + 7_919) % (2**63 - 1)


class Collectives:
    """The learner's collectives over ``world_size`` ranks (no-ops on one rank)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def agree(self, ready: bool, stop: bool) -> tuple[bool, bool]:
        """Every rank steps only when all are ready; any rank's stop request stops all."""
        if self.world_size == 1:
            return ready, stop
        flags = torch.tensor([0 if ready else 1, 1 if stop else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags[0].item() == 0, flags[1].item() == 1

    def batch_wide(self, fn, rewards: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        """``fn(rewards, mask)`` over every rank's ``[G, K]`` groups; this rank's rows of its outputs.
        On one rank the mask is passed only when the batch is padded (as the losses take it)."""
        if self.world_size == 1:
            return fn(rewards, None if bool(mask.all()) else mask)
        G, K = rewards.shape
        dims = self.all_reduce(torch.tensor([G, K], dtype=torch.int64, device=self.device), dist.ReduceOp.MAX)
        Gm, Km = (int(v) for v in dims.tolist())
        r = torch.zeros(Gm, Km, dtype=torch.float64, device=self.device)
        m = torch.zeros(Gm, Km, dtype=torch.float64, device=self.device)
        r[:G, :K] = rewards.to(self.device)
        m[:G, :K] = mask.to(self.device, torch.float64)
        rs = [torch.empty_like(r) for _ in range(self.world_size)]
        ms = [torch.empty_like(m) for _ in range(self.world_size)]
        dist.all_gather(rs, r)
        dist.all_gather(ms, m)
        full_r, full_m = torch.cat(rs).cpu(), torch.cat(ms).cpu() > 0.5  # [W·Gm, Km]
        rows = slice(self.rank * Gm, self.rank * Gm + G)
        return tuple(out[rows, :K] for out in fn(full_r, full_m))
