#!/bin/sh
# Runs the server under callgrind, for `switchboard-bench ... --server-bin
# bench/callgrind-wrapper.sh` (docs/BENCHMARKS.md, "Instruction counts").
#   SWITCHBOARD_REAL_BIN  the server binary (default target/release/switchboard)
#   CALLGRIND_OUT         the output file (default /tmp/callgrind.switchboard.<pid>)
exec valgrind --tool=callgrind \
  --callgrind-out-file="${CALLGRIND_OUT:-/tmp/callgrind.switchboard.%p}" \
  "${SWITCHBOARD_REAL_BIN:-target/release/switchboard}" "$@"
