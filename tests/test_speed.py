"""The throughput benchmark times the trainer's own step, not a copy of it."""

import pytest

from slowrun import speed, train


def test_recipes_are_timed_through_the_trainer(bpe_ds, monkeypatch):
    fitted = []
    real_fit = train.fit

    def spy(run):
        fitted.append(run.total_steps)
        return real_fit(run)

    assert speed.fit is train.fit  # the trainer's own loop
    monkeypatch.setattr(speed, "fit", spy)
    row = speed.measure_one("smoke", "fp32", 3, 1, str(bpe_ds), [])
    assert fitted == [4]  # warmup + timed steps, run by train.fit
    assert row["step_s_median"] > 0 and row["tokens_per_s"] == pytest.approx(1024 / row["step_s_median"], rel=1e-3)
    assert row["batch_tokens"] == 1024 and row["params"] > 0


def test_the_minimal_loop_runs_at_the_baseline_size(bpe_ds):
    row = speed.measure_one("minimal", "fp32", 1, 0, str(bpe_ds), ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2",
                                                                 "--train.batch_tokens=1024", "--model.seq_len=64"])
    assert row["recipe"] == "minimal" and row["step_s_median"] > 0
