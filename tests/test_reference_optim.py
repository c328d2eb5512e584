"""The reference benchmark's optimizer and schedule choices, behind optim.* flags: values at the
steps its spec names (/work/logs/spec_two_hour_unlimited.md A4/A5, spec_limited_tiny.md 1.4/1.5,
2.4/2.5) and hand computations of each Muon/AdamW variant on small matrices."""

import math

import pytest
import torch

from slowrun.averaging import EMA
from slowrun.config import OptimConfig, build_config
from slowrun.gpt import GPT
from slowrun.optim import AdamW, Muon, build_optimizers, muon_chunks, orthogonalize, scalar_part_rules
from slowrun.schedules import Schedule

# ---------------------------------------------------------------------------------------
# schedules


def _reference(N: int, epochs: int, swa: int, warmdown_ratio: float, power: float, hold=0.4, low=0.65, high=1.5):
    """The reference's get_lr_multiplier / SWA overlay / get_wd_multiplier, as the spec quotes them."""
    spe = N / epochs
    start = N - swa * spe
    warmdown = round(warmdown_ratio * N)

    def lr(it):
        lrm = 1.0 if it <= N - warmdown else ((N - it) / warmdown) ** power
        if it >= start:
            lrm = 0.05 + (max(lrm, 0.05) - 0.05) * (1 + math.cos(math.pi * ((it - start) % spe) / spe)) / 2
        return lrm

    def wd(it):
        if it >= start:
            return low + (high - low) * ((it - start) % spe) / spe
        t = it / N
        return 1.0 if t < hold else 1 - (1 - low) * min(1.0, max(0.0, (t - hold) / (start / N - hold)))

    return lr, wd


def _overlay(**kw) -> OptimConfig:
    base = dict(swa_mode="overlay", swa_floor=0.05, warmdown_shape="sqrt", min_lr_frac=0.0, warmup_steps=0,
                wd_shape="sawtooth", wd_hold_frac=0.4, wd_swa_low=0.65, wd_swa_high=1.5)
    return OptimConfig(**(base | kw))


# two-hour track (A5): N = 4194, 22 epochs, SWA over the last 8, warmdown 0.2 sqrt, floor 0.05
TWO_HOUR = {  # it: (lrm, wd mult)
    0: (1.0, 1.0), 1677: (1.0, 1.0), 1678: (1.0, 0.99986), 2479: (1.0, 0.71705), 2668: (1.0, 0.65032),
    2669: (1.0, 0.65041), 2859: (0.05002, 1.49757), 2860: (0.99999, 0.65203), 3050: (0.05000, 1.4992),
    3240: (0.05004, 1.4964), 3355: (0.37971, 1.15911), 3356: (0.37207, 1.16357), 3431: (0.05001, 1.498),
    3432: (0.95299, 0.652), 3622: (0.05000, None), 3623: (0.82492, None), 3774: (0.11471, 1.32732),
    3812: (0.05002, None), 3813: (0.67388, None), 4003: (0.05000, None), 4004: (0.47587, None), 4193: (0.05000, 1.49554),
}


@pytest.mark.parametrize("steps_per_epoch", [4194 / 22, 48828 / 256])  # the reference's, and our loader's
def test_two_hour_overlay_schedule_matches_the_spec_table(steps_per_epoch):
    s = Schedule(4194, steps_per_epoch, _overlay(swa_epochs=8, warmdown_frac=0.2))
    for it, (lrm, wdm) in TWO_HOUR.items():
        assert s.lr(it) == pytest.approx(lrm, abs=1e-4), it
        if wdm is not None:
            assert s.wd(it) == pytest.approx(wdm, abs=1e-4 if len(str(wdm)) > 6 else 1e-3), it
    lr, wd = _reference(4194, 22, 8, 0.2, 0.5)
    assert all(s.lr(it) == pytest.approx(lr(it), abs=1e-12) and s.wd(it) == pytest.approx(wd(it), abs=1e-12)
               for it in range(4194))
    # SWA snapshots at the cycle ends = the epoch ends (after updates 2860, 3050, 3241, ...)
    ends = [it for it in range(4194) if s.cycle_end(it) is not None]
    assert ends == [2859, 3050, 3240, 3431, 3622, 3812, 4003, 4193]
    assert [s.cycle_end(it) for it in ends] == list(range(8))
    assert s.momentum(0) == 0.85 and s.momentum(150) == pytest.approx(0.90) and s.momentum(4193) == 0.95


