"""The reference benchmark's model variants (model.* flags), each against a direct computation
of the reference's formula (specs: the two-hour/unlimited A2 and the limited/tiny 1.2, 2.2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from slowrun.config import ModelConfig, build_config
from slowrun.gpt import GPT, apply_rotary, has_value_proj, rotary_tables, stoch_depth_scales
from slowrun.losses import DistillTarget
from slowrun.optim import group_of

V = 97


def model_of(**kw):
    over = {"model.vocab_size": V, "model.depth": -1, "model.seq_len": 16, "model.n_layer": 4, "model.n_head": 2,
            "model.n_embd": 32, "model.dropout": 0.0}
    over.update({f"model.{k}": v for k, v in kw.items()})
    torch.manual_seed(0)
    return GPT(build_config("slowrun", over).model)


def batch(B=3, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def rope_of(m, T=16):
    return m.rope_cos[:, :T], m.rope_sin[:, :T]


def softcap_ce(m, h, y):
    """CE of the model's head on hidden states h (final norm, shared head, softcap) against y."""
    c = m.cfg.logit_softcap
    z = F.rms_norm(h, (h.size(-1),)) @ m.head_weight.T
    return F.cross_entropy((c * torch.tanh(z / c)).reshape(-1, V), y.reshape(-1))


# ---- 1. value projections on the last block's parity ------------------------------------


def test_value_proj_layers_last_parity():
    layers = lambda n, which: [i for i in range(n) if has_value_proj(ModelConfig(n_layer=n, value_proj_layers=which), i)]
    assert layers(30, "last") == list(range(1, 30, 2))  # the reference's 1, 3, ..., 29 (15 blocks)
    assert layers(16, "last") == list(range(1, 16, 2))  # tiny: 1, 3, ..., 15
    assert layers(5, "last") == [0, 2, 4]  # odd depth: the last block's parity is even
    assert layers(30, "even") == list(range(0, 30, 2))  # today's
    assert layers(30, "last") == [i for i in range(30) if i % 2 == (30 - 1) % 2]
    m = model_of(value_proj_layers="last")
    assert [b.attn.v_x0 is not None for b in m.blocks] == [False, True, False, True]
    assert m.mtp_block is None and not has_value_proj(ModelConfig(n_layer=4, value_proj=False), 1)


# ---- 2. U-Net skips re-added on every pass of the looped span ----------------------------


def test_loop_skips_every_pass_equals_a_hand_unrolled_forward():
    kw = dict(n_layer=6, loop_start=3, loop_end=4, loop_repeats=3)
    m = model_of(loop_skips="every", **kw).eval()
    with torch.no_grad():
        m.unet_w.copy_(torch.tensor([0.7, -0.4, 1.3]))
        m.lambda_r.copy_(torch.linspace(0.8, 1.2, 6))
    x, _ = batch()
    with torch.no_grad():
        h = F.rms_norm(m.wte(x), (32,))
        x0, skips, rope = h, {}, rope_of(m)
        for pos, i in enumerate([0, 1, 2, 3, 4, 3, 4, 3, 4, 5]):  # blocks 3-4 run three times
            if i >= 3:  # decoder block i gets encoder block 5 - i's output, on every pass
                h = h + m.unet_w[5 - i] * skips[5 - i]
            h = m.lambda_r[i] * h + m.lambda_0[i] * x0
            h = m.blocks[i](h, x0, rope)
            if i < 3:
                skips[i] = h
        assert torch.allclose(m.hidden(x, loop_active=True), h, atol=1e-5)
        first = model_of(loop_skips="first", **kw).eval()
        first.load_state_dict(m.state_dict())
        assert (first.hidden(x, loop_active=True) - h).abs().max().item() > 1e-3  # the flag is read
        assert torch.equal(first.hidden(x, loop_active=False), m.hidden(x, loop_active=False))  # same without a loop


# ---- 3. the reference's init (and 9. resid_lambda_init) ----------------------------------


