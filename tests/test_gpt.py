import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from slowrun.config import ModelConfig, build_config
from slowrun.gpt import GPT, apply_rotary, stoch_depth_scales
from slowrun.optim import build_optimizers
from slowrun.losses import DistillTarget, distill_loss, hidden_cross_entropy, linear_cross_entropy, linear_distillation

V = 97


def model_of(recipe="slowrun", **kw):
    over = {"model.vocab_size": V, "model.depth": -1, "model.seq_len": 16, "model.n_layer": 4, "model.n_head": 2, "model.n_embd": 32,
            "model.dropout": 0.0}
    over.update({f"model.{k}": v for k, v in kw.items()})
    torch.manual_seed(0)
    return GPT(build_config(recipe, over).model)


def batch(B=3, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("recipe", ["baseline", "slowrun", "nanochat"])
def test_forward_shapes_and_initial_loss(recipe):
    m = model_of(recipe)
    x, y = batch()
    logits, loss = m(x, y)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    # a fresh model is close to uniform: loss near ln(V)
    assert abs(loss.item() - math.log(V)) < 0.5


@pytest.mark.parametrize("recipe", ["baseline", "slowrun"])
def test_causal(recipe):
    m = model_of(recipe).eval()
    x, _ = batch(1)
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % V
    a, _ = m(x)
    b, _ = m(x2)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-5)


@pytest.mark.parametrize("flag", [dict(norm="layernorm"), dict(pos="learned"), dict(mlp="gelu"), dict(mlp="relu2"),
                                  dict(tie_embeddings=False), dict(qk_norm=False), dict(value_proj=False),
                                  dict(head_gate=False), dict(x0_mix=False), dict(unet=False), dict(logit_softcap=-1.0),
                                  dict(stoch_depth=0.3), dict(mtp_weight=0.3), dict(loop_start=1, loop_end=2, loop_repeats=3),
                                  dict(dropout=0.2), dict(n_layer=3), dict(bias=True),
                                  dict(window_pattern="SSSL", short_window=3), dict(xsa="fixed", xsa_layers=2),
                                  dict(xsa="learnable"), dict(iha=True, iha_pseudo=2),
                                  dict(iha=True, iha_pseudo=2, iha_mix_v=False, window_pattern="S", short_window=4)])
def test_each_feature_trains(flag):
    m = model_of(**flag)
    x, y = batch()
    _, loss = m(x, y, return_logits=False)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert math.isfinite(loss.item()) and grads and all(torch.isfinite(g).all() for g in grads)
    # the flag is read: with the same seed and batch, the logits or the training loss differ from the
    # default model's (the head is scaled up so that output-side flags like the softcap show)
    outputs = []
    for model in (model_of(**flag), model_of()):
        with torch.no_grad():
            model.head_weight.mul_(100)
        torch.manual_seed(3)
        outputs.append(model(x, y, loop_active=True))  # a no-op without a looped span
    (a_logits, a_loss), (b_logits, b_loss) = outputs
    assert not (torch.equal(a_logits, b_logits) and a_loss.item() == b_loss.item()), flag


def test_init_values():
    m = model_of(tie_embeddings=False)
    assert torch.all(m.blocks[0].attn.v_gate.weight == 0) and torch.all(m.blocks[0].attn.head_gate.weight == 0)
    assert m.blocks[1].attn.v_x0 is None  # value projections on alternate layers
    assert torch.all(m.lambda_r == 1) and torch.allclose(m.lambda_0, torch.full((4,), 0.1))
    assert torch.all(m.unet_w == 1) and m.unet_w.numel() == 2
    assert abs(m.lm_head.weight.std().item() - 0.001) < 3e-4
    assert abs(m.wte.weight.std().item() - 1.0) < 0.05
    base = model_of("baseline")
    assert abs(base.wte.weight.std().item() - 0.02) < 0.003 and base.lm_head is None
    tied = model_of()  # the slowrun recipe ties them: the one matrix is the head too, at init_std
    assert tied.lm_head is None and abs(tied.wte.weight.std().item() - 0.02) < 0.003


