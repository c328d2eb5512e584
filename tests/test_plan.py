import json

import pytest
import torch

from slowrun.averaging import EMA
from slowrun.cli import main
from slowrun.config import build_config
from slowrun.gpt import GPT
from slowrun.optim import build_optimizers
from slowrun.plan import (activation_bytes_per_token, autocast_copy_bytes, median_step_s, meta_model, plan,
                          state_bytes)

V = 97
SMALL = {"model.vocab_size": V, "model.depth": -1, "model.seq_len": 64, "model.n_layer": 4, "model.n_head": 4,
         "model.n_embd": 64, "train.batch_tokens": 512}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("recipe,over", [("slowrun", {}), ("slowrun", {"optim.normuon": True, "optim.ema_decay": 0.99}),
                                         ("baseline", {"optim.name": "adamw"}), ("nanochat", {"model.mtp_weight": 0.3})])
def test_state_memory_equals_the_bytes_held_after_a_real_step(recipe, over):
    cfg = build_config(recipe, {**SMALL, **over})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizers(model, cfg.optim, torch.device("cpu"))
    ema = EMA(model, cfg.optim.ema_decay, 1) if cfg.optim.ema_decay > 0 else None
    x = torch.randint(0, V, (2, 64))
    _, loss = model(x, x, return_logits=False)
    loss.backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    if ema is not None:
        ema.update(model, 1)
    held = {
        "weights": sum(nbytes(p) for p in model.parameters()),
        "gradients": sum(nbytes(p.grad) for p in model.parameters()),
        "optimizer": sum(nbytes(v) for o in opt.optimizers for st in o.state.values() for v in st.values()
                         if isinstance(v, torch.Tensor)),
        "ema": sum(nbytes(v) for v in ema.shadow.values()) if ema is not None else 0,
    }
    est = state_bytes(meta_model(cfg), cfg)
    assert est == held  # exact: tolerance 0 bytes
    p = plan(recipe, {**SMALL, **over}, train_tokens=100_000)
    assert p.params == model.num_params() and p.flops_per_token == model.flops_per_token()
    assert p.non_embedding_params == model.num_params(exclude_embeddings=True)
    assert {k: p.memory_bytes[k] for k in held} == held


def saved_activation_bytes(model: GPT, x: torch.Tensor, bf16: bool) -> int:
    """Bytes of the unique non-parameter storages the forward of `hidden` saves for backward."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.hidden(x)
    return sum(seen.values())


@pytest.mark.parametrize("recipe", ["slowrun", "baseline", "nanochat"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_estimate_is_near_the_bytes_autograd_saves(recipe, dtype):
    cfg = build_config(recipe, {**SMALL, "train.dtype": dtype})
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    x = torch.randint(0, V, (8, 64))
    measured = saved_activation_bytes(model, x, dtype == "bf16")
    est = activation_bytes_per_token(cfg, "cpu") * x.numel() + autocast_copy_bytes(model, cfg)
    assert abs(est - measured) <= 0.15 * measured, (est, measured)


def test_meta_model_costs_no_memory():
    cfg = build_config("slowrun", {"model.vocab_size": 50257, "model.depth": -1, "model.n_layer": 30, "model.n_embd": 1792, "model.n_head": 14})
    m = meta_model(cfg)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.num_params() > 1.3e9


def test_plan_cli_and_wall_time_from_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": 1, "step_s": 9.0}, {"kind": "eval", "step": 1},
            {"kind": "train", "step": 2, "step_s": 0.5}, {"kind": "train", "step": 3, "step_s": 0.7},
            {"kind": "train", "step": 4, "step_s": 0.6}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert median_step_s(run) == 0.6  # the first step (compilation) is left out
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    assert main(["plan", "slowrun", *sets, "--set", "train.epochs=2", "--train-tokens", "10k", "--gpus", "2",
                 "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 39  # ceil(2 epochs * ((10000 - 1) // 64 sequences) / 8 sequences per step)
    assert out["wall_s"] == pytest.approx(out["steps"] * 0.6)
    assert out["memory_bytes"]["allreduce_buffer"] == out["memory_bytes"]["gradients"]
    assert main(["plan", "slowrun", *sets]) == 0
    assert "memory per rank" in capsys.readouterr().out


def test_plan_refuses_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "slowrun", "plan", "slowrun", "--gpus", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--gpus 3" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "slowrun", "plan", "slowrun", "--run", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


@pytest.mark.parametrize("step_s", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_step_time_that_is_not_a_positive_number_is_refused(step_s):
    """--step-s nan printed a wall time of 0m00s."""
    from slowrun.plan import PlanError

    with pytest.raises(PlanError, match=f"--step-s: must be a finite number > 0, got {step_s}"):
        plan("smoke", step_s=step_s)
