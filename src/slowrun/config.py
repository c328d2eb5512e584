"""Typed, validated run configuration: TOML recipes plus dotted command-line overrides.

A run's configuration is one `RunConfig` made of one dataclass per concern (`model`,
`optim`, `train`, `data`, `eval`, `distill`). Every field carries a one-line help text
(shown by `slowrun train --help-config`) and is validated in `__post_init__`; an error
names the option (`optim.weight_decay: must be >= 0, got -1`). Recipes are TOML files
(`src/slowrun/recipes/*.toml`, or any path); overrides are `--section.key=value` where the
value is parsed as a TOML literal. The fully resolved config is written next to every run
and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from . import SlowrunError


class ConfigError(SlowrunError):
    """A configuration value or key is wrong; the message names the option."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text (with units)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(cond: bool, name: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, f"must be one of {', '.join(choices)}", value)


def window_stages(cfg: "ModelConfig") -> list[tuple[int, int, int, int]]:
    """model.window_schedule as [(first epoch, last epoch, short, long)], 1-based epochs,
    contiguous from epoch 1; [] when unset. Raises ConfigError naming the option."""
    text = cfg.window_schedule.strip()
    if not text:
        return []
    stages = []
    for part in text.split(";"):
        try:
            span, sizes = part.split(":")
            first, last = (int(v) for v in span.split("-"))
            short, long = (int(v) for v in sizes.split(","))
        except ValueError:
            raise ConfigError(f"model.window_schedule: '{part}' is not FIRST-LAST:SHORT,LONG, got {text!r}") from None
        expect = stages[-1][1] + 1 if stages else 1
        _check(first == expect and last >= first, "model.window_schedule", f"stage '{part}' must start at epoch {expect}", text)
        _check(1 <= short <= long <= cfg.seq_len, "model.window_schedule",
               f"stage '{part}' needs 1 <= short <= long <= seq_len={cfg.seq_len}", text)
        stages.append((first, last, short, long))
    return stages


