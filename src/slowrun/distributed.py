"""One code path for one process or many: the torchrun environment, gradient averaging.

A single process (no WORLD_SIZE, or 1) never touches torch.distributed. Under torchrun,
gloo runs on CPU and nccl on GPU; rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Read the torchrun environment and start the process group if there are several ranks.

    `timeout_min`: how long a collective waits for the other ranks before the process group
    aborts (an explicit figure: evaluation is sharded, so the longest wait is a checkpoint write)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
    return DistEnv(rank, world, local, dev)


def all_reduce_mean(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Average tensors over ranks in place, flattened into one buffer per dtype."""
    if not env.distributed or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= env.world_size
        offset = 0
        for t in group:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """The rank that owns each tensor's optimizer step: largest first onto the least-loaded
    rank (ties by rank), so every rank holds about 1/world of the elements."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


class ShardedStep:
    """A ZeRO-2-style split of the optimizer step over the ranks (train.shard_optimizer), the
    reference's design with whole tensors as the unit, so that Muon orthogonalizes whole
    matrices:

    - each tensor has one owner rank (`assign_owners`); after backward its gradient is summed
      onto its owner only (one `reduce` per owner and dtype, over a flat bucket) and averaged
      there; the other ranks drop it, so gradients beyond the backward pass and optimizer
      state (created on a tensor's first step) live on one rank each;
    - the global gradient norm is the all-reduced sum of each rank's owned squares;
    - each rank steps its own tensors, then every owner broadcasts them (one bucket per owner
      and dtype), so every rank ends the step with the same full weights.

    A reduce plus a broadcast moves as many bytes as the all-reduce it replaces. One process:
    every tensor is rank 0's and nothing is communicated. Checkpoints hold the whole state
    (`gather_state` on rank 0); a resumed rank keeps only its own (`keep_own_state`).
    """

    def __init__(self, params: list[torch.Tensor], env: DistEnv) -> None:
        self.params, self.env = params, env
        self.owner = assign_owners([p.numel() for p in params], env.world_size)
        self.own = {id(p) for p, r in zip(params, self.owner) if r == env.rank}

    def _buckets(self, tensors: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
        """(owner, indices) per owner and dtype, in a fixed order on every rank."""
        out: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(self.owner):
            out.setdefault((r, str(tensors[i].dtype)), []).append(i)
        return [(r, idx) for (r, _), idx in sorted(out.items())]

    def reduce_grads(self) -> None:
        """Average each gradient onto its owner; the other ranks' copies are dropped."""
        grads = [p.grad for p in self.params]
        for r, idx in self._buckets(grads):
            if self.env.distributed:
                flat = torch.cat([grads[i].reshape(-1) for i in idx])
                dist.reduce(flat, dst=r, op=dist.ReduceOp.SUM)
                if r == self.env.rank:
                    flat /= self.env.world_size
                    offset = 0
                    for i in idx:
                        n = grads[i].numel()
                        grads[i].copy_(flat[offset: offset + n].view_as(grads[i]))
                        offset += n
            if r != self.env.rank:
                for i in idx:
                    self.params[i].grad = None

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradients (each counted on its owner); scaled to `max_norm`
        as torch.nn.utils.clip_grad_norm_ does."""
        own = [p.grad for p in self.params if p.grad is not None]
        device = self.params[0].device
        sq = torch.stack([g.detach().float().pow(2).sum() for g in own]).sum() if own else torch.zeros((), device=device)
        if self.env.distributed:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in own:
            g.mul_(coef.to(g.dtype))
        return float(norm)

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Every owner sends its freshly stepped tensors to the other ranks."""
        if not self.env.distributed:
            return
        for r, idx in self._buckets(self.params):
            flat = torch.cat([self.params[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=r)
            if r != self.env.rank:
                offset = 0
                for i in idx:
                    n = self.params[i].numel()
                    self.params[i].copy_(flat[offset: offset + n].view_as(self.params[i]))
                    offset += n

    def gather_state(self, optimizers: list[torch.optim.Optimizer]) -> list[dict] | None:
        """The optimizers' whole state on rank 0 (None elsewhere): every rank's own entries,
        gathered and merged (every rank must call it)."""
        mine = [opt.state_dict() for opt in optimizers]
        if not self.env.distributed:
            return mine
        local = [{k: {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in sd["state"].items()}
                 for sd in mine]
        parts: list | None = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(local, parts, dst=0)
        if not self.env.is_main:
            return None
        merged = []
        for j, sd in enumerate(mine):
            state: dict = {}
            for part in parts:  # type: ignore[union-attr]
                state.update(part[j])
            merged.append({"state": dict(sorted(state.items())), "param_groups": sd["param_groups"]})
        return merged

    def keep_own_state(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """After loading a whole checkpoint: drop the state of tensors another rank steps."""
        for opt in optimizers:
            for p in list(opt.state):
                if id(p) not in self.own:
                    del opt.state[p]
