"""The reference benchmark's tracks as recipes: each builds at full size (on the meta device)
with the reference's parameter count less its vocabulary padding, and trains 3 steps scaled
down on CPU through the same trainer."""

import math

import pytest
import torch

from slowrun.config import build_config
from slowrun.gpt import GPT
from slowrun.train import train

# the reference's counts (its trainers, vocabulary padded to 50304: wte and lm_head carry
# 47 extra rows each, as ours with model.vocab_pad_to = 64) and the record each recipe follows
REFERENCE = {
    "limited": (1_443_722_775, 1792),  # 1-hour record #20 (3.195)
    "two_hour": (1_443_722_775, 1792),  # 2-hour record #6 (3.139)
    "unlimited": (1_870_172_811, 2048),  # unlimited record #11 (3.001), one member
    "tiny": (316_935_848, 1024),  # tiny record PR #99 (3.295) without MG, recurrence, offset MTP
}


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_reference_recipe_at_full_size_has_the_reference_parameter_count(recipe):
    cfg = build_config(recipe, {"model.vocab_size": 50257})
    with torch.device("meta"):
        model = GPT(cfg.model)
    reference, width = REFERENCE[recipe]
    assert model.num_params() == reference  # to the parameter, with the vocabulary padded to 50,304 as the reference
    assert model.wte.weight.shape == (50304, width) and model.head_weight.shape == (50257, width)


def test_reference_recipes_follow_the_records_step_counts():
    steps = {r: build_config(r).train.max_steps for r in REFERENCE}
    assert steps == {"limited": 2097, "two_hour": 4194, "unlimited": 6100, "tiny": 2850}
    # round(epochs * tokens per epoch / batch) with the reference's disjoint 2049-token chunks
    for recipe, per_rank in (("limited", 4), ("two_hour", 4), ("tiny", 32)):
        cfg = build_config(recipe)
        seqs = 100_000_000 // 2049 // (8 * per_rank) * (8 * per_rank)
        assert cfg.train.max_steps == round(cfg.train.epochs * seqs * 2048 / cfg.train.batch_tokens)


SCALED_DOWN = {"model.n_layer": 4, "model.n_embd": 64, "model.n_head": 2, "model.seq_len": 32, "model.short_window": 8,
               "model.loop_start": 2, "model.loop_end": 2, "model.loop_from_epoch": 0, "train.batch_tokens": 1024,
               "train.micro_batch_tokens": 512, "train.max_steps": 3, "train.compile": False, "train.dtype": "fp32",
               "train.epoch_snapshots": 0, "eval.max_tokens": 512, "eval.reference_batch": -1}


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_reference_recipe_trains_three_steps_scaled_down(recipe, bpe_ds, tmp_path):
    over = dict(SCALED_DOWN, **{"data.path": str(bpe_ds)})
    full = build_config(recipe).model
    if full.loop_start < 0:
        over = {k: v for k, v in over.items() if not k.startswith("model.loop")}
    if full.window_schedule:  # the same stages with windows for 32-token sequences
        over["model.window_schedule"] = "1-6:4,8;7-13:8,16;14-22:12,32"
    result = train(build_config(recipe, over), tmp_path / recipe, echo=False)
    assert result["steps"] == 3 and math.isfinite(result["val_loss"])
    assert result["config"]["model"]["n_layer"] == 4 and result["config"]["train"]["batch_tokens"] == 1024


@pytest.mark.parametrize("recipe,per_rank", [("limited", 4), ("two_hour", 4), ("tiny", 32)])
def test_epoch_snapshots_fall_on_the_reference_steps_at_the_cycle_lows(recipe, per_rank):
    """The reference's loader keeps len // 2049 chunks rounded down to its device batch x 8 ranks
    and detects an epoch's end after the first optimizer step whose micro-batches (plus the one it
    prefetches) reach past it; ours, with data.chunking = disjoint, ends the epoch on that step.
    The snapshots (the last train.epoch_snapshots epoch ends) then follow the last update of an
    SWA cycle (1-hour and 2-hour: LR at the 0.05 floor), as the reference's do."""
    from slowrun.loader import epoch_seqs
    from slowrun.schedules import Schedule

    cfg = build_config(recipe)
    n_tokens, T, B = 100_000_000, 2048, cfg.train.batch_tokens // 2048
    ref_loader_steps = n_tokens // (T + 1) // (per_rank * 8)  # its DataLoader.num_steps per epoch
    accum = cfg.train.batch_tokens // (per_rank * 8 * T)
    S = epoch_seqs(n_tokens, T, cfg.data.chunking, cfg.data.epoch_multiple)
    assert S == ref_loader_steps * per_rank * 8
    epochs = round(cfg.train.epochs)
    ours = [math.ceil(k * S / B) for k in range(1, epochs + 1)]  # the step on which our loader rolls over
    theirs = [next(s for s in range(1, 10**5) if 1 + accum * s >= k * ref_loader_steps + 1) for k in range(1, epochs + 1)]
    assert ours == theirs
    snaps = ours[-cfg.train.epoch_snapshots:]
    sched = Schedule(cfg.train.max_steps, S / B, cfg.optim)
    if cfg.optim.swa_epochs:  # the 1-hour and 2-hour tracks: the reference's LR (its loop) at each snapshot's last update
        N = cfg.train.max_steps
        spe, start = N / epochs, N - cfg.optim.swa_epochs * N / epochs
        for s in snaps[-cfg.optim.swa_epochs:]:
            it = s - 1
            W = round(cfg.optim.warmdown_frac * N)
            power = 0.5 if cfg.optim.warmdown_shape == "sqrt" else 1.0  # its WARMDOWN_POWER (tiny: linear)
            lrm = 1.0 if it <= N - W else ((N - it) / W) ** power
            pos = (it - start) % spe
            ref_lr = 0.05 + (max(lrm, 0.05) - 0.05) * (1 + math.cos(math.pi * pos / spe)) / 2
            assert sched.lr(it) == pytest.approx(ref_lr, abs=1e-12)
            assert ref_lr < 0.06  # at the cycle's floor
        # the windows at a stride of 2048 ended each of these epochs later, after the cycle restarted (1-hour:
        # LR 0.95x and 0.67x of the peak at epochs 9 and 10; tiny: 0.49x, 0.32x, 0.16x at epochs 12-14)
        stride = epoch_seqs(n_tokens, T, "stride")
        late = [math.ceil(k * stride / B) - 1 for k in range(epochs - cfg.optim.swa_epochs + 1, epochs)]
        assert all(sched.lr(it) > 0.15 for it in late)
