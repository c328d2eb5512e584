#!/usr/bin/env bash
# Issue 13 on the CPU track, in two parts that share one ledger:
#  - swaps: the changes the reference names next (second-order optimizers, curricula) and the
#    recipe's own default batch (2,048 tokens), each at the wall time of the track's single entry
#    as it was trained (the `slowrun` recipe with batch 4,096), against it; the curricula order the
#    documents by length, or by their loss under a small model (`_loss`), and serve the sequences in
#    that order, or shuffled within each eighth of the epoch (`_blocks`: the order by difficulty
#    kept from block to block, the batches random within a block);
#  - steps: the two closest second-order swaps (SOAP, PSGD-Kron) at the recipe's steps instead of its
#    wall time (8 epochs each): whether they lose per step too, or only by their cost (what matters on
#    the unlimited track, which ranks loss alone); the full recipe's runs are the swaps' own;
#  - loo: what each technique of the `slowrun` recipe is worth, leave-one-out, the recipe as it is
#    (batch 2,048, which won the swaps), against it;
#  - tied: the same for the recipe with tied embeddings (which won the leave-one-out, and is the
#    recipe's default since), of the techniques that looked harmful or worth nothing untied (ONLY to
#    choose; the full recipe's runs are the leave-one-out's tied ones, found in the ledger);
#  - both: the tied recipe without the two that looked harmful tied too (the SWA cycles and the RMSNorm
#    after the lookup), against it with each put back and with both (the tied part's runs): a 2x2 of
#    which only the full recipe's 3 runs are new;
#  - ref: the reference tracks' own recipes at this scale (limited_cpu, tiny_cpu: each sized to the
#    slowrun recipe's wall time in its file) against the recipe as it is, and the techniques of theirs
#    (and of the nanochat_ref baseline: value embeddings, SSSL windows) that ours lacks, each added to it
#    alone at its wall time;
#  - size: the recipe given the single entry's whole allowance. It takes ~11.5 of its 30 minutes on 2
#    cores, so each swap takes ~2.35x its compute (step times at 1 thread, 2026-12-07: depth 5 1.63x,
#    depth 6 2.33x, depth 8 5.43x depth 4's): depth 4 for 19 epochs, depth 5 for 12, depth 6 for 8;
#    and a snapshot ensemble inside the run: 16 epochs in 2 cosine cycles from the peak LR, the
#    probabilities of both cycle ends averaged (the reference's own figures average epoch snapshots);
#  - size6: the same question asked of the depth-6 recipe (23.7 of its 30 minutes alone on 2 cores,
#    2026-12-07): its 8 epochs' compute spent on depth 7 for 5 epochs (~1.55x depth 6's per-token
#    FLOPs) or depth 8 for 3 (2.33x its step time at 1 thread), and depth 6 for 9 epochs (~27 min);
#  - ref6: the reference's techniques that won their screen on the depth-4 recipe (PART=ref), added to
#    the depth-6 recipe at its wall time: the loop (its first decoder block, the 4th, three times from
#    the 5th of 8 epochs, as the depth-4 screen looped its 3rd).
# Each over 3 seeds. The CPU track's settings: builtin data, bpe:8192, 262,144 training tokens,
# periodic evals on 32k val tokens.
#
#   bash benchmarks/ablation_cpu.sh                 # every part (PART=swaps, steps, loo, tied, both, ref, size, size6 or ref6: one); JOBS=2 THREADS=1
#   ONLY=muon,swa PART=loo bash benchmarks/ablation_cpu.sh   # some techniques only
#   VARIANTS=value_embed PART=ref bash benchmarks/ablation_cpu.sh   # some variants only (ref, size)
#   SEEDS=1 PART=size bash benchmarks/ablation_cpu.sh   # seed 0 only, to screen (3 decide; the same runs)
#   NO_TRAIN=1 bash benchmarks/ablation_cpu.sh      # the tables of the runs finished so far, nothing trained
#
# Needs the second-order extra (pip install -e ".[second-order]") for the optimizer swaps.
# Every finished run is appended to benchmarks/results/ablation_ledger.jsonl (commit it as runs
# finish): a rerun on any machine trains only what is missing. The swaps' step times are measured
# once and kept in benchmarks/results/ablation_cpu_equal_time.json (committed too), so every
# machine plans the same runs. The tables land in benchmarks/results/ablation_cpu_swaps.json,
# ablation_cpu_steps.json, ablation_cpu.json (leave-one-out), ablation_cpu_tied.json and ablation_cpu_both.json, each with a report (bar chart of the
# deltas) in the folder of the same name.
#
# On a lent GPU (CUDA is used when present; JOBS runs share it): with $OUT set, the ablation ledger
# is copied there every 20 s and when stopped by a timeout; merge it back with
# `python -m slowrun.ledger merge OUT/ablation_ledger.jsonl benchmarks/results/ablation_ledger.jsonl`.
# The packages the GPU image lacks: benchmarks/gpu_wheels.sh (its header says how to install them).
set -euo pipefail
# the whole script is one block, read before any of it runs: editing the file during a run changes nothing in it
{
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
THREADS="${THREADS:-1}"
PART="${PART:-all}"
ONLY="${ONLY:-}"  # the leave-one-out parts' techniques, e.g. "muon,swa" (tied: embed_norm,swa when empty)
VARIANTS="${VARIANTS:-}"  # the ref and size parts' variants, e.g. "value_embed,windows" (every one when empty)
case "$PART" in all|swaps|steps|loo|tied|both|ref|size|size6|ref6) ;; *) echo "PART: all, swaps, steps, loo, tied, both, ref, size, size6 or ref6, got '$PART'" >&2; exit 2;; esac
if command -v slowrun >/dev/null; then SLOWRUN=(slowrun); else export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"; SLOWRUN=(python3 -m slowrun); fi
LEDGER=benchmarks/results/ablation_ledger.jsonl
# shellcheck source=benchmarks/out_copies.sh
. benchmarks/out_copies.sh
keep_copies "$LEDGER" benchmarks/results/ablation_cpu_swaps.json benchmarks/results/ablation_cpu_steps.json \
  benchmarks/results/ablation_cpu.json benchmarks/results/ablation_cpu_tied.json benchmarks/results/ablation_cpu_both.json \
  benchmarks/results/ablation_cpu_ref.json benchmarks/results/ablation_cpu_size.json benchmarks/results/ablation_cpu_size6.json \
  benchmarks/results/ablation_cpu_ref6.json
