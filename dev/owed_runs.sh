#!/usr/bin/env bash
# The CPU track's owed runs (issues 32 and 34), in the order dev/LOG.md gives, one after another,
# each through dev/long_run.sh (a snapshot of the committed code). Every step reads the committed
# ledgers first, so running this again after a stop trains only what is missing. Start
# dev/commit_ledgers.sh beside it so that each finished run is committed as it ends:
#
#   setsid nohup dev/commit_ledgers.sh > /tmp/commit_ledgers.log 2>&1 &
#   setsid nohup dev/owed_runs.sh > /tmp/owed_runs.log 2>&1 < /dev/null &
#   DRY_RUN=1 dev/owed_runs.sh        # the commands, nothing run
#   FROM=3 dev/owed_runs.sh           # from the third step on
#
# Step 1 rewrites benchmarks/results/cpu_track.json; the README's headline row and the entry and
# ablation prose in docs/cpu-track.md are written by hand from it (the generated tables by step 5).
#
# Every config here is bf16, and an fp32 run is another config (its own ledger key): on a CPU
# without bf16 arithmetic (AVX2 only: bf16 emulated, ~22x slower) it refuses to start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -z "${DRY_RUN:-}" ] && [ "$($PY -c 'import torch; from slowrun.distributed import fast_bf16_available as f; print(f(torch.device("cpu")))')" != True ]; then
  echo "owed_runs: this CPU has no bf16 arithmetic (lscpu shows neither amx_bf16 nor avx512_bf16); the owed runs are bf16 configs" >&2
  exit 2
fi

steps=(
  # 1. the distilled entry: three depth-6 teachers and a student of all three (~2.2 h alone on 2 cores)
  "THREADS=2 NICE=0 dev/long_run.sh slowrun bench cpu-track --parts distill --jobs 1 --threads 2"
  # 2. SSSL windows on the depth-4 recipe, seeds 1 and 2 (its seed 0 won by less than the seed spread)
  "SEEDS=3 VARIANTS=windows PART=ref JOBS=2 THREADS=1 dev/long_run.sh bash benchmarks/ablation_cpu.sh"
  # 3. the loop on the depth-6 recipe, seed 0 (a screen; seeds 1 and 2 if it beats depth 6's seed 0 on val)
  "PART=ref6 SEEDS=1 JOBS=1 THREADS=2 dev/long_run.sh bash benchmarks/ablation_cpu.sh"
  # 4. the nanochat_ref curve at 8x
  "THREADS=2 dev/long_run.sh slowrun bench cpu-track --parts baseline --budgets 8 --jobs 1 --threads 2"
  # the tables of what finished, nothing trained
  "NO_TRAIN=1 PART=ref bash benchmarks/ablation_cpu.sh && NO_TRAIN=1 PART=ref6 bash benchmarks/ablation_cpu.sh && $PY -m slowrun.docgen"
)
for i in "${!steps[@]}"; do
  n=$((i + 1))
  [ "$n" -ge "${FROM:-1}" ] || continue
  echo "owed_runs: step $n/${#steps[@]}: ${steps[$i]}" >&2
  [ -n "${DRY_RUN:-}" ] || bash -c "${steps[$i]}"
done
