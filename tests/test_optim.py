
import copy

import pytest
import torch

from slowrun.config import OptimConfig, build_config
from slowrun.gpt import GPT
from slowrun.jobs import torchrun
from slowrun.optim import AdamW, Muon, build_optimizers, orthogonalize, split_params


def _spectrum_matrix(shape, lo):
    """A random matrix (batched over leading dims) with singular values log-spaced in [lo, 1]."""
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k))
    s = torch.logspace(torch.log10(torch.tensor(lo)).item(), 0, k)
    return U @ torch.diag_embed(s.expand(*batch, k)) @ V.mT


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (96, 256), (4, 3, 48, 80)])
@pytest.mark.parametrize("coeffs,band", [("quintic", (0.65, 1.25)), ("polar_express", (0.8, 1.2)), ("polar_express_exact", (0.8, 1.2))])
def test_orthogonalize_brings_singular_values_near_one(shape, coeffs, band):
    torch.manual_seed(0)
    for G in (_spectrum_matrix(shape, 1e-2), 3.0 * _spectrum_matrix(shape, 0.3)):
        O = orthogonalize(G, steps=5, coeffs=coeffs, dtype=torch.float32)
        s = torch.linalg.svdvals(O)
        assert s.min() > band[0] and s.max() < band[1], (s.min(), s.max())
        # same singular vectors as G: O = U f(S) V^T, so O^T G (or G O^T) is symmetric
        if len(shape) == 2:
            M = (O.mT @ G) if shape[0] >= shape[1] else (G @ O.mT)
            assert torch.allclose(M, M.mT, atol=1e-3 * M.abs().max())
    if shape[-2] != shape[-1]:  # rectangular Gaussian matrices are well enough conditioned
        s = torch.linalg.svdvals(orthogonalize(torch.randn(*shape), 5, coeffs, dtype=torch.float32))
        assert s.min() > band[0] and s.max() < band[1]


def test_polar_express_is_tighter_than_quintic():
    torch.manual_seed(1)
    G = _spectrum_matrix((128, 256), 1e-2)
    low = {c: torch.linalg.svdvals(orthogonalize(G, 5, c, dtype=torch.float32)).min() for c in ("quintic", "polar_express")}
    assert low["polar_express"] > low["quintic"] + 0.1


def test_muon_matches_torch_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs PyTorch >= 2.9")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(48, 32))
    ref = torch.nn.Parameter(ours.detach().clone())
    a = Muon([ours], lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon([ref], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True)
    for step in range(5):
        g = torch.randn(48, 32)
        ours.grad, ref.grad = g.clone(), g.clone()
        a.step()
        b.step()
        assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5), step


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(3, 3))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [dict(params=ps[:2], lr=1e-2, weight_decay=0.5), dict(params=ps[2:], lr=3e-3, weight_decay=0.0)]
    ours = AdamW(groups(params), betas=(0.8, 0.95), eps=1e-10)
    ref = torch.optim.AdamW(groups(ref_params), betas=(0.8, 0.95), eps=1e-10)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.allclose(p, q, atol=1e-6)


def test_cautious_weight_decay_only_where_signs_agree():
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))
    opt = AdamW([p], lr=0.1, weight_decay=1.0, cautious_wd=True, betas=(0.0, 0.0), eps=1e-12)
    p.grad = torch.tensor([[1.0, -1.0, -1.0, 1.0]])  # update = sign(grad)
    opt.step()
    # entries 0, 1: update and param agree -> decayed by lr*wd*p; entries 2, 3: not decayed
    assert torch.allclose(p.detach(), torch.tensor([[1 - 0.1 - 0.1, -1 + 0.1 + 0.1, 1 + 0.1, -1 - 0.1]]))


@pytest.mark.parametrize("recipe", ["baseline", "slowrun", "smoke", "nanochat"])
def test_every_parameter_in_exactly_one_group(recipe):
    cfg = build_config(recipe, {"model.vocab_size": 300, "model.mtp_weight": 0.3})
    model = GPT(cfg.model)
    groups = split_params(model)
    names = [n for plist in groups.values() for n, _ in plist]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    opts = build_optimizers(model, cfg.optim)
    in_opt = [id(p) for g in opts.groups() for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in model.parameters())
    kinds = {g["kind"] for g in opts.groups()}
    if cfg.optim.name == "muon":
        assert all(isinstance(o, (AdamW, Muon)) for o in opts.optimizers)
        assert all(g["kind"] == "matrix" for g in opts.optimizers[-1].param_groups)
    assert "scalar" in kinds or recipe in ("baseline", "nanochat")
    # no weight decay on scalars, gates and norms
    assert all(g["base_wd"] == 0 for g in opts.groups() if g["kind"] == "scalar")