DATA=benchmarks/work/cpu-track/data/1x
[ -f "$DATA/manifest.json" ] || "${SLOWRUN[@]}" prepare --source builtin --tokenizer bpe:8192 --train-tokens 262144 \
  --val-tokens 131072 --test-tokens 131072 --out "$DATA" --no-progress
# every variant placed on the track's baseline curve once it is committed (the table only: no run changes):
# nanochat_ref's, else the earlier nanochat one
CURVE=()
for c in benchmarks/results/curves/cpu_nanochat_ref.json benchmarks/results/curves/cpu_nanochat.json; do
  if [ -f "$c" ]; then CURVE=(--curve "$c"); break; fi
done
# every part measures the recipe as it was when that part began, so that its runs keep their configs
# as the recipe changes: with 2 SWA cycles (the leave-one-out and `tied` found them harmful; the recipe has
# none since), and but for `tied` and `both` with untied embeddings (the leave-one-out found tying better)
# Every part so far measured the depth-4 recipe (4 layers of 256), pinned here since the recipe took depth 6
RECIPE=(--recipe slowrun --data "$DATA" --seeds "${SEEDS:-3}" --set eval.max_tokens=32768
        --set model.depth=-1 --set model.n_layer=4 --set model.n_head=4 --set model.n_embd=256
        --ledger "$LEDGER" "${CURVE[@]}"
        --jobs "$JOBS" --threads "$THREADS" --no-progress ${NO_TRAIN:+--no-train})
