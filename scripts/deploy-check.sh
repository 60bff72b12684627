#!/usr/bin/env bash
# Validates deploy/: the plain manifests (deploy/kubernetes) against the Kubernetes schemas
# (kubernetes-validate, strict: unknown fields fail), and the Helm chart (deploy/helm/ampoule):
# rendered — by `helm template` when a helm binary is on PATH, else by
# deploy/tools/render_chart.py, which renders the subset of Helm's template language the
# chart uses and fails on anything else — then validated the same way, and its defaults
# compared object by object with the plain manifests. Called by scripts/test.sh; runs alone
# too (it makes its venv, target/deploy-venv, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
if ! cmp -s deploy/requirements.txt "$venv/requirements.txt"; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/requirements.txt
  cp deploy/requirements.txt "$venv/requirements.txt"
fi
validate() { "$venv/bin/kubernetes-validate" --strict --quiet "$@"; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The validator must catch a broken object, or its passes mean nothing.
sed 's/containerPort: 8080/containerPort: "eight"/; s/  serviceName:/  servceName:/' \
  deploy/kubernetes/statefulset.yaml >"$out/broken.yaml"
if validate "$out/broken.yaml" >/dev/null 2>&1; then
  echo "deploy-check: kubernetes-validate accepted a broken StatefulSet" >&2
  exit 1
fi

echo "deploy-check: deploy/kubernetes against the Kubernetes schemas" >&2
validate deploy/kubernetes/*.yaml

render() {
  if command -v helm >/dev/null 2>&1; then
    helm template ampoule deploy/helm/ampoule --namespace ampoule ${1:+-f "$1"}
  else
    "$venv/bin/python" deploy/tools/render_chart.py deploy/helm/ampoule ampoule ampoule ${1:+"$1"}
  fi
}
command -v helm >/dev/null 2>&1 && echo "deploy-check: rendering with $(helm version --short)" >&2 \
  || echo "deploy-check: no helm binary; rendering with deploy/tools/render_chart.py" >&2
render >"$out/defaults.yaml"
validate "$out/defaults.yaml"
"$venv/bin/python" deploy/tools/compare.py "$out/defaults.yaml" deploy/kubernetes
for values in deploy/helm/ampoule/ci/*-values.yaml; do
  echo "deploy-check: the chart with $values" >&2
  render "$values" >"$out/other.yaml"
  validate "$out/other.yaml"
done
echo "deploy-check: ok" >&2