@pytest.mark.parametrize("flag", [{}, {"muon_eq_r": True}, {"normuon": True}, {"cautious_wd": True},
                                  {"muon_coeffs": "polar_express"}])
def test_muon_variants_reduce_a_loss(flag):
    torch.manual_seed(0)
    target = torch.randn(32, 16)
    W = torch.nn.Parameter(torch.zeros(32, 16))
    cfg = OptimConfig(**flag)
    opt = Muon([W], lr=0.2, momentum=0.9, weight_decay=0.01, eq_r=cfg.muon_eq_r, normuon=cfg.normuon,
               cautious_wd=cfg.cautious_wd, coeffs=cfg.muon_coeffs, ns_dtype=torch.float32)
    losses = []
    for _ in range(60):
        loss = ((W - target) ** 2).mean()
        losses.append(loss.item())
        W.grad = None
        loss.backward()
        opt.step()
    assert min(losses[-5:]) < 0.3 * losses[0], (losses[0], losses[-5:])


def test_fused_matrices_are_orthogonalized_per_part():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(96, 64))
    opt = Muon([dict(params=[W], chunks=3)], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    g = torch.randn(96, 64)
    g[32:64] *= 100  # one part much larger: a joint orthogonalization would drown the others
    W.grad = g
    opt.step()
    for part in W.detach().neg().split(32):
        s = torch.linalg.svdvals(part)
        assert 0.65 < s.min() and s.max() < 1.25


def test_group_learning_rates_scale_with_lr_scale_and_width():
    """nanochat's rates: AdamW groups x (n_embd / 768)^-0.5, Muon's matrices unscaled; lr_scale multiplies all."""
    for width, scale in ((256, 2.0), (768, 1.0)):
        cfg = build_config("nanochat", {"model.vocab_size": 300, "model.depth": -1, "model.n_layer": 1,
                                        "model.n_embd": width, "model.n_head": 4, "optim.lr_scale": scale})
        opts = build_optimizers(GPT(cfg.model), cfg.optim)
        lr = {g["kind"]: g["base_lr"] for g in opts.groups()}
        wd = {g["kind"]: g["base_wd"] for g in opts.groups()}
        w = (width / 768) ** -0.5
        assert lr["matrix"] == pytest.approx(0.02 * scale)
        assert lr["embed"] == pytest.approx(0.3 * w * scale) and lr["head"] == pytest.approx(0.008 * w * scale)
        assert wd == {"matrix": 0.28, "embed": 0.0, "head": 0.0}  # weight decay on Muon's matrices only


def test_iha_parameters_get_their_own_adamw_group():
    """IHA's mixing tensors (3-D: never Muon) are trained by AdamW at optim.iha_lr without weight decay."""
    cfg = build_config("slowrun", {"model.vocab_size": 300, "model.depth": -1, "model.n_layer": 2, "model.n_embd": 32,
                                   "model.n_head": 2, "model.iha": True, "model.iha_pseudo": 2, "model.mtp_weight": 0.3,
                                   "optim.iha_lr": 0.03, "optim.weight_decay": 1.2, "model.xsa": "learnable"})
    model = GPT(cfg.model)
    groups = split_params(model)  # asserts every parameter is in exactly one group
    iha = sorted(n for n, _ in groups["iha"])
    assert iha == sorted(n for n, _ in model.named_parameters() if ".attn.iha_" in n) and len(iha) == 3 * 4  # 2 blocks + MTP
    assert all(n.endswith("xsa_gate") is False for n in iha) and any(n.endswith("xsa_gate") for n, _ in groups["scalar"])
    opts = build_optimizers(model, cfg.optim)
    (g,) = [g for g in opts.groups() if g["kind"] == "iha"]
    assert isinstance(opts.optimizers[0], AdamW) and any(g is h for h in opts.optimizers[0].param_groups)
    assert g["base_lr"] == pytest.approx(0.03) and g["base_wd"] == 0.0 and len(g["params"]) == 12


# ---------------------------------------------------------------------------------------
# heavyball's SOAP, KL-Shampoo and PSGD-Kron for the hidden matrices (the second-order extra)


def _tiny_gpt(matrix_optimizer: str):
    cfg = build_config("smoke", {"model.vocab_size": 64, "optim.matrix_optimizer": matrix_optimizer, "optim.precond_lr": 0.01,
                                 "optim.precondition_frequency": 2, "optim.weight_decay": 0.1})
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


def _least_squares(params, step: int) -> torch.Tensor:
    """sum_W ||W A - B||^2 over the hidden matrices, with (A, B) drawn from the step number."""
    g = torch.Generator().manual_seed(step)
    loss = 0
    for p in params:
        A, B = torch.randn(p.size(1), 3, generator=g), torch.randn(p.size(0), 3, generator=g)
        loss = loss + (p @ A - B).square().sum()
    return loss


def _matrices(model):
    return [p for n, p in split_params(model)["matrix"]]


@pytest.mark.parametrize("name", ["soap", "kl_shampoo", "psgd_kron"])
def test_heavyball_matrix_optimizer_steps_as_heavyball_itself(name):
    heavyball = pytest.importorskip("heavyball")
    from slowrun.optim import HEAVYBALL

    model, cfg = _tiny_gpt(name)
    opts = build_optimizers(model, cfg.optim)
    hb = [o for o in opts.optimizers if type(o).__module__.startswith("heavyball")]
    assert len(hb) == 1 and isinstance(hb[0], getattr(heavyball, HEAVYBALL[name]))
    assert {id(p) for g in hb[0].param_groups for p in g["params"]} == {id(p) for p in _matrices(model)}
    assert all(isinstance(o, AdamW) for o in opts.optimizers if o is not hb[0])  # the rest stays AdamW
    copies = [torch.nn.Parameter(p.detach().clone()) for p in _matrices(model)]
    kw = {} if name == "psgd_kron" else {"precondition_frequency": 2}
    ref = getattr(heavyball, HEAVYBALL[name])(copies, lr=0.01, weight_decay=0.1, **kw)
    for step in range(3):
        _least_squares(_matrices(model), step).backward()
        torch.manual_seed(7 + step)  # a rank's own seed: neither read nor advanced by the heavyball step
        opts.step()
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7 + step)))
        opts.zero_grad()
        _least_squares(copies, step).backward()
        torch.manual_seed(1_000_003 + step)  # PSGD's probe vectors: the draws heavyball_step seeds by its step
        ref.step()
        ref.zero_grad()
        for p, q in zip(_matrices(model), copies):
            assert torch.equal(p, q), (name, step)
    assert all(not torch.equal(p, q) for p, q in zip(_matrices(model), _matrices(_tiny_gpt(name)[0])))  # every matrix moved


