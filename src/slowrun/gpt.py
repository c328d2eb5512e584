"""The GPT: one model whose recipe features are flags of `ModelConfig`, read in `forward`.

Baseline (nanoGPT / GPT-2): LayerNorm, learned positions, GELU MLP, tied embeddings.
Slowrun recipe: weightless RMSNorm, RoPE + QK-norm, SwiGLU, tied embeddings with an
RMSNorm after the lookup, value projections from x0, per-head output gates, x0 mixing,
U-Net skips, logit softcap, dropout, stochastic depth, layer looping, a
multi-token-prediction head, sliding-window attention, XSA (exclusive self attention) and
IHA (interleaved head attention). nanochat's value embeddings (a token table per block in
place of the projection from x0) are a flag too. The reference benchmark's variants of these (value
projections on the last block's parity, skips re-added on every loop pass, its init, its MTP
head, IHA without an output scale, half-truncated RoPE, a partial key offset, tanh-gated XSA,
stochastic depth drawn at every block call) are flags too. Architecture and initialization only: no training logic.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, window_stages
from .losses import DistillTarget, training_loss

VALUE_GATE_CHANNELS = 32  # value-projection gate reads x[..., :32]
HEAD_GATE_CHANNELS = 12  # attention head gate reads x[..., :12]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def has_value_proj(cfg: ModelConfig, layer: int) -> bool:
    """Whether block `layer` gets a gated value input (a projection of x0, or with
    model.value_embed a token table): alternate blocks, the even ones (0, 2, ...) or those with
    the last block's parity (the reference's and nanochat's: 1, 3, ..., 29 of 30)."""
    if not cfg.value_proj:
        return False
    return layer % 2 == (0 if cfg.value_proj_layers == "even" else (cfg.n_layer - 1) % 2)


def stoch_depth_scales(cfg: ModelConfig, seed: int | None = None, step: int = 0, loop_active: bool | None = None,
                       micro: int = 0) -> torch.Tensor | None:
    """Stochastic depth's decisions for one training step: a float32 CPU tensor of residual
    scales, 0.0 for a skipped block and 1 / (1 - p) for a kept one (1.0 without
    model.stoch_depth_rescale, the reference's). None when stochastic depth is off.

    Default: one scale per block index (n_layer,), p_i = stoch_depth * i / (n_layer - 1); every
    pass of a looped block shares its scale and the MTP block is never dropped.
    model.stoch_depth_per_call (the reference's): one scale per block call, in the order of
    `GPT.block_order(loop_active)` (each replay of a looped block draws again; None = the
    trained architecture, as `GPT.hidden`), then one for the MTP block with
    p = stoch_depth * n_layer / (n_layer - 1); micro-step `micro` takes the next draws of the
    step's stream, so each micro-step can draw again as in the reference (the per-block
    default ignores it).

    A pure function of (seed, step, micro), drawn on the host from a generator seeded with
    (seed, step) and not the rank, so every rank skips the same blocks (their gradients stay
    comparable). seed None draws from torch's global generator (a direct training call).
    """
    L = cfg.n_layer
    if cfg.stoch_depth <= 0 or L < 2:
        return None
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1)) if seed is not None else None
    if cfg.stoch_depth_per_call:
        layers = torch.tensor([*block_order(cfg, cfg.loop_start >= 0 if loop_active is None else loop_active), L],
                              dtype=torch.float32)  # the calls' blocks, the MTP block (index L) last
        if micro > 0:
            torch.rand(micro * len(layers), generator=g)  # the earlier micro-steps' draws
    else:
        layers = torch.arange(L, dtype=torch.float32)
    p = cfg.stoch_depth * layers / (L - 1)
    u = torch.rand(len(layers), generator=g)
    kept = 1.0 / (1.0 - p) if cfg.stoch_depth_rescale else torch.ones(())
    return torch.where(u < p, torch.zeros(()), kept)


def loop_active_at(cfg: ModelConfig, epoch: int) -> bool:
    """Whether the looped span repeats in 0-based `epoch`: from model.loop_from_epoch on."""
    return cfg.loop_start >= 0 and epoch >= cfg.loop_from_epoch


def block_order(cfg: ModelConfig, loop_active: bool = False) -> list[int]:
    """Indices of the blocks in execution order (the looped span repeats when `loop_active`:
    the trainer sets it from model.loop_from_epoch)."""
    order = list(range(cfg.n_layer))
    if cfg.loop_start >= 0 and loop_active and cfg.loop_repeats > 1:
        span = order[cfg.loop_start : cfg.loop_end + 1]
        order = order[: cfg.loop_start] + span * cfg.loop_repeats + order[cfg.loop_end + 1 :]
    return order