def test_fused_loss_matches_logits_loss():
    for cap in (-1.0, 15.0):
        m = model_of(logit_softcap=cap)
        x, y = batch()
        _, ref = m(x, y, return_logits=True)
        ref.backward()
        g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        _, fused = m(x, y, return_logits=False)
        fused.backward()
        assert torch.allclose(ref, fused, atol=1e-5)
        for n, p in m.named_parameters():
            assert torch.allclose(p.grad, g_ref[n], atol=1e-5, rtol=1e-4), n


def test_linear_cross_entropy_against_plain_torch():
    torch.manual_seed(0)
    h = torch.randn(300, 24, requires_grad=True)
    W = torch.randn(50, 24, requires_grad=True)
    y = torch.randint(0, 50, (300,))
    ref = F.cross_entropy(7 * torch.tanh(h @ W.T / 7), y)
    gh, gw = torch.autograd.grad(ref, (h, W))
    ours = linear_cross_entropy(h, W, y, softcap=7.0, chunk=64)
    oh, ow = torch.autograd.grad(ours * 3.0, (h, W))  # upstream gradient other than 1 is applied
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(oh, 3 * gh, atol=1e-6) and torch.allclose(ow, 3 * gw, atol=1e-6)


@pytest.mark.parametrize("cap, t_cap, alpha, T", [(7.0, 5.0, 0.5, 1.2), (-1.0, -1.0, 0.9, 2.0), (7.0, -1.0, 0.0, 1.0),
                                                (-1.0, 5.0, 1.0, 0.7)])
def test_linear_distillation_against_plain_torch(cap, t_cap, alpha, T):
    torch.manual_seed(0)
    h = torch.randn(300, 24, requires_grad=True)
    W = torch.randn(50, 24, requires_grad=True)
    th, tW = torch.randn(300, 40), torch.randn(50, 40)  # a teacher of another width
    y = torch.randint(0, 50, (300,))

    def capped(z, c):
        return c * torch.tanh(z / c) if c > 0 else z

    ref = distill_loss(capped(h @ W.T, cap), capped(th @ tW.T, t_cap), y, alpha, T)
    gh, gw = torch.autograd.grad(ref, (h, W))
    ours = linear_distillation(h, W, y, cap, th, tW, t_cap, alpha, T, chunk=64)  # 64 does not divide 300
    oh, ow = torch.autograd.grad(ours * 3.0, (h, W))  # upstream gradient other than 1 is applied
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-6)
    assert torch.allclose(oh, 3 * gh, atol=1e-6, rtol=1e-4) and torch.allclose(ow, 3 * gw, atol=1e-6, rtol=1e-4)


def test_linear_distillation_from_an_ensemble_of_teachers():
    """Several teachers: KL to their average probability at the temperature, against plain torch."""
    torch.manual_seed(0)
    h = torch.randn(200, 24, requires_grad=True)
    W = torch.randn(50, 24, requires_grad=True)
    teachers = [(torch.randn(200, 40), torch.randn(50, 40), 5.0), (torch.randn(200, 16), torch.randn(50, 16), -1.0),
                (torch.randn(200, 24), torch.randn(50, 24), 9.0)]
    y = torch.randint(0, 50, (200,))
    a, T = 0.7, 1.5
    student = 7 * torch.tanh(h @ W.T / 7)
    probs = [torch.softmax((c * torch.tanh(th @ tW.T / c) if c > 0 else th @ tW.T) / T, -1) for th, tW, c in teachers]
    pt = torch.stack(probs).mean(0)
    ref = (1 - a) * F.cross_entropy(student, y) + a * T**2 * (pt * (pt.log() - torch.log_softmax(student / T, -1))).sum(-1).mean()
    gh, gw = torch.autograd.grad(ref, (h, W))
    ths, tWs, caps = zip(*teachers)
    ours = linear_distillation(h, W, y, 7.0, ths, tWs, caps, a, T, chunk=64)
    oh, ow = torch.autograd.grad(ours, (h, W))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-6)
    assert torch.allclose(oh, gh, atol=1e-6, rtol=1e-4) and torch.allclose(ow, gw, atol=1e-6, rtol=1e-4)
    # the unfused path's teacher "logits": their softmax at T is the average probability
    target = DistillTarget(None, a, T, hidden=ths, head=tWs, softcap=caps)
    assert torch.allclose(torch.softmax(target.teacher_logits() / T, -1), pt, atol=1e-6)
    with pytest.raises(ValueError, match="2 teacher hidden states, 3 heads"):
        linear_distillation(h, W, y, 7.0, ths[:2], tWs, caps, a, T)


