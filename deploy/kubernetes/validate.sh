#!/usr/bin/env bash
# Validates the manifests against the Kubernetes API schemas (kubernetes-validate, pinned,
# installed into target/venv-k8s on first use). Kinds from CRDs (ServiceMonitor) and the
# Kustomization have no schema there; they are checked for their required fields.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=$root/target/venv-k8s
version=1.37.0
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "kubernetes-validate==$version"
fi
cd "$root/deploy/kubernetes"
# Every file the kustomization lists, and nothing left out of it.
listed=$("$venv/bin/python" -c '
import yaml
k = yaml.safe_load(open("kustomization.yaml"))
print(" ".join(k["resources"]))')
for f in *.yaml; do
  [[ $f == kustomization.yaml ]] && continue
  [[ " $listed " == *" $f "* ]] || { echo "FAIL $f is not in kustomization.yaml"; exit 1; }
done
out=$("$venv/bin/kubernetes-validate" --strict $listed 2>&1) || { echo "$out"; exit 1; }
echo "$out"
# Only the CRD kind may lack a schema.
if grep -v "kind ServiceMonitor" <<<"$out" | grep -q "^WARN"; then
  echo "FAIL: unexpected warnings"; exit 1
fi
"$venv/bin/python" - <<'PY'
import yaml
sm = yaml.safe_load(open("servicemonitor.yaml"))
assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
svc = [d for d in yaml.safe_load_all(open("services.yaml")) if d["metadata"]["name"] == "nxcache"][0]
ports = {p["name"] for p in svc["spec"]["ports"]}
for e in sm["spec"]["endpoints"]:
    assert e["port"] in ports, f"ServiceMonitor port {e['port']} not on the Service"
assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
sts = yaml.safe_load(open("statefulset.yaml"))
spec = sts["spec"]
assert spec["podManagementPolicy"] == "Parallel" and spec["replicas"] == 3
c = spec["template"]["spec"]["containers"][0]
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
print("INFO servicemonitor.yaml, services.yaml and statefulset.yaml agree")
PY
