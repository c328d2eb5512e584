"""Schedules: pure functions of the step. Learning rate, weight decay and Muon momentum.

The run is split into a main phase and, optionally, SWA cycles or snapshot cycles:

    main phase      warmup (linear) -> flat -> warmdown over the last `warmdown_frac` of the
                    main phase (linear, sqrt or cosine) to `min_lr_frac`
    SWA cycles      the last `swa_epochs` epochs each run a short cosine from `swa_peak_frac`
                    to `min_lr_frac * swa_peak_frac`; their end checkpoints are averaged
    snapshot cycles the whole run is N cosine cycles (1 -> min_lr_frac); each end is a member

Weight decay (`wd_shape = "hold"`) is held, lowered with the LR over the warmdown to
`wd_end_frac`, and during SWA cycles raised against the falling LR (from `wd_swa_frac` to
twice that at a cycle's end); `wd_shape = "cosine"` decays it from 1 to 0 over the whole run
(nanochat). Muon momentum ramps from `muon_momentum_start` to `muon_momentum` over
`muon_momentum_warmup_steps`, then optionally down to `muon_momentum_end` over the warmdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OptimConfig


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: float  # optimizer steps per pass over the training split
    cfg: OptimConfig
    snapshot_cycles: int = 0

    @property
    def swa_steps(self) -> int:
        if self.cfg.swa_epochs <= 0 or self.snapshot_cycles:
            return 0
        return min(self.total_steps - 1, round(self.cfg.swa_epochs * self.steps_per_epoch))

    @property
    def main_steps(self) -> int:
        return self.total_steps - self.swa_steps

    def _decay(self, frac: float) -> float:
        """Fraction of the way from peak (0) to min (1) -> LR multiplier."""
        shape, lo = self.cfg.warmdown_shape, self.cfg.min_lr_frac
        if shape == "linear":
            w = 1 - frac
        elif shape == "sqrt":
            w = math.sqrt(1 - frac)  # the reference's limited-track shape: 0.71 at the midpoint
        else:
            w = 0.5 * (1 + math.cos(math.pi * frac))
        return lo + (1 - lo) * w

    def _cycle(self, step: int) -> tuple[int, float] | None:
        """(cycle index, progress in (0, 1]) of a step inside the SWA / snapshot cycles."""
        if self.snapshot_cycles:
            start, length, n = 0, self.total_steps / self.snapshot_cycles, self.snapshot_cycles
        elif self.swa_steps and step >= self.main_steps:
            start, length, n = self.main_steps, self.swa_steps / self.cfg.swa_epochs, self.cfg.swa_epochs
        else:
            return None
        k = min(int((step - start) // length), n - 1)
        return k, min(1.0, (step + 1 - start - k * length) / length)

    def lr(self, step: int) -> float:
        """LR multiplier of the peak for the update made at `step` (0-based)."""
        c = self.cfg
        cyc = self._cycle(step)
        if cyc is not None:
            peak = 1.0 if self.snapshot_cycles else c.swa_peak_frac
            lo = c.min_lr_frac * peak
            return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * cyc[1]))
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        warmdown = round(c.warmdown_frac * self.main_steps)
        start = self.main_steps - warmdown
        if warmdown == 0 or step < start:
            return 1.0
        return self._decay((step - start + 1) / warmdown)

    def _warmdown_progress(self, step: int) -> float | None:
        """Progress in (0, 1] of a main-phase step inside the LR warmdown; None outside it."""
        warmdown = round(self.cfg.warmdown_frac * self.main_steps)
        start = self.main_steps - warmdown
        if warmdown == 0 or step < start or step >= self.main_steps or self.snapshot_cycles:
            return None
        return (step - start + 1) / warmdown

    def wd(self, step: int) -> float:
        """Weight-decay multiplier of `optim.weight_decay` at `step`."""
        c = self.cfg
        if c.wd_shape == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / self.total_steps))
        cyc = self._cycle(step)
        if cyc is not None and not self.snapshot_cycles:
            _, t = cyc
            return c.wd_swa_frac * (1.0 + (1 - 0.5 * (1 + math.cos(math.pi * t))))
        warmdown = round(c.warmdown_frac * self.main_steps)
        start = self.main_steps - warmdown
        if warmdown == 0 or step < start or cyc is not None:
            return 1.0
        frac = (step - start + 1) / warmdown
        return 1.0 + (c.wd_end_frac - 1.0) * frac

    def momentum(self, step: int) -> float:
        """Muon momentum at `step`; the warmup ramp takes precedence over the warmdown one (as nanochat)."""
        c = self.cfg
        if step < c.muon_momentum_warmup_steps:
            frac = step / c.muon_momentum_warmup_steps
            return c.muon_momentum_start + (c.muon_momentum - c.muon_momentum_start) * frac
        down = self._warmdown_progress(step) if c.muon_momentum_end != -1 else None
        if down is not None:
            return c.muon_momentum + (c.muon_momentum_end - c.muon_momentum) * down
        return c.muon_momentum

    def cycle_end(self, step: int) -> int | None:
        """If `step` is the last step of an SWA/snapshot cycle, that cycle's index."""
        here, nxt = self._cycle(step), (self._cycle(step + 1) if step + 1 < self.total_steps else None)
        if here is None:
            return None
        if nxt is None or nxt[0] != here[0]:
            return here[0]
        return None