def test_loss_kernels_built_by_inductor_equal_them_run_eagerly():
    """The fused output layer's elementwise kernels, as training runs them (compiled, the
    default), equal the same functions run eagerly; one build serves other shapes and dtypes."""
    from slowrun import losses
    losses.compile_kernels(True)  # the default (conftest restores it after each test)
    torch.manual_seed(0)
    for n, V, cap, dtype in ((64, 50, 7.0, torch.float32), (44, 70, 7.0, torch.bfloat16), (64, 50, -1.0, torch.float32)):
        z, zt = (torch.randn(n, V) * 4).to(dtype), (torch.randn(n, V) * 4).to(dtype)
        y = torch.randint(0, V, (n,))
        for fn, args in ((losses._ce_rows, (z, y, cap)), (losses._distill_rows, (z, y, cap, 0.3, 1.5, (5.0, -1.0), zt, 2 * zt))):
            built = losses._run_kernel(fn, *args)
            assert callable(losses._COMPILED[fn]), "the kernel was not built"
            for a, b in zip(built, fn(*args)):
                assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5), (fn.__name__, n, V)


def test_a_loss_kernel_that_cannot_be_built_runs_eagerly_with_one_warning(tmp_path):
    """No C++ compiler for inductor: the fused loss warns once (through the run's log) and gives
    the eager result; the process goes on."""
    script = tmp_path / "no_cxx.py"
    script.write_text(
        "import torch\n"
        "from slowrun import losses\n"
        "got = []\n"
        "losses.compile_kernels(True, got.append)\n"
        "torch.manual_seed(0)\n"
        "h, W, y = torch.randn(300, 16), torch.randn(50, 16), torch.randint(0, 50, (300,))\n"
        "a = [losses.linear_cross_entropy(h, W, y, 7.0, 64).item() for _ in range(2)]\n"
        "losses.compile_kernels(False)\n"
        "b = losses.linear_cross_entropy(h, W, y, 7.0, 64).item()\n"
        "print(a[0] == a[1] == b, len(got), got[0] if got else '')\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("True 1 warning: the fused output layer's compiled kernel could not be built"), last
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mtp_inside", [False, True])
def test_fused_distillation_matches_the_teacher_logits_path(mtp_inside):
    """The trainer's form (the teacher's normed hidden states and head, fused loss) against
    its logits and the unfused loss: equal loss and gradients, the MTP term placed alike."""
    m, teacher = model_of(mtp_weight=0.3), model_of(n_embd=48, n_layer=2, logit_softcap=10.0).eval()
    x, y = batch()
    with torch.no_grad():
        t_logits, _ = teacher(x)
        t_hidden = teacher.norm_f(teacher.hidden(x))
    _, ref = m(x, y, return_logits=True, distill=DistillTarget(t_logits, 0.6, 1.5, mtp_inside))
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    target = DistillTarget(None, 0.6, 1.5, mtp_inside, hidden=(t_hidden,), head=(teacher.head_weight,), softcap=(10.0,))
    logits, fused = m(x, y, return_logits=False, distill=target)
    fused.backward()
    assert logits is None and torch.allclose(ref, fused, atol=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, g_ref[n], atol=1e-5, rtol=1e-4), n
    assert torch.allclose(target.teacher_logits(), t_logits, atol=1e-5)  # the unfused path's teacher logits


def test_layer_looping_order():
    m = model_of(n_layer=6, loop_start=2, loop_end=3, loop_repeats=3, loop_from_epoch=1)
    assert m.block_order() == [0, 1, 2, 3, 4, 5]
    assert m.block_order(loop_active=True) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert m.flops_per_token(loop_active=True) > m.flops_per_token()
    x, y = batch()
    plain = m.hidden(x, loop_active=False)
    looped = m.hidden(x, loop_active=True)  # the argument reaches the blocks: a different function
    assert torch.isfinite(looped).all() and (looped - plain).abs().max().item() > 1e-3
    # evaluation runs the network as trained: unlooped before loop_from_epoch (a fresh model is at
    # step 0), looped once the trainer (or a loaded weights file) says the loop is on
    assert not m.loop_active and torch.equal(m.eval().hidden(x), plain)
    m.loop_active = True
    assert torch.equal(m.hidden(x), looped)


def test_mtp_only_in_training():
    m = model_of(mtp_weight=0.5)
    x, y = batch()
    m.eval()
    _, eval_loss = m(x, y)
    m.train()
    _, train_loss = m(x, y)
    assert train_loss.item() > eval_loss.item() + 0.5 * 3  # the auxiliary CE (~ln 97) is added


def test_stochastic_depth_is_off_in_eval_and_random_in_training():
    m = model_of(stoch_depth=0.9)
    x, _ = batch()
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    outs = {tuple(m(x)[0][0, 0, :3].tolist()) for _ in range(8)}
    assert len(outs) > 1


def test_stochastic_depth_decisions_are_the_same_on_every_rank():
    cfg = model_of(stoch_depth=0.5, n_layer=6).cfg
    # two ranks ask for the same (seed, step): the same blocks skipped
    assert torch.equal(stoch_depth_scales(cfg, seed=3, step=17), stoch_depth_scales(cfg, seed=3, step=17))
    steps = [stoch_depth_scales(cfg, seed=3, step=s) for s in range(50)]
    assert len({tuple(t.tolist()) for t in steps}) > 5  # but they change with the step
    assert not torch.equal(torch.stack(steps), torch.stack([stoch_depth_scales(cfg, seed=4, step=s) for s in range(50)]))
    assert stoch_depth_scales(model_of(stoch_depth=0.0).cfg, 3, 17) is None


def test_stochastic_depth_skip_frequency_rises_linearly_with_depth():
    cfg = model_of(stoch_depth=0.6, n_layer=4).cfg
    n = 4000
    scales = torch.stack([stoch_depth_scales(cfg, seed=0, step=s) for s in range(n)])  # (n, L)
    p = torch.tensor([0.0, 0.2, 0.4, 0.6])  # stoch_depth * i / (L - 1)
    freq = (scales == 0).float().mean(0)
    assert freq[0] == 0  # the first block is never skipped
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9), freq
    kept = scales != 0
    assert torch.allclose(scales[kept], (1 / (1 - p)).expand(n, -1)[kept])  # kept blocks are rescaled