@pytest.mark.parametrize("name", ["soap", "kl_shampoo", "psgd_kron"])
def test_heavyball_resume_through_a_checkpoint_is_exact(name, tmp_path):
    pytest.importorskip("heavyball")
    from slowrun.checkpoint import load_checkpoint, save_checkpoint

    def steps(model, opts, start, stop):
        for step in range(start, stop):
            torch.manual_seed(step)  # the trainer's own per-step seeding: heavyball's draws must not depend on it
            _least_squares(_matrices(model), step).backward()
            opts.step()
            opts.zero_grad()

    model, cfg = _tiny_gpt(name)
    opts = build_optimizers(model, cfg.optim)
    steps(model, opts, 0, 3)
    path = save_checkpoint(tmp_path, 3, cfg, model.state_dict(), opts.state_dict(), {})
    steps(model, opts, 3, 6)  # straight through

    ck = load_checkpoint(path)
    resumed, _ = _tiny_gpt(name)
    resumed.load_state_dict(ck.model)
    ropts = build_optimizers(resumed, cfg.optim)
    ropts.load_state_dict(ck.optimizer_states(len(ropts.optimizers)))
    steps(resumed, ropts, 3, 6)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), (name, n)
    assert any(not torch.equal(p, q) for p, q in zip(_matrices(model), _matrices(_tiny_gpt(name)[0])))  # it trained


def test_matrix_optimizer_needs_muon_groups():
    from slowrun.config import ConfigError

    with pytest.raises(ConfigError, match="optim.matrix_optimizer"):
        OptimConfig(name="adamw", matrix_optimizer="soap")
    with pytest.raises(ConfigError, match="optim.matrix_optimizer: must be one of"):
        OptimConfig(matrix_optimizer="shampoo")


