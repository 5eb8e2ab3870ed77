#!/usr/bin/env bash
# The README's first command: set up this machine, build two OS images, start a local
# ttserver on 127.0.0.1 (SQLite state, TCG or KVM as the host allows), and show the
# product at work: `tt env add/run/del` across both images, then a small pytest run over
# the same OS matrix with the pytest_ttstack plugin.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_PATH=${TTSTACK_IMAGE_PATH:-/var/lib/ttstack/images}
STATE=${TTSTACK_DEMO_STATE:-/var/lib/ttstack/demo-state}
PORT=${TTSTACK_DEMO_PORT:-20000}
bash scripts/setup-host.sh

mkdir -p "$STATE"
ttserver --image-path "$IMAGE_PATH" --cfgdb-path "$STATE" --serv-addr 127.0.0.1 \
  --serv-port "$PORT" --cpu-total 2 --mem-total 2G --disk-total 20G \
  --port-range 42000-42999 >"$STATE/ttserver.log" 2>&1 &
SERVER=$!
export TT_CONFIG="$STATE/tt-config.json"
cleanup() {
  tt env del demo >/dev/null 2>&1 || true
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 60); do tt --server "127.0.0.1:$PORT" status >/dev/null 2>&1 && break; sleep 0.5; done

set -x
tt config --serv-addr 127.0.0.1 --serv-port "$PORT"
tt status --remote
tt env add demo --os-prefix=debian-12,debian-13
tt env list
tt env run demo --cmd 'uname -m; grep PRETTY_NAME /etc/os-release'
tt env del demo
python3 -m pytest -p no:cacheprovider -q --tt-server "127.0.0.1:$PORT" \
  --tt-os=debian-12,debian-13 examples/test_demo.py
