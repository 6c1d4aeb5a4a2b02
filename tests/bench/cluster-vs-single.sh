#!/usr/bin/env bash
# Benchmarks a three-node cluster (replication factor 3, write quorum 2) against a single
# node on this machine, in one run, with the same load generator (`nxcache bench`), and
# prints throughput ratios. A fourth member is drained, so it owns no key: every PUT and
# GET through it is relayed to the owners ("through a non-owner").
#
# All nodes run with --fsync off, so the ratios show what replication costs (the
# network hops and the extra copies), not disk flushes.
#
# Usage: tests/bench/cluster-vs-single.sh [--count N] [--rounds N]
# Results (JSON lines) go to bench-results/ in the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
count=1000
rounds=3
while (($#)); do
  case $1 in
    --count) count=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
source "$root/tests/bench/lib.sh"
bench_setup cluster-vs-single

export NXCACHE_READ_WRITE_TOKENS=bench-token-0123456789 NXCACHE_ADMIN_TOKENS=bench-admin-token-0123456789
export NXCACHE_CLUSTER_SECRET=bench-cluster-secret-0123456789

start_node() { # $1 name, then extra flags; prints the base URL
  local name=$1; shift
  local port; port=$(free_port)
  "$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/$name" --fsync off \
    --max-disk-usage 200GiB --log-level warn "$@" >/dev/null 2>&1 &
  track_pid $!
  wait_http "http://127.0.0.1:$port/healthz"
  echo "http://127.0.0.1:$port"
}

single=$(start_node single --grpc-listen "127.0.0.1:$(free_port)")
wait_http "$single/readyz"

seed_port=$(free_port)
urls=()
for id in 1 2 3 4; do
  grpc=$([ "$id" = 1 ] && echo "$seed_port" || free_port)
  flags=(--node-id "$id" --grpc-listen "127.0.0.1:$grpc" --advertise "127.0.0.1:$grpc")
  if [ "$id" = 1 ]; then flags+=(--bootstrap --replication-factor 3 --write-quorum 2); else flags+=(--join "127.0.0.1:$seed_port"); fi
  urls+=("$(start_node "node-$id" "${flags[@]}")")
done
admin() { NXCACHE_ADMIN_TOKEN=bench-admin-token-0123456789 "$bin" admin --server "${urls[0]}" "$@"; }
settled() { # $1 = expected members
  admin status --json 2>/dev/null | python3 -c "
import json,sys
s=json.load(sys.stdin)
ok = s['leader_id'] is not None and len(s['members']) == $1 and all(m['reachable'] for m in s['members'])
sys.exit(0 if ok else 1)"
}
for _ in $(seq 600); do settled 4 && break; sleep 0.1; done
settled 4 || { echo "the cluster did not form" >&2; exit 1; }
admin nodes drain 4 >/dev/null
echo "cluster: nodes 1-3 own every key (R=3, W=2); node 4 is drained and owns none"

echo "1 MiB objects, concurrency 32, $count objects, $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  echo "round $r"
  bench single "$single" 1MiB 32 "$count" 1
  bench cluster-owner "${urls[0]}" 1MiB 32 "$count" 1
  bench cluster-non-owner "${urls[3]}" 1MiB 32 "$count" 1
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(label, phase):
    return statistics.median(r["report"][phase]["requests_per_second"] for r in rows if r["label"] == label)
errors = sum(r["report"][p]["errors"] for r in rows for p in ("put", "get"))
print("\nmedians over rounds, ratios against the single node measured in the same run:")
for label in ["cluster-owner", "cluster-non-owner"]:
    print(f"  {label:<18} 1 MiB PUT {med(label, 'put') / med('single', 'put'):.2f}x   GET {med(label, 'get') / med('single', 'get'):.2f}x")
print(f"  errors in all rounds: {errors}")
PY
echo "raw results: $out"