class Norm(nn.Module):
    """LayerNorm with weight and bias (baseline) or weightless RMSNorm."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x) if self.ln is not None else rms_norm(x)


def rope_inv_freq(head_dim: int, base: float, frac: float = 1.0) -> torch.Tensor:
    """Angular frequency of each of the D/2 rotation pairs (pair j = dims j and j + D/2).

    With `frac` < 1 (model.rope_frac) only the first R = int(D * frac) // 2 pairs rotate, at the
    frequencies of a head of 2R dims (base^(-2j / 2R)); the other pairs get frequency 0 (cos 1,
    sin 0) and pass unrotated: at D = 128, frac 0.5 dims 0-31 and 64-95 rotate (the tiny track's).
    """
    rot = int(head_dim * frac) // 2 if frac < 1 else head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * rot, 2, dtype=torch.float32) / (2 * rot)))
    if rot < head_dim // 2:
        inv_freq = torch.cat((inv_freq, torch.zeros(head_dim // 2 - rot)))
    return inv_freq


def rotary_tables(seq_len: int, head_dim: int, base: float, frac: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, T, 1, D/2) of the rotation pairs at `rope_inv_freq`."""
    return rotary_from(seq_len, rope_inv_freq(head_dim, base, frac))


def rotary_from(seq_len: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)


def yarn(inv_freq: torch.Tensor, old: int, new: int, alpha: float = 1.0, beta: float = 32.0) -> tuple[torch.Tensor, float]:
    """YaRN for a context grown from `old` to `new` tokens: (new frequencies, attention-scale factor).

    A pair that turns fewer than `alpha` times over `old` tokens is interpolated (frequency x
    old/new), one that turns more than `beta` times is kept, linear in between; the softmax
    scale grows by 0.2 ln(new/old) + 1 (the reference's two-hour trainer, as YaRN's paper)."""
    rotations = old * inv_freq / (2 * math.pi)
    s = old / new
    w = ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    return inv_freq * (s + w * (1 - s)), 0.2 * math.log(new / old) + 1.0


def window_state(cfg: ModelConfig, stage: int) -> tuple[int, int, torch.Tensor, float]:
    """(short, long, RoPE frequencies, attention-scale factor) at stage `stage` of
    model.window_schedule: YaRN applied at every growth of the long window up to it."""
    stages = window_stages(cfg)
    inv_freq, scale = rope_inv_freq(cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.rope_frac), 1.0
    for prev, cur in zip(stages[:stage], stages[1 : stage + 1]):
        if cfg.window_yarn and cur[3] > prev[3]:
            inv_freq, factor = yarn(inv_freq, prev[3], cur[3])
            scale *= factor
    return stages[stage][2], stages[stage][3], inv_freq, scale


def window_stage_of(cfg: ModelConfig, epoch: int) -> int:
    """The window-schedule stage of 0-based `epoch` (the last stage after the schedule ends)."""
    stages = window_stages(cfg)
    return next((k for k, (_, last, _, _) in enumerate(stages) if epoch + 1 <= last), len(stages) - 1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D), rotate the two halves of each head as pairs (dim j with dim j + D/2)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def layer_window(cfg: ModelConfig, layer: int, short: int = -1, long: int = -1) -> int:
    """Keys before each query that block `layer` attends to, in tokens; -1 = full context.

    `window_pattern` is tiled over the blocks (S = short, L = long); the last block is an L
    block and the MTP block (layer = n_layer) always sees the full context, as in the
    reference. Fixed windows: S = model.short_window, L = full; a window-schedule stage
    passes its `short` and `long` (a window of seq_len or more is the full context)."""
    pattern = cfg.window_pattern
    if not pattern or layer >= cfg.n_layer:
        return -1
    is_long = layer == cfg.n_layer - 1 or pattern[layer % len(pattern)] == "L"
    if long < 0:  # fixed windows
        return -1 if is_long else (cfg.short_window if cfg.short_window > 0 else cfg.seq_len // 2)
    w = long if is_long else short
    return -1 if w >= cfg.seq_len else w


def band_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) boolean mask, True where query i may attend key j: j <= i and i - j <= window."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def attention_kernel(cfg: ModelConfig, device: torch.device) -> str:
    """How sliding-window blocks attend: "flex" (torch's flex_attention with a block-sparse mask:
    a fused kernel that skips the blocks outside the band; CUDA, which has its backward) or
    "sdpa" (scaled_dot_product_attention with a dense boolean mask: every T x T score, any
    device). model.attn_kernel = auto picks flex on CUDA. Full-context blocks always take SDPA's
    fused causal path."""
    if cfg.attn_kernel != "auto":
        return cfg.attn_kernel
    return "flex" if device.type == "cuda" else "sdpa"


def window_mask(T: int, window: int, device: torch.device, kernel: str):
    """The mask of a `window` band over T positions, in the form `kernel` takes."""
    if kernel == "sdpa":
        return band_mask(T, window, device)
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q, k):
        return (k <= q) & (q - k <= window)

    return create_block_mask(band, None, None, T, T, device=str(device))