# the depth-6 recipe (the recipe since 2026-12-07), pinned as well: its runs are the size part's d6_e8
RECIPE6=("${RECIPE[@]}" --set model.depth=6)
TIED=("${RECIPE[@]}" --set optim.swa_epochs=2)
COMMON=("${TIED[@]}" --set model.tie_embeddings=false)
# the swaps' and the steps' baseline: the track's single entry as it was trained
AGAINST_ENTRY=(--only none --set train.batch_tokens=4096)

wants() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
# variants NAME:KEY=VALUE,...: each as `--variant` arguments, but only those VARIANTS names (all when
# it is empty); their runs are the same as in the whole part, so a later run of all of it trains the rest
variants() {
  local v
  for v in "$@"; do
    if [ -z "$VARIANTS" ] || [[ ",$VARIANTS," == *",${v%%:*},"* ]]; then printf -- '--variant\n%s\n' "$v"; fi
  done
}
# run_part WORK RESULT TITLE ABLATE_ARGS...: the ablation in benchmarks/work/WORK, its table into
# benchmarks/results/RESULT.json and its report into the folder of that name
run_part() {
  local work="benchmarks/work/$1" result="benchmarks/results/$2" title="$3"
  shift 3
  stoppable "${SLOWRUN[@]}" ablate "$@" --out "$work"
  cp "$work/ablation.json" "$result.json"
  "${SLOWRUN[@]}" report --ablation "$result.json" --out "$result" --title "$title"
}

if wants swaps; then
  # the curricula by model loss score each training document by its mean loss under a small model
  # trained on the training split only: the baseline curve's depth-4 nanochat model at 1x, one epoch
  # (seed 0; a few minutes). Its document scores are cached beside its weights.
  SCORER=benchmarks/work/ablation-cpu/scorer-nanochat-d4
  if [ ! -f "$SCORER/result.json" ] && [ -z "${NO_TRAIN:-}" ]; then
    if [ -f "$SCORER/config.toml" ]; then  # stopped part way: it goes on from its last checkpoint
      "${SLOWRUN[@]}" train --resume "$SCORER" --quiet
    else
      "${SLOWRUN[@]}" train --recipe nanochat --data "$DATA" --run-dir "$SCORER" --quiet --model.depth=4 \
        --optim.lr_scale=0.5 --train.batch_tokens=1024 --eval.max_tokens=32768 --train.seed=0 \
        --train.num_threads="$THREADS" --train.progress=false
    fi
  fi
  run_part ablation-cpu ablation_cpu_swaps "CPU track: swaps against the slowrun recipe at batch 4,096" "${COMMON[@]}" "${AGAINST_ENTRY[@]}" \
    --variant batch_2048:train.batch_tokens=2048 \
    --variant soap:optim.matrix_optimizer=soap --variant kl_shampoo:optim.matrix_optimizer=kl_shampoo \
    --variant psgd_kron:optim.matrix_optimizer=psgd_kron \
    --variant easy_to_hard:data.curriculum=easy_to_hard --variant hard_to_easy:data.curriculum=hard_to_easy \
    --variant mixed:data.curriculum=mixed \
    --variant easy_to_hard_loss:data.curriculum=easy_to_hard,data.curriculum_score=$SCORER \
    --variant hard_to_easy_loss:data.curriculum=hard_to_easy,data.curriculum_score=$SCORER \
    --variant mixed_loss:data.curriculum=mixed,data.curriculum_score=$SCORER \
    --variant easy_to_hard_loss_blocks:data.curriculum=easy_to_hard,data.curriculum_score=$SCORER,data.curriculum_blocks=8 \
    --variant mixed_loss_blocks:data.curriculum=mixed,data.curriculum_score=$SCORER,data.curriculum_blocks=8 \
    --equal-time --equal-time-file benchmarks/results/ablation_cpu_equal_time.json
