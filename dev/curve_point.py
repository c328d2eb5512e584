"""Train one point of the CPU track's baseline curve ahead of its sweep, through the sweep's own
jobs (same run directory, same ledger line, same tag), so that the sweep later finds it finished.

For a second slot while the sweep is busy: e.g. the second seed of a size that may be chosen, run
beside the expansion that decides whether it is (if it is not, the run is in the ledger and costs
only its slot's time). Run it under dev/long_run.sh, one thread, like the sweep:

    dev/long_run.sh python dev/curve_point.py 2 model.depth=10 train.seed=1

BUDGET is a budget of the track; the point is the budget's fixed lr and batch (CURVE_TUNED) with the
given KEY=VALUE settings on top (values as JSON, else strings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slowrun.jobs import JobsFailed
from slowrun.sweep import Runs
from slowrun.track import CURVE_TUNED, TRACK, curve_sweep, ledger_of, track_data


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: dev/curve_point.py BUDGET KEY=VALUE [KEY=VALUE ...]", file=sys.stderr)
        return 2
    budget = float(argv[0])
    lr, batch = CURVE_TUNED[TRACK.curve_recipe]
    given = {}
    for a in argv[1:]:
        k, v = a.split("=", 1)
        try:
            given[k] = json.loads(v)
        except json.JSONDecodeError:
            given[k] = v
    # in the sweep's order (its run directory's name follows it): the size, lr, batch, then the seed
    seed = {"train.seed": given.pop("train.seed")} if "train.seed" in given else {}
    point = {**given, "optim.lr_scale": lr, "train.batch_tokens": batch, **seed}
    work = Path("benchmarks/work/cpu-track")
    cfg = curve_sweep(TRACK, work, track_data(TRACK, work), 1, 1, ledger_of("benchmarks/results/cpu_track.json"), [budget])
    runs = Runs(cfg)
    job = runs.job(budget, point, "seeds" if "train.seed" in point else "expand")
    if job.run_dir in runs.results:
        print(f"{job.run_dir}: finished already (the ledger has it)")
        return 0
    runs.run([job], f"{budget:g}x point")
    if runs.failures:
        raise JobsFailed(runs.failures, "the curve point")
    print(f"{job.run_dir}: val {runs.loss(job):.4f}, test {runs.loss(job, 'test'):.4f} (in {cfg.ledger})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
