#!/usr/bin/env bash
# Positioned channels in a two-node cluster: plain vs positioned delivery (latency, CPU) through
# node A with events published on node B, interleaved; then the reconnect scenario against A
# with publishes on B; then the history memory bound (a small bound, many channels).
#   benches/resume_cluster.sh [repeats] [connections]
# Needs redis-server and release builds: cargo build --release --bin bts-guru && cargo build --release -p bts-guru-bench
set -euo pipefail
REPEATS=${1:-3}
CONNS=${2:-2000}
cd "$(dirname "$0")/.."
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
OUT=$(mktemp -d)
RPORT=$(free_port)
redis-server --port "$RPORT" --save '' --appendonly no --daemonize no >"$OUT/redis.log" 2>&1 &
RPID=$!
PIDS=("$RPID")
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
sleep 0.3
export REVERB_APP_ID=bench REVERB_APP_KEY=bench-key REVERB_APP_SECRET=bench-secret
start_node() { # name port mport [extra env...]
  local name=$1 port=$2 mport=$3; shift 3
  env REDIS_URL="redis://127.0.0.1:$RPORT/0" REVERB_SCALING_ENABLED=true \
    BTS_APP_RESUME='sports.pos.*,sports.resume.*' "$@" ./target/release/bts-guru --host 127.0.0.1 \
    --port "$port" --metrics-port "$mport" --shards 1 >"$OUT/$name.out" 2>"$OUT/$name.err" &
  PIDS+=("$!")
  for _ in $(seq 100); do grep -q ready "$OUT/$name.out" && break; sleep 0.1; done
}
PA=$(free_port); MA=$(free_port); PB=$(free_port); MB=$(free_port)
start_node a "$PA" "$MA"
APID=${PIDS[-1]}
start_node b "$PB" "$MB"
sleep 1
bench() { ./target/release/bts-guru-bench --port "$PA" --api-port "$PB" --server-pid "$APID" --json-only "$@"; }
for i in $(seq "$REPEATS"); do
  for kind in plain positioned; do
    prefix=news.plain.l; [ "$kind" = positioned ] && prefix=sports.pos.l
    line=$(bench fanout -c "$CONNS" -k 10 --channels-per-event 10 -r 10 -d 10 --channel-prefix "$prefix" | tail -1)
    echo "$kind $i $(echo "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); s=r["server"]; print(json.dumps({"ok": r["ok"], "cpu_ms_per_1000": s.get("cpu_ms_per_1000_deliveries"), "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"], "deliveries": r["deliveries"]["received"]}))')"
  done
done
bench reconnect -c "$CONNS" -k 20 -r 100 -d 10 | tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print("reconnect (viewers on A, publishes on B)", json.dumps({"ok": r["ok"], **r["result"]}))'
# The memory bound: a third node with a 1 MiB bound, 500 positioned channels.
PC=$(free_port); MC=$(free_port)
start_node c "$PC" "$MC" BTS_RESUME_MEMORY_BYTES=1048576
./target/release/bts-guru-bench --port "$PC" --json-only fanout -c 500 -k 500 -r 500 -d 6 --channel-prefix sports.pos.mem >/dev/null 2>&1 || true
curl -s "127.0.0.1:$MC/metrics" | grep -E '^bts_resume_(history_bytes|history_bytes_limit|channels|channels_dropped_total|events_total) '
