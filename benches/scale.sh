#!/bin/bash
# Multi-core scaling: the highest deliveries/s bts-guru sustains (no loss, p99 <= 50 ms) at
# 10,000 subscribers over 10 channels, for each shard count in SHARDS_LIST (shards pinned to
# CPUs 0..N-1), with the generator pinned to GEN_CPUS. Meant for a host with 16 or more CPUs;
# see BENCHMARKS.md ("Multi-core scaling") for a run and how to read it.
#
# Knobs: SHARDS_LIST ("1 2 4 8"), GEN_CPUS (8-15), GEN_THREADS (8), C (10000 subscribers),
#        START (200 ev/s), FACTOR (1.5), STEPS (11), STEP_S (2), STEP_TIMEOUT (140 s),
#        BTS / BENCH (the release binaries), OUT (where the JSON results go).
cd "$(dirname "$0")/.."
BTS=${BTS:-target/release/bts-guru}
BENCH=${BENCH:-target/release/bts-guru-bench}
OUT=${OUT:-target/scale/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
{
nproc; uname -r; grep -m1 "model name" /proc/cpuinfo
ulimit -n 200000 2>/dev/null || ulimit -n 65536
ulimit -l unlimited 2>/dev/null || true
ulimit -n; ulimit -l
cat /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/tcp_congestion_control
} > "$OUT/machine.txt" 2>&1
ulimit -n 200000 2>/dev/null || ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
ulimit -l unlimited 2>/dev/null || true
sysctl -qw net.ipv4.ip_local_port_range="1024 65000" || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
for N in ${SHARDS_LIST:-1 2 4 8}; do
  PORT=$(free_port)
  REVERB_APP_ID=bench REVERB_APP_KEY=bench-key REVERB_APP_SECRET=bench-secret \
    "$BTS" --host 127.0.0.1 --port "$PORT" --no-metrics --shards "$N" > "$OUT/server-$N.log" 2>&1 &
  SP=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  kill -0 "$SP" 2>/dev/null || { echo "shards $N: server exited"; tail -5 "$OUT/server-$N.log"; continue; }
  timeout ${STEP_TIMEOUT:-140} taskset -c ${GEN_CPUS:-8-15} "$BENCH" --port "$PORT" --app-id bench --app-key bench-key \
    --app-secret bench-secret --server-pid "$SP" --json-only max -c ${C:-10000} -k 10 --threads ${GEN_THREADS:-8} \
    --start-rate ${START:-200} --step-factor ${FACTOR:-1.5} --step-s ${STEP_S:-2} --drain-ms 1500 --p99-ms 50 --max-steps ${STEPS:-11} --publishers 4 \
    > "$OUT/max-$N.json" 2> "$OUT/max-$N.log"
  echo "shards $N: exit $? $(date -u +%T)"
  kill "$SP"; wait "$SP" 2>/dev/null
  python3 - "$OUT/max-$N.json" <<'PY' 2>/dev/null || tail -c 600 "$OUT/max-$N.json"
import json,sys
d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
b=d.get('best') or {}
print(json.dumps({'max_deliveries_per_s':d.get('max_deliveries_per_s'),'stop':d.get('stop_reason'),'rate':b.get('rate'),'achieved':b.get('achieved_rate'),'srv_cores':b.get('server_cpu_cores'),'cpu_per_1000':b.get('server_cpu_ms_per_1000_deliveries'),'gen_cores':b.get('generator_cpu_cores'),'p99_ms':(b.get('latency_us') or {}).get('p99',0)/1000,'missing':b.get('missing'),'ok':d.get('ok'),'problems':d.get('problems')}))
PY
done
