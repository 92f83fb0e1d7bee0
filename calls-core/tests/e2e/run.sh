#!/usr/bin/env bash
# End-to-end tests: headless Chromium (Debian package, driven by playwright-core), an aiortc
# participant and a coturn TURN relay against the reference server (red.test.mjs also needs root
# for a network namespace and nftables; recording.test.mjs needs ffmpeg). Installs what is missing,
# builds the server, runs every test; exits non-zero on any failure. Server (and coturn) logs
# land in calls-core/tests/e2e/logs/. screenshot.mjs (docs/demo-three-participants.png) and
# recording_cpu.mjs (docs/recording.md's CPU table) are not part of the run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing chromium (apt)"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

if ! command -v turnserver >/dev/null; then
  echo "== installing coturn (apt; turn.test.mjs starts its own turnserver on loopback)"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y coturn
fi

if ! command -v ffprobe >/dev/null; then
  echo "== installing ffmpeg (apt; recording.test.mjs reads and decodes the recorded files)"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg
fi

if ! command -v nft >/dev/null; then
  echo "== installing nftables (apt; red.test.mjs drops a share of UDP inside a network namespace)"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nftables
fi

echo "== npm ci"
(cd "$here" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

if ! python3 -c 'import aiortc, websockets' 2>/dev/null; then
  echo "== installing aiortc and websockets (pip)"
  python3 -m pip install -q aiortc websockets
fi

# The debug build reuses what `cargo test` built (dependencies are optimized in the dev
# profile); CALLS_E2E_PROFILE=release tests the release binary instead. A CALLS_SERVER_BIN that
# exists is used as it is (CI passes the binary `cargo test` built, whose features differ).
profile="${CALLS_E2E_PROFILE:-debug}"
if [ -n "${CALLS_SERVER_BIN:-}" ] && [ -x "$CALLS_SERVER_BIN" ]; then
  echo "== using the server $CALLS_SERVER_BIN"
elif [ "$profile" = release ]; then
  echo "== building the server ($profile)"
  (cd "$root" && cargo build --release -p calls-core --features server --bin calls-server)
else
  echo "== building the server ($profile)"
  (cd "$root" && cargo build -p calls-core --features server --bin calls-server)
fi
export CALLS_SERVER_BIN="${CALLS_SERVER_BIN:-${CARGO_TARGET_DIR:-$root/target}/$profile/calls-server}"

echo "== running the end-to-end tests"
cd "$here"
# One test at a time: this machine has two cores and a test runs up to six Chromium pages.
exec node --test --test-concurrency=1 browser.test.mjs aiortc.test.mjs turn.test.mjs ops.test.mjs limits.test.mjs simulcast.test.mjs slots.test.mjs red.test.mjs recording.test.mjs nodes.test.mjs