# 1-hour (limited) track (1.5): N = 2097, 11 epochs, SWA over the last 3
LIMITED = {0: (1, 1.0), 838: (1, 1.0), 839: (1, 0.9999), 1144: (1, 0.8444), 1525: (1, 0.6500), 1526: (0.9999, 0.6541),
           1621: (0.5204, 1.0776), 1678: (0.1389, 1.332), 1679: (0.1343, 1.336), 1716: (0.9536, 0.6512),
           1887: (0.0666, 1.4137), 1907: (0.6734, 0.6528), 2000: (0.2715, 1.0675), 2096: (0.0500, 1.4955)}


def test_limited_overlay_schedule_matches_the_spec_table():
    s = Schedule(2097, 48828 / 256, _overlay(swa_epochs=3, warmdown_frac=0.2))
    for it, (lrm, wdm) in LIMITED.items():
        assert s.lr(it) == pytest.approx(lrm, abs=1e-4), it
        assert s.wd(it) == pytest.approx(wdm, abs=1e-4 if len(str(wdm)) > 5 else 1e-3), it
    lr, wd = _reference(2097, 11, 3, 0.2, 0.5)
    assert all(s.lr(it) == pytest.approx(lr(it), abs=1e-12) and s.wd(it) == pytest.approx(wd(it), abs=1e-12)
               for it in range(2097))
    assert [it for it in range(2097) if s.cycle_end(it) is not None] == [1715, 1906, 2096]


# tiny track (2.5): N = 2850, 15 epochs of 190 steps, SWA over the last 4, linear warmdown 0.4,
# WD through [0, 380, 1520, 2850] -> [0.8, 0.8, 0.1, 0.93] (base 0.8)
TINY = {0: (1.0, 0.800), 300: (1.0, 0.800), 380: (1.0, 0.800), 940: (1.0, 0.456), 950: (1.0, 0.450), 1520: (1.0, 0.100),
        1710: (1.0, 0.219), 1881: (0.85, 0.325), 1995: (0.75, 0.396), 2090: (0.667, 0.456), 2185: (0.317, 0.515),
        2280: (0.500, 0.574), 2470: (0.333, 0.693), 2849: (0.050, 0.929)}


def test_tiny_overlay_schedule_and_weight_decay_points():
    cfg = _overlay(swa_epochs=4, warmdown_frac=0.4, warmdown_shape="linear", wd_shape="points",
                   wd_points=[[0, 1], [0.1333, 1], [0.5333, 0.125], [1, 1.1625]])
    s = Schedule(2850, 190.0, cfg)
    for it, (lrm, wd) in TINY.items():
        assert s.lr(it) == pytest.approx(lrm, abs=5e-4), it
        assert 0.8 * s.wd(it) == pytest.approx(wd, abs=5e-4), it
    assert [s.wd(it) for it in (0, 380, 1520, 2850)] == [1.0, 1.0, 0.125, 1.1625]  # the points, exactly
    assert s.wd(950) == pytest.approx(1 + (0.125 - 1) * 570 / 1140)  # np.interp between steps 380 and 1520
    assert s.lr(1710) == 1.0 and s.lr(1711) == pytest.approx(1139 / 1140)  # flat through it = N - W
    assert [it for it in range(2850) if s.cycle_end(it) is not None] == [2279, 2469, 2659, 2849]


def test_overlay_without_swa_cycles_and_sawtooth_without_swa():
    """swa_epochs = 0: overlay has no cycles (today's warmdown); sawtooth falls to wd_swa_low at the end."""
    s = Schedule(100, 10.0, _overlay(swa_epochs=0, warmdown_frac=0.2))
    assert not s.overlay and s.swa_steps == 0
    assert [s.cycle_end(i) for i in range(100)] == [None] * 100
    assert s.wd(39) == 1.0 and s.wd(70) == pytest.approx(1 - 0.35 * 0.5) and s.wd(100) == pytest.approx(0.65)


def test_overlay_momentum_warmdown_over_all_steps():
    s = Schedule(100, 10.0, _overlay(swa_epochs=2, warmdown_frac=0.2, muon_momentum_warmup_steps=0, muon_momentum_end=0.9))
    assert s.momentum(80) == 0.95 and s.momentum(90) == pytest.approx(0.95 - 0.05 * 10 / 20)


