import math

import pytest

from slowrun.config import OptimConfig
from slowrun.schedules import Schedule


def test_flat_then_linear_warmdown():
    s = Schedule(100, 10.0, OptimConfig(warmdown_frac=0.2, warmdown_shape="linear", min_lr_frac=0.0))
    assert s.lr(0) == 1.0 and s.lr(79) == 1.0
    assert s.lr(80) == pytest.approx(1 - 1 / 20)
    assert s.lr(99) == pytest.approx(0.0)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_warmdown_shapes_end_at_min(shape):
    s = Schedule(50, 5.0, OptimConfig(warmdown_frac=1.0, warmdown_shape=shape, min_lr_frac=0.1))
    assert s.lr(49) == pytest.approx(0.1)
    lrs = [s.lr(i) for i in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    mid = s.lr(24)
    expected = {"linear": 0.1 + 0.9 * (1 - 25 / 50), "sqrt": 0.1 + 0.9 * math.sqrt(1 - 25 / 50),
                "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 50))}[shape]
    assert mid == pytest.approx(expected)


def test_sqrt_warmdown_midpoint_is_the_references():
    """The reference (limited #20) multiplies the LR by sqrt(1 - f) over the warmdown: 0.707 at
    f = 0.5, not 1 - sqrt(0.5) = 0.293; with min_lr_frac it is min + (1 - min) * sqrt(1 - f)."""
    s = Schedule(100, 10.0, OptimConfig(warmdown_frac=0.5, warmdown_shape="sqrt", min_lr_frac=0.0))
    assert s.lr(49) == 1.0
    assert s.lr(74) == pytest.approx(math.sqrt(0.5)) and s.lr(74) == pytest.approx(0.7071, abs=1e-4)
    lo = Schedule(100, 10.0, OptimConfig(warmdown_frac=0.5, warmdown_shape="sqrt", min_lr_frac=0.2))
    assert lo.lr(74) == pytest.approx(0.2 + 0.8 * math.sqrt(0.5)) and lo.lr(99) == pytest.approx(0.2)


def test_warmup():
    s = Schedule(100, 10.0, OptimConfig(warmup_steps=10, warmdown_frac=0.0))
    assert [round(s.lr(i), 2) for i in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]


def test_swa_cycles_and_weight_decay():
    cfg = OptimConfig(warmdown_frac=0.5, swa_epochs=2, swa_peak_frac=0.4, min_lr_frac=0.0, wd_end_frac=0.5, wd_swa_frac=1.0)
    s = Schedule(100, 10.0, cfg)
    assert s.main_steps == 80 and s.swa_steps == 20
    assert s.lr(79) == pytest.approx(0.0)
    # each SWA cycle: a cosine from 0.4 down to 0, ending exactly at the cycle's last step
    assert s.lr(80) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert s.lr(89) == pytest.approx(0.0) and s.lr(99) == pytest.approx(0.0)
    assert [i for i in range(100) if s.cycle_end(i) is not None] == [89, 99]
    # weight decay: held, lowered with the LR to wd_end_frac, raised against the LR in the cycles
    assert s.wd(0) == 1.0 and s.wd(39) == 1.0 and s.wd(79) == pytest.approx(0.5)
    assert s.wd(80) < s.wd(85) < s.wd(89) == pytest.approx(2.0)


def test_snapshot_cycles():
    s = Schedule(90, 10.0, OptimConfig(min_lr_frac=0.0), snapshot_cycles=3)
    assert [i for i in range(90) if s.cycle_end(i) is not None] == [29, 59, 89]
    assert s.lr(0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 30)))
    assert s.lr(30) == s.lr(0) and s.lr(29) == pytest.approx(0.0)


def test_muon_momentum_warmup():
    s = Schedule(1000, 10.0, OptimConfig(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=300))
    assert s.momentum(0) == 0.85 and s.momentum(150) == pytest.approx(0.90) and s.momentum(999) == 0.95


def test_nanochat_schedules():
    """The nanochat recipe's schedules at named steps: warmup 40, warmdown over the last 65% to 5%,
    momentum 0.85 -> 0.97 over 400 steps then -> 0.90 over the warmdown, weight decay cosine to 0."""
    from slowrun.config import build_config

    s = Schedule(1000, 1000.0, build_config("nanochat").optim)
    assert s.lr(0) == pytest.approx(1 / 40) and s.lr(39) == 1.0 and s.lr(349) == 1.0
    assert s.lr(350) == pytest.approx(0.05 + 0.95 * (1 - 1 / 650)) and s.lr(999) == pytest.approx(0.05)
    assert s.momentum(0) == 0.85 and s.momentum(200) == pytest.approx(0.91) and s.momentum(399) < 0.97
    assert s.momentum(400) == pytest.approx(0.97 + (0.90 - 0.97) * 51 / 650)  # past warmup, inside the warmdown
    assert s.momentum(999) == pytest.approx(0.90)
    assert s.wd(0) == 1.0 and s.wd(500) == pytest.approx(0.5) and s.wd(999) == pytest.approx(0.0, abs=1e-4)
    held = Schedule(1000, 1000.0, OptimConfig(warmdown_frac=0.5, muon_momentum_warmup_steps=0))
    assert held.momentum(999) == held.cfg.muon_momentum  # muon_momentum_end = -1: held