def test_stochastic_depth_skips_blocks_and_never_in_eval():
    m = model_of(stoch_depth=0.9)
    x, y = batch()
    ref = model_of(stoch_depth=0.0)
    ref.load_state_dict(m.state_dict())
    skip_all = torch.tensor([1.0, 0.0, 0.0, 0.0])  # blocks 1-3 skipped
    m.eval(), ref.eval()
    assert torch.equal(m(x, depth_scales=skip_all)[0], ref(x)[0])  # eval never skips
    m.train()
    _, loss = m(x, y, depth_scales=skip_all)
    loss.backward()
    # a skipped block costs nothing: it did not run, so its weights have no gradient
    assert all(p.grad is None for p in m.blocks[2].parameters())
    assert m.blocks[0].mlp.c_fc.weight.grad is not None


def compile_counting_graphs(m):
    """torch.compile(m) with a backend that records each graph Dynamo hands it (after a reset)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(m, backend=backend), graphs


def test_stochastic_depth_compiles_without_graph_break_or_recompile():
    m = model_of(stoch_depth=0.9).train()
    x, _ = batch()
    compiled, graphs = compile_counting_graphs(m)
    for step in range(4):
        s = stoch_depth_scales(m.cfg, seed=0, step=step)
        # the compiled mask multiply equals eager's skipping
        assert torch.allclose(compiled(x, depth_scales=s)[0], m(x, depth_scales=s)[0], atol=1e-5)
    assert len(graphs) == 1  # one graph: no break in `hidden`, no recompilation per skip pattern
    torch._dynamo.reset()


def test_param_count_and_flops():
    m = model_of("baseline")
    C, L = 32, 4
    per_block = 4 * C * C + 4 * C + 2 * (4 * C * C) + 4 * C + C + 4 * C  # attn + mlp weights/biases + 2 LN
    expected = V * C + 16 * C + L * per_block + 2 * C
    assert m.num_params() == expected
    assert m.flops_per_token() == 6 * (L * 12 * C * C + V * C) + 12 * L * C * 16


def test_depth_knob():
    cfg = ModelConfig(vocab_size=V, depth=2, head_dim=16, aspect_ratio=32)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 64, 4)
    assert GPT(cfg).num_params() > 0


def test_nanochat_init():
    m = model_of("nanochat", n_embd=64)
    C = 64
    for blk in m.blocks:
        assert torch.all(blk.attn.c_proj.weight == 0) and torch.all(blk.mlp.c_proj.weight == 0)  # blocks start as identity
        for w in (blk.attn.c_attn.weight, blk.mlp.c_fc.weight):
            assert w.abs().max() <= math.sqrt(3 / C) + 1e-7  # uniform, bounded: no outliers
            assert w.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.05)
    assert abs(m.wte.weight.std().item() - 1.0) < 0.05 and abs(m.lm_head.weight.std().item() - 0.001) < 3e-4
    x, _ = batch()
    h = m.hidden(x)  # identity blocks: the output is the normalized embedding itself
    assert torch.allclose(h, F.rms_norm(m.wte(x), (C,)), atol=1e-6)


def test_distillation_keeps_the_mtp_term():
    """With a teacher and an MTP head, the loss is the distillation loss plus mtp_weight * the MTP CE."""
    m = model_of(mtp_weight=0.5)
    x, y = batch()
    teacher_logits = torch.randn(3, 16, V, generator=torch.Generator().manual_seed(2))
    _, loss = m(x, y, distill=DistillTarget(teacher_logits, 0.5, 2.0))
    h = m.hidden(x)
    distill = distill_loss(m.logits(h), teacher_logits, y, 0.5, 2.0)
    mtp = hidden_cross_entropy(m, m.mtp_hidden(h, x), y[:, 1:])
    assert mtp.item() > 3  # about ln(97) at init: dropping it would show
    assert loss.item() == pytest.approx(distill.item() + 0.5 * mtp.item(), rel=1e-5)
    m.eval()
    _, eval_loss = m(x, y, distill=DistillTarget(teacher_logits, 0.5, 2.0))
    assert eval_loss.item() == pytest.approx(distill.item(), rel=1e-5)  # evaluation never adds MTP


# ---- attention variants: sliding windows, XSA, IHA --------------------------------------


def by_hand_attention(attn, x, rope, window=-1, xsa_gate=None):
    """One attention layer computed directly: banded causal softmax(q k^T / sqrt(D)) v per head,
    then (XSA) minus xsa_gate * the component along each token's own unit value, then c_proj."""
    B, T, C = x.shape
    H, D = attn.n_head, attn.head_dim
    q, k, v = attn.c_attn(x).view(B, T, 3, H, D).unbind(2)
    q, k = F.rms_norm(apply_rotary(q, *rope), (D,)), F.rms_norm(apply_rotary(k, *rope), (D,))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j <= window) if window >= 0 else True)
    w = torch.exp(scores - scores.max(-1, keepdim=True).values) * allowed  # softmax over the band only
    y = torch.einsum("bhij,bjhd->bihd", w / w.sum(-1, keepdim=True), v)
    if xsa_gate is not None:
        u = v / v.norm(dim=-1, keepdim=True)
        y = y - xsa_gate.view(H, 1) * (y * u).sum(-1, keepdim=True) * u
    return attn.c_proj(y.reshape(B, T, C))


