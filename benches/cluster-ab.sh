#!/usr/bin/env bash
# A/B of the cluster path: two nodes in cluster mode on one loopback Redis, subscribers on node
# B, signed HTTP publishes to node A (every delivery crosses nodes through Redis), 1 shard each;
# runs binary A and binary B interleaved, 3 times each, and prints one JSON line per run
# (bts-guru-bench fanout; `server` is node A's CPU).
# Usage: benches/cluster-ab.sh BIN_A BIN_B [fanout args...]
#   e.g. benches/cluster-ab.sh /tmp/bts-guru-main target/release/bts-guru -c 20 -k 1 -r 2000 -d 10 --publishers 8
set -u
BIN_A=$1
BIN_B=$2
shift 2
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(-c 100 -k 1 -r 500 -d 10 --publishers 4)
BENCH=${BENCH:-target/release/bts-guru-bench}
RP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
D=$(mktemp -d)
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no --dir $D >/dev/null 2>&1 &
RPID=$!
sleep 0.5
run() {
  local bin=$1 tag=$2
  local pa=$((20000 + RANDOM % 20000)) pb=$((40000 + RANDOM % 20000))
  env -i PATH=$PATH HOME=$D REDIS_URL=redis://127.0.0.1:$RP/0 REVERB_SCALING_ENABLED=true $bin --port $pa --shards 1 --no-metrics >$D/a.log 2>&1 &
  local A=$!
  env -i PATH=$PATH HOME=$D REDIS_URL=redis://127.0.0.1:$RP/0 REVERB_SCALING_ENABLED=true $bin --port $pb --shards 1 --no-metrics >$D/b.log 2>&1 &
  local B=$!
  sleep 3
  local out
  out=$($BENCH --port $pb --api-port $pa --server-pid $A --json-only fanout "${ARGS[@]}" 2>&1 | tail -1)
  echo "$tag $out"
  kill $A $B; wait $A $B 2>/dev/null
}
for i in 1 2 3; do
  run "$BIN_A" A
  run "$BIN_B" B
done
kill $RPID
rm -rf "$D"