@pytest.mark.parametrize("name", ["soap", "psgd_kron"])
def test_heavyball_under_torchrun_two_gloo_ranks_equal_one_process(name, bpe_ds, tmp_path):
    """Each rank steps its own heavyball optimizer on the all-reduced gradients, with the same
    seeded draws: two ranks follow one process (up to the reduction order of the gradients)."""
    pytest.importorskip("heavyball")
    import json
    import os
    import subprocess
    import sys

    common = ["--recipe", "smoke", "--data", str(bpe_ds), "--train.max_steps=4", "--train.batch_tokens=2048",
              "--eval.max_tokens=512", "--quiet", "--train.num_threads=1", f"--optim.matrix_optimizer={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "slowrun", "train", "--run-dir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    assert "Learning rate changed" not in one.stderr  # heavyball's notice of our schedules is not shown
    two = subprocess.run([*torchrun(2), "-m", "slowrun", "train", "--run-dir", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-12000:]

    def losses(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 4 and b == pytest.approx(a, abs=2e-4)
    assert a[-1] < a[0]  # it trains


def test_bf16_params_store_weights_and_adamw_state_in_bf16_and_round_small_updates_away():
    from slowrun.config import build_config
    from slowrun.gpt import GPT
    from slowrun.optim import store_bf16

    cfg = build_config("smoke", {"model.vocab_size": 64, "model.tie_embeddings": False,
                                 "optim.bf16_params": ["embed", "head"]})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    assert sorted(store_bf16(model, cfg.optim)) == ["lm_head.weight", "wte.weight"]
    assert model.wte.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.c_attn.weight.dtype == torch.float32
    opt = build_optimizers(model, cfg.optim)
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)  # an fp32 run: the bf16 tables are cast where they are read
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.bfloat16
    before = model.wte.weight.detach().clone()
    for g in opt.groups():  # a step far below bf16's resolution at these magnitudes (~1e-2 of 1.0)
        g["lr"] = 1e-6
    opt.step()
    st = opt.optimizers[0].state[model.wte.weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(model.wte.weight.detach(), before)  # rounded away, as in the reference
    fp32 = GPT(cfg.model)
    fp32.load_state_dict(model.state_dict())  # a bf16-stored run's weights load into an fp32 model
    assert fp32.wte.weight.dtype == torch.float32 and torch.equal(fp32.wte.weight, before.float())


# ---------------------------------------------------------------------------------------
# the batched steps against the per-parameter loops they replaced (the oracle, kept here as it was)


def _with_grads(opt):
    """(group, parameter, its gradient, its state) for every parameter with a gradient."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p, p.grad, opt.state[p]


@torch.no_grad()
def reference_muon_step(opt: Muon) -> None:
    """Muon's step one parameter at a time, as optim.py had it before the batched step."""
    import math

    for group, p, g, st in _with_grads(opt):
        lr, mom, wd, eps = group["lr"], group["momentum"], group["weight_decay"], group["eps"]
        if not st:
            st["momentum_buffer"] = torch.zeros_like(p)
        buf = st["momentum_buffer"]
        buf.lerp_(g, 1 - mom)
        u = g.lerp(buf, mom) if group["nesterov"] else buf
        k = group["chunks"] if p.size(0) % group["chunks"] == 0 else 1
        u = u.view(k, p.size(0) // k, p.size(1))  # fused matrices: orthogonalize each part
        if group["eq_r"]:
            u = u / u.norm(dim=-1, keepdim=True).clamp(min=eps)
        O = orthogonalize(u, group["ns_steps"], group["coeffs"], eps, group["ns_dtype"])
        if group["normuon"] and group["normuon_wide"] == "column":
            O = _reference_normuon_by_shape(O, st, group["normuon_beta2"])
        elif group["normuon"]:
            if "row_sq" not in st:
                st["row_sq"] = torch.zeros(k, p.size(0) // k, 1, device=p.device, dtype=torch.float32)
            v = st["row_sq"]
            v.lerp_(O.float().square().mean(-1, keepdim=True), 1 - group["normuon_beta2"])
            n0 = O.norm()
            O = O / (v.sqrt() + eps).to(O.dtype)
            O = O * (n0 / O.norm().clamp(min=eps))
        O = O.reshape(p.shape)
        scale = math.sqrt(max(1.0, (p.size(0) / k) / p.size(1)))
        if group["scaled_wd"]:
            lr_t = lr * scale
            mask = (O * p >= 0) if group["cautious_wd"] else 1.0
            p.sub_(O * lr_t + p * mask * (lr_t * wd))
            continue
        if wd != 0:
            if group["cautious_wd"]:
                p.sub_(p * (O * p > 0), alpha=lr * wd)
            else:
                p.mul_(1 - lr * wd)
        p.add_(O, alpha=-lr * scale)


def _reference_normuon_by_shape(O, st, beta2):
    red = -1 if O.size(-2) >= O.size(-1) else -2
    key = "row_sq" if red == -1 else "col_sq"
    Of = O.float()
    if key not in st:
        st[key] = torch.zeros_like(Of.mean(red, keepdim=True))
    v = st[key]
    v.lerp_(Of.square().mean(red, keepdim=True), 1 - beta2)
    scaled = Of * v.clamp_min(1e-10).rsqrt()
    n0, n1 = Of.norm(dim=(-2, -1), keepdim=True), scaled.norm(dim=(-2, -1), keepdim=True)
    return (scaled * (n0 / n1.clamp_min(1e-10))).to(O.dtype)


@torch.no_grad()
def reference_adamw_step(opt: AdamW) -> None:
    """AdamW's step one tensor at a time, as optim.py had it before the foreach step."""
    import math

    for group, p, g, st in _with_grads(opt):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        m, v, t = st["exp_avg"], st["exp_avg_sq"], st["step"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        update = m / denom / (1 - b1**t)
        if wd != 0:
            if group["cautious_wd"]:
                p.sub_(p * (update * p > 0), alpha=lr * wd)
            else:
                p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr)


# several shapes, two of a kind, a fused q/k/v matrix (chunks 3) and one that cannot be split in 3
MUON_SHAPES = ([(48, 16), (16, 48), (16, 16), (48, 16), (16, 48)], [(48, 16), (48, 16), (16, 16)])


def _muon_pair(**kw):
    torch.manual_seed(0)
    plain, fused = ([torch.nn.Parameter(torch.randn(s)) for s in shapes] for shapes in MUON_SHAPES)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in (plain, fused)]
    make = lambda a, b: Muon([dict(params=a), dict(params=b, chunks=3)], lr=0.05, momentum=0.9, weight_decay=0.3,
                             ns_dtype=torch.float32, **kw)
    return make(plain, fused), make(*copies)


def _same_params_and_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, tol: float = 1e-6) -> None:
    for ga, gb in zip(a.param_groups, b.param_groups):
        for p, q in zip(ga["params"], gb["params"]):
            assert torch.allclose(p, q, atol=tol, rtol=0), (p - q).abs().max()
            sa, sb = a.state[p], b.state[q]
            assert sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype, key
                    assert torch.allclose(sa[key], sb[key], atol=tol, rtol=0), (key, (sa[key] - sb[key]).abs().max())
                else:
                    assert sa[key] == sb[key], key


def _random_grads(opt: torch.optim.Optimizer, step: int) -> list[torch.Tensor | None]:
    """A gradient per parameter, drawn from the step; on step 2 the second parameter of each group has none."""
    gen = torch.Generator().manual_seed(100 + step)
    return [None if step == 2 and i == 1 else torch.randn(p.shape, generator=gen)
            for g in opt.param_groups for i, p in enumerate(g["params"])]


def _step_both(batched, oracle, reference_step, steps: range) -> None:
    for step in steps:
        for opt in (batched, oracle):
            params = [p for g in opt.param_groups for p in g["params"]]
            for p, g in zip(params, _random_grads(opt, step)):
                p.grad = g
        batched.step()
        reference_step(oracle)


MUON_VARIANTS = {"plain": dict(nesterov=False), "nesterov": {}, "normuon_row": dict(normuon=True),
                 "normuon_column": dict(normuon=True, normuon_wide="column"), "eq_r": dict(eq_r=True),
                 "cautious_wd": dict(cautious_wd=True), "scaled_cautious_wd": dict(cautious_wd=True, scaled_wd=True),
                 "scaled_wd": dict(scaled_wd=True), "polar_express_exact": dict(coeffs="polar_express_exact"),
                 "all": dict(eq_r=True, normuon=True, normuon_wide="column", cautious_wd=True, scaled_wd=True)}


@pytest.mark.parametrize("variant", MUON_VARIANTS)
def test_batched_muon_step_equals_the_per_parameter_step(variant):
    batched, oracle = _muon_pair(**MUON_VARIANTS[variant])
    _step_both(batched, oracle, reference_muon_step, range(5))
    _same_params_and_state(batched, oracle)
    assert all(p.grad is not None and not torch.equal(p, p.grad) for g in batched.param_groups for p in g["params"])


def _adamw_pair(**kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((5, 7), (7,), (3, 3), (5, 7), (1,))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = lambda ps: AdamW([dict(params=ps[:3], weight_decay=0.5), dict(params=ps[3:], lr=3e-2, weight_decay=0.0)],
                            lr=1e-2, betas=(0.8, 0.95), eps=1e-10, **kw)
    return make(params), make(copies)


@pytest.mark.parametrize("cautious_wd", [False, True])
def test_foreach_adamw_step_equals_the_per_tensor_step(cautious_wd):
    batched, oracle = _adamw_pair(cautious_wd=cautious_wd)
    _step_both(batched, oracle, reference_adamw_step, range(5))
    _same_params_and_state(batched, oracle)
    assert batched.state[batched.param_groups[0]["params"][1]]["step"] == 4  # no gradient on step 2: its count held


@pytest.mark.parametrize("variant", ["normuon_row", "all", "adamw"])
def test_a_per_parameter_state_dict_resumes_in_the_batched_step(variant):
    """A state saved by the per-parameter step (today's checkpoints) loads into the batched
    optimizer, which then steps as the per-parameter one does."""
    if variant == "adamw":
        batched, oracle = _adamw_pair(cautious_wd=True)
        reference = reference_adamw_step
    else:
        batched, oracle = _muon_pair(**MUON_VARIANTS[variant])
        reference = reference_muon_step
    for step in range(3):  # the per-parameter step only, then its state into the batched optimizer
        for p, g in zip([p for g in oracle.param_groups for p in g["params"]], _random_grads(oracle, step)):
            p.grad = g
        reference(oracle)
    with torch.no_grad():
        for p, q in zip([p for g in batched.param_groups for p in g["params"]],
                        [p for g in oracle.param_groups for p in g["params"]]):
            p.copy_(q)
    batched.load_state_dict(copy.deepcopy(oracle.state_dict()))  # as a checkpoint would: no tensor shared
    _same_params_and_state(batched, oracle, tol=0.0)
    _step_both(batched, oracle, reference, range(3, 6))
    _same_params_and_state(batched, oracle)


@pytest.mark.parametrize("flags", [{}, dict(muon_swiglu_parts=True, normuon=True, normuon_wide="column", gates_in_muon="both",
                                           cautious_wd=True, cautious_wd_scope="muon", weight_decay=1.3)])
def test_batched_steps_of_a_smoke_gpts_optimizers_equal_the_per_parameter_steps(flags):
    """The groups build_optimizers makes (fused q/k/v, SwiGLU parts, gates, scalars) through both steps."""
    cfg = build_config("smoke", {"model.vocab_size": 64, **{f"optim.{k}": v for k, v in flags.items()}})
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(GPT(cfg.model))
    batched, oracle = (build_optimizers(m, cfg.optim) for m in models)
    for g in [*batched.groups(), *oracle.groups()]:
        g["ns_dtype"] = torch.float32
    for a, b in zip(batched.optimizers, oracle.optimizers):
        _step_both(a, b, reference_muon_step if isinstance(b, Muon) else reference_adamw_step, range(5))
        _same_params_and_state(a, b)


def test_a_shape_split_over_several_stacks_steps_as_one(monkeypatch):
    """Stacks capped at MAX_STACK_ELEMENTS (here two 48 x 16 matrices: the fused group's three
    take two stacks) step as the per-parameter loop."""
    import slowrun.optim

    monkeypatch.setattr(slowrun.optim, "MAX_STACK_ELEMENTS", 2 * 48 * 16)
    batched, oracle = _muon_pair(**MUON_VARIANTS["all"])
    batched.param_groups[1]["params"].append(torch.nn.Parameter(torch.randn(48, 16)))
    oracle.param_groups[1]["params"].append(torch.nn.Parameter(batched.param_groups[1]["params"][-1].detach().clone()))
    _step_both(batched, oracle, reference_muon_step, range(5))
    _same_params_and_state(batched, oracle)
