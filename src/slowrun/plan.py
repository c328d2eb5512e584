"""`slowrun plan`: what a recipe costs before it runs: parameters, FLOPs per token, steps,
memory per rank and, given a measured step time, the wall time of the whole run.

The model is built on the `meta` device (shapes without storage), so planning a
1.4B-parameter recipe takes no memory and no time. Memory per rank, in bytes:

- weights, gradients: 4 bytes per parameter each (fp32 master weights and gradients;
  autocast computes in bf16 but stores fp32);
- optimizer state: AdamW 2 fp32 moments for each parameter of its groups; Muon 1 fp32
  momentum buffer per matrix, plus NorMuon's per-row second moments (one fp32 per row);
- EMA: an fp32 copy of the state dict when optim.ema_decay > 0;
- replicated on every rank, except with train.shard_optimizer (gpus > 1): the optimizer
  state divided by the ranks (each tensor's state on its owner); the gradients are still
  whole during backward (they are reduced after it);
- all-reduce buffer (gpus > 1): `distributed.all_reduce_mean` concatenates every gradient
  into one fp32 buffer after backward, when the activations are already freed (sharded:
  the largest owner's bucket, about 1/gpus of it);
- autocast weight copies (bf16): the bf16 casts of the block matrices, kept by autocast
  for the whole forward (2 bytes per block matrix parameter);
- activations: the tensors the forward saves for backward, per token of a micro-batch,
  counted per block (elements; `r` fp32 residual-stream copies at 4 bytes, the rest in the
  compute dtype: 4 bytes fp32, 2 bf16):
    residual  r = 2 (block input, input of norm2) + 1 with x0 mixing (the unmixed x)
    attention 1 (norm1 out) + 3 (qkv) + 2 with RoPE (rotated q, k) + 2 with QK-norm
              + 1 (attention out) + 1 (c_proj input) + 2 on value-projection layers
              (x0 projection, new v); times iha_pseudo for q/k/v/out with IHA (rough)
    MLP       1 (norm2 out) + 4*hidden (swiglu: c_fc out 2h, silu h, product h),
              2*hidden (gelu, relu2)
    dropout   2 masks of C (1 byte each on CUDA, the compute dtype on CPU)
  times n_embd, times the blocks run (looping repeats included, the MTP block too), plus
  2 fp32 copies of C for the embedding output. Flash / memory-efficient attention saves no
  T x T matrix; per-head statistics and norm scales (O(n_head) per token) are left out.
  Checked against the bytes the autograd graph actually saves (saved_tensors_hooks over
  `hidden`, unique storages, parameters excluded: exact and not noisy, unlike RSS deltas;
  tests/test_plan.py, 4 layers, width 64, 512 tokens, CPU, estimate / measured):
  slowrun 1.035 (fp32) 0.950 (bf16), baseline 1.085 / 1.088, nanochat 1.050 / 0.963;
- logits: the fused, chunked output layer (`losses.linear_cross_entropy`) keeps only a
  chunk of the (N, V) logits (3 fp32 copies; 256 rows on CPU, 4,096 on CUDA), the fp32
  head gradient and the hidden-state gradient; twice with MTP (an estimate on CUDA, not yet
  measured on a GPU).

The total is the persistent state (weights, gradients, optimizer, EMA) plus the larger of
the forward/backward working set and the all-reduce buffer. CUDA's allocator cache and
fragmentation come on top.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import SlowrunError
from .config import ConfigError, RunConfig, build_config
from .dataset import Dataset, DatasetError
from .gpt import GPT, has_value_proj
from .losses import FUSED_CHUNK
from .optim import split_params
from .rundir import METRICS, RunDir
from .runlog import fmt_time, read_metrics
from .steps import step_plan

DEFAULT_VOCAB = 50257  # GPT-2's, the benchmark's tokenizer, when neither recipe nor dataset says
DEFAULT_TRAIN_TOKENS = 100_000_000  # the benchmark's budget, when neither --train-tokens nor a dataset says
GB = 1e9


class PlanError(SlowrunError):
    pass


@dataclass
class Plan:
    recipe: str
    params: int
    non_embedding_params: int
    flops_per_token: int
    train_tokens: int  # trained on: the training split less data.fitness_tokens
    epochs: float
    steps: int
    batch_tokens: int
    gpus: int
    micro_batch_tokens: int  # per rank and forward/backward
    accum: int  # micro-batches per step and rank
    device: str
    dtype: str
    memory_bytes: dict[str, int] = field(default_factory=dict)  # per rank
    peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    step_s: float | None = None
    wall_s: float | None = None  # steps * step_s: training only, evaluations not included


def meta_model(cfg: RunConfig) -> GPT:
    """The recipe's model with shapes and no storage."""
    with torch.device("meta"):
        return GPT(cfg.model)