def plain_attention_model(**kw):
    return model_of(head_gate=False, value_proj=False, n_layer=2, **kw)


def test_sliding_window_equals_a_dense_band():
    m = plain_attention_model(window_pattern="SL", short_window=3)
    attn = m.blocks[0].attn
    assert attn.window == 3 and m.blocks[1].attn.window == -1
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    rope = (m.rope_cos[:, :16], m.rope_sin[:, :16])
    with torch.no_grad():
        ours = attn(x, x, rope)
        assert torch.allclose(ours, by_hand_attention(attn, x, rope, window=3), atol=1e-5)
        assert not torch.allclose(ours, by_hand_attention(attn, x, rope), atol=1e-3)  # the band matters
    # prepared once per window: one dense mask of the full length, cut for shorter inputs
    idx = torch.randint(0, 50, (1, 16))
    m.hidden(idx)
    m.hidden(idx[:, :9])
    assert list(m.attn_masks) == [("dense", 3, "cpu")] and m.attn_masks[("dense", 3, "cpu")].shape == (16, 16)
    assert attn.masks is m.attn_masks


@pytest.mark.parametrize("recipe,over", [
    ("limited", {"model.xsa": "fixed", "model.iha": True, "model.iha_pseudo": 2, "model.iha_ve_after_mix": False,
                 "model.mtp_weight": 0.3}),
    ("two_hour", {"model.window_schedule": "1-1:4,8;2-2:8,16"}),
    ("tiny", {"model.key_offset": True, "model.xsa": "tanh"}),
])
def test_flex_attention_equals_the_dense_band(recipe, over):
    """model.attn_kernel = flex (torch's flex_attention on a block mask) gives the dense-mask
    attention's output with every feature that touches attention (XSA, IHA's interleaved
    positions, the key offset, a window-schedule stage with YaRN, the MTP block). Forward only:
    flex_attention has no backward on CPU (a GPU run checks it: benchmarks/gpu_session.sh)."""
    from slowrun.config import build_config

    base = {"model.vocab_size": 50, "model.n_layer": 4, "model.n_embd": 32, "model.n_head": 2, "model.seq_len": 16,
            "model.short_window": 5, "model.dropout": 0.0, "model.loop_start": -1, "model.stoch_depth": 0.0, **over}
    torch.manual_seed(0)
    dense = GPT(build_config(recipe, {**base, "model.attn_kernel": "sdpa"}).model).eval()
    flex = GPT(build_config(recipe, {**base, "model.attn_kernel": "flex"}).model).eval()
    flex.load_state_dict(dense.state_dict())
    if dense.window_stage >= 0:
        dense.set_window_stage(0)
        flex.set_window_stage(0)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = dense.hidden(idx), flex.hidden(idx)
        assert any(k[0] == "flex" for k in flex.attn_masks) and all(k[0] == "dense" for k in dense.attn_masks)
        assert torch.allclose(a, b, atol=1e-5)
        if dense.mtp_block is not None:
            assert torch.allclose(dense.mtp_hidden(a, idx, idx), flex.mtp_hidden(b, idx, idx), atol=1e-5)


