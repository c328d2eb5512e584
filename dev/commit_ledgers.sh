#!/usr/bin/env bash
# While long jobs run: every INTERVAL seconds (default 240) commit each results ledger that changed
# (benchmarks/results/ledger.jsonl, ablation_ledger.jsonl, ablation_cpu_equal_time.json), one commit
# per file (with the docs' generated tables of it), so that a session ending at any moment loses no
# finished point. Stop it (kill) before
# the session's last commits.
#
#   setsid nohup dev/commit_ledgers.sh > /tmp/commit_ledgers.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=(benchmarks/results/ledger.jsonl benchmarks/results/ablation_ledger.jsonl benchmarks/results/ablation_cpu_equal_time.json)
while true; do
  sleep "${INTERVAL:-240}"
  for f in "${FILES[@]}"; do
    [ -f "$f" ] || continue
    if [ -n "$(git status --porcelain -- "$f")" ]; then
      # the docs' tables of the results (python -m slowrun.docgen) in the same commit, so that the
      # committed docs never lag the committed results (tests/test_docs.py)
      docs=()
      if .venv/bin/python -m slowrun.docgen >/dev/null 2>&1 && [ -n "$(git status --porcelain -- docs/cpu-track.md)" ]; then
        docs=(docs/cpu-track.md)
      fi
      git add -- "$f" "${docs[@]}" && git commit -q -m "results: $(basename "$f") ($(wc -l < "$f") lines)" -- "$f" "${docs[@]}" || true
    fi
  done
done