def state_bytes(model: torch.nn.Module, cfg: RunConfig) -> dict[str, int]:
    """Weights, gradients, optimizer state and EMA in bytes, as `build_optimizers` and `EMA` allocate them."""
    groups = split_params(model, cfg.optim.gates_in_muon if cfg.optim.name == "muon" else "none")
    params = [p for plist in groups.values() for _, p in plist]
    weights = sum(p.numel() * 4 for p in params)
    opt = 0
    for kind, plist in groups.items():
        for _, p in plist:
            if kind == "matrix" and cfg.optim.name == "muon":
                wide_by_column = cfg.optim.normuon_wide == "column" and p.size(0) < p.size(1)
                opt += p.numel() * 4 + ((p.size(1) if wide_by_column else p.size(0)) * 4 if cfg.optim.normuon else 0)
            else:
                opt += 2 * p.numel() * 4
    ema = sum(t.numel() * 4 for t in model.state_dict().values()) if cfg.optim.ema_decay > 0 else 0
    return {"weights": weights, "gradients": weights, "optimizer": opt, "ema": ema}


def activation_bytes_per_token(cfg: RunConfig, device: str, loop_active: bool = True) -> float:
    """Bytes the forward saves for backward per token (the formula in the module docstring)."""
    m = cfg.model
    act = 2 if cfg.train.dtype == "bf16" else 4
    C, Hd = m.n_embd, m.hidden_dim
    residual = 2 + (1 if m.x0_mix else 0)
    pseudo = m.iha_pseudo if m.iha else 1
    attn = 1 + 3 * pseudo + (2 * pseudo if m.pos == "rope" else 0) + (2 * pseudo if m.qk_norm else 0) + pseudo + 1
    mlp = 1 + (4 if m.mlp == "swiglu" else 2) * Hd / C
    dropout = 2 * (1 if device == "cuda" else act) if m.dropout > 0 else 0
    layers = list(range(m.n_layer))
    if m.loop_start >= 0 and loop_active and m.loop_repeats > 1:
        layers += list(range(m.loop_start, m.loop_end + 1)) * (m.loop_repeats - 1)
    if m.mtp_weight > 0:
        layers.append(-1)  # the MTP block (no value projection)
    total = 0.0
    for i in layers:
        value = 2 if i >= 0 and has_value_proj(m, i) else 0
        total += C * (4 * residual + act * (attn + value + mlp) + dropout)
    return total + 2 * 4 * C  # the embedding lookup and its norm (x0)


def logits_bytes(cfg: RunConfig, tokens: int, device: str) -> int:
    """The output layer's working set for a micro-batch of `tokens` (module docstring)."""
    m = cfg.model
    V, C = m.vocab_size, m.n_embd
    act = 2 if cfg.train.dtype == "bf16" else 4
    heads = 2 if m.mtp_weight > 0 else 1
    chunk = FUSED_CHUNK.get(device, FUSED_CHUNK["cuda"])
    return heads * (min(chunk, tokens) * V * 4 * 3 + V * C * 4 + tokens * C * act * 2)


def autocast_copy_bytes(model: GPT, cfg: RunConfig) -> int:
    """bf16 copies of the block matrices that autocast keeps through the forward."""
    if cfg.train.dtype != "bf16":
        return 0
    return sum(p.numel() * 2 for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith(("wte", "wpe")))


def median_step_s(run_dir: str | Path) -> float:
    """Median `step_s` of a run's training steps (metrics.jsonl; the first step, with its
    compilation and allocation, is left out when there are others)."""
    if not RunDir(run_dir).metrics.is_file():
        raise PlanError(f"--run {run_dir}: no {METRICS} there")
    rows = [r for r in read_metrics(run_dir) if r.get("kind") == "train" and "step_s" in r]
    if not rows:
        raise PlanError(f"--run {run_dir}: {METRICS} holds no training step")
    times = [r["step_s"] for r in rows if r.get("step", 0) > 1] or [r["step_s"] for r in rows]
    return float(statistics.median(times))