def test_reference_init_stds_on_a_wide_model():
    C = 512
    m = model_of(n_embd=C, n_head=4, n_layer=2, init="reference", mtp_weight=0.3, mtp_style="reference", tie_embeddings=False,
                 value_proj_layers="last", resid_lambda_init=1.1)
    bound, std = math.sqrt(3 / C), 1 / math.sqrt(C)
    blocks = [*m.blocks, m.mtp_block]
    hidden = [w for b in blocks for w in (b.attn.c_attn.weight, b.mlp.c_fc.weight)] + [m.blocks[1].attn.v_x0.weight, m.mtp_proj.weight]
    for w in hidden:  # uniform(-sqrt(3/C), sqrt(3/C)), C even where the fan-in is 2C or the MLP width
        assert w.abs().max().item() <= bound + 1e-7
        assert w.std().item() == pytest.approx(std, rel=0.03)
    for w in [w for b in blocks for w in (b.attn.c_proj.weight, b.mlp.c_proj.weight)]:  # N(0, C^-0.5), both projections
        assert w.std().item() == pytest.approx(std, rel=0.03) and abs(w.mean().item()) < 0.1 * std
        assert (w.abs() > bound).float().mean().item() == pytest.approx(2 * (1 - 0.958368), abs=0.01)  # normal tails, not uniform
    for b in blocks:
        assert torch.all(b.attn.head_gate.weight == 0)
    assert torch.all(m.blocks[1].attn.v_gate.weight == 0) and m.blocks[0].attn.v_x0 is None
    assert m.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)  # embed_init_std: 1 with embed_norm
    assert m.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.equal(m.lambda_r, torch.full((2,), 1.1)) and torch.allclose(m.lambda_0, torch.full((2,), 0.1))
    assert torch.equal(m.unet_w, torch.ones(1))


# ---- 4. the reference's MTP head, 5. MTP inside the distillation mix ----------------------


def test_mtp_reference_equals_a_hand_computation():
    m = model_of(mtp_weight=0.3, mtp_style="reference", window_pattern="SSSL", short_window=3)
    assert m.mtp_block.attn.window == -1 and m.mtp_block.attn.v_x0 is None  # full context, no value projection
    assert tuple(m.mtp_proj.weight.shape) == (32, 64) and m.mtp_proj.bias is None
    x, y = batch()
    h = m.hidden(x)
    norm = lambda z: F.rms_norm(z, (32,))
    # reference: mtp_proj(cat[norm(h)[:, :-1], norm(wte(y[:, :-1]))]) -> block (full window) -> norm -> head vs y[:, 1:]
    z = torch.cat((norm(h)[:, :-1], norm(m.wte(y[:, :-1]))), dim=-1) @ m.mtp_proj.weight.T  # (B, T-1, C)
    out = m.mtp_block(z, z, rope_of(m, 15))
    assert torch.allclose(m.mtp_hidden(h, x, y), out, atol=1e-6)
    expected = softcap_ce(m, h, y) + 0.3 * softcap_ce(m, out, y[:, 1:])
    for return_logits in (True, False):  # the logits path and the fused output layer
        _, loss = m(x, y, return_logits=return_logits)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    m.eval()
    assert m(x, y)[1].item() == pytest.approx(softcap_ce(m, h, y).item(), rel=1e-5)  # evaluation: no MTP term
    with pytest.raises(ValueError, match="targets"):
        m.mtp_hidden(h, x)
    # the head reads the true next token: changing y[t] changes the MTP output at t only
    y2 = y.clone()
    y2[:, 5] = (y2[:, 5] + 1) % V
    m.train()
    a, b = m.mtp_hidden(h, x, y), m.mtp_hidden(h, x, y2)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and (a[:, 5] - b[:, 5]).abs().max().item() > 1e-4


def test_mtp_proj_is_a_counted_muon_matrix():
    ref, block = model_of(mtp_weight=0.3, mtp_style="reference"), model_of(mtp_weight=0.3)
    assert group_of("mtp_proj.weight", ref.mtp_proj.weight) == "matrix"
    assert ref.num_params() - block.num_params() == 2 * 32 * 32
    assert ref.flops_per_token() - block.flops_per_token() == 6 * 2 * 32 * 32


