"""Schedules: pure functions of the step. Learning rate, weight decay and Muon momentum.

The run is split into a main phase and, optionally, SWA cycles or snapshot cycles:

    main phase      warmup (linear) -> flat -> warmdown over the last `warmdown_frac` of the
                    main phase (linear, sqrt or cosine) to `min_lr_frac`
    SWA cycles      the last `swa_epochs` epochs each run a short cosine from `swa_peak_frac`
                    to `min_lr_frac * swa_peak_frac`; their end checkpoints are averaged
    snapshot cycles the whole run is N cosine cycles (1 -> min_lr_frac); each end is a member

With `swa_mode = "overlay"` (the reference's) the warmdown runs over all N steps, as the
reference computes it for update `it` (0-based): flat while it <= N - W, then the shape of
(N - it) / W, W = round(warmdown_frac * N). The last `swa_epochs` cycles of spe = N / epochs
steps (fractional; epochs = the run's epochs, rounded) start at N - swa_epochs * spe and lay
a cosine over that envelope: floor + (max(envelope, floor) - floor) * (1 + cos(pi*pos/spe))/2,
pos = (it - start) mod spe, floor = `swa_floor`.

Weight decay (`wd_shape = "hold"`) is held, lowered with the LR over the warmdown to
`wd_end_frac`, and during SWA cycles raised against the falling LR (from `wd_swa_frac` to
twice that at a cycle's end); `wd_shape = "cosine"` decays it from 1 to 0 over the whole run
(nanochat); `sawtooth` (the reference's 1-hour and 2-hour tracks) holds 1 while it/N <
`wd_hold_frac`, falls linearly to `wd_swa_low` at the SWA start (the end without SWA), then
rises linearly from `wd_swa_low` to `wd_swa_high` within each cycle; `points` (the tiny
track's) is piecewise linear through `wd_points`, each fraction of N rounded to a step.
Muon momentum ramps from `muon_momentum_start` to `muon_momentum` over
`muon_momentum_warmup_steps`, then optionally down to `muon_momentum_end` over the warmdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import OptimConfig


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: float  # optimizer steps per pass over the training split
    cfg: OptimConfig
    snapshot_cycles: int = 0

    @property
    def overlay(self) -> bool:
        """SWA cycles laid over the whole run's schedule (optim.swa_mode = overlay)."""
        return self.cfg.swa_mode == "overlay" and self.cfg.swa_epochs > 0 and not self.snapshot_cycles

    @property
    def swa_steps(self) -> int:
        """Steps of the SWA cycles that follow the main phase (swa_mode = after); 0 otherwise."""
        if self.cfg.swa_epochs <= 0 or self.snapshot_cycles or self.overlay:
            return 0
        return min(self.total_steps - 1, round(self.cfg.swa_epochs * self.steps_per_epoch))

    def _swa_window(self) -> tuple[float, float] | None:
        """(first step, steps per cycle) of the SWA cycles, both possibly fractional; None without SWA.
        Overlay: spe = N / epochs (epochs = N / steps_per_epoch rounded), as the reference's."""
        if self.overlay:
            N = self.total_steps
            spe = N / max(1, round(N / self.steps_per_epoch))
            return max(0.0, N - self.cfg.swa_epochs * spe), spe
        if self.swa_steps:
            return self.main_steps, self.swa_steps / self.cfg.swa_epochs
        return None

    def _swa_pos(self, step: int) -> tuple[float, float] | None:
        """(steps since the current SWA cycle began, steps per cycle); None before the SWA start."""
        window = self._swa_window()
        if window is None or step < window[0]:
            return None
        start, spe = window
        return (step - start) % spe, spe

    def _envelope(self, step: int) -> float:
        """Overlay: the warmup / flat / warmdown LR multiplier over all steps, indexed as the reference."""
        c, N = self.cfg, self.total_steps
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        warmdown = round(c.warmdown_frac * N)
        if warmdown == 0 or step <= N - warmdown:
            return 1.0
        return self._decay((step - (N - warmdown)) / warmdown)

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
        if self.overlay:
            lrm, swa = self._envelope(step), self._swa_pos(step)
            if swa is not None:
                pos, spe = swa
                lrm = c.swa_floor + (max(lrm, c.swa_floor) - c.swa_floor) * (1 + math.cos(math.pi * pos / spe)) / 2
            return lrm
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
        if self.overlay:
            N = self.total_steps
            warmdown = round(self.cfg.warmdown_frac * N)
            return (step - (N - warmdown)) / warmdown if warmdown and step > N - warmdown else None
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
        if c.wd_shape == "linear":
            return 1 - step / self.total_steps
        if c.wd_shape == "sawtooth":
            return self._wd_sawtooth(step)
        if c.wd_shape == "points":
            return self._wd_points(step)
        if self.overlay:
            swa = self._swa_pos(step)
            if swa is not None:  # raised against the falling LR of the cycle, as in swa_mode = after
                return c.wd_swa_frac * (1.0 + (1 - 0.5 * (1 + math.cos(math.pi * swa[0] / swa[1]))))
            down = self._warmdown_progress(step)
            return 1.0 if down is None else 1.0 + (c.wd_end_frac - 1.0) * down
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

    def _wd_sawtooth(self, step: int) -> float:
        c, N = self.cfg, self.total_steps
        window = self._swa_window()
        if window is not None and step >= window[0]:
            start, spe = window
            return c.wd_swa_low + (c.wd_swa_high - c.wd_swa_low) * ((step - start) % spe) / spe
        t, end = step / N, (window[0] / N if window is not None else 1.0)
        if t < c.wd_hold_frac:
            return 1.0
        decay = 1.0 if end <= c.wd_hold_frac else min(1.0, max(0.0, (t - c.wd_hold_frac) / (end - c.wd_hold_frac)))
        return 1.0 - (1.0 - c.wd_swa_low) * decay

    def _wd_points(self, step: int) -> float:
        """Linear between the points (fraction of N rounded to a step, multiplier), as the reference's np.interp."""
        return float(np.interp(step, [round(f * self.total_steps) for f, _ in self.cfg.wd_points],
                               [float(m) for _, m in self.cfg.wd_points]))

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
        """If `step` is the last step of an SWA/snapshot cycle, that cycle's index (0-based).
        Overlay: the update after which the cycle position wraps, and the last update."""
        if self.overlay:
            swa = self._swa_pos(step)
            if swa is None or (step + 1 < self.total_steps and self._swa_pos(step + 1)[0] > swa[0]):
                return None
            pos, spe = swa
            return min(self.cfg.swa_epochs - 1, round((step - self._swa_window()[0] - pos) / spe))
        here, nxt = self._cycle(step), (self._cycle(step + 1) if step + 1 < self.total_steps else None)
        if here is None:
            return None
        if nxt is None or nxt[0] != here[0]:
            return here[0]
        return None