def test_window_pattern_per_layer_and_wide_window_is_full_causal():
    windows = lambda m: [b.attn.window for b in m.blocks]
    assert windows(model_of(n_layer=6, window_pattern="SSSL")) == [8, 8, 8, -1, 8, -1]  # last block always full
    assert windows(model_of(window_pattern="SSSL", short_window=5)) == [5, 5, 5, -1]
    assert windows(model_of()) == [-1, -1, -1, -1] and windows(model_of(window_pattern="L")) == [-1] * 4
    x, _ = batch()
    wide = model_of(window_pattern="S", short_window=16)  # the masked path, with a band as wide as T
    assert wide.blocks[0].attn.window == 16
    with torch.no_grad():
        assert torch.allclose(wide(x)[0], model_of()(x)[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["fixed", "learnable"])
def test_xsa_against_a_direct_computation(kind):
    m = plain_attention_model(xsa=kind, window_pattern="S", short_window=5)
    attn = m.blocks[0].attn
    gate = torch.ones(2)
    if kind == "learnable":
        assert torch.equal(attn.xsa_gate, torch.ones(2))  # starts as fixed XSA
        with torch.no_grad():
            attn.xsa_gate.copy_(torch.tensor([0.3, -1.2]))
        gate = attn.xsa_gate.detach()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    rope = (m.rope_cos[:, :16], m.rope_sin[:, :16])
    with torch.no_grad():
        assert torch.allclose(attn(x, x, rope), by_hand_attention(attn, x, rope, window=5, xsa_gate=gate), atol=1e-5)
    assert [b.attn.xsa for b in model_of(xsa="fixed", xsa_layers=1).blocks] == [False, False, False, True]
    assert all(b.attn.xsa_gate is None for b in model_of(xsa="fixed").blocks)


@pytest.mark.parametrize("extra", [{}, dict(window_pattern="SL", short_window=4, xsa="learnable", mtp_weight=0.3)])
def test_iha_at_identity_init_changes_nothing(extra):
    off = model_of(**extra)
    on = model_of(iha=True, **extra)
    missing = on.load_state_dict(off.state_dict(), strict=False).missing_keys
    assert missing and all(".attn.iha_" in n for n in missing)
    a = on.blocks[0].attn
    assert torch.equal(a.iha_q[:, :, 0], torch.eye(2)) and torch.equal(a.iha_out, torch.ones(2, 1))
    x, y = batch()
    with torch.no_grad():
        (lo, loss_off), (ln, loss_on) = off(x, y), on(x, y)
    assert torch.allclose(lo, ln, atol=1e-6, rtol=0) and loss_off.item() == pytest.approx(loss_on.item(), abs=1e-6)
    with torch.no_grad():
        assert torch.allclose(on.hidden(x), off.hidden(x), atol=1e-6, rtol=0)  # hidden states are O(1)
    with torch.no_grad():
        a.iha_q[0, 1, 0] = 0.5  # a head mixed into another: a different model
        assert (on.hidden(x) - off.hidden(x)).abs().max().item() > 1e-3  # vs <= 1e-6 at identity


def test_iha_pseudo_heads_against_a_direct_computation():
    """P = 2 (the reference's): pseudo-head p of head h is sum_m q_m * iha_q[m, h, p], interleaved into the
    sequence at position t*P + p; attention over the 2T positions; outputs collapsed by iha_out."""
    m = plain_attention_model(iha=True, iha_pseudo=2, qk_norm=False)
    attn = m.blocks[0].attn
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in (attn.iha_q, attn.iha_k, attn.iha_v, attn.iha_out):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 16, 32, generator=g)
    rope = (m.rope_cos[:, :32], m.rope_sin[:, :32])
    H, D, P, T = 2, 16, 2, 16
    with torch.no_grad():
        q, k, v = attn.c_attn(x).view(1, T, 3, H, D).unbind(2)
        expand = lambda z, mix: torch.stack([sum(z[:, :, m_] * mix[m_, h, p] for m_ in range(H))
                                             for p in range(P) for h in range(H)], 2).view(1, T * P, H, D)
        qe, ke, ve = expand(q, attn.iha_q), expand(k, attn.iha_k), expand(v, attn.iha_v)
        qe, ke = apply_rotary(qe, *rope), apply_rotary(ke, *rope)
        ye = F.scaled_dot_product_attention(qe.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), is_causal=True)
        ye = ye.transpose(1, 2).reshape(1, T, P, H, D)
        y = sum(ye[:, :, p] * attn.iha_out[:, p].view(H, 1) for p in range(P))
        assert torch.allclose(attn(x, x, rope), attn.c_proj(y.reshape(1, T, H * D)), atol=1e-5)


