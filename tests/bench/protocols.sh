#!/usr/bin/env bash
# Throughput of each protocol nxcache serves (Nx, Bazel, Gradle, ccache, Turborepo) on
# one node, in one run, with the same load generator (`nxcache bench --protocol`), and
# the ratio of each to the Nx route. Objects of 1 MiB by default. The protocols take
# turns for --rounds rounds and each one's best round counts, so a warming node or a
# busy neighbour does not fall on one protocol alone.
#
# Usage: tests/bench/protocols.sh [--count N] [--concurrency N] [--size SIZE] [--rounds N]
#   NXCACHE_BENCH_BIN=target/debug/nxcache to skip the release build.
# Results (JSON lines) go to bench-results/ in the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
count=300
concurrency=8
size=1MiB
rounds=2
while (($#)); do
  case $1 in
    --count) count=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
source "$root/tests/bench/lib.sh"
bench_setup protocols

export NXCACHE_READ_WRITE_TOKENS=bench
port=$(free_port)
"$bin" serve --listen "127.0.0.1:$port" --grpc-listen "127.0.0.1:$(free_port)" \
  --data-dir "$work/node" --fsync off --max-disk-usage 200GiB --log-level warn \
  >"$work/node.log" 2>&1 &
track_pid $!
url="http://127.0.0.1:$port"
wait_http "$url/readyz"

echo "objects of $size, $count per protocol and round, concurrency $concurrency, one node, --fsync off, best of $rounds rounds"
for _ in $(seq "$rounds"); do
  for protocol in nx bazel gradle ccache turbo; do
    json=$("$bin" bench --url "$url" --token bench --protocol "$protocol" --size "$size" \
      --concurrency "$concurrency" --count "$count" --json)
    echo "{\"label\":\"$protocol\",\"report\":$json}" >>"$out"
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    for phase in ("put", "get"):
        mib = r["report"][phase]["mib_per_second"]
        best[(r["label"], phase)] = max(best.get((r["label"], phase), 0.0), mib)
print(f"{'protocol':<8} {'PUT MiB/s':>10} {'vs nx':>6} {'GET MiB/s':>10} {'vs nx':>6}")
for label in ("nx", "bazel", "gradle", "ccache", "turbo"):
    put, get = best[(label, "put")], best[(label, "get")]
    print(f"{label:<8} {put:>10.1f} {put / best[('nx', 'put')]:>6.2f} {get:>10.1f} {get / best[('nx', 'get')]:>6.2f}")
PY
echo "results: $out"
