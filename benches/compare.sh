#!/usr/bin/env bash
# Side-by-side: the same bts-guru-bench scenarios against bts-guru, Sockudo and Soketi on this
# machine, in one run, REPEATS times each (fresh server per scenario), then the medians and the
# ratios to Sockudo (benches/compare_summary.py). Optional, not part of CI. See BENCHMARKS.md.
#
# Set up once (Debian):
#   apt-get install -y protobuf-compiler python3
#   cargo install sockudo --locked --version 5.2.0 --root /opt/sockudo     # SOCKUDO=/opt/sockudo/bin/sockudo
#   mkdir -p /opt/soketi && cd /opt/soketi && cat > package.json <<'EOF'
#   {"private":true,"dependencies":{"@soketi/soketi":"1.6.1"},
#    "overrides":{"uWebSockets.js":"npm:@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0"}}
#   EOF
#   npm install                                                              # SOKETI_DIR=/opt/soketi
#   cargo build --release                                                    # bts-guru and bts-guru-bench
#
# Run:   SOCKUDO=… SOKETI_DIR=… benches/compare.sh
# Knobs: REPEATS (3), SERVERS ("bts-guru sockudo soketi"), SCENARIOS ("fanout5k sat1k max1k idle10k";
#        also fanout5kz and idle10kz: the same with permessage-deflate offered),
#        OUT (target/compare/<time>), SHARDS (bts-guru shards; default: all CPUs).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BTS=${BTS:-$ROOT/target/release/bts-guru}
BENCH=${BENCH:-$ROOT/target/release/bts-guru-bench}
SOCKUDO=${SOCKUDO:-$(command -v sockudo || echo /work/sockudo-install/bin/sockudo)}
SOKETI_DIR=${SOKETI_DIR:-/work/soketi}
REPEATS=${REPEATS:-3}
SERVERS=${SERVERS:-"bts-guru sockudo soketi"}
SCENARIOS=${SCENARIOS:-"fanout5k sat1k max1k idle10k"}
OUT=${OUT:-$ROOT/target/compare/$(date -u +%Y%m%dT%H%M%SZ)}
APP_ID=bench APP_KEY=bench-key APP_SECRET=bench-secret
mkdir -p "$OUT"

for f in "$BTS" "$BENCH"; do
  [[ -x $f ]] || { echo "missing $f: run cargo build --release" >&2; exit 2; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts server $1 on port $2; prints its PID (the process that owns the sockets).
start_server() {
  local name=$1 port=$2 log=$3
  case $name in
    bts-guru)
      REVERB_APP_ID=$APP_ID REVERB_APP_KEY=$APP_KEY REVERB_APP_SECRET=$APP_SECRET \
        "$BTS" --host 127.0.0.1 --port "$port" --no-metrics ${SHARDS:+--shards $SHARDS} \
        >"$log" 2>&1 &
      ;;
    sockudo)
      [[ -x $SOCKUDO ]] || { echo "Sockudo not found (set SOCKUDO)" >&2; return 1; }
      HOST=127.0.0.1 PORT=$port METRICS_ENABLED=false RATE_LIMITER_ENABLED=false \
        SOCKUDO_MAX_CONNECTIONS=1000000 SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=1000000 \
        SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=1000000 \
        SOCKUDO_DEFAULT_APP_ID=$APP_ID SOCKUDO_DEFAULT_APP_KEY=$APP_KEY \
        SOCKUDO_DEFAULT_APP_SECRET=$APP_SECRET SOCKUDO_ENABLE_CLIENT_MESSAGES=true \
        "$SOCKUDO" >"$log" 2>&1 &
      ;;
    soketi)
      [[ -d $SOKETI_DIR/node_modules/@soketi/soketi ]] || { echo "Soketi not found (set SOKETI_DIR)" >&2; return 1; }
      SOKETI_HOST=127.0.0.1 SOKETI_PORT=$port SOKETI_METRICS_ENABLED=false \
        SOKETI_DEFAULT_APP_ID=$APP_ID SOKETI_DEFAULT_APP_KEY=$APP_KEY \
        SOKETI_DEFAULT_APP_SECRET=$APP_SECRET SOKETI_DEFAULT_APP_ENABLE_CLIENT_MESSAGES=true \
        node "$SOKETI_DIR/node_modules/@soketi/soketi/bin/server.js" start >"$log" 2>&1 &
      ;;
  esac
  local pid=$!
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { echo "$name exited at start; log:" >&2; tail -20 "$log" >&2; return 1; }
    sleep 0.1
  done
  echo "$name did not listen on $port within 30 s" >&2
  kill "$pid" 2>/dev/null || true
  return 1
}

