"""Held-out loss: mean cross-entropy over every target of non-overlapping chunks, and bits per byte.

As in the reference benchmark, a split is cut into non-overlapping chunks of seq_len+1
tokens (seq_len targets each; the remainder is dropped) and the loss is the mean over all
targets, model in eval mode. Bits per byte divides the summed loss (in bits) by the UTF-8
bytes of the target tokens, so runs with different tokenizers compare. The per-target
log-probabilities can be returned too: probability-averaged ensembles (and a run's
`swa_probs` variant) need nothing else.

Sharded: given a `DistEnv` of several ranks, each rank scores every world_size-th batch of
chunks and the per-target log-probabilities are summed over ranks (each target is scored
by one rank and is 0 elsewhere, so the sum is exact): every rank returns the same array,
and the loss, bits per byte and any probability average computed from it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistEnv


@dataclass
class EvalResult:
    loss: float  # mean nats per target
    bpb: float  # bits per UTF-8 byte of the targets
    targets: int
    bytes: int


def num_chunks(n_tokens: int, seq_len: int, max_tokens: int = -1) -> int:
    n = n_tokens // (seq_len + 1)
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // (seq_len + 1)))
    return n


def scored_tokens(tokens: np.ndarray, seq_len: int, reference_batch: int = -1) -> np.ndarray:
    """The tokens of the chunks an evaluation scores: all of them, or with `reference_batch`
    the subset the reference benchmark scores. Its val loader permutes the (seq_len + 1)-token
    chunks with numpy's RandomState(42) and runs whole batches of `reference_batch` sequences
    (8 ranks x 4 on its tracks), so the last n mod reference_batch chunks of the permutation
    are never scored. The loss is a mean over targets, so the kept chunks are returned in
    file order (one contiguous array that every evaluation function takes as a split)."""
    if reference_batch == -1:
        return tokens
    n = len(tokens) // (seq_len + 1)
    keep = np.sort(np.random.RandomState(42).permutation(n)[: n - n % reference_batch])
    if len(keep) == 0:
        raise ValueError(f"eval.reference_batch={reference_batch}: the split's {n} chunks are fewer than one batch")
    return np.asarray(tokens[: n * (seq_len + 1)]).reshape(n, seq_len + 1)[keep].reshape(-1)


def split_tokens(ds, split: str, seq_len: int, reference_batch: int = -1) -> np.ndarray:
    """A dataset split as it is scored: val through `scored_tokens` (`eval.reference_batch`)."""
    tokens = ds.tokens(split)
    return scored_tokens(tokens, seq_len, reference_batch) if split == "val" else tokens


def chunk_batches(tokens: np.ndarray, seq_len: int, batch_seqs: int, max_tokens: int = -1):
    """Yield (B, seq_len+1) int64 arrays of consecutive non-overlapping chunks."""
    n = num_chunks(len(tokens), seq_len, max_tokens)
    if n == 0:
        raise ValueError(f"split of {len(tokens)} tokens is shorter than one chunk of {seq_len + 1}")
    for i in range(0, n, batch_seqs):
        j = min(n, i + batch_seqs)
        yield np.asarray(tokens[i * (seq_len + 1): j * (seq_len + 1)], dtype=np.int64).reshape(j - i, seq_len + 1)


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def target_logprobs(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_seqs: int = 16,
                    device: torch.device | str = "cpu", dtype: str = "fp32", max_tokens: int = -1,
                    env: DistEnv | None = None) -> np.ndarray:
    """log p(target) for every target of every chunk, float64, in order (n_chunks * seq_len,).

    With `env` of several ranks, every rank must call it: each scores its share of the
    batches (batch b on rank b % world_size) and all get the whole array (module docstring)."""
    device = torch.device(device)
    rank, world = (env.rank, env.world_size) if env is not None and env.distributed else (0, 1)
    n = num_chunks(len(tokens), seq_len, max_tokens)
    if n == 0:
        raise ValueError(f"split of {len(tokens)} tokens is shorter than one chunk of {seq_len + 1}")
    out = np.zeros(n * seq_len, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        for b, i in enumerate(range(0, n, batch_seqs)):
            if b % world != rank:
                continue
            j = min(n, i + batch_seqs)
            chunk = np.asarray(tokens[i * (seq_len + 1): j * (seq_len + 1)], dtype=np.int64).reshape(j - i, seq_len + 1)
            x = torch.from_numpy(chunk[:, :-1]).to(device)
            y = torch.from_numpy(chunk[:, 1:]).to(device)
            with autocast(device, dtype):
                logits, _ = model(x)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            out[i * seq_len: j * seq_len] = lp.double().cpu().numpy().reshape(-1)
    finally:
        model.train(was_training)
    if world > 1:
        t = torch.from_numpy(out).to(device)  # nccl reduces device tensors, gloo CPU ones
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = t.cpu().numpy()
    return out


def target_byte_counts(tokens: np.ndarray, seq_len: int, token_bytes: np.ndarray, max_tokens: int = -1) -> np.ndarray:
    n = num_chunks(len(tokens), seq_len, max_tokens)
    chunks = np.asarray(tokens[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)
    return token_bytes[chunks[:, 1:]].reshape(-1)


def summarize(logprobs: np.ndarray, target_bytes: np.ndarray) -> EvalResult:
    nats = -float(logprobs.sum())
    nbytes = int(target_bytes.sum())
    return EvalResult(loss=nats / len(logprobs), bpb=nats / math.log(2) / max(1, nbytes), targets=len(logprobs), bytes=nbytes)


def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, token_bytes: np.ndarray, batch_seqs: int = 16,
             device: torch.device | str = "cpu", dtype: str = "fp32", max_tokens: int = -1,
             env: DistEnv | None = None) -> EvalResult:
    """Loss and bits per byte; with `env` of several ranks, sharded (every rank calls it and gets the result)."""
    lp = target_logprobs(model, tokens, seq_len, batch_seqs, device, dtype, max_tokens, env)
    return summarize(lp, target_byte_counts(tokens, seq_len, token_bytes, max_tokens))


def prob_average(logprobs: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """log of the (weighted) mean of the members' probabilities of each target."""
    stacked = np.stack(logprobs)  # (K, N)
    w = np.full(len(logprobs), 1.0 / len(logprobs)) if weights is None else np.asarray(weights, dtype=np.float64)
    m = stacked.max(axis=0)
    return m + np.log(np.einsum("k,kn->n", w, np.exp(stacked - m)))


def evaluate_averaged(models: Iterable[torch.nn.Module], tokens: np.ndarray, seq_len: int, token_bytes: np.ndarray,
                      batch_seqs: int = 16, device: torch.device | str = "cpu", dtype: str = "fp32",
                      max_tokens: int = -1, env: DistEnv | None = None, weights: np.ndarray | None = None) -> EvalResult:
    """Loss of the (weighted) mean of the models' probabilities (one model: its own loss), as
    the final evaluation scores a probability-averaged variant. `models` may be a generator, so
    that one model at a time is in memory. `env`: sharded over its ranks, as `target_logprobs`."""
    lps = [target_logprobs(m, tokens, seq_len, batch_seqs, device, dtype, max_tokens, env) for m in models]
    if not lps:
        raise ValueError("evaluate_averaged needs at least one model")
    lp = lps[0] if len(lps) == 1 else prob_average(lps, weights)
    return summarize(lp, target_byte_counts(tokens, seq_len, token_bytes, max_tokens))