@pytest.mark.parametrize("style", ["block", "reference"])
def test_mtp_inside_the_distillation_mix(style):
    m = model_of(mtp_weight=0.3, mtp_style=style)
    x, y = batch()
    teacher = torch.randn(3, 16, V, generator=torch.Generator().manual_seed(2))
    a, T = 0.7, 1.5
    h = m.hidden(x)
    s = m.logits(h).reshape(-1, V)
    ce = F.cross_entropy(s, y.reshape(-1))
    pt = torch.softmax(teacher.reshape(-1, V) / T, -1)
    kl = (pt * (pt.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()  # KL(teacher || student), mean over tokens
    mtp = softcap_ce(m, m.mtp_hidden(h, x, y), y[:, 1:])
    assert mtp.item() > 3  # about ln(97): dropping it would show
    _, inside = m(x, y, distill=DistillTarget(teacher, a, T, mtp_inside=True))
    assert inside.item() == pytest.approx(((1 - a) * (ce + 0.3 * mtp) + a * T**2 * kl).item(), rel=1e-5)
    _, outside = m(x, y, distill=DistillTarget(teacher, a, T))  # today's default: MTP outside the mix
    assert outside.item() == pytest.approx(((1 - a) * ce + a * T**2 * kl + 0.3 * mtp).item(), rel=1e-5)
    m.eval()
    _, ev = m(x, y, distill=DistillTarget(teacher, a, T, mtp_inside=True))
    assert ev.item() == pytest.approx(((1 - a) * ce + a * T**2 * kl).item(), rel=1e-5)  # evaluation: no MTP


# ---- 6. IHA with the value projection added after the mix, no iha_out ---------------------


def test_iha_ve_after_mix_is_the_identity_at_init_and_adds_the_value_projection_after_mixing():
    off = model_of()
    on = model_of(iha=True, iha_ve_after_mix=True)
    assert all(b.attn.iha_out is None for b in on.blocks)
    missing = on.load_state_dict(off.state_dict(), strict=False).missing_keys
    assert missing and all(n.endswith(("attn.iha_q", "attn.iha_k", "attn.iha_v")) for n in missing)
    x, y = batch()
    with torch.no_grad():
        assert torch.allclose(on.hidden(x), off.hidden(x), atol=1e-6, rtol=0)
        assert on(x, y)[1].item() == pytest.approx(off(x, y)[1].item(), abs=1e-6)
    # a non-identity mix: v' = mix(c_v x) + 2 sigmoid(W x[:32]) v_x0(x0), q' = mix(c_q x), k' = mix(c_k x)
    attn = on.blocks[0].attn
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (attn.iha_q, attn.iha_k, attn.iha_v, attn.v_gate.weight):
            p.copy_(torch.randn(p.shape, generator=g))
        xin, x0 = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
        q, k, v = attn.c_attn(xin).view(2, 16, 3, 2, 16).unbind(2)
        mix = lambda z, w: torch.stack([sum(z[:, :, s] * w[s, t, 0] for s in range(2)) for t in range(2)], 2)
        ve = (2 * torch.sigmoid(attn.v_gate(xin[..., :32]))).unsqueeze(-1) * attn.v_x0(x0).view(2, 16, 2, 16)
        rope = rope_of(on)

        def attend(q, k, v):
            q, k = F.rms_norm(apply_rotary(q, *rope), (16,)), F.rms_norm(apply_rotary(k, *rope), (16,))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            y = y.transpose(1, 2) * torch.sigmoid(attn.head_gate(xin[..., :12])).unsqueeze(-1)
            return attn.c_proj(y.reshape(2, 16, 32))

        after = attend(mix(q, attn.iha_q), mix(k, attn.iha_k), mix(v, attn.iha_v) + ve)
        before = attend(mix(q, attn.iha_q), mix(k, attn.iha_k), mix(v + ve, attn.iha_v))
        assert torch.allclose(attn(xin, x0, rope), after, atol=1e-5)
        assert (after - before).abs().max().item() > 1e-3  # the order matters
    with pytest.raises(ValueError, match="iha_ve_after_mix"):
        model_of(iha=True, iha_ve_after_mix=True, iha_pseudo=2)


# ---- 7. half-truncated RoPE, 8. the partial key offset ------------------------------------


def test_rope_frac_tables_follow_the_reference_formula():
    # the reference at head_dim 128: 32 pairs at 10000^(-j/32), then 32 pairs at frequency 0
    cos, sin = rotary_tables(40, 128, 10000.0, frac=0.5)
    j = torch.arange(64, dtype=torch.float64)
    inv = torch.where(j < 32, 10000.0 ** (-2 * j / 64), torch.zeros(()))
    angles = torch.arange(40, dtype=torch.float64)[:, None] * inv
    assert cos.shape == (1, 40, 1, 64)
    assert torch.allclose(cos[0, :, 0].double(), angles.cos(), atol=1e-5) and torch.allclose(sin[0, :, 0].double(), angles.sin(), atol=1e-5)
    assert torch.all(cos[..., 32:] == 1) and torch.all(sin[..., 32:] == 0)
    full_c, full_s = rotary_tables(40, 128, 10000.0)
    assert torch.equal(rotary_tables(40, 128, 10000.0, frac=1.0)[0], full_c)
    # pair j rotates dims j and j + D/2: with frac 0.5 dims 0-31 and 64-95 rotate, 32-63 and 96-127 pass through
    x = torch.randn(2, 40, 3, 128, generator=torch.Generator().manual_seed(4))
    r = apply_rotary(x, cos, sin)
    still = torch.cat((torch.arange(32, 64), torch.arange(96, 128)))
    moved = torch.cat((torch.arange(0, 32), torch.arange(64, 96)))
    assert torch.equal(r[..., still], x[..., still])
    assert (r[..., moved] - x[..., moved]).abs().max().item() > 1e-2
    x1, x2 = x[..., :32], x[..., 64:96]  # the reference's cat([x1 cos + x2 sin, -x1 sin + x2 cos]) on the rotating pairs
    c, s = cos[..., :32], sin[..., :32]
    assert torch.allclose(r[..., :32], x1 * c + x2 * s, atol=1e-6) and torch.allclose(r[..., 64:96], -x1 * s + x2 * c, atol=1e-6)
    m = model_of(rope_frac=0.5, n_embd=64)  # the model's tables: head_dim 32, 8 rotating pairs
    c8, s8 = rotary_tables(16, 32, 10000.0, frac=0.5)
    assert torch.equal(m.rope_cos, c8) and torch.equal(m.rope_sin, s8) and torch.all(m.rope_cos[..., 8:] == 1)


def test_key_offset_equals_the_shift_by_hand():
    m = model_of(key_offset=True, head_gate=False, value_proj=False, n_layer=2, window_pattern="SL", short_window=4,
                 mtp_weight=0.3)
    assert [b.attn.key_offset for b in m.blocks] == [False, True] and not m.mtp_block.attn.key_offset  # L and last blocks
    attn = m.blocks[1].attn
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    rope = rope_of(m)
    D = 16
    with torch.no_grad():
        q, k, v = attn.c_attn(x).view(2, 16, 3, 2, D).unbind(2)
        q, k = F.rms_norm(apply_rotary(q, *rope), (D,)), F.rms_norm(apply_rotary(k, *rope), (D,))  # after rope and QK-norm
        k = k.clone()
        k[:, 1:, :, D // 2:] = k[:, :-1, :, D // 2:].clone()  # the reference: position 0 keeps its own
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        assert torch.allclose(attn(x, x, rope), attn.c_proj(y.transpose(1, 2).reshape(2, 16, 32)), atol=1e-5)
        plain = model_of(head_gate=False, value_proj=False, n_layer=2, window_pattern="SL", short_window=4, mtp_weight=0.3)
        plain.load_state_dict(m.state_dict())
        assert torch.equal(m.blocks[0].attn(x, x, rope), plain.blocks[0].attn(x, x, rope))  # S blocks unchanged
        assert (attn(x, x, rope) - plain.blocks[1].attn(x, x, rope)).abs().max().item() > 1e-3


# ---- 10. attention-only dropout, 11. stochastic depth without rescale ---------------------


def test_mlp_dropout_false_leaves_the_mlp_output_undropped_and_unscaled():
    m = model_of(dropout=0.5, mlp_dropout=False).train()
    block = m.blocks[0]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6))
    rope = rope_of(m)
    torch.manual_seed(7)
    out = block(x, x, rope)
    torch.manual_seed(7)
    h = x + F.dropout(block.attn(block.norm1(x), x, rope), 0.5, True)  # the attention output is dropped
    assert torch.allclose(out, h + block.mlp(block.norm2(h)), atol=1e-6)
    both = model_of(dropout=0.5).train().blocks[0]
    both.load_state_dict(block.state_dict())
    torch.manual_seed(7)
    assert not torch.allclose(both(x, x, rope), out, atol=1e-3)  # today's default drops the MLP output too


def test_stochastic_depth_without_rescale_keeps_blocks_at_scale_one():
    cfg = model_of(stoch_depth=0.6, stoch_depth_rescale=False).cfg
    scales = torch.stack([stoch_depth_scales(cfg, seed=0, step=s) for s in range(500)])
    assert set(scales.unique().tolist()) == {0.0, 1.0}
    cfg_r = model_of(stoch_depth=0.6).cfg
    rescaled = torch.stack([stoch_depth_scales(cfg_r, seed=0, step=s) for s in range(500)])
    assert torch.equal(scales == 0, rescaled == 0)  # the same blocks skipped; only the kept scale differs


# ---- 12. tanh-gated XSA -------------------------------------------------------------------


def test_xsa_tanh_is_off_at_init_and_follows_the_formula():
    off = model_of()
    on = model_of(xsa="tanh")
    assert all(torch.equal(b.attn.xsa_alpha, torch.zeros(2)) and b.attn.xsa_gate is None for b in on.blocks)
    assert group_of("blocks.0.attn.xsa_alpha", on.blocks[0].attn.xsa_alpha) == "scalar"
    missing = on.load_state_dict(off.state_dict(), strict=False).missing_keys
    assert missing and all(n.endswith("attn.xsa_alpha") for n in missing)
    x, _ = batch()
    with torch.no_grad():
        assert torch.allclose(on(x)[0], off(x)[0], atol=1e-6, rtol=0)
    m = model_of(xsa="tanh", head_gate=False, value_proj=False, n_layer=2)
    attn = m.blocks[0].attn
    xin = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(8))
    rope = rope_of(m)
    with torch.no_grad():
        attn.xsa_alpha.copy_(torch.tensor([0.8, -1.5]))
        q, k, v = attn.c_attn(xin).view(2, 16, 3, 2, 16).unbind(2)
        q, k = F.rms_norm(apply_rotary(q, *rope), (16,)), F.rms_norm(apply_rotary(k, *rope), (16,))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
        v_hat = v / v.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-4)  # the reference's
        y = y - (y * v_hat).sum(-1, keepdim=True) * torch.tanh(attn.xsa_alpha).view(2, 1) * v_hat
        assert torch.allclose(attn(xin, xin, rope), attn.c_proj(y.reshape(2, 16, 32)), atol=1e-5)


