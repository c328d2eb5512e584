"""The techniques, each declared once: its config keys, the parameters it adds with their optimizer
group, its ablation switches and its row of the docs' technique table.

Three readers take their lists from here: `optim` puts every parameter in the group its declaration
gives (`claim`; a parameter that no declaration claims is an error naming it, so a new module cannot
land in a group by accident), `ablate.TECHNIQUES` is `ablations()` (the leave-one-out list, in
declaration order), and `python -m slowrun.docgen` writes the table of docs/configuration.md
(`technique_rows`). `BASE` claims the parameters every model has: the token table, the block
linears, the norms and biases. docs/extending.md walks through adding a technique.

A parameter pattern is a parameter's full name or its dotted ending: `attn.v_gate.weight` claims
`blocks.3.attn.v_gate.weight` and `mtp_block.attn.v_gate.weight`; each parameter must match exactly one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import SlowrunError
from .config import RunConfig

# optim's parameter groups: Muon (or AdamW with optim.name = adamw) for the hidden matrices, AdamW for
# the rest at the group's own rate (config.OptimConfig.group_lr); scalars and IHA without weight decay
GROUPS = ("matrix", "embed", "head", "scalar", "iha")
# parts of the scalar group that get an AdamW group of their own when their flag is set (optim.scalar_part_rules):
# resid (optim.resid_lr_frac), x0 (optim.x0_beta1), head_gate (optim.head_gate_betas), xsa (optim.xsa_betas)
SCALAR_PARTS = ("resid", "x0", "head_gate", "xsa")
GATES_IN_MUON = ("value", "both")  # the values of optim.gates_in_muon that move some gate matrices to Muon
# AdamW learning rate of the hidden matrices when Muon is ablated: the middle of the 1e-3..3e-3
# range usual for AdamW at the widths of the CPU recipes (256-384); the other groups keep theirs
ADAMW_MATRIX_LR = 2e-3


class TechniqueError(SlowrunError):
    """A parameter that no declaration claims, or that two claim."""


@dataclass(frozen=True)
class Params:
    """Parameters a technique adds and the optimizer group they go to."""

    names: tuple[str, ...]  # full names or dotted endings
    group: str  # one of GROUPS
    part: str = ""  # scalar group only: its own AdamW group (one of SCALAR_PARTS) when that part's flag is set
    muon_when: tuple[str, ...] = ()  # a gate matrix: the optim.gates_in_muon values that make it a Muon matrix

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"{self.names}: group {self.group!r} is not one of {GROUPS}")
        if self.part and (self.group != "scalar" or self.part not in SCALAR_PARTS):
            raise ValueError(f"{self.names}: part {self.part!r} needs group scalar and one of {SCALAR_PARTS}")
        if not set(self.muon_when) <= set(GATES_IN_MUON):
            raise ValueError(f"{self.names}: muon_when {self.muon_when} not among {GATES_IN_MUON}")


@dataclass(frozen=True)
class Ablation:
    """A leave-one-out switch of `slowrun ablate`: its name (`--only NAME`, the key of its row in an
    ablation.json), what off means in words, whether a config has it on, and the overrides that turn it off."""

    name: str
    what: str
    is_on: Callable[[RunConfig], bool]
    off: Callable[[RunConfig], dict[str, Any]]  # may depend on the config (Muon's)


@dataclass(frozen=True)
class Technique:
    """One technique: a row of the docs' table (`doc` and the config `keys`), the parameters it adds
    (none for a technique of the data, the schedule or the optimizer) and its ablation switches."""

    name: str
    doc: str  # the table's first cell: the technique in words, its variants in parentheses
    keys: tuple[str, ...]  # "section.key", each a field of config.py's dataclasses
    params: tuple[Params, ...] = ()
    ablations: tuple[Ablation, ...] = ()


def _const(overrides: dict[str, Any]) -> Callable[[RunConfig], dict[str, Any]]:
    return lambda c: dict(overrides)


def _muon_off(c: RunConfig) -> dict[str, Any]:
    """AdamW at ADAMW_MATRIX_LR for the hidden matrices; embeddings, head and scalars keep the
    learning rates they had (optim.lr stood for them when their own was -1)."""
    keep = {f"optim.{k}_lr": c.optim.lr for k in ("embed", "head", "scalar") if getattr(c.optim, f"{k}_lr") == -1}
    return {"optim.name": "adamw", "optim.lr": ADAMW_MATRIX_LR, **keep}


BASE = Technique("base", "the transformer every recipe has", ("model.n_layer", "model.n_embd", "model.bias"), (
    Params(("wte.weight",), "embed"),
    # the block linears (the MTP block's too): q/k/v fused, the SwiGLU input [gate; up] fused (optim.muon_chunks)
    Params(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"), "matrix"),
    Params(("ln.weight", "ln.bias"), "scalar"),  # model.norm = layernorm (RMSNorm has no weights)
    Params(("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"), "scalar"),  # model.bias
))

# In this order `ablate` tries them (and an ablation.json lists them), and the docs' table lists them.
TECHNIQUES: tuple[Technique, ...] = (
    # data order and length
    Technique("data_order", "per-epoch document shuffle; sequences as windows at a stride or the reference's disjoint "
              "chunks (epochs a multiple of its batch)",
              ("data.doc_shuffle", "data.seq_shuffle", "data.chunking", "data.epoch_multiple"), ablations=(
                  Ablation("doc_shuffle", "no per-epoch document shuffle", lambda c: c.data.doc_shuffle,
                           _const({"data.doc_shuffle": False})),
                  Ablation("seq_shuffle", "no sequence shuffle within epochs", lambda c: c.data.seq_shuffle,
                           _const({"data.seq_shuffle": False})))),
    # SWA's cycles are whole epochs at the end: with one epoch they would eat the main phase, so they go too
    Technique("multi_epoch", "many epochs over the same tokens (a run's length in epochs, or in steps)",
              ("train.epochs", "train.max_steps"), ablations=(
                  Ablation("multi_epoch", "one epoch instead of several (and no SWA cycles, which need epochs)",
                           lambda c: c.train.epochs > 1 and c.train.max_steps == -1,
                           lambda c: {"train.epochs": 1.0, **({"optim.swa_epochs": 0} if c.optim.swa_epochs > 0 else {})}),)),
    # architecture
    Technique("embeddings", "untied embeddings, RMSNorm after lookup", ("model.tie_embeddings", "model.embed_norm"),
              (Params(("lm_head.weight",), "head"),), (
                  Ablation("untied", "tied input embedding and output head", lambda c: not c.model.tie_embeddings,
                           _const({"model.tie_embeddings": True})),
                  Ablation("embed_norm", "no RMSNorm after the embedding lookup", lambda c: c.model.embed_norm,
                           _const({"model.embed_norm": False})))),
    Technique("norms", "RMSNorm / LayerNorm, QK-norm", ("model.norm", "model.qk_norm"), ablations=(
        Ablation("qk_norm", "no QK-norm", lambda c: c.model.qk_norm, _const({"model.qk_norm": False})),)),
    Technique("positions", "RoPE / learned positions", ("model.pos", "model.rope_base"),
              (Params(("wpe.weight",), "embed"),), (
                  Ablation("rope", "learned absolute positions instead of RoPE", lambda c: c.model.pos == "rope",
                           _const({"model.pos": "learned"})),)),
    # relu2 at 4x has the parameters of SwiGLU at 8/3x (2 vs 3 matrices): the MLP changes, not its size
    Technique("mlp", "SwiGLU / GELU / ReLU^2", ("model.mlp",), ablations=(
        Ablation("swiglu", "ReLU^2 MLP (4x, nanochat's) instead of SwiGLU", lambda c: c.model.mlp == "swiglu",
                 _const({"model.mlp": "relu2"})),)),
    Technique("value_proj", "value projections from x0 (gated), on even blocks or the last block's parity; nanochat's "
              "value embeddings (a token table per block instead)",
              ("model.value_proj", "model.value_proj_layers", "model.value_embed"), (
                  Params(("attn.v_x0.weight",), "matrix"),
                  Params(("attn.v_embed.weight",), "embed"),
                  Params(("attn.v_gate.weight",), "scalar", muon_when=("value", "both")),
              ), (
                  Ablation("value_proj", "no value projections from x0", lambda c: c.model.value_proj,
                           _const({"model.value_proj": False})),)),
    Technique("head_gate", "attention head gate", ("model.head_gate",),
              (Params(("attn.head_gate.weight",), "scalar", part="head_gate", muon_when=("both",)),), (
                  Ablation("head_gate", "no attention head gates", lambda c: c.model.head_gate,
                           _const({"model.head_gate": False})),)),
    Technique("x0_mix_unet", "x0 mixing (residual-lambda init), U-Net skips",
              ("model.x0_mix", "model.resid_lambda_init", "model.unet"), (
                  Params(("lambda_r",), "scalar", part="resid"),  # the reference's resid_lambdas
                  Params(("lambda_0",), "scalar", part="x0"),  # the reference's x0_lambdas
                  Params(("unet_w",), "scalar", part="resid"),  # the reference's skip_weights
              ), (
                  Ablation("x0_mix", "no residual / x0 mixing", lambda c: c.model.x0_mix, _const({"model.x0_mix": False})),
                  Ablation("unet", "no U-Net skips", lambda c: c.model.unet, _const({"model.unet": False})))),
    Technique("softcap", "logit softcap", ("model.logit_softcap",), ablations=(
        Ablation("softcap", "no logit softcap", lambda c: c.model.logit_softcap != -1,
                 _const({"model.logit_softcap": -1.0})),)),
    Technique("dropout", "dropout (attention only or both), stochastic depth (rescaled or not, per step or per block call)",
              ("model.dropout", "model.mlp_dropout", "model.stoch_depth", "model.stoch_depth_rescale",
               "model.stoch_depth_per_call"), ablations=(
                  Ablation("dropout", "no dropout", lambda c: c.model.dropout > 0, _const({"model.dropout": 0.0})),
                  Ablation("stoch_depth", "no stochastic depth", lambda c: c.model.stoch_depth > 0,
                           _const({"model.stoch_depth": 0.0})))),
    Technique("layer_loop", "layer looping, U-Net skips on every replay",
              ("model.loop_start", "model.loop_end", "model.loop_repeats", "model.loop_from_epoch", "model.loop_skips"),
              ablations=(Ablation("layer_loop", "no layer looping", lambda c: c.model.loop_start != -1,
                                  _const({"model.loop_start": -1})),)),
    # the MTP block is one more block: its parameters are BASE's and its techniques'
    Technique("mtp", "multi-token prediction (an extra block, or the reference's mtp_proj of the hidden state and the "
              "next token)", ("model.mtp_weight", "model.mtp_style"), (Params(("mtp_proj.weight",), "matrix"),), (
                  Ablation("mtp", "no multi-token prediction", lambda c: c.model.mtp_weight > 0,
                           _const({"model.mtp_weight": 0.0})),)),
    Technique("sliding_window", "sliding-window attention by block pattern; windows scheduled by epoch with YaRN; the "
              "kernel (dense-mask SDPA, or flex_attention on a block mask where it has a backward: CUDA)",
              ("model.window_pattern", "model.short_window", "model.window_schedule", "model.window_yarn",
               "model.attn_kernel"), ablations=(
                  Ablation("sliding_window", "full attention in every block", lambda c: c.model.window_pattern != "",
                           _const({"model.window_pattern": ""})),)),
    Technique("xsa_iha", "XSA (fixed, learnable, tanh-gated), IHA",
              ("model.xsa", "model.xsa_layers", "model.iha", "model.iha_pseudo", "model.iha_mix_v",
               "model.iha_ve_after_mix", "optim.iha_lr"), (
                  Params(("attn.xsa_gate", "attn.xsa_alpha"), "scalar", part="xsa"),  # learnable's and tanh's per-head scales
                  Params(("attn.iha_q", "attn.iha_k", "attn.iha_v", "attn.iha_out"), "iha"),  # AdamW at optim.iha_lr
              ), (
                  Ablation("xsa", "no exclusive self attention", lambda c: c.model.xsa != "off", _const({"model.xsa": "off"})),
                  Ablation("iha", "no interleaved head attention", lambda c: c.model.iha, _const({"model.iha": False})))),
    Technique("rope_frac", "half-truncated RoPE, partial key offset", ("model.rope_frac", "model.key_offset")),
    Technique("vocab_pad", "vocabulary padded to a multiple (the reference: 64), pad rows never scored",
              ("model.vocab_pad_to",)),
    Technique("init", "init: GPT-2 (normal, scaled projections), nanochat (uniform, zero projections) or the "
              "reference's (uniform, normal projections)",
              ("model.init", "model.init_std", "model.embed_init_std", "model.head_init_std")),
    # optimization
    Technique("muon", "Muon for the hidden matrices, optim.name = muon (quintic / Polar Express rounded or at full "
              "precision, MuonEq-R, NorMuon by row or by column on wide matrices, SwiGLU parts apart)",
              ("optim.name", "optim.muon_coeffs", "optim.muon_eq_r", "optim.normuon", "optim.normuon_wide",
               "optim.muon_swiglu_parts"), ablations=(
                  Ablation("muon", f"AdamW (lr {ADAMW_MATRIX_LR:g}) for the hidden matrices instead of Muon",
                           lambda c: c.optim.name == "muon", _muon_off),
                  Ablation("muon_eq_r", "no MuonEq-R", lambda c: c.optim.name == "muon" and c.optim.muon_eq_r,
                           _const({"optim.muon_eq_r": False})),
                  Ablation("normuon", "no NorMuon", lambda c: c.optim.name == "muon" and c.optim.normuon,
                           _const({"optim.normuon": False})))),
    Technique("muon_momentum", "Muon momentum warmup and warmdown",
              ("optim.muon_momentum_start", "optim.muon_momentum_warmup_steps", "optim.muon_momentum_end")),
    Technique("group_rates", "gates in Muon; per-group AdamW rates and betas",
              ("optim.gates_in_muon", "optim.resid_lr_frac", "optim.x0_beta1", "optim.head_gate_betas",
               "optim.xsa_betas")),
    Technique("cautious_wd", "cautious weight decay (everywhere or Muon only at its scaled rate)",
              ("optim.cautious_wd", "optim.cautious_wd_scope"), ablations=(
                  Ablation("cautious_wd", "plain decoupled weight decay", lambda c: c.optim.cautious_wd,
                           _const({"optim.cautious_wd": False})),)),
    Technique("heavy_wd", "heavy weight decay (on the embeddings and head too, or not)",
              ("optim.weight_decay", "optim.wd_embed"), ablations=(
                  Ablation("heavy_wd", "standard weight decay 0.1", lambda c: c.optim.weight_decay > 0.1,
                           _const({"optim.weight_decay": 0.1})),)),
    Technique("wd_schedule", "WD schedule (hold, cosine, linear, sawtooth, piecewise)",
              ("optim.wd_shape", "optim.wd_end_frac", "optim.wd_swa_frac", "optim.wd_hold_frac", "optim.wd_swa_low",
               "optim.wd_swa_high", "optim.wd_points"), ablations=(
                  Ablation("wd_schedule", "weight decay held (no lowering, no SWA sawtooth)",
                           lambda c: c.optim.wd_end_frac != 1 or (c.optim.swa_epochs > 0 and c.optim.wd_swa_frac != 1),
                           _const({"optim.wd_end_frac": 1.0, "optim.wd_swa_frac": 1.0})),)),
    Technique("ema", "EMA of weights (from step 0, or from a fraction of the run)",
              ("optim.ema_decay", "optim.ema_every", "optim.ema_start_frac"), ablations=(
                  Ablation("ema", "no EMA of the weights", lambda c: c.optim.ema_decay != -1,
                           _const({"optim.ema_decay": -1.0})),)),
    Technique("schedule", "LR schedule, SWA cycles (after the decay or laid over it)",
              ("optim.warmdown_frac", "optim.warmdown_shape", "optim.swa_epochs", "optim.swa_mode", "optim.swa_floor"),
              ablations=(Ablation("swa", "no SWA cycles", lambda c: c.optim.swa_epochs > 0, _const({"optim.swa_epochs": 0})),)),
    Technique("lr_scale", "one multiplier on every LR; AdamW LRs of tables and head scaled by width (nanochat)",
              ("optim.lr_scale", "optim.adamw_width_ref")),
    Technique("precision_clip", "weights and AdamW state of the tables (and head) stored in bf16; gradient clipping of "
              "the average or of each rank's own", ("optim.bf16_params", "optim.clip_scope", "optim.grad_clip")),
    Technique("second_order", "second-order optimizers for the hidden matrices instead of Muon (heavyball's SOAP, "
              "KL-Shampoo, PSGD-Kron; the `second-order` extra)", ("optim.matrix_optimizer", "optim.precond_lr")),
    # training, evaluation and data
    Technique("epoch_snapshots", "epoch-end snapshots, their probability averages (equal, recency-weighted) and "
              "recency-weighted parameter average", ("train.epoch_snapshots",)),
    Technique("reference_val", "the reference's val protocol (its 4,864 of 4,880 chunks)", ("eval.reference_batch",)),
    Technique("sharded", "sharded optimizer step (torchrun)", ("train.shard_optimizer", "train.dist_timeout_min")),
    Technique("curriculum", "curriculum: each epoch's documents ordered by length or by a small model's loss "
              "(easy-to-hard, hard-to-easy, alternating), served in order or shuffled within N blocks",
              ("data.curriculum", "data.curriculum_score", "data.curriculum_blocks")),
    Technique("snapshot_ensembles", "snapshot ensembles", ("train.snapshot_cycles", "train.snapshot_noise")),
    Technique("distill", "distillation (MTP inside the mix or not)",
              ("distill.teacher", "distill.alpha", "distill.temperature", "distill.mtp_inside")),
)


def ablations() -> tuple[Ablation, ...]:
    """Every ablation switch, in declaration order: `ablate.TECHNIQUES`."""
    return tuple(a for t in TECHNIQUES for a in t.ablations)


def matches(pattern: str, name: str) -> bool:
    """A pattern claims the parameter of that name, or any whose name ends in "." + pattern."""
    return name == pattern or name.endswith("." + pattern)


def claim(name: str) -> Params:
    """The declaration of parameter `name` (of `GPT.named_parameters()`); an error naming it when no
    technique (nor BASE) declares it, or when two do."""
    hits = [(t.name, p) for t in (BASE, *TECHNIQUES) for p in t.params if any(matches(n, name) for n in p.names)]
    if not hits:
        raise TechniqueError(f"parameter {name}: no technique claims it; declare it, with its optimizer group, "
                             f"in the params of its technique in slowrun/techniques.py (docs/extending.md)")
    if len(hits) > 1:
        raise TechniqueError(f"parameter {name}: claimed by {' and '.join(t for t, _ in hits)} in slowrun/techniques.py")
    return hits[0][1]


def technique_rows() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The docs' table: (technique in words, config keys, ablation names) per technique."""
    return [(t.doc, t.keys, tuple(a.name for a in t.ablations)) for t in TECHNIQUES]
