#!/usr/bin/env bash
# The process group of the long job started by dev/long_run.sh (its own session: the leader is the
# command itself, not the `setsid --wait` that started it), for kill -STOP/-CONT/-TERM -- -PGID.
#   dev/job_pgid.sh benchmarks/ablation_cpu.sh
ps -eo pid,pgid,args | awk -v s="$1" '$1 == $2 && index($0, s) && $3 != "setsid" {print $2; exit}'