@pytest.mark.parametrize("flag", [dict(window_pattern="SSSL", short_window=4), dict(xsa="fixed"),
                                  dict(xsa="learnable"), dict(iha=True), dict(iha=True, iha_pseudo=2)])
def test_attention_features_train_a_few_steps(flag):
    cfg = build_config("slowrun", {"model.vocab_size": V, "model.depth": -1, "model.seq_len": 16, "model.n_layer": 2,
                                   "model.n_head": 2, "model.n_embd": 32, "model.dropout": 0.0,
                                   **{f"model.{k}": v for k, v in flag.items()}})
    torch.manual_seed(0)
    m = GPT(cfg.model)
    opts = build_optimizers(m, cfg.optim)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = batch()
    losses = []
    for _ in range(4):
        _, loss = m(x, y, return_logits=False)
        losses.append(loss.item())
        opts.zero_grad()
        loss.backward()
        opts.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    new = [n for n in before if ("iha_" in n or "xsa_gate" in n)]
    assert all(not torch.equal(before[n], dict(m.named_parameters())[n]) for n in new)  # the new parameters learn


def test_compile_traces_the_fused_loss_into_the_graph():
    """Under torch.compile the fused, chunked output layer is traced into the model's graph (no
    graph break: its chunk loop is unrolled), with the eager loss and gradients."""
    m = model_of().train()
    x, y = batch()
    compiled, graphs = compile_counting_graphs(m)
    _, loss = compiled(x, y, return_logits=False)
    grads = torch.autograd.grad(loss, [m.wte.weight, m.blocks[0].attn.c_attn.weight])
    _, ref = m(x, y, return_logits=False)
    ref_grads = torch.autograd.grad(ref, [m.wte.weight, m.blocks[0].attn.c_attn.weight])
    assert torch.allclose(loss, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))
    assert len(graphs) == 1 and "autograd_function_apply" in graphs[0].code  # one graph, the loss inside
    torch._dynamo.reset()


