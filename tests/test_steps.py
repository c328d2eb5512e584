"""Batch and step arithmetic: `step_plan` against numbers worked by hand, and `slowrun plan`
reporting the steps the trainer takes (with and without a fitness slice, on 1, 2 and 4 ranks)."""

import json

import pytest

from slowrun import distributed
from slowrun.config import ConfigError, build_config
from slowrun.plan import plan
from slowrun.steps import epoch_seqs, step_plan, trained_tokens
from slowrun.train import setup, train
from tests.conftest import smoke_config


def cfg_of(**over):
    base = {"model.vocab_size": 97, "model.seq_len": 32, "train.batch_tokens": 1024, "train.max_steps": -1,
            "train.epochs": 2.0}
    return build_config("smoke", {**base, **over})


def test_step_plan_by_hand():
    # 1024 tokens a step = 32 sequences of 32; 2 ranks: 16 each, in micro-batches of 256 tokens = 8: 2 of them
    s = step_plan(cfg_of(**{"train.micro_batch_tokens": 256, "data.fitness_tokens": 2_000}), 40_000, world_size=2)
    assert (s.tokens_per_step, s.seqs_per_step, s.rank_seqs, s.micro_seqs, s.accum, s.micro_tokens) == (1024, 32, 16, 8, 2, 256)
    assert s.train_tokens == 38_000  # the last 2,000 of 40,000 are the fitness slice
    assert s.seqs_per_epoch == 1187  # stride: (38,000 - 1) // 32
    assert s.steps_per_epoch == 1187 / 32 and s.total_steps == 75  # ceil(2 x 37.09375)
    assert s.epochs == 75 * 1024 / 38_000
    # disjoint chunks of 33, a multiple of 32 kept: 38,000 // 33 = 1,151 -> 1,120 = 35 steps an epoch
    d = step_plan(cfg_of(**{"data.fitness_tokens": 2_000, "data.chunking": "disjoint", "data.epoch_multiple": 32}), 40_000)
    assert (d.seqs_per_epoch, d.steps_per_epoch, d.total_steps, d.accum) == (1120, 35.0, 70, 1)
    assert step_plan(cfg_of(**{"train.max_steps": 7}), 40_000).total_steps == 7  # max_steps wins over epochs
    assert step_plan(cfg_of(**{"train.epochs": 0.001}), 40_000).total_steps == 1  # never 0
    assert epoch_seqs(100, 32) == 3 and epoch_seqs(100, 32, "disjoint", 2) == 2 and trained_tokens(100, 0) == 100


@pytest.mark.parametrize("over, ranks, message", [
    ({}, 3, "train.batch_tokens: 32 sequences per step do not split over 3 ranks"),
    ({"train.micro_batch_tokens": 96}, 2, "train.micro_batch_tokens: 16 sequences per rank are not a multiple of 3"),
    ({"train.batch_tokens": 1000}, 1, "train.batch_tokens: must be a multiple of model.seq_len=32"),
    ({"data.fitness_tokens": 20_000}, 1, "data.fitness_tokens=20,000 would take half or more of the 40,000"),
    ({"train.batch_tokens": 65_536}, 1, r"holds 1249 sequences of 32, fewer than one batch \(2048\)"),
])
def test_step_plan_refusals_name_the_option(over, ranks, message):
    with pytest.raises(ConfigError, match=message):
        step_plan(cfg_of(**over), 40_000, ranks)


# the smoke recipe for a quarter epoch of bpe_ds (40,000 training tokens): 10 steps of 32 sequences;
# with 19,000 tokens held out as the fitness slice 6 (the plan said 10 before it subtracted them)
QUARTER = {"train.max_steps": -1, "train.epochs": 0.25, "train.micro_batch_tokens": 128, "eval.at_epoch_end": False,
           "model.tie_embeddings": True}


@pytest.mark.parametrize("fitness, steps", [(0, 10), (19_000, 6)])
def test_plan_reports_the_steps_a_real_run_takes(bpe_ds, tmp_path, fitness, steps):
    """Trained for real on one rank: the steps `slowrun plan` reports are the steps run. The tied
    model's log header counts its parameters without the token table (it once said 'N parameters
    (N without embeddings)')."""
    over = {**QUARTER, "data.fitness_tokens": fitness}
    p = plan("smoke", over, data=str(bpe_ds), device="cpu")
    result = train(smoke_config(bpe_ds, **over), tmp_path / "run", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert p.steps == result["steps"] == len([r for r in rows if r["kind"] == "train"]) == steps
    assert p.train_tokens == result["unique_tokens"] == 40_000 - fitness and p.epochs == result["epochs"]
    header = next(line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if line.startswith("# model:"))
    assert f"{p.params:,} parameters ({p.non_embedding_params:,} without embeddings)" in header
    assert p.params - p.non_embedding_params == 512 * 32  # tied: the token table (vocabulary 512, width 32)


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("fitness", [0, 19_000])
def test_plan_and_trainer_setup_agree_on_several_ranks(bpe_ds, tmp_path, ranks, fitness):
    """Rank 0 of `ranks`, set up by the trainer (no process group: setup communicates only with
    the default dataset or a curriculum): its steps, schedule and micro-batches are the plan's,
    and the batch its loader serves is the plan's micro-batches of the plan's size."""
    over = {**QUARTER, "data.fitness_tokens": fitness}
    p = plan("smoke", over, gpus=ranks, data=str(bpe_ds), device="cpu")
    run = setup(smoke_config(bpe_ds, **over), tmp_path / "run", resume=False, force=False, echo=False,
                env=distributed.DistEnv(rank=0, world_size=ranks))
    try:
        T = run.cfg.model.seq_len
        x, _ = run.loader.next_batch()
        assert (run.total_steps, run.sched.total_steps) == (p.steps, p.steps)
        assert (run.accum, run.micro_seqs * T) == (p.accum, p.micro_batch_tokens) == (32 // 4 // ranks, 128)
        assert x.shape == (p.accum * p.micro_batch_tokens // T, T)
        assert run.loader.num_tokens == p.train_tokens == 40_000 - fitness
        assert run.sched.steps_per_epoch == run.loader.seqs_per_epoch / (p.batch_tokens // T)  # the loader's epoch
    finally:
        run.log.close()
