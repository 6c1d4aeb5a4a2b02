#!/usr/bin/env bash
# Benchmarks one nxcache node against Debian's nginx (WebDAV PUT: temp file + rename, no
# fsync) on this machine, in one run, with the same load generator (`nxcache bench`),
# and prints throughput ratios. Also measures 1 KiB GET latency and the peak RSS of a
# node while a 1 GiB artifact goes in and out.
#
# Usage: tests/bench/vs-nginx.sh [--count N] [--rounds N] [--skip-rss]
# Results (JSON lines) go to bench-results/ in the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
count=2000
rounds=3
rss=1
while (($#)); do
  case $1 in
    --count) count=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --skip-rss) rss=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if ! command -v nginx >/dev/null 2>&1; then
  echo "installing Debian's nginx-light (WebDAV module included)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
  # The package starts a system-wide nginx on port 80; this benchmark runs its own.
  (systemctl stop nginx || service nginx stop || pkill -x nginx) >/dev/null 2>&1 || true
fi
source "$root/tests/bench/lib.sh"
bench_setup vs-nginx

# nginx: as many workers as nxcache has runtime threads (one per core).
nginx_port=$(free_port)
mkdir -p "$work/nginx/www/v1/cache" "$work/nginx/tmp"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes $(nproc);
# The work dir is private to this (root) shell; workers must write into it.
user root;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $work/nginx/tmp;
  server {
    listen 127.0.0.1:$nginx_port;
    root $work/nginx/www;
    location = /healthz { return 200 "ok"; }
    location /v1/cache/ {
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 0;
      client_body_buffer_size 1m;
    }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
track_pid $!
wait_http "http://127.0.0.1:$nginx_port/healthz"

start_nxcache() { # $1 = fsync on|off ; prints the base URL
  local port; port=$(free_port)
  NXCACHE_READ_WRITE_TOKENS=bench-token-0123456789 "$bin" serve --listen "127.0.0.1:$port" --grpc-listen "127.0.0.1:$(free_port)" \
    --data-dir "$work/nxcache-$1-$RANDOM" --fsync "$1" --max-disk-usage 200GiB \
    --log-level warn >/dev/null 2>&1 &
  track_pid $!
  wait_http "http://127.0.0.1:$port/readyz"
  echo "http://127.0.0.1:$port"
}
nx_off=$(start_nxcache off)
nx_on=$(start_nxcache on)

echo "1 MiB objects, concurrency 32, $count objects, $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  echo "round $r"
  bench nginx "http://127.0.0.1:$nginx_port" 1MiB 32 "$count" 1
  bench nxcache-fsync-off "$nx_off" 1MiB 32 "$count" 1
  bench nxcache-fsync-on "$nx_on" 1MiB 32 "$count" 1
done
echo "1 KiB GET latency, concurrency 32"
for r in $(seq "$rounds"); do
  bench nginx-1k "http://127.0.0.1:$nginx_port" 1KiB 32 2000 10
  bench nxcache-1k "$nx_off" 1KiB 32 2000 10
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(label, phase, key):
    return statistics.median(r["report"][phase][key] for r in rows if r["label"] == label)
print("\nmedians over rounds, ratios against nginx measured in the same run:")
for label in ["nxcache-fsync-off", "nxcache-fsync-on"]:
    put = med(label, "put", "requests_per_second") / med("nginx", "put", "requests_per_second")
    get = med(label, "get", "requests_per_second") / med("nginx", "get", "requests_per_second")
    print(f"  {label:<18} 1 MiB PUT throughput {put:.2f}x   GET throughput {get:.2f}x")
for p in ["p50_ms", "p99_ms"]:
    n, x = med("nginx-1k", "get", p), med("nxcache-1k", "get", p)
    print(f"  1 KiB GET {p[:3]}: nginx {n:.3f} ms, nxcache {x:.3f} ms ({x / n:.2f}x)")
PY

if ((rss)); then
  echo "peak RSS of a fresh node while a 1 GiB artifact is PUT, then GET"
  port=$(free_port)
  NXCACHE_READ_WRITE_TOKENS=bench-token-0123456789 "$bin" serve --listen "127.0.0.1:$port" --grpc-listen "127.0.0.1:$(free_port)" \
    --data-dir "$work/rss" --fsync off --max-disk-usage 4GiB --log-level warn >/dev/null 2>&1 &
  rss_pid=$!
  track_pid "$rss_pid"
  wait_http "http://127.0.0.1:$port/readyz"
  head -c 1073741824 /dev/urandom > "$work/big.bin"
  base=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
  curl -sf -H "Authorization: Bearer bench" -T "$work/big.bin" \
    -H 'Content-Type: application/octet-stream' "http://127.0.0.1:$port/v1/cache/1" -o /dev/null
  after_put=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
  curl -sf -H "Authorization: Bearer bench" "http://127.0.0.1:$port/v1/cache/1" -o "$work/back.bin"
  after_get=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
  cmp -s "$work/big.bin" "$work/back.bin" || { echo "1 GiB round trip differs" >&2; exit 1; }
  echo "  peak RSS: at start $((base / 1024)) MiB, after PUT $((after_put / 1024)) MiB, after GET $((after_get / 1024)) MiB (1 GiB round trip byte-identical)"
  echo "{\"label\":\"rss-1gib\",\"vmhwm_kib\":{\"start\":$base,\"after_put\":$after_put,\"after_get\":$after_get}}" >> "$out"
fi
echo "raw results: $out"
