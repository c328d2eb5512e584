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
# 47 extra rows each) and the record each recipe follows
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
    assert model.num_params() == reference - 2 * 47 * width


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
