"""The `limited` recipe's model against the reference's own 1-hour trainer (qlabs-eng/slowrun at
fd342f0, ../shared/reference): its model classes are taken from train.py with `ast` (the script
itself parses arguments and trains at import) and run on CPU with a stand-in for FA3 (SDPA with
the same window), fp32 RoPE tables on both sides and the same weights: per-block outputs, the
training loss with its MTP term, and every gradient, unlooped and with the looped span
replayed. Skipped where the reference folder is absent."""

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slowrun.config import build_config
from slowrun.gpt import GPT

REF = Path(os.environ.get("SLOWRUN_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
TRAINER = REF / "qlabs-slowrun-fd342f0" / "train.py"
pytestmark = pytest.mark.skipif(not TRAINER.is_file(), reason=f"the reference's trainer not found at {TRAINER}")

V, T, L, C, H = 128, 32, 4, 64, 2
MODEL_CODE = ("GPTConfig", "norm", "has_ve", "apply_rotary_emb", "CausalSelfAttention", "MLP", "Block", "GPT")


def fa3_stand_in(q, k, v, causal=True, window_size=(-1, -1)):
    """FA3's flash_attn_func on CPU: (B, T, H, D) in and out, a query attends keys i - left..i."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    n, left = q.size(2), window_size[0]
    if left < 0 or left >= n:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j <= left))
    return y.transpose(1, 2)


@pytest.fixture(scope="module")
def ref():
    """The reference's model classes, defined from its source in a namespace of their own."""
    tree = ast.parse(TRAINER.read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in MODEL_CODE]
    assert sorted(n.name for n in nodes) == sorted(MODEL_CODE)
    ns = dict(torch=torch, nn=nn, F=F, dataclass=dataclass, print0=lambda *a, **k: None,
              args=SimpleNamespace(mtp_weight=0.3, iha_lr=0.02), LOGIT_CAP=10.0, MAX_SEQ_LEN=T, DEPTH=L, N_HEAD=H,
              N_EMBD=C, WINDOW_PATTERN="SSSL", flash_attn=SimpleNamespace(flash_attn_func=fa3_stand_in))
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(TRAINER), "exec"), ns)
    return SimpleNamespace(**{k: ns[k] for k in MODEL_CODE})


def pair(ref, loop: bool):
    cfg = build_config("limited", {"model.vocab_size": V, "model.seq_len": T, "model.n_layer": L, "model.n_embd": C,
                                   "model.n_head": H, "model.short_window": T // 2, "model.dropout": 0.0,
                                   "model.stoch_depth": 0.0, "model.loop_start": 2, "model.loop_end": 2,
                                   "model.loop_repeats": 3, "train.dtype": "fp32"})
    torch.manual_seed(0)
    r = ref.GPT(ref.GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=H, n_embd=C,
                              window_pattern="SSSL", dropout=0.0, stoch_depth=0.0, use_iha=True, iha_mix_v=True))
    r.init_weights()
    with torch.no_grad():  # away from the identity inits, so that every tensor matters
        for p in r.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if loop:
        r.set_dupe_layers(2, 3, loops=2)  # block 2 three times, as loop_start = loop_end = 2, loop_repeats = 3
    ours = GPT(cfg.model)
    r.cos, r.sin = ours.rope_cos.clone(), ours.rope_sin.clone()  # fp32 tables on both sides
    sd = {"wte.weight": r.transformer.wte.weight, "lm_head.weight": r.lm_head.weight, "lambda_r": r.resid_lambdas,
          "lambda_0": r.x0_lambdas, "unet_w": r.skip_weights.flip(0),  # ours by encoder block, theirs by decoder
          "mtp_proj.weight": r.mtp_proj.weight}
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(r.transformer.h)] + [("mtp_block", r.mtp_block)]
    for name, b in blocks:
        a = b.attn
        sd[f"{name}.attn.c_attn.weight"] = torch.cat((a.c_q.weight, a.c_k.weight, a.c_v.weight))
        sd[f"{name}.attn.c_proj.weight"] = a.c_proj.weight
        sd[f"{name}.attn.head_gate.weight"] = a.attn_gate.weight
        for x in "qkv":  # theirs mixes q_h = sum_m mix[h, m] q_m; ours q_h = sum_m q_m iha[m, h, 0]
            sd[f"{name}.attn.iha_{x}"] = getattr(a, f"{x}_mix").T.unsqueeze(-1)
        sd[f"{name}.mlp.c_fc.weight"] = torch.cat((b.mlp.c_gate.weight, b.mlp.c_fc.weight))  # [gate; up]
        sd[f"{name}.mlp.c_proj.weight"] = b.mlp.c_proj.weight
        if a.ve_gate is not None:
            sd[f"{name}.attn.v_gate.weight"] = a.ve_gate.weight
            sd[f"{name}.attn.v_x0.weight"] = r.ve_projs[name.split(".")[1]].weight
    assert set(sd) == {n for n, _ in ours.named_parameters()}
    assert sum(p.numel() for p in sd.values()) == sum(p.numel() for p in r.parameters())  # every tensor, once
    ours.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    return ours.train(), r.train(), sd


def block_outputs(model, blocks, run):
    out = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(o.detach())) for b in blocks]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, out


@pytest.mark.parametrize("loop", [False, True])
def test_limited_equals_the_reference_trainers_model(ref, loop):
    ours, r, sd = pair(ref, loop)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (3, T), generator=g), torch.randint(0, V, (3, T), generator=g)
    (ref_loss, parts), ref_blocks = block_outputs(r, list(r.transformer.h), lambda: r(x, y))
    (_, loss), our_blocks = block_outputs(ours, list(ours.blocks), lambda: ours(x, y, return_logits=False,
                                                                              loop_active=loop))
    assert len(our_blocks) == len(ref_blocks) == (L + 2 if loop else L)  # the looped block's replays too
    for i, (a, b) in enumerate(zip(our_blocks, ref_blocks)):
        # fp32 rounding, relative to the residual stream's scale (it grows to ~20 here)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (f"block call {i}", (a - b).abs().max().item())
    assert parts["mtp_loss"] > 0 and abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()
    loss.backward()
    ref_loss.backward()
    for name, p in ours.named_parameters():
        if name.endswith(("c_attn.weight", "c_fc.weight")) or ".iha_" in name:
            continue  # built from several of theirs: checked below
        want = r.skip_weights.grad.flip(0) if name == "unet_w" else sd[name].grad
        assert want is not None and torch.allclose(p.grad, want, atol=1e-6, rtol=1e-4), name
    a = r.transformer.h[1].attn
    assert torch.allclose(ours.blocks[1].attn.c_attn.weight.grad,
                          torch.cat((a.c_q.weight.grad, a.c_k.weight.grad, a.c_v.weight.grad)), atol=1e-6, rtol=1e-4)
    assert torch.allclose(ours.blocks[1].attn.iha_q.grad[..., 0], a.q_mix.grad.T, atol=1e-6, rtol=1e-4)
    m = r.transformer.h[2].mlp
    assert torch.allclose(ours.blocks[2].mlp.c_fc.weight.grad, torch.cat((m.c_gate.weight.grad, m.c_fc.weight.grad)),
                          atol=1e-6, rtol=1e-4)