fi
if wants steps; then
  run_part ablation-cpu-steps ablation_cpu_steps "CPU track: second-order swaps at the slowrun recipe's steps (batch 4,096)" "${COMMON[@]}" "${AGAINST_ENTRY[@]}" \
    --variant soap:optim.matrix_optimizer=soap --variant psgd_kron:optim.matrix_optimizer=psgd_kron
fi
if wants loo; then
  run_part ablation-cpu-loo ablation_cpu "CPU track: leave-one-out ablation of the slowrun recipe" "${COMMON[@]}" ${ONLY:+--only "$ONLY"}
fi
if wants tied; then
  run_part ablation-cpu-tied ablation_cpu_tied "CPU track: leave-one-out ablation of the slowrun recipe with tied embeddings" \
    "${TIED[@]}" --only "${ONLY:-embed_norm,swa}"
fi
if wants both; then
  run_part ablation-cpu-both ablation_cpu_both "CPU track: the tied recipe without SWA and the embedding RMSNorm, each put back" \
    "${RECIPE[@]}" --set optim.swa_epochs=0 --set model.embed_norm=false --only none \
    --variant embed_norm:model.embed_norm=true --variant swa:optim.swa_epochs=2 \
    --variant both:model.embed_norm=true,optim.swa_epochs=2
fi
if wants ref; then
  # (the recipe swaps get the depth-4 pin too: limited_cpu's own 3 heads of 64 are restated; tiny_cpu is 4 x 256)
  # the loop: the first decoder block three times from the 5th of 8 epochs (the 1-hour track loops the first
  # six of its decoder's 15 blocks from the 7th of 11 epochs); the windows: half the context, the last block full
  run_part ablation-cpu-ref ablation_cpu_ref "CPU track: the reference's recipes at this scale, and their techniques added to ours" \
    "${RECIPE[@]}" --only none \
    $(variants limited_cpu:recipe=limited_cpu,model.n_head=3,model.n_embd=192 tiny_cpu:recipe=tiny_cpu \
      xsa:model.xsa=tanh iha:model.iha=true \
      windows:model.window_pattern=SSSL,model.short_window=128 \
      mtp:model.mtp_weight=0.3,model.mtp_style=reference \
      loop:model.loop_start=2,model.loop_end=2,model.loop_repeats=3,model.loop_from_epoch=4,model.loop_skips=every \
      stoch_depth:model.stoch_depth=0.05,model.stoch_depth_per_call=true,model.stoch_depth_rescale=false \
      value_embed:model.value_embed=true) \
    --equal-time --equal-time-file benchmarks/results/ablation_cpu_equal_time.json
fi
if wants size; then
  run_part ablation-cpu-size ablation_cpu_size "CPU track: the slowrun recipe given the single entry's 30 minutes" \
    "${RECIPE[@]}" --only none \
    $(variants d4_e19:train.epochs=19 d5_e12:model.depth=5,train.epochs=12 d6_e8:model.depth=6 \
      snap2_e16:train.epochs=16,train.snapshot_cycles=2)
fi
if wants size6; then
  run_part ablation-cpu-size6 ablation_cpu_size6 "CPU track: the depth-6 recipe's 30 minutes spent on other sizes" \
    "${RECIPE6[@]}" --only none \
    $(variants d7_e5:model.depth=7,train.epochs=5 d8_e3:model.depth=8,train.epochs=3 d6_e9:train.epochs=9)
fi
if wants ref6; then
  run_part ablation-cpu-ref6 ablation_cpu_ref6 "CPU track: the reference's techniques that won on depth 4, added to the depth-6 recipe" \
    "${RECIPE6[@]}" --only none \
    $(variants loop:model.loop_start=3,model.loop_end=3,model.loop_repeats=3,model.loop_from_epoch=4,model.loop_skips=every) \
    --equal-time --equal-time-file benchmarks/results/ablation_cpu_equal_time.json
fi
exit
}