def test_overlay_hold_weight_decay_rises_in_cycles():
    s = Schedule(100, 10.0, _overlay(swa_epochs=2, warmdown_frac=0.5, wd_shape="hold", wd_end_frac=0.5))
    assert s.wd(0) == 1.0 and s.wd(50) == 1.0 and s.wd(70) == pytest.approx(1 - 0.5 * 20 / 50)
    assert s.wd(80) == pytest.approx(1.0) and s.wd(85) == pytest.approx(1.5) and s.wd(99) > 1.9


# ---------------------------------------------------------------------------------------
# optimizer groups


def _smoke(**optim):
    cfg = build_config("smoke", {"model.vocab_size": 64, **{f"optim.{k}": v for k, v in optim.items()}})
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


def _where(opts, model):
    """name -> (optimizer class, group) for every parameter."""
    out = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for opt in opts.optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                out[ids[id(p)]] = (type(opt), g)
    return out


def test_defaults_keep_todays_groups():
    model, cfg = _smoke()
    opts = build_optimizers(model, cfg.optim)
    where = _where(opts, model)
    assert sorted({g["kind"] for g in opts.groups()}) == ["embed", "head", "matrix", "scalar"]
    assert sorted(g["chunks"] for g in opts.optimizers[-1].param_groups) == [1, 3]
    assert where["blocks.0.mlp.c_fc.weight"][1]["chunks"] == 1 and muon_chunks("blocks.0.mlp.c_fc.weight") == 1
    for n in ("blocks.0.attn.v_gate.weight", "blocks.0.attn.head_gate.weight", "lambda_r", "lambda_0", "unet_w"):
        assert where[n][0] is AdamW and where[n][1]["kind"] == "scalar" and where[n][1]["base_wd"] == 0
    assert "betas" not in where["lambda_0"][1] or where["lambda_0"][1]["betas"] == (cfg.optim.beta1, cfg.optim.beta2)


@pytest.mark.parametrize("mode,in_muon", [("none", ()), ("value", ("v_gate",)), ("both", ("v_gate", "head_gate"))])
def test_gates_land_in_muon_per_flag(mode, in_muon):
    model, cfg = _smoke(gates_in_muon=mode, weight_decay=1.3)
    where = _where(build_optimizers(model, cfg.optim), model)
    gates = [n for n in where if n.endswith("gate.weight")]
    assert gates
    for n in gates:
        opt, g = where[n]
        if n.split(".")[-2] in in_muon:
            assert opt is Muon and g["kind"] == "matrix" and g["base_wd"] == 1.3 and g["base_lr"] == cfg.optim.matrix_lr
        else:
            assert opt is AdamW and g["kind"] == "scalar" and g["base_wd"] == 0
    # with AdamW for everything the gates stay scalars (no weight decay)
    model, cfg = _smoke(gates_in_muon=mode, name="adamw")
    assert all(g["kind"] == "scalar" for n, (_, g) in _where(build_optimizers(model, cfg.optim), model).items()
               if n.endswith("gate.weight"))