@dataclass
class ModelConfig:
    """Architecture. Every recipe feature is a flag read in `GPT.forward`."""

    vocab_size: int = opt(-1, "vocabulary size in tokens; -1 = take it from the dataset")
    vocab_pad_to: int = opt(1, "token tables and the head get rows up to a multiple of this (the reference: 64, 50,257 -> 50,304, for tensor-core shapes); the pad rows are never scored nor sampled; 1 = none")
    seq_len: int = opt(256, "context length in tokens (training sequences and eval chunks)")
    depth: int = opt(-1, "single size knob: sets n_layer=depth and n_embd=depth*aspect_ratio (rounded to head_dim); -1 = use n_layer/n_embd as given")
    aspect_ratio: int = opt(64, "n_embd per layer when `depth` is used")
    head_dim: int = opt(64, "channels per attention head when `depth` is used")
    n_layer: int = opt(4, "number of transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(256, "model width (residual stream channels)")
    norm: str = opt("rmsnorm", "normalization: layernorm (with weights and biases) or rmsnorm (weightless)")
    bias: bool = opt(False, "biases in linear layers (GPT-2 style)")
    qk_norm: bool = opt(True, "RMS-normalize queries and keys (after rotary)")
    pos: str = opt("rope", "positions: learned (absolute table) or rope")
    rope_base: float = opt(10000.0, "RoPE base frequency")
    mlp: str = opt("swiglu", "MLP: gelu (4x), relu2 (4x, relu squared) or swiglu (hidden 256*ceil(8d/3/256))")
    mlp_hidden: int = opt(-1, "MLP hidden width; -1 = the default of the chosen MLP")
    tie_embeddings: bool = opt(False, "share the input embedding and the output head")
    embed_norm: bool = opt(True, "RMSNorm right after the embedding lookup")
    value_proj: bool = opt(True, "value projections from x0 on alternate layers, gated by 2*sigmoid(W x[:32]) with W = 0 at init")
    value_embed: bool = opt(False, "with value_proj: the gated value input is a per-block token table (vocab x n_embd, looked up from the input tokens: nanochat's value embeddings) instead of a projection of x0")
    head_gate: bool = opt(True, "per-head attention output gate sigmoid(W x[:12]), W = 0 at init")
    x0_mix: bool = opt(True, "before each block x = lambda_r*x + lambda_0*x0 (learned, init 1.0 and 0.1)")
    unet: bool = opt(True, "U-Net skips: encoder block i's output added into decoder block n-1-i (learned weight, init 1)")
    logit_softcap: float = opt(15.0, "logits c*tanh(z/c); -1 disables")
    dropout: float = opt(0.1, "dropout probability on attention and MLP outputs")
    stoch_depth: float = opt(0.0, "stochastic depth: block i is skipped with probability stoch_depth*i/(n_layer-1) in training")
    loop_start: int = opt(-1, "first block of the looped span; -1 disables layer looping")
    loop_end: int = opt(-1, "last block (inclusive) of the looped span")
    loop_repeats: int = opt(1, "times the looped span runs once looping is active")
    loop_from_epoch: int = opt(0, "epoch (0-based) from which the span is looped")
    mtp_weight: float = opt(0.0, "weight of the multi-token-prediction auxiliary loss (predict t+2 from an extra block); 0 disables")
    window_pattern: str = opt("", "sliding-window attention: S (short window) / L (full context) per block, tiled over the blocks (the reference: SSSL); the last block and the MTP block are always full; \"\" = all full")
    short_window: int = opt(-1, "keys before each query that S blocks attend to, in tokens (the reference: 1024 at seq_len 2048); -1 = seq_len // 2")
    window_schedule: str = opt("", "context-window schedule by epoch, the reference's 2-hour track: \"FIRST-LAST:SHORT,LONG;...\" (1-based epochs; S blocks see SHORT keys back, L blocks and the last block LONG), e.g. \"1-6:256,768;7-13:768,1792;14-22:1280,2048\"; \"\" = fixed windows")
    attn_kernel: str = opt("auto", "sliding-window blocks: sdpa (a dense boolean mask: every score computed, any device), flex (torch's flex_attention with a block-sparse band mask, a fused kernel; its backward needs CUDA) or auto (flex on CUDA, sdpa elsewhere)")
    window_yarn: bool = opt(True, "with window_schedule: when the long window grows, rescale RoPE frequencies and the attention scale by YaRN (alpha 1, beta 32), as the reference")
    xsa: str = opt("off", "exclusive self attention (arXiv 2603.09078): off, fixed (y -= (y.v_hat) v_hat per head), learnable (the removed component scaled by a per-head weight, init 1) or tanh (scaled by tanh(a), a init 0: the tiny track's)")
    xsa_layers: int = opt(-1, "XSA on the last N blocks (and the MTP block); -1 = every block")
    iha: bool = opt(False, "interleaved head attention (arXiv 2602.21371): learned cross-head mixing of q, k (and v), identity at init")
    iha_pseudo: int = opt(1, "IHA pseudo-heads per head, interleaved into the sequence (the reference: 2); 1 = plain H x H mixing, the model unchanged at init")
    iha_mix_v: bool = opt(True, "IHA also mixes the values across heads")
    init_std: float = opt(0.02, "std of hidden-matrix init (output projections are scaled by 1/sqrt(2*n_layer))")
    embed_init_std: float = opt(-1.0, "std of the embedding init; -1 = init_std for tied embeddings, 1.0 when embed_norm is on")
    head_init_std: float = opt(0.001, "std of the untied output head init")
    init: str = opt("gpt2", "hidden-matrix init: gpt2 (N(0, init_std), output projections / sqrt(2*n_layer)), nanochat (uniform with std 1/sqrt(n_embd), output projections zero) or reference (the reference benchmark's: uniform with std 1/sqrt(n_embd), output projections N(0, 1/sqrt(n_embd)))")
    value_proj_layers: str = opt("even", "blocks with value projections: even (0, 2, ...) or last (those with the last block's parity, the reference's: 1, 3, ..., 29 of 30)")
    loop_skips: str = opt("first", "U-Net skips of a looped span: first (added on its first pass only) or every (re-added on every replay, the reference's)")
    mtp_style: str = opt("block", "MTP head input: block (an extra block on the trunk's hidden state) or reference (mtp_proj([norm(h_t), norm(wte(y_t+1))]) then the block, the reference's)")
    iha_ve_after_mix: bool = opt(False, "IHA: add the value projection after the heads' values are mixed, and no per-head output scale (the reference's fused H x H mixing)")
    rope_frac: float = opt(1.0, "fraction of each head's dimensions RoPE rotates (the tiny track: 0.5, frequencies as for a head of half the size); the rest pass unrotated")
    key_offset: bool = opt(False, "full-context blocks shift the second half of each key's channels one position forward (the tiny track's partial key offset)")
    resid_lambda_init: float = opt(1.0, "initial value of the residual lambdas lambda_r of x0_mix (the tiny track: 1.1)")
    mlp_dropout: bool = opt(True, "apply model.dropout to the MLP output too (false: attention output only, the tiny track's)")
    stoch_depth_per_call: bool = opt(False, "stochastic depth drawn at every block call (each loop replay draws again) and the MTP block dropped too, with p = stoch_depth * n_layer / (n_layer - 1), as the reference; false: one draw per block per step, the MTP block never dropped")
    stoch_depth_rescale: bool = opt(True, "stochastic depth scales a kept block by 1/(1-p) (false: no rescale, the reference's)")

    def __post_init__(self) -> None:
        _check(self.depth == -1 or self.depth >= 1, "model.depth", "must be -1 (off) or >= 1", self.depth)
        if self.depth > 0:
            self.n_layer = self.depth
            # rounded up to a multiple of head_dim, as nanochat's base_train
            self.n_embd = -(-self.depth * self.aspect_ratio // self.head_dim) * self.head_dim
            self.n_head = self.n_embd // self.head_dim
        _check(self.vocab_size == -1 or self.vocab_size > 1, "model.vocab_size", "must be -1 or > 1", self.vocab_size)
        _check(self.seq_len >= 2, "model.seq_len", "must be >= 2", self.seq_len)
        _check(self.vocab_pad_to >= 1, "model.vocab_pad_to", "must be >= 1", self.vocab_pad_to)
        _check(self.n_layer >= 1, "model.n_layer", "must be >= 1", self.n_layer)
        _check(self.n_head >= 1, "model.n_head", "must be >= 1", self.n_head)
        _check(self.n_embd % self.n_head == 0, "model.n_embd", f"must be divisible by model.n_head={self.n_head}", self.n_embd)
        _choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("model.pos", self.pos, ("learned", "rope"))
        _choice("model.mlp", self.mlp, ("gelu", "relu2", "swiglu"))
        if self.pos == "rope":
            _check((self.n_embd // self.n_head) % 2 == 0, "model.n_head", "RoPE needs an even head dimension", self.n_head)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _check(0.0 <= self.stoch_depth < 1.0, "model.stoch_depth", "must be in [0, 1)", self.stoch_depth)
        _check(self.logit_softcap == -1 or self.logit_softcap > 0, "model.logit_softcap", "must be -1 or > 0", self.logit_softcap)
        _check(self.mtp_weight >= 0, "model.mtp_weight", "must be >= 0", self.mtp_weight)
        _check(set(self.window_pattern) <= {"S", "L"}, "model.window_pattern", "must be a string of S and L (or empty)", self.window_pattern)
        _check(self.short_window == -1 or self.short_window >= 1, "model.short_window", "must be -1 or >= 1 (tokens)", self.short_window)
        stages = window_stages(self)  # validates the schedule
        _check(not stages or self.window_pattern != "", "model.window_schedule", "needs model.window_pattern (which blocks are S and L)",
               self.window_schedule)
        _choice("model.xsa", self.xsa, ("off", "fixed", "learnable", "tanh"))
        _check(self.xsa_layers == -1 or 1 <= self.xsa_layers <= self.n_layer, "model.xsa_layers",
               f"must be -1 (every block) or in [1, n_layer={self.n_layer}]", self.xsa_layers)
        _check(self.iha_pseudo >= 1, "model.iha_pseudo", "must be >= 1", self.iha_pseudo)
        _check(not self.iha_ve_after_mix or self.iha_pseudo == 1, "model.iha_ve_after_mix",
               f"needs model.iha_pseudo=1 (the reference's fused mixing), got iha_pseudo={self.iha_pseudo}", self.iha_ve_after_mix)
        if self.loop_start != -1:
            _check(0 <= self.loop_start <= self.loop_end < self.n_layer, "model.loop_start",
                   f"need 0 <= loop_start <= loop_end < n_layer={self.n_layer} (loop_end={self.loop_end})", self.loop_start)
            _check(self.loop_repeats >= 1, "model.loop_repeats", "must be >= 1", self.loop_repeats)
        _check(self.init_std > 0, "model.init_std", "must be > 0", self.init_std)
        _choice("model.init", self.init, ("gpt2", "nanochat", "reference"))
        _choice("model.value_proj_layers", self.value_proj_layers, ("even", "last"))
        _check(not self.value_embed or self.value_proj, "model.value_embed", "needs model.value_proj=true (it replaces the projection's source)",
               self.value_embed)
        _choice("model.loop_skips", self.loop_skips, ("first", "every"))
        _choice("model.mtp_style", self.mtp_style, ("block", "reference"))
        _choice("model.attn_kernel", self.attn_kernel, ("auto", "sdpa", "flex"))
        _check(0 < self.rope_frac <= 1, "model.rope_frac", "must be in (0, 1]", self.rope_frac)

    @property
    def padded_vocab(self) -> int:
        """Rows of the token tables and the head: vocab_size rounded up to a multiple of vocab_pad_to."""
        return -(-self.vocab_size // self.vocab_pad_to) * self.vocab_pad_to

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden > 0:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 256 * -(-(8 * self.n_embd // 3) // 256)
        return 4 * self.n_embd


@dataclass
class OptimConfig:
    """Optimizers, learning-rate / weight-decay / momentum schedules, EMA and SWA."""

    name: str = opt("muon", "muon (Muon for 2-D hidden matrices, AdamW for the rest) or adamw (AdamW for everything)")
    lr: float = opt(6e-4, "AdamW learning rate of hidden matrices (when name=adamw)")
    matrix_lr: float = opt(0.02, "Muon learning rate of hidden matrices (when name=muon)")
    embed_lr: float = opt(-1.0, "AdamW learning rate of the token/position embeddings; -1 = optim.lr")
    head_lr: float = opt(-1.0, "AdamW learning rate of the output head; -1 = optim.lr")
    scalar_lr: float = opt(-1.0, "AdamW learning rate of scalars, gates and norm weights; -1 = optim.lr")
    iha_lr: float = opt(0.02, "AdamW learning rate of the IHA mixing matrices (no weight decay, no width scaling)")
    lr_scale: float = opt(1.0, "multiplier of every group's peak learning rate (one knob to tune them together)")
    adamw_width_ref: int = opt(-1, "AdamW learning rates of the embeddings (value embeddings too) and the head scale by (n_embd / adamw_width_ref)^-0.5, as nanochat's (ref 768; its scalars are not scaled); -1 disables")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay on matrices, embeddings and head (never on scalars, gates or norms)")
    wd_embed: bool = opt(True, "apply weight_decay to embeddings and head too")
    cautious_wd: bool = opt(False, "cautious weight decay: decay only where the update and the parameter have the same sign")
    muon_momentum: float = opt(0.95, "Muon (Nesterov) momentum after warmup")
    muon_momentum_start: float = opt(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = opt(300, "steps to ramp Muon momentum from start to final")
    muon_momentum_end: float = opt(-1.0, "Muon momentum at the end of the LR warmdown, reached linearly from muon_momentum over it (nanochat: 0.90); -1 = held")
    muon_ns_steps: int = opt(5, "Newton-Schulz iterations")
    muon_coeffs: str = opt("quintic", "Newton-Schulz coefficients: quintic (3.4445, -4.7750, 2.0315), polar_express (rounded to 3 decimals, normalisation eps 1e-7) or polar_express_exact (at full precision, eps 1e-6: nanochat's and the reference's)")
    muon_swiglu_parts: bool = opt(False, "orthogonalize the fused SwiGLU input matrix as its two parts (gate, up), each with its own shape scale, as the reference's separate matrices")
    normuon_wide: str = opt("row", "NorMuon statistics of a wide matrix (rows < cols): row (per row, as for every matrix) or column (per column, the reference's)")
    gates_in_muon: str = opt("none", "small gate matrices trained by Muon with weight decay instead of AdamW: none, value (the value-projection gates: the tiny track) or both (and the head gates: the 1-hour and 2-hour tracks)")
    resid_lr_frac: float = opt(1.0, "learning rate of the residual lambdas and U-Net skip weights as a fraction of the scalar rate (the reference: 0.01)")
    x0_beta1: float = opt(-1.0, "AdamW beta1 of the x0 lambdas (the reference: 0.96); -1 = optim.beta1")
    head_gate_betas: list = opt([], "AdamW (beta1, beta2) of the head gates, e.g. [0.9, 0.99] (the tiny track's); [] = optim.beta1, beta2")
    xsa_betas: list = opt([], "AdamW (beta1, beta2) of the XSA scales (xsa_gate, xsa_alpha), e.g. [0.9, 0.95] (the tiny track's); [] = optim.beta1, beta2")
    bf16_params: list = opt([], "parameter groups whose weights and AdamW state are stored in bf16, so that small updates round away as in the reference: [\"embed\"] (the token and value tables: the reference's tracks) or [\"embed\", \"head\"] (tiny); [] = fp32")
    clip_scope: str = opt("global", "optim.grad_clip on the gradient averaged over the ranks (global) or on each rank's own before the average (local: the reference's unlimited trainer)")
    cautious_wd_scope: str = opt("all", "where optim.cautious_wd applies: all (AdamW and Muon) or muon (Muon only, its decay scaled by the shape factor as the update: the reference's)")
    muon_eq_r: bool = opt(False, "MuonEq-R: normalize rows of the momentum before orthogonalization")
    normuon: bool = opt(False, "NorMuon: per-row second-moment normalization after orthogonalization")
    matrix_optimizer: str = opt("muon", "optimizer of the 2-D hidden matrices when name=muon: muon, or heavyball's soap, kl_shampoo or psgd_kron (needs the second-order extra; run without torch.compile)")
    precond_lr: float = opt(3e-3, "learning rate of the hidden matrices with matrix_optimizer soap, kl_shampoo or psgd_kron")
    precondition_frequency: int = opt(10, "steps between eigenbasis refreshes of soap and kl_shampoo (psgd_kron: heavyball's probability schedule)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; -1 disables")
    warmup_steps: int = opt(0, "linear LR warmup in steps")
    warmdown_frac: float = opt(0.3, "fraction of the steps (before any SWA cycles) over which the LR decays")
    warmdown_shape: str = opt("linear", "shape of the decay over its progress f in [0, 1]: linear (1 - f), sqrt (sqrt(1 - f), the reference's) or cosine")
    min_lr_frac: float = opt(0.0, "LR at the end of the decay as a fraction of the peak")
    swa_epochs: int = opt(0, "SWA: the last N epochs each run a short cosine LR cycle; their end checkpoints are averaged; 0 disables")
    swa_peak_frac: float = opt(0.3, "LR at the start of each SWA cycle as a fraction of the peak")
    swa_mode: str = opt("after", "SWA cycles: after (they follow the main phase and its decay) or overlay (the reference's: the decay runs over every step and the last swa_epochs epoch-long cosine cycles peak at it, floored at swa_floor)")
    swa_floor: float = opt(0.05, "overlay SWA: the LR multiplier each cycle ends at (and the least peak)")
    wd_shape: str = opt("hold", "weight decay over the main phase: hold (held, then lowered with the LR to wd_end_frac), cosine (from weight_decay to 0 over the whole run, as nanochat from 2026-03-09), linear (from weight_decay to 0 over the whole run, as nanochat 1076f97), sawtooth (the reference's: held to wd_hold_frac, linearly to wd_swa_low at the SWA start, then from wd_swa_low to wd_swa_high within each SWA cycle) or points (piecewise linear through wd_points)")
    wd_hold_frac: float = opt(0.4, "wd_shape=sawtooth: fraction of the steps the weight decay is held")
    wd_swa_low: float = opt(0.65, "wd_shape=sawtooth: multiplier at the SWA start and at each cycle start")
    wd_swa_high: float = opt(1.5, "wd_shape=sawtooth: multiplier at each SWA cycle end")
    wd_points: list = opt([], "wd_shape=points: [[fraction of steps, multiplier], ...] from fraction 0 to 1, linear between (the tiny track: [[0, 1], [0.1333, 1], [0.5333, 0.125], [1, 1.1625]])")
    wd_end_frac: float = opt(1.0, "weight decay at the end of the LR decay as a fraction of weight_decay (held, then lowered with the LR)")
    wd_swa_frac: float = opt(1.0, "weight decay during SWA cycles as a fraction of weight_decay, raised against the falling LR")
    ema_decay: float = opt(-1.0, "EMA of the weights: decay per step (an update every ema_every steps applies ema_decay^ema_every), bias-corrected unless ema_start_frac > 0; -1 disables")
    ema_every: int = opt(10, "update the EMA every N steps")
    ema_start_frac: float = opt(0.0, "fraction of the steps before the EMA starts, from the weights of that step (the reference's unlimited track: 0.9); 0 = from step 0")

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("muon", "adamw"))
        for n in ("lr", "matrix_lr", "iha_lr"):
            _check(getattr(self, n) > 0, f"optim.{n}", "must be > 0", getattr(self, n))
        for n in ("embed_lr", "head_lr", "scalar_lr"):
            v = getattr(self, n)
            _check(v == -1 or v > 0, f"optim.{n}", "must be -1 or > 0", v)
        _check(self.lr_scale > 0, "optim.lr_scale", "must be > 0", self.lr_scale)
        _check(self.adamw_width_ref == -1 or self.adamw_width_ref > 0, "optim.adamw_width_ref", "must be -1 or > 0", self.adamw_width_ref)
        _check(self.muon_momentum_end == -1 or 0 <= self.muon_momentum_end < 1, "optim.muon_momentum_end", "must be -1 or in [0, 1)", self.muon_momentum_end)
        _choice("optim.wd_shape", self.wd_shape, ("hold", "cosine", "linear", "sawtooth", "points"))
        if self.wd_shape == "points":
            pts = self.wd_points
            _check(len(pts) >= 2 and all(isinstance(q, list) and len(q) == 2 for q in pts), "optim.wd_points",
                   "needs >= 2 [fraction, multiplier] pairs", pts)
            xs = [q[0] for q in pts]
            _check(xs[0] == 0 and xs[-1] == 1 and xs == sorted(xs), "optim.wd_points", "fractions must rise from 0 to 1", xs)
        _check(0 <= self.wd_hold_frac <= 1, "optim.wd_hold_frac", "must be in [0, 1]", self.wd_hold_frac)
        _choice("optim.swa_mode", self.swa_mode, ("after", "overlay"))
        _check(0 <= self.swa_floor < 1, "optim.swa_floor", "must be in [0, 1)", self.swa_floor)
        _choice("optim.normuon_wide", self.normuon_wide, ("row", "column"))
        _choice("optim.gates_in_muon", self.gates_in_muon, ("none", "value", "both"))
        _check(self.resid_lr_frac > 0, "optim.resid_lr_frac", "must be > 0", self.resid_lr_frac)
        _check(self.x0_beta1 == -1 or 0 <= self.x0_beta1 < 1, "optim.x0_beta1", "must be -1 or in [0, 1)", self.x0_beta1)
        _choice("optim.cautious_wd_scope", self.cautious_wd_scope, ("all", "muon"))
        _choice("optim.clip_scope", self.clip_scope, ("global", "local"))
        for kind in self.bf16_params:
            _choice("optim.bf16_params", kind, ("embed", "head"))
        _check(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)", self.beta2)
        _check(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.muon_momentum < 1, "optim.muon_momentum", "must be in [0, 1)", self.muon_momentum)
        _check(0 <= self.muon_momentum_start < 1, "optim.muon_momentum_start", "must be in [0, 1)", self.muon_momentum_start)
        _check(self.muon_ns_steps >= 1, "optim.muon_ns_steps", "must be >= 1", self.muon_ns_steps)
        _choice("optim.muon_coeffs", self.muon_coeffs, ("quintic", "polar_express", "polar_express_exact"))
        _choice("optim.matrix_optimizer", self.matrix_optimizer, ("muon", "soap", "kl_shampoo", "psgd_kron"))
        _check(self.matrix_optimizer == "muon" or self.name == "muon", "optim.matrix_optimizer",
               "only applies with optim.name=muon (adamw trains the matrices with AdamW)", self.matrix_optimizer)
        _check(self.precond_lr > 0, "optim.precond_lr", "must be > 0", self.precond_lr)
        _check(self.precondition_frequency >= 1, "optim.precondition_frequency", "must be >= 1", self.precondition_frequency)
        _check(self.grad_clip == -1 or self.grad_clip > 0, "optim.grad_clip", "must be -1 or > 0", self.grad_clip)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.warmdown_frac <= 1, "optim.warmdown_frac", "must be in [0, 1]", self.warmdown_frac)
        _choice("optim.warmdown_shape", self.warmdown_shape, ("linear", "sqrt", "cosine"))
        _check(0 <= self.min_lr_frac <= 1, "optim.min_lr_frac", "must be in [0, 1]", self.min_lr_frac)
        _check(self.swa_epochs >= 0, "optim.swa_epochs", "must be >= 0", self.swa_epochs)
        _check(0 < self.swa_peak_frac <= 1, "optim.swa_peak_frac", "must be in (0, 1]", self.swa_peak_frac)
        _check(self.wd_end_frac >= 0, "optim.wd_end_frac", "must be >= 0", self.wd_end_frac)
        _check(self.wd_swa_frac >= 0, "optim.wd_swa_frac", "must be >= 0", self.wd_swa_frac)
        _check(self.ema_decay == -1 or 0 < self.ema_decay < 1, "optim.ema_decay", "must be -1 or in (0, 1)", self.ema_decay)
        _check(self.ema_every >= 1, "optim.ema_every", "must be >= 1", self.ema_every)
        _check(0 <= self.ema_start_frac < 1, "optim.ema_start_frac", "must be in [0, 1)", self.ema_start_frac)
        for n in ("head_gate_betas", "xsa_betas"):
            b = getattr(self, n)
            _check(b == [] or (len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)), f"optim.{n}",
                   "must be [] or [beta1, beta2] in [0, 1)", b)

    def group_lr(self, kind: str, n_embd: int) -> float:
        """Peak learning rate of a parameter group (matrix, embed, head, scalar or iha) in a model
        of width `n_embd`: the group's own rate, times `lr_scale`, times the width scaling of
        AdamW rates of the embeddings and head when `adamw_width_ref` is set (Muon's matrices are
        scaled by their shape)."""
        if kind == "matrix" and self.name == "muon":
            return self.matrix_lr * self.lr_scale
        if kind == "iha":
            return self.iha_lr * self.lr_scale
        v = {"matrix": -1, "embed": self.embed_lr, "head": self.head_lr, "scalar": self.scalar_lr}[kind]
        lr = (self.lr if v == -1 else v) * self.lr_scale
        if self.adamw_width_ref > 0 and kind in ("embed", "head"):
            lr *= (n_embd / self.adamw_width_ref) ** -0.5
        return lr


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, logging and checkpoints."""

    epochs: float = opt(1.0, "passes over the training split (fractions allowed)")
    max_steps: int = opt(-1, "optimizer steps; -1 = from epochs")
    batch_tokens: int = opt(16384, "global batch per optimizer step in tokens (all ranks, all micro-batches)")
    micro_batch_tokens: int = opt(-1, "tokens per forward/backward on one rank; gradient accumulation reaches batch_tokens; -1 = no accumulation")
    seed: int = opt(0, "seed for init, dropout and the data order")
    dtype: str = opt("bf16", "compute precision: fp32, or bf16 autocast where the device has bf16 arithmetic (a GPU from Ampere on, a CPU with AVX512 or AMX) and fp32 elsewhere, recorded so in the run's config (SLOWRUN_CPU_BF16=1: bf16 on any CPU)")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda")
    compile: bool = opt(False, "torch.compile the model (helps on GPU; gave nothing on CPU)")
    compile_scope: str = opt("model", "what train.compile compiles: model (the whole forward and loss, one graph per architecture: the most fusion, but every gradient is ready only when the whole backward has ended, so a torchrun run communicates after it) or blocks (each transformer block apart, the embedding, head and loss eager: a block's gradients are ready as its backward ends, so train.shard_optimizer's reduces overlap the rest of the backward)")
    compile_loss: bool = opt(True, "compile the fused output layer's elementwise kernel alone (softcap, softmax and their gradient, a chunk of rows at a time; inductor, even with train.compile off): on a CPU the kernel is 2-5x faster and the CPU track's step takes 6-14% less time, a distillation step 10-34% less; runs eagerly, with a warning, where it cannot be built")
    compile_backend: str = opt("inductor", "torch.compile backend: inductor (fused kernels), or aot_eager / eager (the same graphs and autograd structure without code generation: checks of breaks, recompiles and overlap in seconds)")
    shard_optimizer: bool = opt(False, "torchrun: split the optimizer step over the ranks ZeRO-2-style (each tensor's gradient reduced onto one owner rank, its optimizer state there only, the stepped weights broadcast): optimizer state and gradients take ~1/world of the memory each; Muon still sees whole matrices")
    dist_timeout_min: float = opt(30.0, "torchrun: minutes a collective may wait for the other ranks before the run aborts (a rank-0 checkpoint write is the longest wait)")
    num_threads: int = opt(-1, "torch CPU threads; -1 = torch's default")
    log_every: int = opt(1, "write a metrics line every N steps")
    progress: bool = opt(True, "show a progress bar (rank 0, interactive terminals)")
    checkpoint_every: int = opt(-1, "save a checkpoint every N steps (and at epoch ends); -1 = only at epoch ends")
    keep_checkpoints: int = opt(2, "rolling checkpoints kept (SWA snapshots are kept apart)")
    save_final: bool = opt(True, "write the final weights (model.safetensors) to the run directory")
    wandb: bool = opt(False, "log to Weights & Biases (needs the wandb extra)")
    tensorboard: bool = opt(False, "log to TensorBoard (needs the tensorboard extra)")
    snapshot_cycles: int = opt(0, "snapshot ensemble: split training into N cyclic-LR cycles, each cycle end saved as a member; 0 disables")
    epoch_snapshots: int = opt(0, "keep the weights of the last N epoch ends; the final evaluation adds their probability averages, equal (epochs_probs) and recency-weighted k/sum(k) (epochs_probs_recency, the reference's 1-hour and 2-hour figure); 0 disables")
    snapshot_noise: float = opt(0.0, "snapshot ensemble: std of Gaussian noise added to weights at each cycle start, relative to each tensor's RMS")

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0", self.epochs)
        _check(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 or > 0", self.max_steps)
        _check(self.batch_tokens > 0, "train.batch_tokens", "must be > 0", self.batch_tokens)
        _check(self.micro_batch_tokens == -1 or self.micro_batch_tokens > 0, "train.micro_batch_tokens", "must be -1 or > 0", self.micro_batch_tokens)
        _choice("train.dtype", self.dtype, ("fp32", "bf16"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.compile_scope", self.compile_scope, ("model", "blocks"))
        _choice("train.compile_backend", self.compile_backend, ("inductor", "aot_eager", "eager"))
        _check(self.dist_timeout_min > 0, "train.dist_timeout_min", "must be > 0", self.dist_timeout_min)
        _check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        _check(self.checkpoint_every == -1 or self.checkpoint_every >= 1, "train.checkpoint_every", "must be -1 or >= 1", self.checkpoint_every)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(self.snapshot_cycles >= 0, "train.snapshot_cycles", "must be >= 0", self.snapshot_cycles)
        _check(self.epoch_snapshots >= 0, "train.epoch_snapshots", "must be >= 0", self.epoch_snapshots)
        _check(self.snapshot_noise >= 0, "train.snapshot_noise", "must be >= 0", self.snapshot_noise)


@dataclass
class DataConfig:
    """Which prepared dataset to train on and how to walk its training split."""

    path: str = opt("", "prepared dataset directory (`slowrun prepare --out`); empty = the builtin default dataset")
    doc_shuffle: bool = opt(True, "shuffle the document order every epoch (seed = train.seed + epoch) so chunk boundaries move")
    seq_shuffle: bool = opt(True, "shuffle the fixed-length sequences within each epoch")
    chunking: str = opt("stride", "how an epoch's stream is cut into sequences of seq_len+1 tokens: stride (a window every seq_len tokens: each token is a target once) or disjoint (back-to-back chunks, as the reference's loader: its epochs, SWA cycles and snapshots fall on its steps)")
    epoch_multiple: int = opt(1, "with disjoint chunking: an epoch keeps a multiple of this many chunks (after the shuffle), the rest dropped, as the reference's loader (its device batch x 8 ranks: 32 for the 1-hour track)")
    fitness_tokens: int = opt(0, "tokens carved from the END of the training split as a fitness slice (for ensemble member selection); never trained on")
    curriculum: str = opt("off", "per-epoch document order by difficulty: off, easy_to_hard, hard_to_easy or mixed (alternating by epoch); on, sequences are served in stream order, or shuffled within data.curriculum_blocks blocks")
    curriculum_score: str = opt("length", "document difficulty: length (tokens), or a run directory / weights file whose model's mean loss on each training document is the score (cached beside its weights)")
    curriculum_blocks: int = opt(0, "with a curriculum: 0 serves the sorted epoch's sequences in stream order; N > 0 cuts them into N consecutive blocks and shuffles the sequences within each (the order by difficulty holds from block to block, each batch is drawn at random from its block)")

    def __post_init__(self) -> None:
        _choice("data.chunking", self.chunking, ("stride", "disjoint"))
        _check(self.epoch_multiple >= 1, "data.epoch_multiple", "must be >= 1 (sequences)", self.epoch_multiple)
        _check(self.epoch_multiple == 1 or self.chunking == "disjoint", "data.epoch_multiple",
               "drops an epoch's remainder of disjoint chunks: set data.chunking = disjoint too", self.epoch_multiple)
        _check(self.fitness_tokens >= 0, "data.fitness_tokens", "must be >= 0", self.fitness_tokens)
        _choice("data.curriculum", self.curriculum, ("off", "easy_to_hard", "hard_to_easy", "mixed"))
        _check(self.curriculum_score != "", "data.curriculum_score", "must be length or a run directory / weights file", self.curriculum_score)
        _check(self.curriculum_blocks >= 0, "data.curriculum_blocks", "must be >= 0", self.curriculum_blocks)
        _check(self.curriculum_blocks == 0 or self.curriculum != "off", "data.curriculum_blocks",
               "shuffles within a curriculum's blocks: set data.curriculum too", self.curriculum_blocks)


@dataclass
class EvalConfig:
    """When and how held-out loss is measured."""

    every_steps: int = opt(-1, "evaluate on val every N steps; -1 = only at epoch ends and at the end")
    at_epoch_end: bool = opt(True, "evaluate on val at each epoch end")
    max_tokens: int = opt(-1, "cap on val tokens used by periodic evals (the final eval uses the whole split); -1 = all")
    batch_seqs: int = opt(16, "sequences per evaluation forward pass")
    test: bool = opt(True, "evaluate the final weights, EMA and SWA averages on the test split as well")
    reference_batch: int = opt(-1, "score only the chunks the reference benchmark scores: it permutes the val chunks with numpy RandomState(42) and drops the last (n mod reference_batch) of them (its tracks: 8 ranks x 4 sequences = 32); -1 = every chunk")

    def __post_init__(self) -> None:
        _check(self.every_steps == -1 or self.every_steps >= 1, "eval.every_steps", "must be -1 or >= 1", self.every_steps)
        _check(self.max_tokens == -1 or self.max_tokens > 0, "eval.max_tokens", "must be -1 or > 0", self.max_tokens)
        _check(self.batch_seqs >= 1, "eval.batch_seqs", "must be >= 1", self.batch_seqs)
        _check(self.reference_batch == -1 or self.reference_batch >= 1, "eval.reference_batch", "must be -1 or >= 1", self.reference_batch)


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher run, or from an ensemble of them (chain or ensemble distillation in ensembles)."""

    teacher: str = opt("", "teacher run directory or checkpoint (several separated by commas: an ensemble, its probabilities at the temperature averaged); empty disables distillation")
    alpha: float = opt(0.5, "loss = (1-alpha)*CE + alpha*T^2*KL(teacher/T || student/T)")
    temperature: float = opt(1.2, "distillation temperature T")
    mtp_inside: bool = opt(False, "with an MTP head: loss = (1-alpha)*(CE + mtp_weight*MTP) + alpha*T^2*KL (the reference's); false adds the MTP term outside the mix")

    def __post_init__(self) -> None:
        _check(0 <= self.alpha <= 1, "distill.alpha", "must be in [0, 1]", self.alpha)
        _check(self.temperature > 0, "distill.temperature", "must be > 0", self.temperature)
        _check(all(distill_teachers(self)) if self.teacher else True, "distill.teacher",
               "has an empty name (separate several with single commas)", self.teacher)


def distill_teachers(cfg: DistillConfig) -> list[str]:
    """distill.teacher's runs or checkpoints, in order (none when distillation is off)."""
    return [p.strip() for p in cfg.teacher.split(",")] if cfg.teacher else []


@dataclass
class RunConfig:
    """Everything a training run depends on; written as `config.toml` next to every run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]


@functools.lru_cache(maxsize=None)
def section_defaults(section: str) -> dict[str, Any]:
    """Field -> default of a config section in this version ({} for a section it does not know)."""
    if section not in SECTIONS:
        return {}
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in fields(SECTIONS[section])}


# ---------------------------------------------------------------------------------------
# dict <-> dataclass


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check a TOML value against a field's declared type (ints may stand for floats)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if typ is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _unknown(name: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{name}'{hint}")


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts; unknown keys are errors."""
    sections = {}
    for sec, value in d.items():
        if sec not in SECTIONS:
            raise _unknown(sec, list(SECTIONS))
        if not isinstance(value, dict):
            raise ConfigError(f"{sec}: expected a [{sec}] table, got {value!r}")
        cls = SECTIONS[sec]
        hints = get_type_hints(cls)
        kwargs = {}
        for k, v in value.items():
            if k not in hints:
                raise _unknown(f"{sec}.{k}", [f"{sec}.{f.name}" for f in fields(cls)])
            kwargs[k] = _coerce(f"{sec}.{k}", v, hints[k])
        sections[sec] = cls(**kwargs)
    return RunConfig(**sections)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


# ---------------------------------------------------------------------------------------
# recipes and overrides


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("slowrun.recipes").iterdir() if p.name.endswith(".toml"))


def _recipe_text(name_or_path: str, relative_to: Path | None = None) -> tuple[str, Path | None]:
    """(a recipe's TOML text, its file when it is one): by path to a .toml file (relative to
    `relative_to`, the folder of the recipe that extends it, where given) or by name among the
    shipped ones."""
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute() and path.suffix == ".toml":
        path = relative_to / path
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path.read_text(), path
    res = resources.files("slowrun.recipes") / f"{name_or_path}.toml"
    if not res.is_file():
        raise ConfigError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(recipe_names())}; or give a path to a .toml file)")
    return res.read_text(), None


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (shipped in `slowrun/recipes/`) or by path to a TOML file. A recipe
    whose first key is `extends = "OTHER"` (a shipped name, or a .toml path relative to its own
    file) is OTHER's values with its own over them, key by key within each section: a scaled
    copy of a recipe names only what it changes."""
    return _load_recipe(name_or_path, None, ())


def _load_recipe(name_or_path: str, relative_to: Path | None, chain: tuple[str, ...]) -> dict[str, Any]:
    try:
        text, path = _recipe_text(name_or_path, relative_to)
    except ConfigError as e:
        if not chain:
            raise
        raise ConfigError(f"recipe {chain[-1]}: extends = {name_or_path!r}: {e}") from None
    me = str(path.resolve()) if path is not None else f"{name_or_path} (shipped)"
    if me in chain:
        raise ConfigError(f"recipe {chain[0]}: extends itself in a loop ({' -> '.join((*chain, me))})")
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {name_or_path}: invalid TOML: {e}") from None
    parent = recipe.pop("extends", None)
    if parent is None:
        return recipe
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"recipe {name_or_path}: extends = {parent!r}: expected the name or path of another recipe")
    base = _load_recipe(parent, path.parent if path is not None else None, (*chain, me))
    for sec, values in recipe.items():
        if not isinstance(values, dict):
            raise ConfigError(f"recipe {name_or_path}: {sec} = {values!r} outside a section (only `extends` may be)")
        base.setdefault(sec, {}).update(values)
    return base


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--optim.weight_decay=1.6` / `--train.epochs 12` -> {"optim.weight_decay": 1.6, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument '{a}' (config overrides look like --section.key=value)")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{a[2:]}: missing value")
            key, raw = a[2:], args[i + 1]
            i += 1
        out[key] = parse_value(raw)
        i += 1
    return out


def parse_value(raw: str) -> Any:
    """A TOML literal (1.6, true, "x", [1, 2]); anything unparsable is taken as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in overrides.items():
        sec, _, name = key.partition(".")
        if sec not in SECTIONS or not name:
            raise _unknown(key, [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in fields(c)])
        out.setdefault(sec, {})[name] = value
    return out


SIZE_KEYS = ("model.n_layer", "model.n_embd", "model.n_head")


def build_config(recipe: str | dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    base = load_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = overrides or {}
    cfg = config_from_dict(merge_overrides(base, overrides))
    given = [k for k in SIZE_KEYS if k in overrides]
    if given and "model.depth" not in overrides and cfg.model.depth > 0:
        # the recipe's model.depth overwrote them without a word (a depth given beside them wins)
        raise ConfigError(f"--{given[0]}: this recipe sizes the model by model.depth={cfg.model.depth}, which sets "
                          f"n_layer, n_embd and n_head; pass --model.depth=-1 with it, or --model.depth=D alone")
    return cfg


def describe_options() -> str:
    """Every config key with its default and help text, for `--help-config`."""
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"[{sec}]  {cls.__doc__.strip().splitlines()[0]}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{sec}.{f.name}={tomli_w.dumps({'v': default})[4:].strip()}\n      {f.metadata['help']}")
    return "\n".join(lines)
