"""Batch and step arithmetic: how a run's global batch splits over ranks and micro-batches,
how many sequences an epoch serves and how many optimizer steps the run takes.

`step_plan` is the one place this is computed: the trainer runs the steps it returns, and
`slowrun plan`, the ablation's equal-time epochs, the sweep's cost estimate and the
throughput benchmark read the same numbers, so none of them can drift from the run.

- tokens per step: `train.batch_tokens`, every rank and micro-batch together; a multiple of
  `model.seq_len`, so a step is `batch_tokens / seq_len` sequences;
- per rank: the step's sequences split evenly over the ranks; each rank runs
  `train.micro_batch_tokens / seq_len` of them per forward/backward (all of them with -1)
  and accumulates the gradients of `accum` micro-batches;
- training tokens: the training split less its last `data.fitness_tokens` (the fitness
  slice, held out for ensemble member selection; under half the split);
- sequences per epoch (`epoch_seqs`): windows of seq_len+1 tokens every seq_len tokens
  (`data.chunking = "stride"`), or back-to-back chunks of seq_len+1 rounded down to a
  multiple of `data.epoch_multiple` (`"disjoint"`);
- steps: `train.max_steps`, else ceil(epochs x sequences per epoch / sequences per step)
  (at least 1); a batch may straddle two epochs, so steps per epoch is fractional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError, RunConfig

CHUNKINGS = ("stride", "disjoint")


def epoch_seqs(n_tokens: int, seq_len: int, chunking: str = "stride", epoch_multiple: int = 1) -> int:
    """Sequences one epoch of `n_tokens` serves: windows of seq_len+1 at a stride of seq_len, or
    disjoint seq_len+1 chunks rounded down to a multiple of `epoch_multiple`."""
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking {chunking!r}: must be one of {', '.join(CHUNKINGS)}")
    if chunking == "stride":
        return (n_tokens - 1) // seq_len
    return n_tokens // (seq_len + 1) // epoch_multiple * epoch_multiple


def trained_tokens(split_tokens: int, fitness_tokens: int) -> int:
    """Tokens of a training split of `split_tokens` that are trained on: all but the fitness
    slice, its last `fitness_tokens` (which must be under half the split)."""
    if fitness_tokens >= split_tokens // 2 and fitness_tokens > 0:
        raise ConfigError(f"data.fitness_tokens={fitness_tokens:,} would take half or more of the {split_tokens:,} "
                          "training tokens")
    return split_tokens - max(0, fitness_tokens)


def seqs_per_step(cfg: RunConfig) -> int:
    """Sequences of model.seq_len in one optimizer step (all ranks); train.batch_tokens must be a multiple."""
    T = cfg.model.seq_len
    if cfg.train.batch_tokens % T:
        raise ConfigError(f"train.batch_tokens: must be a multiple of model.seq_len={T}, got {cfg.train.batch_tokens}")
    return cfg.train.batch_tokens // T


@dataclass(frozen=True)
class StepPlan:
    """A run's batch and step arithmetic (`step_plan`)."""

    seq_len: int  # tokens per sequence (model.seq_len)
    tokens_per_step: int  # train.batch_tokens: every rank, every micro-batch
    seqs_per_step: int  # sequences per optimizer step, all ranks
    rank_seqs: int  # sequences per step on one rank
    micro_seqs: int  # sequences per forward/backward on one rank
    accum: int  # micro-batches per step and rank (gradient accumulation)
    train_tokens: int  # training tokens the loader serves: the split less the fitness slice
    seqs_per_epoch: int  # sequences one epoch serves (data.chunking, data.epoch_multiple)
    steps_per_epoch: float  # optimizer steps per epoch, fractional (a batch may straddle two epochs)
    total_steps: int  # train.max_steps, or ceil(train.epochs x steps_per_epoch)

    @property
    def micro_tokens(self) -> int:
        """Tokens per forward/backward on one rank."""
        return self.micro_seqs * self.seq_len

    @property
    def epochs(self) -> float:
        """Passes over the trained tokens that total_steps make."""
        return self.total_steps * self.tokens_per_step / self.train_tokens


def step_plan(cfg: RunConfig, split_tokens: int, world_size: int = 1) -> StepPlan:
    """The steps `cfg` trains on a training split of `split_tokens` tokens over `world_size`
    ranks; a ConfigError naming the option when the batch does not split or the data holds
    less than one step."""
    T = cfg.model.seq_len
    batch_seqs = seqs_per_step(cfg)
    if batch_seqs % world_size:
        raise ConfigError(f"train.batch_tokens: {batch_seqs} sequences per step do not split over {world_size} ranks")
    rank_seqs = batch_seqs // world_size
    micro = rank_seqs if cfg.train.micro_batch_tokens == -1 else max(1, cfg.train.micro_batch_tokens // T)
    if rank_seqs % micro:
        raise ConfigError(f"train.micro_batch_tokens: {rank_seqs} sequences per rank are not a multiple of {micro} "
                          "per micro-batch")
    n = trained_tokens(split_tokens, cfg.data.fitness_tokens)
    seqs = epoch_seqs(n, T, cfg.data.chunking, cfg.data.epoch_multiple)
    if seqs < batch_seqs:
        raise ConfigError(f"train.batch_tokens: the training split ({n:,} tokens) holds {seqs} sequences of {T}, "
                          f"fewer than one batch ({batch_seqs})")
    spe = seqs / batch_seqs
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * spe))
    return StepPlan(T, cfg.train.batch_tokens, batch_seqs, rank_seqs, micro, rank_seqs // micro, n, seqs, spe, total)
