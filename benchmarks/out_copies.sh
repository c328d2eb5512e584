# Sourced by the benchmark scripts that may run on a lent machine whose $OUT folder is what comes
# back (benchmarks/gpu_curve.sh, benchmarks/ablation_cpu.sh). Without $OUT both functions are the
# plain thing.
#
#   keep_copies FILE...   with $OUT set: copy each FILE into $OUT every 20 s and at exit (atomically)
#   stoppable CMD...      run CMD so that a TERM or INT (a timeout) stops it and the script exits,
#                         its EXIT trap (the last copies) still runs: bash runs a trap only once its
#                         foreground command has ended, so CMD runs in the background and is waited for
#
# `timeout` signals its whole process group, so the job and the copier may be gone already when a
# trap kills them: the traps' kills may fail (`|| true`) without `set -e` ending the trap early.

_copy_into_out() {
  local f
  for f in "$@"; do
    [ -f "$f" ] && cp "$f" "$OUT/$(basename "$f").tmp" && mv "$OUT/$(basename "$f").tmp" "$OUT/$(basename "$f")"
  done
  return 0
}

keep_copies() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  (while sleep 20; do _copy_into_out "$@"; done) &
  _COPIER=$!
  _COPIES=("$@")
  trap 'kill $_COPIER 2>/dev/null || true; _copy_into_out "${_COPIES[@]}"' EXIT
}

stoppable() {
  "$@" &
  _STOPPABLE=$!
  trap 'kill $_STOPPABLE 2>/dev/null || true; exit 143' TERM INT
  wait "$_STOPPABLE"
}
