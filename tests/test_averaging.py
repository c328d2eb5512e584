"""EMA (bias-corrected, updated every k steps) and the streamed parameter average."""

import pytest
import torch

from slowrun.averaging import EMA, average_weights


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_ema_is_bias_corrected():
    m = _model(4.0)
    ema = EMA(m, decay=0.9)
    ema.update(m, step=1)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((2, 2), 4.0))  # not pulled towards zero
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m, step=2)
    # weights 0.1 * 0.9 and 0.1 on 4 and 2, normalized by 1 - 0.9^2
    expected = (0.09 * 4.0 + 0.1 * 2.0) / (1 - 0.81)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((2, 2), expected))


def test_ema_every_k_steps_counts_k_decays():
    m = _model(1.0)
    ema = EMA(m, decay=0.9, every=2)
    ema.update(m, step=1)
    assert ema.weight == 0.0  # skipped: not a multiple of every
    ema.update(m, step=2)
    assert ema.weight == pytest.approx(1 - 0.9**2)


def test_ema_raw_state_round_trip():
    m = _model(3.0)
    a = EMA(m, decay=0.5)
    a.update(m, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    a.update(m, 2)
    b = EMA(m, decay=0.5)
    b.load_raw_state(a.raw_state())
    assert b.weight == a.weight and torch.equal(b.state_dict()["weight"], a.state_dict()["weight"])


def test_average_weights(tmp_path):
    states = {"a": {"w": torch.tensor([1.0, 2.0])}, "b": {"w": torch.tensor([3.0, 6.0])}}
    assert torch.equal(average_weights(["a", "b"], states.__getitem__)["w"], torch.tensor([2.0, 4.0]))
    states["c"] = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="shapes differ"):
        average_weights(["a", "c"], states.__getitem__)
