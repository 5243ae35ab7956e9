#!/usr/bin/env bash
# Positioned vs plain channels: server CPU per delivery, same daemon, runs interleaved
# (plain, positioned, plain, positioned, ...), then the reconnect scenario.
#   benches/resume_cost.sh [repeats] [connections] [rate]
# Needs release builds: cargo build --release --bin bts-guru && cargo build --release -p bts-guru-bench
set -euo pipefail
REPEATS=${1:-3}
CONNS=${2:-5000}
RATE=${3:-10}
cd "$(dirname "$0")/.."
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PORT=$(free_port)
MPORT=$(free_port)
OUT=$(mktemp -d)
export REVERB_APP_ID=bench REVERB_APP_KEY=bench-key REVERB_APP_SECRET=bench-secret
BTS_APP_RESUME='sports.pos.*,sports.resume.*' ./target/release/bts-guru --host 127.0.0.1 \
  --port "$PORT" --metrics-port "$MPORT" --shards 2 >"$OUT/daemon.out" 2>"$OUT/daemon.err" &
DPID=$!
trap 'kill $DPID 2>/dev/null; wait $DPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q ready "$OUT/daemon.out" && break; sleep 0.1; done
bench() { ./target/release/bts-guru-bench --port "$PORT" --server-pid "$DPID" --json-only "$@"; }
for i in $(seq "$REPEATS"); do
  for kind in plain positioned; do
    prefix=news.plain.l; [ "$kind" = positioned ] && prefix=sports.pos.l
    line=$(bench fanout -c "$CONNS" -k 10 --channels-per-event 10 -r "$RATE" -d 10 --channel-prefix "$prefix" | tail -1)
    echo "$kind $i $(echo "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); s=r["server"]; print(json.dumps({"ok": r["ok"], "cpu_ms_per_1000": s.get("cpu_ms_per_1000_deliveries"), "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"], "deliveries": r["deliveries"]["received"]}))')"
  done
done
bench reconnect -c 2000 -k 20 -r 100 -d 10 | tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print("reconnect", json.dumps({"ok": r["ok"], **r["result"]}))'
curl -s "127.0.0.1:$MPORT/metrics" | grep -E '^bts_resume_history_bytes'
