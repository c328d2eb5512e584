"""One code path for one process or many: the torchrun environment, gradient averaging.

A single process (no WORLD_SIZE, or 1) never touches torch.distributed. Under torchrun,
gloo runs on CPU and nccl on GPU; rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import SlowrunError


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


class DeviceError(SlowrunError):
    pass


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):  # never a silent CPU run for a device name not known here
        raise DeviceError(f"device {name!r}: one of auto, cpu, cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("train.device=cuda: no CUDA device is available here (use train.device=auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# "1": count any CPU as computing in bf16 (to check bf16 numerics where it is emulated, slowly); "0": none
CPU_BF16_ENV = "SLOWRUN_CPU_BF16"


def fast_bf16_available(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic: a GPU from Ampere on, a CPU with bf16 matmul kernels
    (oneDNN's own check: AVX512 or AMX on x86, the bf16 extension on Arm). Without them bf16 is
    emulated, measured 22x slower than fp32 (2026-12-07, AMD EPYC with AVX2 only, one thread,
    512^3 matmuls: 1.7 against 37.6 GFLOP/s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def compute_dtype(dtype: str, device: torch.device) -> str:
    """What a run of train.dtype `dtype` computes in on `device`: bf16 autocast where the device
    has bf16 arithmetic, else fp32. A run records this, so that its ledger line names the
    precision it trained in."""
    return "fp32" if dtype == "bf16" and not fast_bf16_available(device) else dtype


def init(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Read the torchrun environment and start the process group if there are several ranks.

    `timeout_min`: how long a collective waits for the other ranks before the process group
    aborts (an explicit figure: evaluation is sharded, so the longest wait is a checkpoint write)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn's functions take `group=group.WORLD` as a default argument, bound
        # when the module is first imported. torch imports it lazily (the first optimizer's
        # add_param_group imports torch._dynamo, which imports it), and after the process group
        # exists that default holds the group forever: destroy_process_group then leaves gloo's
        # worker threads running into the interpreter's shutdown, where one of them aborts the
        # rank (SIGABRT, 'terminate called without an active exception') about once in 100
        # launches. Imported here, before the group exists, the default is None.
        import torch.distributed.nn  # noqa: F401
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
    """The rank that owns each item (a bucket of tensors): largest first onto the least-loaded
    rank (ties by rank), so every rank holds about 1/world of the elements."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


BUCKET_ELEMENTS = 25_000_000  # at most 100 MB of fp32 gradients per reduce (unless one tensor is larger)


