"""Data efficiency: place a loss on a baseline curve "best loss at D training tokens".

The curve is piecewise-linear in tokens (the reference benchmark's method): a loss L
between the curve's points D_i and D_i+1 maps to the D where the line through them meets
L, and efficiency = D / budget (6.1 means the baseline needs 6.1x the data for that loss).
The curve is made monotone first (best loss at <= D tokens). Outside the curve's range
the answer is refused unless asked to extrapolate with a power law L(D) = A / D^alpha + E
fitted to the curve, and then it is marked as extrapolated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import SlowrunError
from .dataset import require_comparable
from .formats import CURVE, check, read_checked
from .results import chosen, read_result
from .storage import parse_json


class EfficiencyError(SlowrunError):
    pass


@dataclass
class Curve:
    name: str
    budget: int  # the budget efficiencies are relative to, in tokens
    tokens: list[int]
    losses: dict[str, list[float]]  # metric ("val"/"test") -> best loss at each budget
    dataset: dict | None = None  # tokenizer / val / test fingerprints; None = an external curve
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, ref: str) -> "Curve":
        """`fineweb` (the reference benchmark's published curve) or a curve JSON file."""
        if ref == "fineweb":
            text = (resources.files("slowrun.curves") / "fineweb.json").read_text()
            data = check(parse_json(text, "fineweb", EfficiencyError), CURVE, "fineweb", text, EfficiencyError)
        else:
            path = Path(ref)
            if path.is_dir():
                path = path / "curve.json"
            if not path.is_file():
                raise EfficiencyError(f"curve not found: {ref} (use fineweb or a curve.json from `slowrun sweep`)")
            data = read_checked(path, CURVE, EfficiencyError)
        try:
            curve = cls(data["name"], int(data["budget"]), [int(t) for t in data["tokens"]],
                        {k: [float(x) for x in v] for k, v in data["losses"].items()}, data.get("dataset"),
                        {k: v for k, v in data.items() if k not in ("name", "budget", "tokens", "losses", "dataset")})
        except (KeyError, TypeError, ValueError) as e:
            raise EfficiencyError(f"{ref}: not a curve file ({e})") from None
        if len(curve.tokens) < 2:
            raise EfficiencyError(f"{ref}: a curve needs at least two points, it has {len(curve.tokens)}")
        if sorted(curve.tokens) != curve.tokens or len(set(curve.tokens)) != len(curve.tokens):
            raise EfficiencyError(f"{ref}: curve tokens must be strictly increasing")
        for metric, ls in curve.losses.items():
            if len(ls) != len(curve.tokens):
                raise EfficiencyError(f"{ref}: {metric} has {len(ls)} losses for {len(curve.tokens)} budgets")
        return curve

    def metric(self, preferred: str | None = None) -> str:
        if preferred:
            if preferred not in self.losses:
                raise EfficiencyError(f"curve {self.name} has no {preferred} losses (it has: {', '.join(self.losses)})")
            return preferred
        return "test" if "test" in self.losses else "val"

    def envelope(self, metric: str) -> np.ndarray:
        """Best loss at <= D tokens (a larger budget can always use less data)."""
        return np.minimum.accumulate(np.asarray(self.losses[metric]))


@dataclass
class PowerLaw:
    """L(D) = A / D^alpha + E, fitted with E in [0, min loss); `at_bound` names a bound the
    best fit sits on (then the fit is no estimate of anything and is reported without a number)."""

    A: float
    alpha: float
    E: float
    residuals: list[float] = field(default_factory=list)  # fitted minus measured, per point
    at_bound: str = ""  # "" or which bound the best fit hit: "E = 0" or "E = min(loss)"

    def __call__(self, D: float) -> float:
        return self.A / D**self.alpha + self.E

    def inverse(self, loss: float) -> float:
        if loss <= self.E:
            return math.inf
        return (self.A / (loss - self.E)) ** (1 / self.alpha)

    @property
    def rms_residual(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals)))) if self.residuals else 0.0

    def as_dict(self) -> dict:
        out = {"form": "L = A / x^alpha + E", "residuals": self.residuals, "rms_residual": self.rms_residual}
        if self.at_bound:
            return {**out, "status": f"hit its bound {self.at_bound}: no estimate"}
        return {**out, "status": "ok", "A": self.A, "alpha": self.alpha, "E": self.E}

    def describe(self) -> str:
        if self.at_bound:
            return f"power-law fit hit its bound {self.at_bound} (rms residual {self.rms_residual:.4f}): no estimate"
        return f"L = {self.A:.4g} / x^{self.alpha:.4f} + {self.E:.4f} (rms residual {self.rms_residual:.4f})"


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of y = A / x^alpha + E with 0 <= E < min(y) and alpha > 0.

    For a fixed E, log(y - E) is linear in log x; E is scanned over [0, min(y)) (dense near
    min(y)) and the E with the smallest squared error in y is kept. When that E is 0 or the
    scan's closest value to min(y), the fit sits on a bound: `at_bound` says which, and
    callers must not report its numbers as estimates.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    # three parameters go through any three points exactly (an rms residual of ~0 that says
    # nothing): a fit is an estimate only where one point or more is left over to check it
    if len(x) < 4:
        raise EfficiencyError(f"a power-law fit needs at least 4 points (3 parameters and one to check them), got {len(x)}")
    lo = float(y.min())
    if lo <= 0:
        raise EfficiencyError("a power-law fit with E >= 0 needs positive losses")
    gaps = np.geomspace(1e-4 * lo, lo, 600)  # E = lo - gap: from just below min(y) down to 0
    candidates = np.unique(np.concatenate([lo - gaps, [0.0]]))
    candidates = candidates[(candidates >= 0) & (candidates < lo)]
    best = None
    for E in candidates:
        slope, icpt = np.polyfit(np.log(x), np.log(y - E), 1)
        if -slope <= 0:
            continue
        pred = np.exp(icpt) * x**slope + E
        err = float(((pred - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, float(E), float(np.exp(icpt)), float(-slope), pred)
    if best is None:
        raise EfficiencyError("no decreasing power law fits these points")
    _, E, A, alpha, pred = best
    bound = "E = 0" if E == 0.0 else "E = min(loss)" if E == candidates.max() else ""
    return PowerLaw(A, alpha, E, [float(r) for r in pred - y], bound)


@dataclass
class Placement:
    loss: float
    tokens: float  # equivalent baseline tokens
    efficiency: float  # tokens / budget
    metric: str
    extrapolated: bool = False
    fit: PowerLaw | None = None

    def describe(self) -> str:
        s = f"{self.efficiency:.2f}x ({self.metric} loss {self.loss:.4f} = the baseline's at {self.tokens:,.0f} tokens)"
        if self.extrapolated:
            f = self.fit
            s += f" [EXTRAPOLATED: L(D) = {f.A:.4g} / D^{f.alpha:.4f} + {f.E:.4f}, rms residual {f.rms_residual:.4f}]"
        return s


def place(curve: Curve, loss: float, metric: str | None = None, extrapolate: bool = False,
          budget: int | None = None) -> Placement:
    metric = curve.metric(metric)
    budget = curve.budget if budget is None else budget
    if not math.isfinite(loss):
        raise EfficiencyError(f"{metric} loss {loss}: not a finite number")
    if budget <= 0:
        raise EfficiencyError(f"budget {budget}: must be > 0 tokens")
    L = curve.envelope(metric)
    D = np.asarray(curve.tokens, float)
    if L[-1] <= loss <= L[0]:
        for i in range(len(D) - 1):
            a, b = L[i], L[i + 1]
            if b <= loss <= a:
                if a == b:
                    tokens = D[i]
                else:
                    tokens = D[i] + (a - loss) / (a - b) * (D[i + 1] - D[i])
                return Placement(loss, tokens, tokens / budget, metric)
    if not extrapolate:
        side = "below" if loss < L[-1] else "above"
        raise EfficiencyError(f"{metric} loss {loss:.4f} is {side} the curve's range [{L[-1]:.4f}, {L[0]:.4f}] "
                              f"({D[0]:,.0f}-{D[-1]:,.0f} tokens); pass --extrapolate to use a fitted power law")
    fit = fit_power_law(D, np.asarray(curve.losses[metric]))
    if fit.at_bound:
        raise EfficiencyError(f"{metric} loss {loss:.4f} is outside the curve's range and its {fit.describe()}")
    tokens = fit.inverse(loss)
    if not math.isfinite(tokens):
        raise EfficiencyError(f"{metric} loss {loss:.4f} is below the fitted asymptote E = {fit.E:.4f}: no finite amount of baseline data reaches it")
    return Placement(loss, tokens, tokens / budget, metric, extrapolated=True, fit=fit)


def efficiency_on(curve: Curve, loss: float, metric: str = "test") -> dict:
    """Data efficiency of a loss on the curve: interpolated, else extrapolated on the curve's
    power-law fit (and marked so), else None with the reason; never clamped."""
    try:
        try:
            pl = place(curve, loss, metric)
        except EfficiencyError:
            pl = place(curve, loss, metric, extrapolate=True)
    except EfficiencyError as e:
        return {"efficiency": None, "efficiency_error": str(e)}
    out = {"efficiency": pl.efficiency, "efficiency_tokens": pl.tokens, "efficiency_extrapolated": pl.extrapolated}
    if pl.fit:
        out["efficiency_fit"] = pl.fit.as_dict()
    return out


def describe_efficiency(e: dict) -> str:
    """`12.75x`, `0.16x (extrapolated)`, or why there is no number: for what `efficiency_on` returned."""
    if e.get("efficiency") is None:
        return e.get("efficiency_error", "n/a")
    return f"{e['efficiency']:.2f}x" + (" (extrapolated)" if e.get("efficiency_extrapolated") else "")


def curve_fit(curve: Curve) -> dict:
    """The power-law fit of a curve's test (else val) losses, as extrapolation would use it: its
    parameters and residuals, or the bound it hit, or why there is none; reported for a curve
    whether or not anything placed on it needs the fit."""
    metric = curve.metric()
    try:
        return {"metric": metric, **fit_power_law(curve.tokens, curve.losses[metric]).as_dict()}
    except EfficiencyError as e:
        return {"metric": metric, "status": f"no fit: {e}"}


def describe_fit(fit: dict) -> str:
    """What `curve_fit` returned, in words."""
    if fit.get("status") == "ok":
        return (f"L = {fit['A']:.4g} / D^{fit['alpha']:.4f} + {fit['E']:.4f} on {fit['metric']} loss "
                f"(rms residual {fit['rms_residual']:.4f})")
    rms = f" (rms residual {fit['rms_residual']:.4f})" if "rms_residual" in fit else ""
    return f"{fit.get('status', 'no fit')}{rms}"


def check_same_data(curve: Curve, run_dataset: dict) -> None:
    """Refuse a run and a curve whose tokenizer or val/test files differ (an external curve
    that records no dataset is taken as given)."""
    if curve.dataset:
        require_comparable(run_dataset, curve.dataset, f"the run and the curve {curve.name}")


def run_loss(run: str | Path, metric: str, variant: str | None = None) -> tuple[float, dict, dict]:
    """(loss, dataset fingerprint, result) of a run's result.json (its best-on-val variant by default)."""
    result = read_result(run)
    name, losses = chosen(result, variant)
    key = f"{metric}_loss"
    if key not in losses:
        raise EfficiencyError(f"{run}: variant {name} has no {key}")
    return float(losses[key]), result.get("dataset", {}), result
