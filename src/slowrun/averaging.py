"""Weight averaging: an EMA of the weights and plain averages of saved snapshots (SWA)."""

from __future__ import annotations

from pathlib import Path

import torch


class EMA:
    """Exponential moving average of the parameters, updated every `every` steps.

    Default (`start` None): starts from zeros and is bias-corrected (divided by
    1 - decay^updates), so early on it is the plain weighted average of the weights seen, not
    a pull towards the init. With `start` (optim.ema_start_frac, the reference's unlimited
    track): nothing is averaged before step `start`; the first update at or after it (a
    multiple of `every`) takes the weights themselves, the later ones lerp towards the
    weights; no correction is needed, the average starts from real weights.
    Each update counts as `every` steps of `decay`.
    """

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1, start: int | None = None) -> None:
        self.decay, self.every, self.start = decay, every, start
        self.shadow = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
        self.weight = 0.0  # 1 - decay^(every*updates); with `start`: 0 before it, then 1

    @property
    def started(self) -> bool:
        """Whether any weights have been averaged yet (else `state_dict` holds zeros)."""
        return self.weight > 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if step % self.every or (self.start is not None and step < self.start):
            return
        d = self.decay**self.every
        for k, v in model.state_dict().items():
            if self.start is None:
                self.shadow[k].mul_(d).add_(v.float(), alpha=1 - d)
            elif self.started:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:  # the start: this step's weights
                self.shadow[k].copy_(v.float())
        self.weight = 1 - (1 - self.weight) * d if self.start is None else 1.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bias-corrected average, in the model's dtypes."""
        w = max(self.weight, 1e-12)
        return {k: v / w for k, v in self.shadow.items()}

    def raw_state(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__weight__": torch.tensor([self.weight], dtype=torch.float64)}

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = float(state["__weight__"][0])
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def average_weights(paths: list[Path], load, weights=None) -> dict[str, torch.Tensor]:
    """Parameter average of several weight files (equal, or with `weights` summing to 1),
    streamed: one file in memory at a time beside the sum."""
    w = [1.0 / len(paths)] * len(paths) if weights is None else [float(x) for x in weights]
    total: dict[str, torch.Tensor] | None = None
    for p, wp in zip(paths, w):
        state = load(p)
        if total is None:
            total = {k: v.double() * wp for k, v in state.items()}
            shapes = {k: v.shape for k, v in state.items()}
        else:
            if {k: v.shape for k, v in state.items()} != shapes:
                raise ValueError(f"{p}: parameter shapes differ from {paths[0]}; parameter averaging needs identical architectures")
            for k, v in state.items():
                total[k] += v.double() * wp
    assert total is not None, "no weights to average"
    return {k: v.float() for k, v in total.items()}
