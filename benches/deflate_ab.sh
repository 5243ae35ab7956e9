#!/usr/bin/env bash
# Issue 16's A/B: the same release build of bts-guru, a bts-guru-bench scenario run without and
# with --deflate (permessage-deflate offered as browsers offer it), alternating, REPEATS times,
# a fresh daemon per run. Results: OUT/<plain|deflate>-<repeat>.json (one JSON line each).
#
# Usage: cargo build --release && benches/deflate_ab.sh
# Knobs: REPEATS (3), SCEN ("fanout -c 5000 -k 1 -r 10 -d 20"), OUT (target/deflate-ab),
# MODES ("plain deflate"; also "deflate-indep": --deflate with BTS_COMPRESSION_CONTEXT=false, every
# message compressed on its own as before shared context).
set -u
cd "$(dirname "$0")/.."
BTS=${BTS:-target/release/bts-guru}
BENCH=${BENCH:-target/release/bts-guru-bench}
OUT=${OUT:-target/deflate-ab}
mkdir -p "$OUT"
REPEATS=${REPEATS:-3}
SCEN=${SCEN:-"fanout -c 5000 -k 1 -r 10 -d 20"}
for rep in $(seq 1 "$REPEATS"); do
  for mode in ${MODES:-plain deflate}; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    ctx=true
    [[ $mode == deflate-indep ]] && ctx=false
    BTS_COMPRESSION_CONTEXT=$ctx REVERB_APP_ID=bench REVERB_APP_KEY=bench-key REVERB_APP_SECRET=bench-secret \
      "$BTS" --host 127.0.0.1 --port "$port" --no-metrics >"$OUT/$mode-$rep.server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    sleep 1
    flag=""
    [[ $mode == deflate* ]] && flag=--deflate
    # shellcheck disable=SC2086
    timeout 600 "$BENCH" --port "$port" --app-id bench --app-key bench-key --app-secret bench-secret \
      --server-pid "$pid" --json-only $flag $SCEN >"$OUT/$mode-$rep.json" 2>"$OUT/$mode-$rep.bench.log"
    echo "$(date -u +%T) $mode #$rep: exit $?"
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null
  done
done
