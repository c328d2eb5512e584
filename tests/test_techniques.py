"""The technique registry: the optimizer's groups and the ablation list come from it, unchanged.

Every recipe's model (at a small size) has each parameter in the group, with the learning rate,
weight decay, betas and Muon parts, that optim.py's rules gave before the registry (kept below, as
they were, as the oracle, for the parameters the models had then); a parameter no declaration claims
is an error naming it; the ablation list is the one ablate.py spelled out before (and the switches
added since); every key and name pattern of the registry is used.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from torch import nn

from slowrun import ablate, optim, techniques
from slowrun.config import SECTIONS, build_config
from slowrun.gpt import GPT
from slowrun.techniques import BASE, TECHNIQUES, Params, Technique, TechniqueError, claim

RECIPES = sorted(p.stem for p in (Path(optim.__file__).parent / "recipes").glob("*.toml"))
SMALL = {"model.vocab_size": 100, "model.depth": -1, "model.n_layer": 4, "model.n_embd": 64, "model.n_head": 2,
         "model.seq_len": 32}
# parameters no shipped recipe makes: learnable XSA's scales, IHA's output weights (the recipes mix the values
# after the value projection, which has none)
VARIANTS = {"slowrun": [{"model.xsa": "learnable"}, {"model.iha": True, "model.iha_pseudo": 2}]}


def small(recipe: str, **over):
    """The recipe at 4 blocks of width 64 (its looped span, windows and window schedule scaled to it)."""
    full = build_config(recipe)
    o = dict(SMALL)
    if full.model.loop_start >= 0:
        o.update({"model.loop_start": 2, "model.loop_end": 2, "model.loop_from_epoch": 0})
    if full.model.window_pattern:
        o["model.short_window"] = 8
    if full.model.window_schedule:
        o["model.window_schedule"] = "1-6:4,8;7-13:8,16;14-22:12,32"
    return build_config(recipe, {**o, **over})


# ---------------------------------------------------------------------------------------
# optim.py's grouping rules before the registry (issue 33, item 5), as they were: the oracle


# every parameter the models had before the registry (full names or dotted endings): a parameter added
# since had no place under the old rules to compare with
OLD_PARAMS = ("wte.weight", "wpe.weight", "lm_head.weight", "lambda_r", "lambda_0", "unet_w", "mtp_proj.weight",
              "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "attn.c_attn.bias",
              "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias", "ln.weight", "ln.bias", "attn.v_x0.weight",
              "attn.v_embed.weight", "attn.v_gate.weight", "attn.head_gate.weight", "attn.xsa_gate", "attn.xsa_alpha",
              "attn.iha_q", "attn.iha_k", "attn.iha_v", "attn.iha_out")


def old_group_of(name, p, gates_in_muon="none"):
    value_gates, head_gates = ("v_gate.weight",), ("head_gate.weight",)
    gates = {"none": (), "value": value_gates, "both": value_gates + head_gates}[gates_in_muon]
    if name.endswith(gates) and p.ndim == 2:
        return "matrix"
    if name in ("wte.weight", "wpe.weight") or name.endswith("attn.v_embed.weight"):
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if name.endswith(("attn.iha_q", "attn.iha_k", "attn.iha_v", "attn.iha_out")):
        return "iha"
    if p.ndim < 2 or name.endswith("gate.weight") or name in ("lambda_r", "lambda_0", "unet_w"):
        return "scalar"
    return "matrix"


def old_scalar_parts(plist, cfg):
    names = {"resid": ("lambda_r", "unet_w"), "x0": ("lambda_0",), "head_gate": ("head_gate.weight",),
             "xsa": ("attn.xsa_gate", "attn.xsa_alpha")}
    on = {"resid": cfg.resid_lr_frac != 1.0, "x0": cfg.x0_beta1 != -1, "head_gate": bool(cfg.head_gate_betas),
          "xsa": bool(cfg.xsa_betas)}
    rules = {k: v for k, v in names.items() if on[k]}
    parts = {"scalar": [], **{k: [] for k in rules}}
    for name, p in plist:
        part = next((k for k, ns in rules.items() if name in ns or name.endswith(tuple("." + n for n in ns))), "scalar")
        parts[part].append(p)
    return {k: v for k, v in parts.items() if v}


def layout(model, cfg) -> dict[str, tuple]:
    """Each parameter's place in the built optimizers: (optimizer, group index, kind, base lr, base wd,
    betas, Muon parts)."""
    opts = optim.build_optimizers(model, cfg.optim)
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for i, opt in enumerate(opts.optimizers):
        for j, g in enumerate(opt.param_groups):
            for p in g["params"]:
                out[ids[id(p)]] = (i, type(opt).__name__, j, g["kind"], g["base_lr"], g["base_wd"], g.get("betas"),
                                   g.get("chunks"))
    assert len(out) == len(ids)
    return out


def configs():
    for recipe in RECIPES:
        yield recipe, small(recipe)
        yield f"{recipe} adamw", small(recipe, **{"optim.name": "adamw"})
        for over in VARIANTS.get(recipe, []):
            yield f"{recipe} {over}", small(recipe, **over)


@pytest.mark.parametrize("label,cfg", [pytest.param(label, cfg, id=label) for label, cfg in configs()])
def test_every_parameter_lands_where_the_old_rules_put_it(label, cfg, monkeypatch):
    model = GPT(cfg.model)
    now = layout(model, cfg)
    monkeypatch.setattr(optim, "group_of", old_group_of)
    monkeypatch.setattr(optim, "scalar_parts", old_scalar_parts)
    before = layout(model, cfg)
    assert now.keys() == before.keys()
    old = [n for n in now if any(techniques.matches(o, n) for o in OLD_PARAMS)]
    assert old
    for name in old:
        assert now[name] == before[name], (label, name)


def test_a_parameter_no_technique_claims_is_an_error_naming_it(monkeypatch):
    cfg = small("smoke")
    model = GPT(cfg.model)
    model.blocks[1].attn.extra = nn.Linear(4, 4, bias=False)  # a new module, declared nowhere
    with pytest.raises(TechniqueError, match=r"parameter blocks\.1\.attn\.extra\.weight: no technique claims it"):
        optim.build_optimizers(model, cfg.optim)
    # declared by its technique, it lands in its group
    extra = Technique("extra", "an extra matrix", ("model.n_embd",), (Params(("attn.extra.weight",), "matrix"),))
    monkeypatch.setattr(techniques, "TECHNIQUES", TECHNIQUES + (extra,))
    assert "blocks.1.attn.extra.weight" in [n for n, _ in optim.split_params(model)["matrix"]]
    # claimed twice: both named
    twice = Technique("twice", "x0 again", ("model.x0_mix",), (Params(("lambda_0",), "scalar"),))
    monkeypatch.setattr(techniques, "TECHNIQUES", TECHNIQUES + (twice,))
    with pytest.raises(TechniqueError, match="parameter lambda_0: claimed by x0_mix_unet and twice"):
        claim("lambda_0")
    # a matrix must be 2-D (Muon takes nothing else)
    scalar = Technique("scalar", "a vector", ("model.n_embd",), (Params(("attn.vec",), "matrix"),))
    monkeypatch.setattr(techniques, "TECHNIQUES", TECHNIQUES + (scalar,))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.vec: declared a matrix .* shape \(4,\)"):
        optim.group_of("blocks.0.attn.vec", nn.Parameter(model.lambda_0.new_zeros(4)))


# ablate.py's list as it was before the registry: name, what off means, the overrides on ON (every switch
# on). The names and overrides are the keys of the ablation results already made: they never change; a
# switch added since is added here
ABLATIONS = [
    ("doc_shuffle", "no per-epoch document shuffle", {"data.doc_shuffle": False}),
    ("seq_shuffle", "no sequence shuffle within epochs", {"data.seq_shuffle": False}),
    ("multi_epoch", "one epoch instead of several (and no SWA cycles, which need epochs)",
     {"train.epochs": 1.0, "optim.swa_epochs": 0}),
    ("untied", "tied input embedding and output head", {"model.tie_embeddings": True}),
    ("embed_norm", "no RMSNorm after the embedding lookup", {"model.embed_norm": False}),
    ("qk_norm", "no QK-norm", {"model.qk_norm": False}),
    ("rope", "learned absolute positions instead of RoPE", {"model.pos": "learned"}),
    ("swiglu", "ReLU^2 MLP (4x, nanochat's) instead of SwiGLU", {"model.mlp": "relu2"}),
    ("value_proj", "no value projections from x0", {"model.value_proj": False}),
    ("head_gate", "no attention head gates", {"model.head_gate": False}),
    ("x0_mix", "no residual / x0 mixing", {"model.x0_mix": False}),
    ("unet", "no U-Net skips", {"model.unet": False}),
    ("softcap", "no logit softcap", {"model.logit_softcap": -1.0}),
    ("dropout", "no dropout", {"model.dropout": 0.0}),
    ("stoch_depth", "no stochastic depth", {"model.stoch_depth": 0.0}),
    ("layer_loop", "no layer looping", {"model.loop_start": -1}),
    ("mtp", "no multi-token prediction", {"model.mtp_weight": 0.0}),
    ("sliding_window", "full attention in every block", {"model.window_pattern": ""}),
    ("xsa", "no exclusive self attention", {"model.xsa": "off"}),
    ("iha", "no interleaved head attention", {"model.iha": False}),
    ("muon", "AdamW (lr 0.002) for the hidden matrices instead of Muon",
     {"optim.name": "adamw", "optim.lr": 0.002, "optim.embed_lr": 0.008, "optim.head_lr": 0.008, "optim.scalar_lr": 0.008}),
    ("muon_eq_r", "no MuonEq-R", {"optim.muon_eq_r": False}),
    ("normuon", "no NorMuon", {"optim.normuon": False}),
    ("cautious_wd", "plain decoupled weight decay", {"optim.cautious_wd": False}),
    ("heavy_wd", "standard weight decay 0.1", {"optim.weight_decay": 0.1}),
    ("wd_schedule", "weight decay held (no lowering, no SWA sawtooth)", {"optim.wd_end_frac": 1.0, "optim.wd_swa_frac": 1.0}),
    ("ema", "no EMA of the weights", {"optim.ema_decay": -1.0}),
    ("swa", "no SWA cycles", {"optim.swa_epochs": 0}),
]
ON = {"model.stoch_depth": 0.05, "model.loop_start": 1, "model.loop_end": 2, "model.loop_repeats": 2,
      "model.mtp_weight": 0.3, "model.window_pattern": "SL", "model.xsa": "fixed", "model.iha": True,
      "optim.muon_eq_r": True, "optim.normuon": True, "optim.cautious_wd": True, "optim.wd_end_frac": 0.5,
      "model.tie_embeddings": False, "optim.swa_epochs": 2}
# the switches on in each recipe at full size
RECIPE_ON = {
    "baseline": "doc_shuffle seq_shuffle",
    "limited": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap "
               "dropout stoch_depth layer_loop mtp sliding_window iha muon muon_eq_r normuon cautious_wd heavy_wd swa",
    "nanochat": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope softcap muon normuon cautious_wd heavy_wd",
    "nanochat_ref": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope value_proj x0_mix softcap sliding_window muon "
                    "normuon cautious_wd heavy_wd",
    "slowrun": "doc_shuffle seq_shuffle multi_epoch embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap "
               "dropout muon heavy_wd ema",
    "smoke": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap muon ema",
    "tiny": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap dropout "
            "sliding_window xsa muon normuon cautious_wd heavy_wd ema swa",
    "two_hour": "doc_shuffle seq_shuffle untied embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap "
                "dropout stoch_depth layer_loop mtp sliding_window iha muon muon_eq_r normuon cautious_wd heavy_wd swa",
    "unlimited": "seq_shuffle untied embed_norm qk_norm rope swiglu value_proj head_gate x0_mix unet softcap dropout "
                 "layer_loop mtp sliding_window iha muon muon_eq_r normuon cautious_wd heavy_wd ema",
}


def test_the_ablation_list_is_the_one_ablate_had():
    on = build_config("slowrun", ON)
    assert [(t.name, t.what, t.off(on)) for t in ablate.TECHNIQUES] == ABLATIONS
    assert all(t.is_on(on) for t in ablate.TECHNIQUES)
    assert {r: " ".join(t.name for t in ablate.TECHNIQUES if t.is_on(build_config(r))) for r in RECIPE_ON} == RECIPE_ON
    assert next(t for t in ablate.TECHNIQUES if t.name == "muon").off(build_config("tiny")) == {
        "optim.name": "adamw", "optim.lr": 0.002}  # a recipe with its own embed, head and scalar rates keeps them


def test_every_key_of_the_registry_is_a_config_key():
    known = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)}
    for t in (BASE, *TECHNIQUES):
        assert t.keys and set(t.keys) <= known, (t.name, set(t.keys) - known)
        assert len(set(t.keys)) == len(t.keys), t.name
    on = build_config("slowrun", ON)
    assert {k for t in ablate.TECHNIQUES for k in t.off(on)} <= known
    names = [t.name for t in (BASE, *TECHNIQUES)]
    assert len(set(names)) == len(names)


def test_every_pattern_claims_a_parameter_of_some_recipe():
    """No dead pattern: each declared name matches a parameter of some recipe's model (or of a VARIANTS one)."""
    params = {n for _, cfg in configs() for n, _ in GPT(cfg.model).named_parameters()}
    for t in (BASE, *TECHNIQUES):
        for decl in t.params:
            for pattern in decl.names:
                assert any(techniques.matches(pattern, n) for n in params), (t.name, pattern)