# ---- the full-size reference models: parameter counts ------------------------------------

TWO_HOUR = dict(vocab_size=50257, seq_len=2048, n_layer=30, n_embd=1792, n_head=14, mlp="swiglu", value_proj=True,
                value_proj_layers="last", head_gate=True, x0_mix=True, unet=True, iha=True, iha_pseudo=1,
                iha_ve_after_mix=True, mtp_weight=0.3, mtp_style="reference", init="reference", logit_softcap=10.0,
                window_pattern="SSSL", short_window=1024, loop_start=15, loop_end=20, loop_repeats=3, loop_skips="every")
TINY = dict(vocab_size=50257, seq_len=2048, n_layer=16, n_embd=1024, n_head=8, mlp="swiglu", value_proj=True,
            value_proj_layers="last", head_gate=True, x0_mix=True, unet=True, xsa="tanh", rope_frac=0.5, key_offset=True,
            resid_lambda_init=1.1, mlp_dropout=False, init="nanochat", window_pattern="SSSL", short_window=1024)


@pytest.mark.parametrize("name, kw, reference", [
    ("two-hour / limited", TWO_HOUR, 1_443_722_775),
    ("unlimited", dict(TWO_HOUR, n_embd=2048, n_head=16), 1_870_172_811),
    ("tiny", TINY, 316_935_848),
])
def test_full_size_reference_models_have_the_reference_parameter_count(name, kw, reference):
    """The spec's counts use the vocabulary padded to 50304 for wte and lm_head; ours is not
    padded, so ours = reference - 2 * 47 * n_embd, every other tensor matching."""
    with torch.device("meta"):
        m = GPT(ModelConfig(**kw))
    assert m.num_params() == reference - 2 * (50304 - 50257) * kw["n_embd"], name


