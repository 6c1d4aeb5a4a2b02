# Shared by the benchmark scripts: sourced after `set -euo pipefail`, with $root set.
# Builds the release binary (or takes $NXCACHE_BENCH_BIN) and sets up: $bin, $work (removed on exit), $out (the JSON
# lines file, named after $1), track_pid PID for processes to stop on exit.
bench_setup() { # $1 = results file prefix
  command -v python3 >/dev/null || { echo "python3 is needed to compute ratios" >&2; exit 2; }
  if [ -n "${NXCACHE_BENCH_BIN:-}" ]; then
    # A binary already built (e.g. target/debug/nxcache where a release build costs too
    # much): ratios within one run stay meaningful, absolute figures do not.
    bin=$NXCACHE_BENCH_BIN
  else
    (cd "$root" && cargo build --release -q -p nxcache)
    bin="$root/target/release/nxcache"
  fi
  work=$(mktemp -d /var/tmp/nxcache-bench.XXXXXX)
  mkdir -p "$root/bench-results"
  out="$root/bench-results/$1-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
  trap bench_cleanup EXIT
}

# Servers are often started inside $(...), a subshell whose variables die with it: their
# pids go to a file, so the cleanup sees every one.
track_pid() { echo "$1" >>"$work/pids"; }

bench_cleanup() {
  if [ -f "$work/pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
    while read -r p; do
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done <"$work/pids"
  fi
  wait 2>/dev/null || true
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { for _ in $(seq 200); do "$bin" probe "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

bench() { # $1 label, $2 url, $3 size, $4 concurrency, $5 count, $6 get rounds
  local json
  json=$("$bin" bench --url "$2" --token bench-token-0123456789 --size "$3" --concurrency "$4" --count "$5" --get-rounds "$6" --json)
  echo "{\"label\":\"$1\",\"report\":$json}" | tee -a "$out" >/dev/null
  echo "$json" | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"  {'$1':<22} PUT {r['put']['requests_per_second']:8.1f}/s  GET {r['get']['requests_per_second']:8.1f}/s  GET p50 {r['get']['p50_ms']:.3f} ms p99 {r['get']['p99_ms']:.3f} ms\")"
}