def make_buckets(params: list[torch.Tensor], world: int, cap: int = BUCKET_ELEMENTS) -> list[list[int]]:
    """Tensor indices in buckets, in reverse order (the order backward finishes them), each of
    one dtype and at most max(cap, total / (4 world)) elements, so every rank owns several."""
    cap = max(1, min(cap, -(-sum(p.numel() for p in params) // (4 * world))))
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(params))):
        if buckets and size + params[i].numel() <= cap and params[buckets[-1][0]].dtype == params[i].dtype:
            buckets[-1].append(i)
            size += params[i].numel()
        else:
            buckets.append([i])
            size = params[i].numel()
    return buckets


class ShardedStep:
    """A ZeRO-2-style split of the optimizer step over the ranks (train.shard_optimizer), the
    reference's design with whole tensors as the unit, so that Muon orthogonalizes whole
    matrices:

    - the tensors are grouped into buckets in backward order (`make_buckets`), each owned by
      one rank (`assign_owners`); during the last micro-batch's backward a bucket's gradients
      are summed onto its owner (an asynchronous `reduce`) as soon as all of them are ready,
      so communication overlaps the rest of the backward pass; afterwards the owner averages
      them and the other ranks drop them;
    - optimizer state is created on a tensor's first step, so it lives on its owner only;
    - the global gradient norm is the all-reduced sum of each rank's owned squares;
    - each rank steps its own tensors, then every owner broadcasts its buckets, so every rank
      ends the step with the same full weights.

    A reduce plus a broadcast moves as many bytes as the all-reduce it replaces. One process:
    every tensor is rank 0's and nothing is communicated. Checkpoints hold the whole state
    (`gather_state` on rank 0); a resumed run, on any number of ranks, keeps each rank's own
    (`keep_own_state`).
    """

    def __init__(self, params: list[torch.Tensor], env: DistEnv) -> None:
        self.params, self.env = params, env
        self.buckets = make_buckets(params, env.world_size)
        bucket_owner = assign_owners([sum(params[i].numel() for i in b) for b in self.buckets], env.world_size)
        self.owner = [0] * len(params)
        self.bucket_of: dict[int, int] = {}
        for k, (b, r) in enumerate(zip(self.buckets, bucket_owner)):
            for i in b:
                self.owner[i] = r
                self.bucket_of[id(params[i])] = k
        self.bucket_owner = bucket_owner
        self.own = {id(p) for p, r in zip(params, self.owner) if r == env.rank}
        self.armed = False
        self.armed_at = 0.0
        self.overlapped = 0
        self.overlap_left = 0.0  # mean share of the last backward still to run when its buckets were sent
        self.pending: list[int] = []
        self.works: dict[int, tuple] = {}
        self.sent_at: dict[int, float] = {}
        if env.distributed:
            for p in params:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def describe(self) -> str:
        mine = [p.numel() for p, r in zip(self.params, self.owner) if r == self.env.rank]
        total = sum(p.numel() for p in self.params)
        return (f"optimizer step sharded over {self.env.world_size} rank(s): rank {self.env.rank} owns {len(mine)} of "
                f"{len(self.params)} tensors ({sum(mine) / total:.1%} of the elements) in {len(self.buckets)} buckets, "
                f"{self.overlapped} reduced during the last backward, sent with {self.overlap_left:.0%} of it "
                f"still to run on average")

    def arm(self) -> None:
        """Call right before the step's last backward: its finished buckets are reduced right away."""
        self.armed, self.works, self.sent_at = self.env.distributed, {}, {}
        self.pending = [len(b) for b in self.buckets]
        self.armed_at = time.perf_counter()

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        k = self.bucket_of[id(p)]
        self.pending[k] -= 1
        if self.pending[k] == 0:
            self.sent_at[k] = time.perf_counter()
            self._launch(k)

    def _launch(self, k: int) -> None:
        flat = torch.cat([self.params[i].grad.reshape(-1) for i in self.buckets[k]])
        self.works[k] = (dist.reduce(flat, dst=self.bucket_owner[k], op=dist.ReduceOp.SUM, async_op=True), flat)

    def reduce_grads(self) -> None:
        """After backward (every gradient present): reduce the buckets not yet sent (a block
        skipped by stochastic depth, or no `arm`), wait for all, average on the owners."""
        if not self.env.distributed:
            return
        # buckets sent from the backward's hooks, and how much of the backward (host time from `arm`
        # to here) was still to run when each was sent: a whole-model compiled graph hands over
        # every gradient at its end (all sent, ~0% left); blocks compiled apart hand them over block
        # by block (train.compile_scope)
        end = time.perf_counter()
        self.overlapped = len(self.sent_at)
        span = max(end - self.armed_at, 1e-9)
        self.overlap_left = sum((end - t) / span for t in self.sent_at.values()) / max(len(self.sent_at), 1)
        for k in range(len(self.buckets)):
            if k not in self.works:
                self._launch(k)
        for k, (work, flat) in sorted(self.works.items()):
            work.wait()
            idx = self.buckets[k]
            if self.bucket_owner[k] == self.env.rank:
                flat /= self.env.world_size
                offset = 0
                for i in idx:
                    g = self.params[i].grad
                    g.copy_(flat[offset: offset + g.numel()].view_as(g))
                    offset += g.numel()
            else:
                for i in idx:
                    self.params[i].grad = None
        self.armed, self.works = False, {}

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
        """Every owner sends its freshly stepped buckets to the other ranks."""
        if not self.env.distributed:
            return
        for idx, r in zip(self.buckets, self.bucket_owner):
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
