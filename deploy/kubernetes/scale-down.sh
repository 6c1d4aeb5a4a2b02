#!/usr/bin/env bash
# Scales the nxcache StatefulSet down without losing data: drains the nodes that will go
# (highest ordinals first) until they hold nothing, removes them from the cluster, then
# scales. Their PersistentVolumeClaims are kept; delete them once you are sure.
#
#   deploy/kubernetes/scale-down.sh 3            # from 5 replicas to 3
#   NAMESPACE=cache deploy/kubernetes/scale-down.sh 4
set -euo pipefail
target=${1:?usage: scale-down.sh REPLICAS}
ns=${NAMESPACE:-default}
sts=${STATEFULSET:-nxcache}
k() { kubectl --namespace "$ns" "$@"; }
# `nxcache admin` inside pod 0 uses that node's own admin token (NXCACHE_ADMIN_TOKENS).
admin() { k exec "$sts-0" -c nxcache -- nxcache admin "$@"; }
status_of() { k exec "$sts-$1" -c nxcache -- nxcache admin status --json; }

current=$(k get statefulset "$sts" -o jsonpath='{.spec.replicas}')
if ((target >= current)); then
  echo "already at $current replicas (asked for $target): nothing to drain"
  exit 0
fi
if ((target < 1)); then
  echo "at least one replica must stay" >&2
  exit 1
fi

for ((id = current - 1; id >= target; id--)); do
  echo "draining node $id"
  admin nodes drain "$id"
  # Drained: the node owns nothing, its rebalance worker has nothing left, and it holds
  # no artifact nor hint of its own.
  until status_of "$id" | python3 -c '
import json, sys
s = json.load(sys.stdin)["data"]
left = s["objects"] + s["pending_hints"] + sum(w["pending"] for w in s["workers"])
print(f"  {s[\"objects\"]} artifacts, {s[\"pending_hints\"]} hints left", file=sys.stderr)
sys.exit(0 if left == 0 else 1)
'; do
    sleep 10
  done
  admin nodes remove "$id"
  echo "node $id drained and removed"
done

k scale statefulset "$sts" --replicas="$target"
echo "scaled $sts to $target; the claims data-$sts-$target.. remain (kubectl delete pvc ...)"