_flex_attention = None


def flex_attention(q, k, v, block_mask, scale):
    """torch's flex_attention, compiled once on a GPU (its fused kernel exists only compiled;
    inside an already compiled model the call is traced into that graph). On a CPU, where it has
    no backward and serves checks only, it runs eagerly."""
    global _flex_attention
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    if _flex_attention is None:
        _flex_attention = torch.compile(flex, dynamic=False)
    return _flex_attention(q, k, v, block_mask=block_mask, scale=scale)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, value_proj: bool, layer: int) -> None:
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.n_head, self.head_dim = H, C // H
        self.cfg = cfg
        self.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        # value projection from x0 (or, with model.value_embed, a token table: nanochat's value
        # embeddings), gated per head by 2*sigmoid(W x[:32]) (1.0 at init)
        self.v_x0 = nn.Linear(C, C, bias=False) if value_proj and not cfg.value_embed else None
        self.v_embed = nn.Embedding(cfg.padded_vocab, C) if value_proj and cfg.value_embed else None
        self.v_gate = nn.Linear(min(VALUE_GATE_CHANNELS, C), H, bias=False) if value_proj else None
        # per-head output gate sigmoid(W x[:12]) (0.5 at init)
        self.head_gate = nn.Linear(min(HEAD_GATE_CHANNELS, C), H, bias=False) if cfg.head_gate else None
        # sliding window (-1 = full causal); with IHA the band spans window * iha_pseudo interleaved positions
        self.window = layer_window(cfg, layer)
        # band masks, shared by the model's blocks (GPT.prepare_attention fills it outside any compiled
        # region, so a compiled forward only reads it)
        self.masks: dict[tuple, object] = {}
        self.attn_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim) (YaRN raises it: GPT.set_window_stage)
        # key offset (full-context trunk blocks): the second half of each key's channels comes from the previous token
        self.key_offset = cfg.key_offset and self.window < 0 and layer < cfg.n_layer
        # XSA: remove from each head's output its component along the token's own value, scaled by
        # 1 (fixed), a learned per-head weight xsa_gate (learnable) or tanh(xsa_alpha) (tanh)
        self.xsa = cfg.xsa != "off" and (cfg.xsa_layers == -1 or layer >= cfg.n_layer - cfg.xsa_layers)
        self.xsa_gate = nn.Parameter(torch.ones(H)) if self.xsa and cfg.xsa == "learnable" else None
        self.xsa_alpha = nn.Parameter(torch.zeros(H)) if self.xsa and cfg.xsa == "tanh" else None
        # IHA: P pseudo-heads per head, each a learned mix of all heads' q/k/v; collapsed back by iha_out.
        # With iha_ve_after_mix (P = 1, the reference's) the value projection is added after the mix and
        # there is no iha_out
        P = cfg.iha_pseudo
        self.ve_after_mix = cfg.iha and cfg.iha_ve_after_mix
        self.iha_q = nn.Parameter(torch.zeros(H, H, P)) if cfg.iha else None  # (source head, target head, pseudo)
        self.iha_k = nn.Parameter(torch.zeros(H, H, P)) if cfg.iha else None
        self.iha_v = nn.Parameter(torch.zeros(H, H, P)) if cfg.iha and cfg.iha_mix_v else None
        self.iha_out = nn.Parameter(torch.zeros(H, P)) if cfg.iha and not self.ve_after_mix else None  # weights of the P pseudo-heads' outputs

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) normed input; x0: the normed embedding; idx: (B, T) token ids (for the
        value embedding)."""
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v = self.c_attn(x).view(B, T, 3, H, D).unbind(2)  # each (B, T, H, D)
        ve = None
        if self.v_gate is not None:
            gate = 2 * torch.sigmoid(self.v_gate(x[..., : self.v_gate.in_features]))  # (B, T, H)
            src = self.v_x0(x0) if self.v_x0 is not None else self.v_embed(idx).to(x.dtype)  # (B, T, C)
            ve = gate.unsqueeze(-1) * src.view(B, T, H, D)
            if not self.ve_after_mix:
                v = v + ve
        P = self.cfg.iha_pseudo if self.iha_q is not None else 1
        if self.iha_q is not None:
            # mix heads into P pseudo-heads, then interleave them into the sequence: (B, T*P, H, D)
            q = torch.einsum("btmd,mhp->btphd", q, self.iha_q).reshape(B, T * P, H, D)
            k = torch.einsum("btmd,mhp->btphd", k, self.iha_k).reshape(B, T * P, H, D)
            if self.iha_v is not None:
                v = torch.einsum("btmd,mhp->btphd", v, self.iha_v).reshape(B, T * P, H, D)
            else:
                v = v.unsqueeze(2).expand(B, T, P, H, D).reshape(B, T * P, H, D)
        if ve is not None and self.ve_after_mix:  # P = 1: the mixed values are (B, T, H, D)
            v = v + ve
        if rope is not None:  # with IHA the interleaved positions 0..T*P-1 are rotated (rope is T*P long)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.key_offset and T > 1:
            # key t takes channels D/2..D from key t-1 (one token = P interleaved positions back);
            # the first token keeps its own
            lo, hi = k[..., : D // 2], k[..., D // 2 :]
            k = torch.cat((lo, torch.cat((hi[:, :P], hi[:, :-P]), dim=1)), dim=-1)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T*P, D)
        if self.window < 0:
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.attn_scale)
        else:
            n, w, dev = T * P, self.window * P, str(x.device)
            block_mask = self.masks.get(("flex", n, w, dev))
            if block_mask is not None:
                y = flex_attention(qt, kt, vt, block_mask, self.attn_scale)
            else:  # the dense band of the full length, cut to n (a band's leading n x n block is the n-band)
                mask = self.masks.get(("dense", w, dev))
                mask = mask[:n, :n] if mask is not None else band_mask(n, w, x.device)  # not prepared: built here
                y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.attn_scale)
        y = y.transpose(1, 2)  # (B, T*P, H, D)
        if self.xsa:
            v_hat = F.normalize(v, dim=-1, eps=1e-4 if self.xsa_alpha is not None else 1e-12)
            removed = (y * v_hat).sum(-1, keepdim=True) * v_hat  # component along the token's own value
            if self.xsa_gate is not None:
                removed = removed * self.xsa_gate.view(H, 1)
            elif self.xsa_alpha is not None:
                removed = removed * torch.tanh(self.xsa_alpha).view(H, 1)
            y = y - removed
        if self.iha_out is not None:  # de-interleave and collapse the pseudo-heads: (B, T, H, D)
            y = torch.einsum("btphd,hp->bthd", y.reshape(B, T, P, H, D), self.iha_out)
        if self.head_gate is not None:
            y = y * torch.sigmoid(self.head_gate(x[..., : self.head_gate.in_features])).unsqueeze(-1)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, Hd = cfg.n_embd, cfg.hidden_dim
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(C, 2 * Hd if cfg.mlp == "swiglu" else Hd, bias=cfg.bias)  # swiglu: [W1; W3]
        self.c_proj = nn.Linear(Hd, C, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, value_proj: bool, layer: int) -> None:
        super().__init__()
        self.norm1 = Norm(cfg.n_embd, cfg.norm)
        self.attn = Attention(cfg, value_proj, layer)
        self.norm2 = Norm(cfg.n_embd, cfg.norm)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout
        self.mlp_dropout = cfg.dropout if cfg.mlp_dropout else 0.0  # the tiny track drops the attention output only

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope, scale: float | torch.Tensor = 1.0,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), x0, rope, idx)
        x = x + scale * F.dropout(a, self.dropout, self.training)
        m = self.mlp(self.norm2(x))
        return x + scale * F.dropout(m, self.mlp_dropout, self.training)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the dataset)")
        self.cfg = cfg
        C, L = cfg.n_embd, cfg.n_layer
        self.wte = nn.Embedding(cfg.padded_vocab, C)  # model.vocab_pad_to: rows past vocab_size are never read
        self.wpe = nn.Embedding(cfg.seq_len, C) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, has_value_proj(cfg, i), i) for i in range(L))
        self.norm_f = Norm(C, cfg.norm)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.padded_vocab, bias=False)
        # learned scalars: x0 mixing (per block) and U-Net skip weights (per encoder/decoder pair)
        self.lambda_r = nn.Parameter(torch.full((L,), cfg.resid_lambda_init)) if cfg.x0_mix else None
        self.lambda_0 = nn.Parameter(torch.full((L,), 0.1)) if cfg.x0_mix else None
        self.unet_w = nn.Parameter(torch.ones(L // 2)) if cfg.unet and L >= 2 else None
        # MTP head: a full-context block; the reference style first projects [norm(h_t), norm(wte(y_t))] (2C -> C)
        self.mtp_block = Block(cfg, False, L) if cfg.mtp_weight > 0 else None
        self.mtp_proj = nn.Linear(2 * C, C, bias=False) if cfg.mtp_weight > 0 and cfg.mtp_style == "reference" else None
        # model.stoch_depth_per_call: the MTP block's scale from the last training `hidden` (None: not dropped)
        self.mtp_depth_scale: float | torch.Tensor | None = None
        if cfg.pos == "rope":
            # with IHA the pseudo-heads are interleaved into the sequence: iha_pseudo positions per token
            cos, sin = rotary_tables(cfg.seq_len * self.rope_stride, C // cfg.n_head, cfg.rope_base, cfg.rope_frac)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # whether the looped span repeats when `hidden` is not told: the trainer sets it every step (and
        # for the final evaluation), a loaded model from its weights file; until then the network as
        # configured from step 0
        self.loop_active = loop_active_at(cfg, 0)
        self.window_stage = -1  # model.window_schedule: a model starts (and is evaluated) at its last stage
        stages = window_stages(cfg)
        if stages:
            self.set_window_stage(len(stages) - 1)
        self.compiled_blocks: list | None = None  # compile_blocks (train.compile_scope = blocks); a list, not submodules
        self.attn_masks: dict[tuple, object] = {}  # one store for every block's band masks
        for attn in self.attentions():
            attn.masks = self.attn_masks
        self.init_weights()

    def all_blocks(self) -> list[Block]:
        """The trunk's blocks, then the MTP block if there is one (index n_layer)."""
        return [*self.blocks, *([self.mtp_block] if self.mtp_block is not None else [])]

    def attentions(self) -> list[Attention]:
        return [b.attn for b in self.all_blocks()]

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each block apart for training (train.compile_scope = blocks); the rest
        of the forward, and every forward without gradients (evaluation), stays eager. Each
        block's backward is then a node of its own in the autograd graph, so its parameters'
        gradients are accumulated, and their post-accumulate hooks fire, while the earlier
        blocks' backward is still to run (a whole-model graph hands every gradient over at its
        end). Blocks of one configuration share their compiled code (the parameters are graph
        inputs); each distinct configuration (window, value projection, XSA, key offset, a
        window-schedule stage) is one more graph, so the recompile limit is raised to allow one
        per block call of every stage. The compiled callables are not submodules: the weights'
        names stay as they are."""
        import torch._dynamo

        stages = max(1, len(window_stages(self.cfg)))
        calls = len(self.block_order(True)) + 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, stages * calls)
        self.compiled_blocks = [torch.compile(b, backend=backend, dynamic=False) for b in self.all_blocks()]

    def _block(self, i: int):
        """Block i (n_layer: the MTP block), or its compiled form in a training forward with
        gradients (compile_blocks)."""
        if self.compiled_blocks is not None and self.training and torch.is_grad_enabled():
            return self.compiled_blocks[i]
        return self.blocks[i] if i < len(self.blocks) else self.mtp_block

    @torch.no_grad()
    def prepare_attention(self, T: int, device: torch.device | str) -> None:
        """Build the band masks the current windows need for T tokens on `device`, once each: a
        dense mask of the full length per window (cut to shorter inputs), and with the flex kernel
        (`attention_kernel`) a block mask for the training length. `hidden` calls it in eager mode;
        a compiled forward only reads the store, so the trainer calls it before each step (a new
        window-schedule stage adds its masks there, outside the graph)."""
        device = torch.device(device)
        P, full = self.rope_stride, self.cfg.seq_len * self.rope_stride
        flex = attention_kernel(self.cfg, device) == "flex" and T * P == full
        for attn in self.attentions():
            if attn.window < 0:
                continue
            w = attn.window * P
            key = ("flex", full, w, str(device)) if flex else ("dense", w, str(device))
            if key not in self.attn_masks:
                self.attn_masks[key] = window_mask(full, w, device, "flex" if flex else "sdpa")

    @torch.no_grad()
    def set_window_stage(self, stage: int) -> None:
        """Windows, RoPE tables and softmax scale of model.window_schedule's stage `stage`
        (the trainer sets the stage of each step's epoch; a pure function of the stage, so a
        resumed run and a loaded model get the same state)."""
        if stage == self.window_stage:
            return
        cfg = self.cfg
        short, long, inv_freq, factor = window_state(cfg, stage)
        scale = None if factor == 1.0 else factor / math.sqrt(cfg.n_embd // cfg.n_head)
        for i, block in enumerate(self.blocks):
            block.attn.window = layer_window(cfg, i, short, long)
        for block in self.all_blocks():
            block.attn.attn_scale = scale
        if cfg.pos == "rope":
            cos, sin = rotary_from(cfg.seq_len * self.rope_stride, inv_freq)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        self.window_stage = stage

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables of T tokens (T * rope_stride positions), None without RoPE."""
        if self.cfg.pos != "rope":
            return None
        n = T * self.rope_stride
        return self.rope_cos[:, :n], self.rope_sin[:, :n]

    @property
    def rope_stride(self) -> int:
        """Rotary positions per token: iha_pseudo with IHA (pseudo-heads interleaved), else 1."""
        return self.cfg.iha_pseudo if self.cfg.iha else 1

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize every parameter:

        - wte: N(0, embed_init_std); default 1.0 with embed_norm (the lookup is normalized),
          else init_std (GPT-2's 0.02; also when tied, since it is then the head as well)
        - wpe: N(0, init_std)
        - c_attn, mlp.c_fc, v_x0 (value projection from x0), mtp_proj: N(0, init_std); with
          `init = "nanochat"` or `"reference"` uniform with std 1/sqrt(n_embd) (bound
          sqrt(3/n_embd): no outliers; n_embd even where the fan-in is 2C)
        - attn.c_proj, mlp.c_proj: N(0, init_std / sqrt(2 * n_layer)) (GPT-2's residual scaling);
          with `init = "nanochat"` zero (every block starts as the identity); with
          `init = "reference"` N(0, 1/sqrt(n_embd)) (both, the MLP's too)
        - lm_head (untied): N(0, head_init_std)
        - attn.v_embed (value embeddings): uniform with std 1/sqrt(n_embd), as nanochat's
        - v_gate, head_gate: 0 (gates start at 2*sigmoid(0) = 1 and sigmoid(0) = 0.5)
        - biases: 0; LayerNorm weight 1, bias 0
        - lambda_r: resid_lambda_init (1.0), lambda_0: 0.1 (x0 mixing); unet_w: 1
        - xsa_gate (learnable XSA): 1 (starts as fixed XSA: the whole own-value component removed)
        - xsa_alpha (tanh XSA): 0 (tanh(0) = 0: starts without XSA)
        - iha_q, iha_k, iha_v (H, H, P): identity on pseudo-head 0 (iha_*[h, h, 0] = 1), 0 elsewhere;
          iha_out (H, P): 1/P. With P = 1 the attention is unchanged at init
        - mtp_block: like any block
        """
        cfg = self.cfg
        std = cfg.init_std
        proj_std = std / math.sqrt(2 * cfg.n_layer)
        nanochat = cfg.init == "nanochat"
        uniform = cfg.init in ("nanochat", "reference")
        bound = math.sqrt(3.0 / cfg.n_embd)  # uniform(-b, b) has std b / sqrt(3) = 1 / sqrt(n_embd)
        emb_std = cfg.embed_init_std if cfg.embed_init_std > 0 else (1.0 if cfg.embed_norm and not cfg.tie_embeddings else std)
        for name, p in self.named_parameters():
            if name == "wte.weight":
                nn.init.normal_(p, 0.0, emb_std, generator=generator)
            elif name == "wpe.weight":
                nn.init.normal_(p, 0.0, std, generator=generator)
            elif name == "lm_head.weight":
                nn.init.normal_(p, 0.0, cfg.head_init_std, generator=generator)
            elif name.endswith("gate.weight"):
                nn.init.zeros_(p)
            elif name.endswith("attn.v_embed.weight"):
                nn.init.uniform_(p, -bound, bound, generator=generator)
            elif name.endswith("c_proj.weight"):
                if nanochat:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, proj_std if not uniform else cfg.n_embd**-0.5, generator=generator)
            elif name.endswith(".weight") and p.ndim == 2:
                if uniform:
                    nn.init.uniform_(p, -bound, bound, generator=generator)
                else:
                    nn.init.normal_(p, 0.0, std, generator=generator)
            elif name.endswith("ln.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name == "lambda_r":
                nn.init.constant_(p, cfg.resid_lambda_init)
            elif name == "unet_w":
                nn.init.ones_(p)
            elif name == "lambda_0":
                nn.init.constant_(p, 0.1)
            elif name.endswith("xsa_gate"):
                nn.init.ones_(p)
            elif name.endswith("xsa_alpha"):
                nn.init.zeros_(p)
            elif name.endswith(("iha_q", "iha_k", "iha_v")):
                nn.init.zeros_(p)
                p[:, :, 0].copy_(torch.eye(p.size(0)))
            elif name.endswith("iha_out"):
                nn.init.constant_(p, 1.0 / p.size(1))
            else:
                raise AssertionError(f"init_weights does not know parameter {name}")

    # -----------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters; with `exclude_embeddings`, less the lookup tables: the token table (tied to
        the output head or not), learned positions and value embeddings. An untied head counts."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
            n -= sum(b.attn.v_embed.weight.numel() for b in self.blocks if b.attn.v_embed is not None)
        return n

    def flops_per_token(self, loop_active: bool = False) -> int:
        """Training FLOPs per token: 6 * (matmul params) + 12 * n_layer * n_embd * seq_len (attention);
        the MTP head adds its block, its mtp_proj and a second pass through the output head."""
        cfg = self.cfg
        layers = cfg.n_layer + (1 if self.mtp_block is not None else 0)
        if cfg.loop_start >= 0 and loop_active:
            layers += (cfg.loop_end - cfg.loop_start + 1) * (cfg.loop_repeats - 1)
        matmul = sum(p.numel() for n, p in self.blocks.named_parameters()
                     if p.ndim == 2 and not n.endswith("v_embed.weight")) * layers / cfg.n_layer  # tables are lookups
        matmul += cfg.vocab_size * cfg.n_embd * (2 if self.mtp_block is not None else 1)
        if self.mtp_proj is not None:
            matmul += self.mtp_proj.weight.numel()
        return int(6 * matmul + 12 * layers * cfg.n_embd * cfg.seq_len)

    def block_order(self, loop_active: bool = False) -> list[int]:
        """Indices of the blocks in execution order (`block_order`)."""
        return block_order(self.cfg, loop_active)

    def hidden(self, idx: torch.Tensor, loop_active: bool | None = None,
               depth_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) before the output norm.

        `loop_active`: repeat the looped span. The trainer passes it every step (looping
        starts at model.loop_from_epoch); None, as in evaluation, takes `self.loop_active`: the
        network as it was trained at that point (unlooped before the loop starts, and in a run
        whose loop never starts).
        `depth_scales`: stochastic depth's decisions for this step (`stoch_depth_scales`, a
        CPU tensor; the trainer passes them, the same on every rank); None in training draws
        them here. Ignored in eval mode (no block is skipped). Eager mode skips a block's
        compute; under torch.compile the block runs and its residual branches are multiplied
        by 0: no graph break and no recompilation per skip pattern (a tuple of constants would
        recompile for each new set of skipped blocks), at the cost of the skipped compute
        (mean sum_i p_i / n_layer = stoch_depth / 2 of the blocks, 2.5% at 0.05).
        With model.stoch_depth_per_call the scales are per block call of this forward's
        order, the last one the MTP block's: kept in `mtp_depth_scale` for `mtp_hidden`.
        """
        cfg = self.cfg
        if loop_active is None:
            loop_active = self.loop_active
        order = self.block_order(loop_active)
        per_call = cfg.stoch_depth_per_call
        scales: list[float] | torch.Tensor | None = None
        if self.training and cfg.stoch_depth > 0:
            if depth_scales is None:
                depth_scales = stoch_depth_scales(cfg, loop_active=loop_active)
            if per_call and depth_scales.numel() != len(order) + 1:
                raise ValueError(f"model.stoch_depth_per_call: {depth_scales.numel()} depth scales for {len(order)} block "
                                 f"calls and the MTP block; draw them with this step's loop_active")
            if torch.compiler.is_compiling():
                scales = depth_scales.to(idx.device)  # mask multiply inside the graph
            else:
                scales = depth_scales.tolist()  # host floats: a skipped block is not run
        if per_call:
            self.mtp_depth_scale = scales[-1] if scales is not None else None
        B, T = idx.shape
        if not torch.compiler.is_compiling():
            self.prepare_attention(T, idx.device)
        x = self.wte(idx)  # (B, T, C)
        if x.dtype != torch.float32 and not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # a bf16-stored table (optim.bf16_params) in an fp32 run
        if cfg.embed_norm:
            x = rms_norm(x)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x0 = x
        rope = self.rope(T)
        L = cfg.n_layer
        skips: dict[int, torch.Tensor] = {}
        seen: set[int] = set()
        for k, i in enumerate(order):
            first = i not in seen
            seen.add(i)
            # decoder block: add its encoder skip (on every pass of a looped span with loop_skips = "every")
            if self.unet_w is not None and (first or cfg.loop_skips == "every") and i >= L - L // 2:
                j = L - 1 - i
                x = x + self.unet_w[j] * skips[j]
            if self.lambda_r is not None:
                x = self.lambda_r[i] * x + self.lambda_0[i] * x0
            s = None if scales is None else scales[k if per_call else i]  # per call, or per block index
            if s is None:
                x = self._block(i)(x, x0, rope, idx=idx)
            elif isinstance(s, torch.Tensor) or s > 0:  # eager: a 0 scale skips the block
                x = self._block(i)(x, x0, rope, scale=s, idx=idx)
            if self.unet_w is not None and first and i < L // 2:
                skips[i] = x
        return x

    @property
    def head_weight(self) -> torch.Tensor:
        w = self.lm_head.weight if self.lm_head is not None else self.wte.weight
        if w.size(0) != self.cfg.vocab_size:
            w = w[: self.cfg.vocab_size]  # the pad rows (model.vocab_pad_to) are never scored
        if w.dtype != torch.float32 and not torch.is_autocast_enabled(w.device.type):
            w = w.float()  # a bf16-stored head (optim.bf16_params) in an fp32 run
        return w

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden -> (B, T, V) float32 logits, softcapped if configured."""
        logits = F.linear(self.norm_f(h), self.head_weight).float()
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def mtp_hidden(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T-1, C) of the multi-token-prediction head: position t predicts token t+2.

        block style: mtp_block(h)[:, :-1] on the trunk's hidden h (before the final norm).
        reference style: mtp_block(mtp_proj(cat[norm_f(h)[:, :-1], norm(wte(y[:, :-1]))])), the
        trunk's normed output beside the true next token's embedding (needs `targets` = y).
        The block has full context, no value projection; the caller applies the final norm and head.
        """
        if self.mtp_proj is not None:
            if targets is None:
                raise ValueError("model.mtp_style = reference: mtp_hidden needs the targets")
            T = idx.size(1) - 1
            e = rms_norm(self.wte(targets[:, :-1]))  # (B, T-1, C) embedding of token t+1
            x = self.mtp_proj(torch.cat((self.norm_f(h[:, :-1]), e), dim=-1))  # (B, T-1, 2C) -> (B, T-1, C)
            rope = self.rope(T)
            return self.run_mtp_block(x, e, rope)  # x0 is unused: the MTP block has no value projection
        x0 = self.wte(idx)
        if self.cfg.embed_norm:
            x0 = rms_norm(x0)
        T = idx.size(1)
        rope = self.rope(T)
        return self.run_mtp_block(h, x0, rope)[:, :-1]

    def run_mtp_block(self, x: torch.Tensor, x0: torch.Tensor, rope) -> torch.Tensor:
        """The MTP block, dropped in training with the last `hidden` call's draw under
        model.stoch_depth_per_call (eager: a dropped block is not run; compiled: scaled by 0)."""
        s = self.mtp_depth_scale if self.training else None
        block = self._block(len(self.blocks))
        if s is None:
            return block(x, x0, rope)
        if isinstance(s, torch.Tensor) or s > 0:
            return block(x, x0, rope, scale=s)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
                loop_active: bool | None = None, distill: DistillTarget | None = None,
                depth_scales: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns (logits (B, T, V) float32 or None, mean loss or None).

        With targets, the loss is `losses.training_loss` (CE, or distillation from `distill`'s
        teacher logits, plus the MTP term in training); `return_logits=False` lets it use the
        fused output layer and return no logits. `loop_active`, `depth_scales`: see `hidden`.
        """
        h = self.hidden(idx, loop_active, depth_scales)
        if targets is None:
            return self.logits(h), None
        return training_loss(self, h, idx, targets, fused=not return_logits, distill=distill)