stop_server() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

scenario_args() {
  case $1 in
    # Server CPU per 1,000 deliveries and latency at 5,000 subscribers on one channel, 10 ev/s.
    fanout5k) echo "fanout -c 5000 -k 1 -r 10 -d 20" ;;
    # The same at saturation: 1,000 subscribers on one channel, 200 events/s offered.
    sat1k) echo "fanout -c 1000 -k 1 -r 200 -d 10 --publishers 4" ;;
    # Highest sustained deliveries/s at 1,000 subscribers with no loss and p99 <= 50 ms.
    max1k) echo "max -c 1000 -k 10 --start-rate 200 --step-factor 1.5 --step-s 3 --drain-ms 2000 --p99-ms 50 --max-steps 12" ;;
    # RSS per idle connection and connection rate (connect through subscription_succeeded).
    idle10k) echo "idle -c 10000 -k 1 --hold-s 2" ;;
    # The same two with permessage-deflate offered as browsers offer it (issue 16): wire bytes
    # per delivery and CPU per delivery when the server compresses; memory with it negotiated.
    # A server that refuses the offer answers without the extension and sends plain frames.
    fanout5kz) echo "--deflate fanout -c 5000 -k 1 -r 10 -d 20" ;;
    idle10kz) echo "--deflate idle -c 10000 -k 1 --hold-s 2" ;;
    *) echo "unknown scenario $1" >&2; return 1 ;;
  esac
}

{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
  echo "bts-guru: $("$BTS" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?))"
  [[ -x $SOCKUDO ]] && echo "sockudo: $("$SOCKUDO" --version 2>/dev/null | head -1 || echo '?')"
  [[ -d $SOKETI_DIR ]] && echo "soketi: $(node -p "require('$SOKETI_DIR/node_modules/@soketi/soketi/package.json').version" 2>/dev/null || echo '?')"
  echo "repeats: $REPEATS; scenarios: $SCENARIOS"
} | tee "$OUT/machine.txt"

for rep in $(seq 1 "$REPEATS"); do
  for scen in $SCENARIOS; do
    for srv in $SERVERS; do
      port=$(free_port)
      log="$OUT/$srv-$scen-$rep.server.log"
      pid=$(start_server "$srv" "$port" "$log") || { echo "skip $srv $scen #$rep"; continue; }
      sleep 1
      # shellcheck disable=SC2046
      set +e
      timeout 600 "$BENCH" --port "$port" --app-id "$APP_ID" --app-key "$APP_KEY" \
        --app-secret "$APP_SECRET" --server-pid "$pid" --json-only \
        $(scenario_args "$scen") >"$OUT/$srv-$scen-$rep.json" 2>"$OUT/$srv-$scen-$rep.bench.log"
      rc=$?
      set -e
      stop_server "$pid"
      echo "$(date -u +%T) $srv $scen #$rep: exit $rc"
    done
  done
done

if [[ " $SERVERS " == *" soketi "* ]]; then
  if grep -qh "Falling back to a NodeJS implementation" "$OUT"/soketi-*.server.log 2>/dev/null; then
    echo "WARNING: Soketi fell back to its NodeJS WebSocket implementation (uWebSockets.js did not load)" | tee -a "$OUT/machine.txt"
  else
    echo "soketi: uWebSockets.js loaded (no \"Falling back to a NodeJS implementation\" in its logs)" | tee -a "$OUT/machine.txt"
  fi
fi

python3 "$ROOT/benches/compare_summary.py" "$OUT" | tee "$OUT/summary.md"
echo "raw results and logs: $OUT"