def plan(recipe: str, overrides: dict | None = None, gpus: int = 1, micro_batch_tokens: int = -1,
         train_tokens: int = -1, data: str | None = None, device: str = "cuda", step_s: float | None = None) -> Plan:
    """Plan a recipe on `gpus` ranks of `device` (cuda or cpu)."""
    if gpus < 1:
        raise PlanError(f"--gpus: must be >= 1, got {gpus}")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"--device: cuda or cpu, got {device}")
    over = dict(overrides or {})
    if micro_batch_tokens > 0:
        over["train.micro_batch_tokens"] = micro_batch_tokens
    notes: list[str] = []
    ds_tokens = -1
    if data:
        try:
            ds = Dataset.open(data, verify=False)
        except (DatasetError, OSError) as e:
            raise PlanError(f"--data {data}: {e}") from None
        ds_tokens = ds.num_tokens("train")
        over.setdefault("model.vocab_size", ds.vocab_size)
    cfg = build_config(recipe, over)
    if cfg.model.vocab_size == -1:
        cfg = build_config(recipe, {**over, "model.vocab_size": DEFAULT_VOCAB})
        notes.append(f"vocabulary {DEFAULT_VOCAB:,} (GPT-2's) assumed: pass --data or --set model.vocab_size=N")
    if train_tokens > 0:
        n_train = train_tokens
    elif ds_tokens > 0:
        n_train = ds_tokens
    else:
        n_train = DEFAULT_TRAIN_TOKENS
        notes.append(f"{DEFAULT_TRAIN_TOKENS:,} training tokens (the benchmark's) assumed: pass --train-tokens or --data")

    try:
        s = step_plan(cfg, n_train, gpus)  # the trainer's own arithmetic
    except ConfigError as e:
        flags = f"--gpus {gpus}" + (f", --micro-batch-tokens {micro_batch_tokens}" if micro_batch_tokens > 0 else "")
        raise PlanError(f"{e} ({flags})") from None
    if cfg.data.fitness_tokens > 0:
        notes.append(f"data.fitness_tokens: the last {cfg.data.fitness_tokens:,} of the {n_train:,} training tokens "
                     "are held out, never trained on")

    model = meta_model(cfg)
    tokens = s.micro_tokens
    mem = state_bytes(model, cfg)
    mem["autocast_copies"] = autocast_copy_bytes(model, cfg)
    mem["activations"] = int(activation_bytes_per_token(cfg, device) * tokens)
    mem["logits"] = logits_bytes(cfg, tokens, device)
    sharded = cfg.train.shard_optimizer and gpus > 1
    if sharded:
        mem["optimizer"] = math.ceil(mem["optimizer"] / gpus)
    mem["allreduce_buffer"] = (math.ceil(mem["gradients"] / gpus) if sharded else mem["gradients"]) if gpus > 1 else 0
    persistent = mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["ema"]
    working = mem["autocast_copies"] + mem["activations"] + mem["logits"]
    notes.append("optimizer state split over the ranks (train.shard_optimizer); weights and gradients replicated"
                 if sharded else "weights, gradients and optimizer state are replicated on every rank"
                 + (" (train.shard_optimizer splits the optimizer state)" if gpus > 1 else ""))
    p = Plan(recipe, model.num_params(), model.num_params(exclude_embeddings=True), model.flops_per_token(),
             s.train_tokens, s.epochs, s.total_steps, s.tokens_per_step, gpus, tokens, s.accum, device, cfg.train.dtype,
             mem, persistent + max(working, mem["allreduce_buffer"]), notes)
    if step_s is not None:
        if not math.isfinite(step_s) or step_s <= 0:
            raise PlanError(f"--step-s: must be a finite number > 0, got {step_s}")
        p.step_s, p.wall_s = step_s, step_s * s.total_steps
    return p


def describe(p: Plan) -> str:
    rows = [
        f"recipe {p.recipe}: {p.params:,} parameters ({p.non_embedding_params:,} without embeddings), "
        f"{p.flops_per_token:,} FLOPs/token",
        f"steps {p.steps:,} x {p.batch_tokens:,} tokens = {p.epochs:.2f} epochs of {p.train_tokens:,}; "
        f"{p.gpus} {p.device} rank(s), {p.accum} micro-batch(es) of {p.micro_batch_tokens:,} tokens per rank, {p.dtype}",
        f"{'memory per rank':<24}{'GB':>9}",
    ]
    for k, v in p.memory_bytes.items():
        rows.append(f"  {k:<22}{v / GB:>9.2f}")
    rows.append(f"  {'peak (estimate)':<22}{p.peak_bytes / GB:>9.2f}")
    if p.wall_s is not None:
        rows.append(f"wall time: {p.steps:,} steps x {p.step_s:.3f} s = {fmt_time(p.wall_s)} of training (evaluation not included)")
    rows += [f"note: {n}" for n in p.notes]
    return "\n".join(rows)


def as_json(p: Plan) -> str:
    return json.dumps(asdict(p))