def test_resid_and_x0_groups_have_their_rates_and_betas():
    model, cfg = _smoke(scalar_lr=0.025, beta1=0.8, beta2=0.95, resid_lr_frac=0.01, x0_beta1=0.96)
    opts = build_optimizers(model, cfg.optim)
    where = _where(opts, model)
    for n in ("lambda_r", "unet_w"):
        assert where[n][1]["kind"] == "resid" and where[n][1]["base_lr"] == pytest.approx(0.00025)
        assert where[n][1]["betas"] == (0.8, 0.95) and where[n][1]["base_wd"] == 0
    x0 = where["lambda_0"][1]
    assert x0["kind"] == "x0" and x0["base_lr"] == pytest.approx(0.025) and x0["betas"] == (0.96, 0.95) and x0["base_wd"] == 0
    assert where["blocks.0.attn.head_gate.weight"][1]["kind"] == "scalar"
    assert where["blocks.0.attn.head_gate.weight"][1]["betas"] == (0.8, 0.95)
    opts.set_schedule(0.5, 1.0)  # the trainer's schedule scales every group from its own peak
    assert where["lambda_r"][1]["lr"] == pytest.approx(0.000125) and x0["lr"] == pytest.approx(0.0125)
    # the x0 group steps as torch's AdamW with its own betas
    lam = dict(model.named_parameters())["lambda_0"]
    ref = torch.nn.Parameter(lam.detach().clone())
    tref = torch.optim.AdamW([ref], lr=0.0125, betas=(0.96, 0.95), eps=cfg.optim.eps, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        g = torch.randn_like(lam)
        lam.grad, ref.grad = g.clone(), g.clone()
        opts.optimizers[0].step()
        tref.step()
    assert torch.allclose(lam, ref, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Muon variants, by hand


def test_swiglu_parts_equal_the_halves_orthogonalized_by_hand():
    model, cfg = _smoke(muon_swiglu_parts=True)
    where = _where(build_optimizers(model, cfg.optim), model)
    assert where["blocks.0.mlp.c_fc.weight"][1]["chunks"] == 2 and muon_chunks("blocks.0.mlp.c_fc.weight", True) == 2
    assert where["blocks.0.attn.c_attn.weight"][1]["chunks"] == 3
    torch.manual_seed(0)
    Hd, C = 48, 16
    W = torch.nn.Parameter(torch.zeros(2 * Hd, C))
    opt = Muon([dict(params=[W], chunks=2)], lr=0.1, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    g = torch.randn(2 * Hd, C)
    g[Hd:] *= 50  # a joint orthogonalization would drown the gate half
    W.grad = g
    opt.step()
    scale = math.sqrt(Hd / C)  # each half's own shape scale (the whole: sqrt(2*Hd/C))
    for half, gh in zip(W.detach().split(Hd), g.split(Hd)):
        expected = -0.1 * scale * orthogonalize(gh, 5, "quintic", 1e-7, torch.float32)
        assert torch.allclose(half, expected, atol=1e-5)


def test_normuon_column_statistics_on_a_wide_matrix_by_hand():
    torch.manual_seed(0)
    beta2, rows, cols = 0.95, 8, 24
    W = torch.nn.Parameter(torch.zeros(rows, cols))
    opt = Muon([W], lr=1.0, momentum=0.0, nesterov=False, normuon=True, normuon_beta2=beta2, normuon_wide="column",
               ns_dtype=torch.float32)
    v = torch.zeros(1, cols)
    for _ in range(3):
        before = W.detach().clone()
        g = torch.randn(rows, cols) * torch.linspace(0.1, 3, cols)  # columns of very different size
        W.grad = g
        opt.step()
        O = orthogonalize(g, 5, "quintic", 1e-7, torch.float32)
        v = beta2 * v + (1 - beta2) * O.square().mean(0, keepdim=True)  # per column
        step = O / v.clamp_min(1e-10).sqrt()
        expected = step * (O.norm() / step.norm())  # Frobenius norm kept
        assert torch.allclose(before - W.detach(), expected, atol=1e-5)
    assert tuple(opt.state[W]["col_sq"].shape) == (1, 1, cols) and "row_sq" not in opt.state[W]


def test_normuon_column_mode_is_per_row_on_tall_parts_with_a_norm_per_part():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(96, 16))  # 3 tall parts of 32 x 16
    opt = Muon([dict(params=[W], chunks=3)], lr=1.0, momentum=0.0, nesterov=False, normuon=True, normuon_beta2=0.5,
               normuon_wide="column", ns_dtype=torch.float32)
    g = torch.randn(96, 16)
    W.grad = g
    opt.step()
    scale = math.sqrt(32 / 16)
    for part, gp in zip((-W.detach() / scale).split(32), g.split(32)):
        O = orthogonalize(gp, 5, "quintic", 1e-7, torch.float32)
        step = O / (0.5 * O.square().mean(1, keepdim=True)).sqrt()
        assert torch.allclose(part, step * (O.norm() / step.norm()), atol=1e-5)
    assert tuple(opt.state[W]["row_sq"].shape) == (3, 32, 1)


def test_cautious_decay_in_muon_only_at_the_scaled_rate():
    model, cfg = _smoke(cautious_wd=True, cautious_wd_scope="muon")
    opts = build_optimizers(model, cfg.optim)
    adam, muon = opts.optimizers
    assert adam.defaults["cautious_wd"] is False and muon.defaults["scaled_wd"] and muon.defaults["cautious_wd"]
    model, cfg = _smoke(cautious_wd=True)  # scope all: today's
    adam, muon = build_optimizers(model, cfg.optim).optimizers
    assert adam.defaults["cautious_wd"] and muon.defaults["cautious_wd"] and not muon.defaults["scaled_wd"]

    torch.manual_seed(0)
    lr, wd = 0.1, 0.5
    W = torch.nn.Parameter(torch.randn(12, 4))  # tall: lr_t = lr * sqrt(3)
    p0 = W.detach().clone()
    opt = Muon([W], lr=lr, momentum=0.0, nesterov=False, weight_decay=wd, cautious_wd=True, scaled_wd=True,
               ns_dtype=torch.float32)
    g = torch.randn(12, 4)
    W.grad = g
    opt.step()
    O = orthogonalize(g, 5, "quintic", 1e-7, torch.float32)
    lr_t = lr * math.sqrt(3)
    mask = (O * p0 >= 0).float()
    assert 0 < mask.mean() < 1
    assert torch.allclose(W.detach(), p0 - lr_t * O - lr_t * wd * p0 * mask, atol=1e-6)


# ---------------------------------------------------------------------------------------
# resume


REFERENCE_FLAGS = dict(muon_swiglu_parts=True, normuon=True, normuon_wide="column", gates_in_muon="both",
                       resid_lr_frac=0.01, x0_beta1=0.96, cautious_wd=True, cautious_wd_scope="muon", weight_decay=1.3)


def _train(model, opts, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() + p.square().sum() for p in model.parameters())
        loss.backward()
        opts.step()
        opts.zero_grad()


def test_optimizer_state_round_trips_through_a_checkpoint_with_the_new_groups(tmp_path):
    from slowrun.checkpoint import load_checkpoint, save_checkpoint

    model, cfg = _smoke(**REFERENCE_FLAGS)
    opts = build_optimizers(model, cfg.optim)
    assert {g["kind"] for g in opts.groups()} >= {"resid", "x0", "matrix"}
    _train(model, opts, 0, 3)
    path = save_checkpoint(tmp_path, 3, cfg, model.state_dict(), opts.state_dict(), {})
    _train(model, opts, 3, 6)  # straight through

    ck = load_checkpoint(path)
    resumed, _ = _smoke(**REFERENCE_FLAGS)
    resumed.load_state_dict(ck.model)
    ropts = build_optimizers(resumed, cfg.optim)
    ropts.load_state_dict(ck.optimizer_states(len(ropts.optimizers)))
    _train(resumed, ropts, 3, 6)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    muon = ropts.optimizers[-1]
    assert any("col_sq" in muon.state[p] for g in muon.param_groups for p in g["params"])  # the wide matrices' stats came back


# ---------------------------------------------------------------------------------------
# head-gate and XSA betas (the tiny track's attn_gate (0.9, 0.99) and xsa (0.9, 0.95) groups)


def _gated(xsa="tanh", **optim):
    cfg = build_config("smoke", {"model.vocab_size": 64, "model.xsa": xsa, "optim.scalar_lr": 0.2, "optim.beta1": 0.8,
                                 "optim.beta2": 0.95, **{f"optim.{k}": v for k, v in optim.items()}})
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


def test_head_gate_and_xsa_groups_have_their_betas_and_step_as_torch_adamw():
    model, cfg = _gated(head_gate_betas=[0.9, 0.99], xsa_betas=[0.9, 0.95])
    opts = build_optimizers(model, cfg.optim)
    where = _where(opts, model)
    scalar_lr = where["lambda_0"][1]["base_lr"]
    gates = [n for n in where if n.endswith("head_gate.weight")]
    xsa = [n for n in where if n.endswith("xsa_alpha")]
    assert len(gates) == len(xsa) == cfg.model.n_layer
    for names, kind, betas in ((gates, "head_gate", (0.9, 0.99)), (xsa, "xsa", (0.9, 0.95))):
        for n in names:
            opt, g = where[n]
            assert opt is AdamW and g["kind"] == kind and g["betas"] == betas
            assert g["base_lr"] == scalar_lr and g["base_wd"] == 0
    for n in ("lambda_0", "blocks.0.attn.v_gate.weight"):
        assert where[n][1]["kind"] == "scalar" and where[n][1]["betas"] == (0.8, 0.95)
    opts.set_schedule(0.5, 1.0)
    # each group steps as torch's AdamW with its own betas
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ours = [dict(model.named_parameters())[n] for n in (gates[0], xsa[0])]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    trefs = [torch.optim.AdamW([r], lr=0.1, betas=b, eps=cfg.optim.eps, weight_decay=0.0)
             for r, b in zip(refs, ((0.9, 0.99), (0.9, 0.95)))]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(ours, refs):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        opts.optimizers[0].step()
        for t in trefs:
            t.step()
    for p, r in zip(ours, refs):
        assert torch.allclose(p, r, atol=1e-7)


def test_head_gate_and_xsa_betas_apply_where_those_parameters_are():
    model, cfg = _gated(xsa="learnable", xsa_betas=[0.9, 0.95])
    where = _where(build_optimizers(model, cfg.optim), model)
    assert where["blocks.1.attn.xsa_gate"][1]["kind"] == "xsa" and where["blocks.1.attn.xsa_gate"][1]["betas"] == (0.9, 0.95)
    assert where["blocks.1.attn.head_gate.weight"][1]["kind"] == "scalar"  # head_gate_betas unset
    # gates in Muon: no head-gate AdamW group
    model, cfg = _gated(head_gate_betas=[0.9, 0.99], gates_in_muon="both")
    opts = build_optimizers(model, cfg.optim)
    assert "head_gate" not in {g["kind"] for g in opts.groups()}
    assert _where(opts, model)["blocks.0.attn.head_gate.weight"][0] is Muon
    # unset: today's single scalar group, XSA scales included
    model, cfg = _gated()
    opts = build_optimizers(model, cfg.optim)
    assert sorted({g["kind"] for g in opts.groups()}) == ["embed", "head", "matrix", "scalar"]
    assert scalar_part_rules(cfg.optim) == {}


# ---------------------------------------------------------------------------------------
# EMA from a start step (the unlimited track: from the weights at 90% of the run, no bias correction)


def _lin(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        m.weight.copy_(value * torch.arange(6.0).view(2, 3) + 1)
    return m


def test_ema_started_at_step_k_equals_a_hand_lerp_from_the_step_k_weights():
    m = _lin(0.0)
    ema = EMA(m, decay=0.9, every=2, start=5)
    weights = {}
    for step in range(1, 13):
        with torch.no_grad():
            m.weight.copy_(_lin(float(step)).weight)
        weights[step] = m.weight.detach().clone()
        ema.update(m, step)
        if step < 6:  # before the start (and step 5 is no update step): nothing averaged
            assert not ema.started and torch.equal(ema.shadow["weight"], torch.zeros(2, 3))
        if step == 8:
            resumed = EMA(_lin(0.0), decay=0.9, every=2, start=5)
            resumed.load_raw_state({k: v.clone() for k, v in ema.raw_state().items()})
    d = 0.9**2  # per update
    e = weights[6]  # the first update at or after step 5: the weights themselves
    for step in (8, 10, 12):
        e = e + (1 - d) * (weights[step] - e)
    assert torch.allclose(ema.state_dict()["weight"], e, atol=1e-6) and ema.weight == 1.0
    for step in (10, 12):  # a resume mid-way continues exactly
        with torch.no_grad():
            m.weight.copy_(weights[step])
        resumed.update(m, step)
    assert torch.equal(resumed.state_dict()["weight"], ema.state_dict()["weight"])


def test_trainer_starts_the_ema_at_its_fraction_and_resumes_it_exactly(bpe_ds, tmp_path):
    import shutil

    from slowrun.checkpoint import list_checkpoints, load_checkpoint, read_weights
    from slowrun.train import train
    from tests.conftest import smoke_config

    over = {"train.max_steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 8, "eval.max_tokens": 512,
            "optim.ema_decay": 0.9, "optim.ema_every": 2, "optim.ema_start_frac": 0.5}
    run = tmp_path / "run"
    train(smoke_config(bpe_ds, **over), run, echo=False)
    cks = {int(p.name.split("_")[1]): p for p in list_checkpoints(run)}
    assert {2, 4, 6, 8} <= set(cks)
    assert load_checkpoint(cks[2]).ema()["__weight__"].item() == 0.0  # step 2 < round(0.5 * 8): not started
    w = {s: load_checkpoint(cks[s]).model for s in (4, 6, 8)}
    d = 0.9**2
    ema, _, _ = read_weights(run / "ema.safetensors")
    for k, v in ema.items():  # from the step-4 weights, then two updates
        e = w[4][k].float()
        for s in (6, 8):
            e = e + (1 - d) * (w[s][k].float() - e)
        assert torch.allclose(v.float(), e, atol=1e-6), k
    for at in (2, 6):  # resumed before and after the start: the same EMA
        again = tmp_path / f"from{at}"
        shutil.copytree(run, again)
        (again / "result.json").unlink()
        for s, p in cks.items():
            if s > at:
                shutil.rmtree(again / p.relative_to(run))
        train(None, again, resume=True, echo=False)
        assert "resumed from" in (again / "log.txt").read_text()
        got, _, _ = read_weights(again / "ema.safetensors")
        for k in ema:
            assert torch.equal(got[k], ema[k]), (at, k)
