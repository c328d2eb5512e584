#!/usr/bin/env bash
# Run a long job (a curve sweep, an ablation) from a snapshot of the committed code, so that
# editing src/ while it runs changes nothing in it: `git archive HEAD` into
# $SNAPSHOTS/<commit> (made once), then the command with that snapshot's src on PYTHONPATH, one
# torch thread (NICE, THREADS to change), at nice 19, from the repository root. The snapshot's
# src/slowrun/COMMIT names the commit, so its runs' ledger lines record it.
#
#   dev/long_run.sh slowrun bench cpu-track --parts baseline --budgets 8 --jobs 1 --threads 1
#   dev/long_run.sh bash benchmarks/ablation_cpu.sh
set -euo pipefail
# With the kernel's autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled = 1) a process's
# nice value counts only against processes of its own session: a job started with setsid at nice 19
# still takes an equal share from the test suite or a timed run in another session (measured: the
# README's main command at 456 tok/s instead of ~3,300 beside two such jobs). So the job gets a session
# of its own and that session's autogroup gets the nice value.
if [ -z "${LONG_RUN_SESSION:-}" ] && command -v setsid >/dev/null; then
  LONG_RUN_SESSION=1 exec setsid --wait "$(realpath "$0")" "$@"
fi
[ -w /proc/self/autogroup ] && echo "${NICE:-19}" > /proc/self/autogroup 2>/dev/null || true
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: dev/long_run.sh COMMAND [ARGS...]" >&2; exit 2; }
commit=$(git rev-parse --short=12 HEAD)
snap="${SNAPSHOTS:-/tmp/slowrun-snapshots}/$commit"
if [ ! -f "$snap/src/slowrun/COMMIT" ]; then
  # a temporary folder of this job's own: two jobs started together both make the snapshot, and the
  # second's rename fails on the first's folder, which is the same code
  mkdir -p "$(dirname "$snap")" && tmp=$(mktemp -d "$snap.tmp.XXXXXX")
  git archive HEAD | tar -x -C "$tmp"
  mv -T "$tmp" "$snap" 2>/dev/null || rm -rf "$tmp"
fi
# the repository's virtual environment first (a script's `slowrun` and `python3` are its own); the
# snapshot's src on PYTHONPATH comes before the editable install's finder
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$snap/src" OMP_NUM_THREADS="${THREADS:-1}"
echo "long_run: code of $commit from $snap" >&2
exec nice -n "${NICE:-19}" "$@"