def test_compile_traces_the_fused_distillation_into_the_graph():
    """The fused distillation loss from two teachers under torch.compile: one graph, the eager loss."""
    m, teachers = model_of().train(), [model_of(n_embd=48, n_layer=2).eval(), model_of(logit_softcap=10.0).eval()]
    x, y = batch()
    with torch.no_grad():
        hidden = tuple(t.norm_f(t.hidden(x)) for t in teachers)
    target = DistillTarget(None, 0.5, 1.2, hidden=hidden, head=tuple(t.head_weight.detach() for t in teachers),
                           softcap=tuple(t.cfg.logit_softcap for t in teachers))
    compiled, graphs = compile_counting_graphs(m)
    _, loss = compiled(x, y, return_logits=False, distill=target)
    grad = torch.autograd.grad(loss, m.wte.weight)[0]
    _, ref = m(x, y, return_logits=False, distill=target)
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(grad, torch.autograd.grad(ref, m.wte.weight)[0], atol=1e-6)
    assert len(graphs) == 1 and "autograd_function_apply" in graphs[0].code
    torch._dynamo.reset()


def test_padded_vocabulary_rows_are_never_scored_or_sampled():
    """model.vocab_pad_to: the tables and the head get rows up to a multiple (the reference's 64);
    logits, the fused loss and its gradients are those of the first vocab_size rows only."""
    padded = model_of(vocab_pad_to=64, tie_embeddings=False)
    plain = model_of(tie_embeddings=False)
    rows = -(-V // 64) * 64
    assert rows > V and padded.wte.weight.shape[0] == padded.lm_head.weight.shape[0] == rows == padded.cfg.padded_vocab
    assert plain.wte.weight.shape[0] == V
    with torch.no_grad():
        for (n, p), q in zip(padded.named_parameters(), plain.parameters()):
            p[: q.size(0)].copy_(q) if n in ("wte.weight", "lm_head.weight") else p.copy_(q)
        padded.lm_head.weight[V:] = 100.0  # pad rows that would dominate any softmax they entered
    x, y = batch()
    logits, _ = padded(x)
    assert logits.shape[-1] == V and torch.allclose(logits, plain(x)[0], atol=1e-6)
    _, loss = padded(x, y, return_logits=False)
    _, ref = plain(x, y, return_logits=False)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert padded.lm_head.weight.grad[V:].abs().max() == 0 and padded.wte.weight.grad[V:].abs().max() == 0


def test_params_without_embeddings_leave_out_the_token_table_tied_or_not():
    """The first README run's header said '5,636,554 parameters (5,636,554 without embeddings)'
    for the tied slowrun recipe: the tied token table was counted back in as the head."""
    tied, untied = model_of("slowrun", tie_embeddings=True), model_of("slowrun", tie_embeddings=False)
    table = tied.wte.weight.numel()
    assert tied.wpe is None and all(b.attn.v_embed is None for b in tied.blocks)  # the token table is its only table
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - table
    assert untied.num_params() == tied.num_params() + table  # the untied head: a matrix of the table's shape
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - table  # the head counts, the table not
