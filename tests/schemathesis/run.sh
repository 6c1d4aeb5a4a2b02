#!/usr/bin/env bash
# Hostile HTTP input against a live node: schemathesis (pinned, installed into
# target/venv-st on first use) generates valid and invalid requests from
# docs/openapi.yaml and checks every answer: no 5xx, no status code or content type
# outside the spec. Run with a read-write token, then a read-only one.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
version=4.32.5
venv=target/venv-st
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi
cargo build --quiet -p nxcache
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
NXCACHE_READ_WRITE_TOKENS=st-read-write-token-0001 NXCACHE_READ_ONLY_TOKENS=st-read-only-token-0001 \
  target/debug/nxcache serve --listen "127.0.0.1:$port" --grpc-listen 127.0.0.1:0 \
  --data-dir "$work/data" --max-artifact-size 1MiB --fsync off --log-level warn \
  2>"$work/node.log" &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  target/debug/nxcache probe "http://127.0.0.1:$port/readyz" 2>/dev/null && break
  sleep 0.1
done

checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance
status=0
for token in st-read-write-token-0001 st-read-only-token-0001; do
  echo "== schemathesis with token $token"
  "$venv/bin/schemathesis" run docs/openapi.yaml \
    --url "http://127.0.0.1:$port" \
    --header "Authorization: Bearer $token" \
    --checks "$checks" \
    --max-examples "${SCHEMATHESIS_EXAMPLES:-200}" \
    --seed 1 \
    --workers 2 \
    --request-timeout 10 \
    --suppress-health-check too_slow \
    --report junit --report-junit-path "$work/junit-$token.xml" || status=$?
  python3 - "$work/junit-$token.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
cases = sum(int(s.get("tests", 0)) for s in suites)
failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
print(f"schemathesis: {cases} operations tested, {failures} failed")
PY
done
if grep -qiE "panicked|ERROR" "$work/node.log"; then
  echo "the node logged errors under hostile input:"; cat "$work/node.log"; status=1
fi
exit $status
