#!/usr/bin/env bash
# The test command: on a fresh Debian machine (with Rust from rustup), installs what the tests
# need -- a C compiler for glommio's bundled liburing, redis-server, Node.js and npm, Chromium
# for the console's browser test, the Node packages of the client-compatibility and browser
# tests, iproute2 for the network-namespace tests (faults, conflation), and curl for the HTTP upload test --
# then runs every check and every test.
# `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v redis-server >/dev/null || need+=(redis-server)
# tests/redis_ha.rs creates a Redis Cluster with redis-cli (redis-tools, a dependency of
# redis-server) and runs sentinels as `redis-server --sentinel` (no redis-sentinel package).
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
{ command -v prlimit >/dev/null && command -v setpriv >/dev/null; } || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
# tests/http_bodies.rs uploads with curl (Expect: 100-continue, chunked).
command -v curl >/dev/null || need+=(curl)
# tests/faults.rs puts a client in a network namespace behind a veth pair (needs root, as CI is);
# tests/conflation.rs also shapes that link with `tc` (iproute2 too).
{ command -v ip >/dev/null && command -v tc >/dev/null; } || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "Node.js >= 20.19 is needed for the client-compatibility tests (laravel-echo 2); found $(node --version 2>/dev/null || echo none)." >&2
  echo "On Debian 12 install a newer Node.js (e.g. the nodejs package from Debian 13 or NodeSource), then rerun." >&2
  exit 1
fi

echo "== npm ci (tests/compat: pusher-js, pusher, laravel-echo, playwright-core, ws)"
npm ci --prefix tests/compat --no-audit --no-fund --loglevel=error

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
# glommio's CI runs its tests under a small memlock limit too; ours fit 3 shards in 8 MiB.
cargo test --all-targets --locked
