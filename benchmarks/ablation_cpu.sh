#!/usr/bin/env bash
# Issue 13 on the CPU track: what each technique of the `slowrun` recipe is worth (leave-one-out),
# and the swaps the reference names next (second-order optimizers, curriculum), each over 3 seeds,
# the swaps at the full recipe's wall time; beside them the recipe's own default batch (2,048, where
# the track's entry pins 4,096), at equal wall time too. The CPU track's single entry's settings (builtin data,
# bpe:8192, 262,144 training tokens; batch 4,096, periodic evals on 32k val tokens).
#
#   bash benchmarks/ablation_cpu.sh                 # ONLY=none: the swaps only; JOBS=2 THREADS=1
#   NO_TRAIN=1 bash benchmarks/ablation_cpu.sh      # the table of the runs finished so far, nothing trained
#
# Needs the second-order extra (pip install -e ".[second-order]") for the optimizer swaps.
# Every finished run is appended to benchmarks/results/ablation_ledger.jsonl (commit it as runs
# finish): a rerun on any machine trains only what is missing. The swaps' step times are measured
# once and kept in benchmarks/results/ablation_cpu_equal_time.json (committed too), so every
# machine plans the same runs. The table lands in benchmarks/results/ablation_cpu.json.
#
# On a lent GPU (CUDA is used when present; JOBS runs share it): with $OUT set, the ablation ledger
# is copied there every 20 s and when stopped by a timeout; merge it back with
# `python -m slowrun.ledger merge OUT/ablation_ledger.jsonl benchmarks/results/ablation_ledger.jsonl`.
# The packages the GPU image lacks: benchmarks/gpu_wheels.sh (its header says how to install them).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
THREADS="${THREADS:-1}"
ONLY="${ONLY:-}"  # e.g. "none" (swaps only) or "muon,swa"
if command -v slowrun >/dev/null; then SLOWRUN=(slowrun); else export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; SLOWRUN=(python3 -m slowrun); fi
LEDGER=benchmarks/results/ablation_ledger.jsonl
# shellcheck source=benchmarks/out_copies.sh
. benchmarks/out_copies.sh
keep_copies "$LEDGER" benchmarks/results/ablation_cpu.json
DATA=benchmarks/work/cpu-track/data/1x
[ -f "$DATA/manifest.json" ] || "${SLOWRUN[@]}" prepare --source builtin --tokenizer bpe:8192 --train-tokens 262144 \
  --val-tokens 131072 --test-tokens 131072 --out "$DATA" --no-progress
# every variant placed on the track's nanochat curve once it is committed (the table only: no run changes)
CURVE=()
[ -f benchmarks/results/curves/cpu_nanochat.json ] && CURVE=(--curve benchmarks/results/curves/cpu_nanochat.json)
stoppable "${SLOWRUN[@]}" ablate --recipe slowrun --data "$DATA" --seeds 3 ${ONLY:+--only "$ONLY"} \
  --set eval.max_tokens=32768 --set train.batch_tokens=4096 \
  --variant batch_2048:train.batch_tokens=2048 \
  --variant soap:optim.matrix_optimizer=soap --variant kl_shampoo:optim.matrix_optimizer=kl_shampoo \
  --variant psgd_kron:optim.matrix_optimizer=psgd_kron \
  --variant easy_to_hard:data.curriculum=easy_to_hard --variant hard_to_easy:data.curriculum=hard_to_easy \
  --variant mixed:data.curriculum=mixed \
  --equal-time --equal-time-file benchmarks/results/ablation_cpu_equal_time.json \
  --ledger "$LEDGER" --out benchmarks/work/ablation-cpu "${CURVE[@]}" \
  --jobs "$JOBS" --threads "$THREADS" --no-progress ${NO_TRAIN:+--no-train}
cp benchmarks/work/ablation-cpu/ablation.json benchmarks/results/ablation_cpu.json
echo "wrote benchmarks/results/ablation_cpu.json"
