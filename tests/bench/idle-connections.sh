#!/usr/bin/env bash
# Measures what 500 idle or trickling (slowloris) connections cost normal requests: the
# p99 of sequential 4 KiB PUTs and GETs against one node alone, then with 250 connections
# that send nothing and 250 that send a request's headers a byte every 100 ms, and the
# ratio. Target: loaded p99 < 10x the baseline (or < 250 ms), i.e. held connections cost
# scheduling noise, not a wait for a free connection slot.
#
# The behaviour (every request still answered while the connections are held) is tested
# by tests/contract.rs; this is the timing, which a test must not assert on.
#
# Usage: tests/bench/idle-connections.sh [--count N] [--held N]
# Results (JSON lines) go to bench-results/ in the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
count=200
held=500
while (($#)); do
  case $1 in
    --count) count=$2; shift 2 ;;
    --held) held=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
source "$root/tests/bench/lib.sh"
bench_setup idle-connections

port=$(free_port)
NXCACHE_READ_WRITE_TOKENS=bench "$bin" serve --listen "127.0.0.1:$port" \
  --grpc-listen "127.0.0.1:$(free_port)" --data-dir "$work/node" --fsync off \
  --log-level warn >/dev/null 2>&1 &
track_pid $!
url="http://127.0.0.1:$port"
wait_http "$url/healthz"

p99s() { # $1 label: one sequential bench run; prints "PUT-p99 GET-p99" in ms
  local json
  json=$("$bin" bench --url "$url" --token bench --size 4KiB --concurrency 1 --count "$count" --json)
  echo "{\"label\":\"$1\",\"held\":$held,\"report\":$json}" >>"$out"
  echo "$json" | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['put']['p99_ms'], r['get']['p99_ms'])"
}

read -r put_alone get_alone < <(p99s alone)

# The held connections, from a helper process that keeps them for as long as it runs.
python3 - "$port" "$held" <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if i % 2:
        s.sendall(b"GET /v1/cache/1 HTTP/1.1\r\nHo")
    conns.append(s)
print("held", flush=True)
while True:
    for s in conns[1::2]:
        try:
            s.sendall(b"s")
        except OSError:
            pass
    time.sleep(0.1)
PY
track_pid $!
sleep 1

read -r put_loaded get_loaded < <(p99s "with $held held")

python3 - "$put_alone" "$get_alone" "$put_loaded" "$get_loaded" "$held" <<'PY'
import sys
pa, ga, pl, gl = map(float, sys.argv[1:5])
print(f"  p99 alone:            PUT {pa:8.2f} ms  GET {ga:8.2f} ms")
print(f"  p99 with {sys.argv[5]} held: PUT {pl:8.2f} ms  GET {gl:8.2f} ms  ({pl/pa:.2f}x, {gl/ga:.2f}x)")
ok = all(l < max(a * 10, 250) for a, l in ((pa, pl), (ga, gl)))
print("  target (< 10x or < 250 ms):", "met" if ok else "NOT met")
PY