def test_reference_flags_together_train():
    tiny_two_hour = {k: v for k, v in TWO_HOUR.items() if k not in ("vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "short_window")}
    tiny_tiny = {k: v for k, v in TINY.items() if k not in ("vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "short_window")}
    for flags in (dict(tiny_two_hour, n_layer=6, loop_start=3, loop_end=4, stoch_depth=0.2, stoch_depth_rescale=False),
                  dict(tiny_tiny, n_embd=64, dropout=0.1)):
        m = model_of(short_window=4, **flags)
        x, y = batch()
        _, loss = m(x, y, return_logits=False, loop_active=True)
        loss.backward()
        assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ---- the two-hour track's context-window schedule with YaRN ------------------------------

SCHEDULE = "1-6:256,768;7-13:768,1792;14-22:1280,2048"


def test_window_schedule_is_validated():
    from slowrun.config import ConfigError, build_config

    ok = {"model.seq_len": 2048, "model.window_pattern": "SSSL"}
    with pytest.raises(ConfigError, match="must start at epoch 7"):
        build_config("slowrun", {**ok, "model.window_schedule": "1-6:256,768;8-13:768,1792"})
    with pytest.raises(ConfigError, match="short <= long <= seq_len"):
        build_config("slowrun", {**ok, "model.window_schedule": "1-6:900,768"})
    with pytest.raises(ConfigError, match="needs model.window_pattern"):
        build_config("slowrun", {"model.seq_len": 2048, "model.window_schedule": SCHEDULE})


def test_window_schedule_yarn_follows_the_reference_formula():
    """YaRN at 768 -> 1792 -> 2048 (the reference's values: softmax scale 128^-0.5 = 0.0883883,
    then 0.1033666 and 0.1061271; lowest frequencies at 768/2048 = 0.375 of their start)."""
    import math

    import numpy as np

    from slowrun.config import build_config
    from slowrun.gpt import window_stage_of, window_state

    cfg = build_config("two_hour", {"model.vocab_size": 64, "model.window_schedule": SCHEDULE}).model
    base = 1.0 / 10000 ** (np.arange(0, 128, 2) / 128)
    inv = base.copy()
    for k, (old, new) in enumerate([(None, 768), (768, 1792), (1792, 2048)]):
        if old is not None:  # numpy, the formula as the reference writes it
            w = np.clip((old * inv / (2 * math.pi) - 1) / 31, 0, 1)
            inv = inv * (old / new + w * (1 - old / new))
        short, long, ours, factor = window_state(cfg, k)
        assert (short, long) == [(256, 768), (768, 1792), (1280, 2048)][k]
        assert np.allclose(ours.numpy(), inv, rtol=1e-6)
    assert [round(window_state(cfg, k)[3] / math.sqrt(128), 7) for k in range(3)] == [0.0883883, 0.1033666, 0.1061271]
    assert abs(window_state(cfg, 2)[2][-1].item() / base[-1] - 0.375) < 1e-6
    assert [window_stage_of(cfg, e) for e in (0, 5, 6, 12, 13, 21, 30)] == [0, 0, 1, 1, 2, 2, 2]
    no_yarn = build_config("two_hour", {"model.vocab_size": 64, "model.window_schedule": SCHEDULE, "model.window_yarn": False}).model
    assert window_state(no_yarn, 2)[3] == 1.0 and torch.equal(window_state(no_yarn, 2)[2], window_state(no_yarn, 0)[2])


def test_window_schedule_stage_equals_fixed_windows_without_yarn():
    """A stage (short 8, long = seq_len) without YaRN is the fixed SSSL model with short_window 8;
    stage 0 (short 4, long 12) bands the L blocks and the last block at 12 keys."""
    kw = dict(seq_len=32, n_layer=4, window_pattern="SSSL")
    fixed = model_of(**kw, short_window=8)
    sched = model_of(**kw, window_schedule="1-1:4,12;2-3:8,32", window_yarn=False)
    sched.load_state_dict(fixed.state_dict())
    idx = torch.randint(0, 61, (2, 32))
    assert [b.attn.window for b in sched.blocks] == [8, 8, 8, -1]  # the last stage by default
    assert torch.equal(sched(idx)[0], fixed(idx)[0])
    sched.set_window_stage(0)
    assert [b.attn.window for b in sched.blocks] == [4, 4, 4, 12]
    assert not torch.allclose(sched(idx)[0], fixed(idx)[0])


def test_trainer_switches_window_stages_at_epoch_boundaries(bpe_ds, tmp_path, monkeypatch):
    from slowrun import gpt
    from slowrun.train import train
    from tests.conftest import smoke_config

    seen = []
    real = gpt.GPT.set_window_stage

    def spy(self, stage):
        seen.append(stage)
        return real(self, stage)

    monkeypatch.setattr(gpt.GPT, "set_window_stage", spy)
    cfg = smoke_config(bpe_ds, **{"model.window_pattern": "SL", "model.window_schedule": "1-1:4,8;2-3:8,16",
                                  "train.epochs": 3, "train.max_steps": 10, "train.batch_tokens": 8192,
                                  "eval.at_epoch_end": False})
    result = train(cfg, tmp_path / "run", echo=False)
    steps = result["steps"]
    calls = seen[1:]  # the first is the model's construction (last stage)
    assert seen[0] == 1 and len(calls) == steps == 10
    first_stage1 = calls.index(1)
    assert all(s == 0 for s in calls[:first_stage1]) and all(s == 1 for s in calls[first_stage1:])
    # the first step that starts in epoch 2 (steps overlap epoch ends: 8192-token steps)
    import math

    assert first_stage1 == math.ceil(result["unique_tokens"] / 8192)


# ---- 13. stochastic depth drawn at every block call, the MTP block too ---------------------

PER_CALL = dict(n_layer=4, loop_start=1, loop_end=2, loop_repeats=3, stoch_depth=0.6, stoch_depth_per_call=True,
                mtp_weight=0.3, mtp_style="reference", unet=False)
LOOPED_CALLS = [0, 1, 2, 1, 2, 1, 2, 3]  # blocks 1-2 run three times


def hand_scales(seed, step, calls, stoch_depth=0.6, L=4, rescale=True, micro=0):
    """The reference's draws, one `rand(())` per block call in order and then the MTP block's
    (layer L, p = stoch_depth * L / (L - 1)): keep = u >= p, from the (seed, step) generator."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    for _ in range(micro * (len(calls) + 1)):  # the earlier micro-steps' draws
        torch.rand((), generator=g)
    out = []
    for layer in [*calls, L]:
        p = stoch_depth * layer / (L - 1)
        keep = torch.rand((), generator=g).item() >= p
        out.append((1 / (1 - p) if rescale else 1.0) if keep else 0.0)
    return out


def test_stoch_depth_per_call_draws_equal_a_hand_replay():
    cfg = model_of(**PER_CALL).cfg
    for loop_active, calls in ((True, LOOPED_CALLS), (False, [0, 1, 2, 3])):
        for step in range(30):
            for micro in (0, 2):
                got = stoch_depth_scales(cfg, seed=5, step=step, loop_active=loop_active, micro=micro)
                assert got.tolist() == pytest.approx(hand_scales(5, step, calls, micro=micro), rel=1e-6), (step, micro)
    assert torch.equal(stoch_depth_scales(cfg, 5, 7), stoch_depth_scales(cfg, 5, 7, loop_active=True))  # None: as trained
    assert torch.equal(stoch_depth_scales(cfg, 5, 7, True), stoch_depth_scales(cfg, 5, 7, True))  # the same on every rank
    assert not torch.equal(stoch_depth_scales(cfg, 5, 7, True, micro=1), stoch_depth_scales(cfg, 5, 7, True))
    flat = model_of(**PER_CALL, stoch_depth_rescale=False).cfg
    for step in range(30):
        assert stoch_depth_scales(flat, 5, step, True).tolist() == hand_scales(5, step, LOOPED_CALLS, rescale=False)
    # the default: one scale per block index, the MTP block never dropped
    assert stoch_depth_scales(model_of(**{**PER_CALL, "stoch_depth_per_call": False}).cfg, 5, 7, True).shape == (4,)


def test_stoch_depth_per_call_redraws_each_replay_and_drops_the_mtp_block():
    cfg = model_of(**PER_CALL).cfg
    n = 3000
    s = torch.stack([stoch_depth_scales(cfg, seed=0, step=k, loop_active=True) for k in range(n)])  # (n, 9)
    assert any(s[k, 1] != s[k, 3] or s[k, 3] != s[k, 5] for k in range(n))  # block 1's three passes draw apart
    p = 0.6 * torch.tensor([*LOOPED_CALLS, 4.0]) / 3  # the MTP block (last): 0.6 * 4 / 3 = 0.8
    freq = (s == 0).float().mean(0)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9), freq
    assert s[:, -1].max().item() == pytest.approx(5.0)  # a kept MTP block: 1 / (1 - 0.8)
    both = ((s[:, 1] == 0) & (s[:, 3] == 0)).float().mean().item()  # two passes of block 1 dropped together
    assert both == pytest.approx(0.2 * 0.2, abs=4 * math.sqrt(0.04 * 0.96 / n))  # independent draws


def per_call_by_hand(m, x, y, s):
    """The per-call training loss unrolled: block call k scaled by s[k] (skipped at 0), the MTP block by s[-1]."""
    norm = lambda z: F.rms_norm(z, (32,))
    h = x0 = norm(m.wte(x))
    for k, i in enumerate(LOOPED_CALLS):
        h = m.lambda_r[i] * h + m.lambda_0[i] * x0
        if s[k] > 0:
            h = m.blocks[i](h, x0, rope_of(m), scale=s[k])
    z = torch.cat((norm(h)[:, :-1], norm(m.wte(y[:, :-1]))), dim=-1) @ m.mtp_proj.weight.T
    out = m.mtp_block(z, z, rope_of(m, 15), scale=s[-1]) if s[-1] > 0 else z
    return softcap_ce(m, h, y) + 0.3 * softcap_ce(m, out, y[:, 1:])


def test_stoch_depth_per_call_forward_equals_a_hand_unrolled_forward():
    m = model_of(**PER_CALL).train()
    with torch.no_grad():
        m.lambda_r.copy_(torch.linspace(0.8, 1.2, 4))
    x, y = batch()
    dropped = [1.0, 1.25, 0.0, 1.25, 5 / 3, 0.0, 5 / 3, 2.5, 0.0]  # block 2's 1st pass, block 1's 3rd, the MTP block
    kept = [1.0, 0.0, 5 / 3, 1.25, 0.0, 1.25, 5 / 3, 2.5, 5.0]
    for s in (dropped, kept):
        _, loss = m(x, y, return_logits=False, loop_active=True, depth_scales=torch.tensor(s))
        assert loss.item() == pytest.approx(per_call_by_hand(m, x, y, s).item(), rel=1e-5)
    m.zero_grad()
    m(x, y, loop_active=True, depth_scales=torch.tensor(dropped))[1].backward()
    assert all(p.grad is None for p in m.mtp_block.parameters())  # eager: a dropped MTP block does not run
    assert m.mtp_proj.weight.grad is not None
    with pytest.raises(ValueError, match="loop_active"):  # scales drawn for the looped order, a forward without it
        m(x, y, loop_active=False, depth_scales=torch.tensor(dropped))
    ref = model_of(**{**PER_CALL, "stoch_depth": 0.0})
    ref.load_state_dict(m.state_dict())
    m.eval(), ref.eval()
    assert torch.equal(m(x, y)[1], ref(x, y)[1])  # evaluation drops nothing
    off = model_of(**{**PER_CALL, "stoch_depth_per_call": False}).train()
    off.hidden(x, depth_scales=torch.zeros(4))
    assert off.mtp_depth_scale is None  # per block index: the MTP block is never dropped


def test_stoch_depth_per_call_compiles_without_graph_break_or_recompile():
    from tests.test_gpt import compile_counting_graphs

    m = model_of(**PER_CALL).train()
    x, _ = batch()
    compiled, graphs = compile_counting_graphs(m)
    for step in range(4):
        s = stoch_depth_scales(m.cfg, seed=0, step=step, loop_active=True)
        assert torch.allclose(compiled(x, loop_active=True, depth_scales=s)[0], m(x, loop_active=True, depth_scales=s)[0],
                              atol=1e-5)
    assert len(graphs) == 1
    torch._dynamo.reset()
