#!/usr/bin/env bash
# The pod-level end-to-end test (make test-pod): the pods that deploy/ describes, each container
# a real process in its own mount namespace, a real Airflow task with PostgresHook in the Airflow
# container, against real Postgres (TLS, verify-full) and moto. See podrun.py for what is emulated.
#
#   bash deploy/pod-e2e/run.sh                       # the manifests of this work tree
#   POD_E2E_DEPLOY=/path/to/deploy bash deploy/pod-e2e/run.sh   # another copy (e.g. an old commit:
#       git archive COMMIT deploy | tar -x -C /tmp/old && POD_E2E_DEPLOY=/tmp/old/deploy ...)
#
# Needs root (bubblewrap binds, uid switches and a private network namespace, as a kubelet has),
# kubectl, `make venv`, `cargo build`, and the Airflow venvs of deploy/airflow/tests/run.sh
# (created here when missing). Installs Debian's bubblewrap when bwrap is missing.
# Everything listens inside a private network namespace: nothing reaches the host's network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEPLOY="${POD_E2E_DEPLOY:-$ROOT/deploy}"
SIDECAR_BIN="${SIDECAR_BIN:-$ROOT/target/debug/airflow-secrets-sidecar}"
PY="$ROOT/.venv/bin/python"
AF2="$ROOT/build/airflow-2.10"
AF3="$ROOT/build/airflow-3.3"

log() { echo "pod-e2e: $*" >&2; }

if [[ "${1:-}" != --inside ]]; then
  [[ "$(id -u)" = 0 ]] || { log "needs root (run it as root or with sudo)"; exit 1; }
  if ! command -v bwrap >/dev/null; then
    log "installing Debian's bubblewrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  fi
  [[ -x "$PY" ]] || { log "missing $PY: run \`make venv\`"; exit 1; }
  [[ -x "$SIDECAR_BIN" ]] || { log "missing $SIDECAR_BIN: run \`cargo build\`"; exit 1; }
  if [[ ! -x "$AF3/bin/airflow" || ! -x "$AF2/bin/airflow" ]]; then
    log "creating the Airflow venvs (deploy/airflow/tests/run.sh, collection only)"
    AIRFLOW_TEST_ONLY=2.10,3.3 bash deploy/airflow/tests/run.sh --collect-only -q >/dev/null
  fi
  # Reinstall the backend from this work tree, as the Airflow image build does.
  for v in "$AF2" "$AF3"; do
    "$v/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
      --force-reinstall --no-index ./deploy/airflow
  done
  rm -rf deploy/airflow/build deploy/airflow/src/*.egg-info
  exec unshare --net -- bash "${BASH_SOURCE[0]}" --inside
fi

# --- inside the private network namespace ------------------------------------------------
started=$SECONDS
ip link set lo up
# The pod's own addresses, where the kubelet's probes arrive (a dual-stack pod network). They
# sit on lo because this kernel may lack the dummy/veth modules; what matters is that they are
# not 127.0.0.1, so a listener bound to loopback only, or to one family only, is not reached.
ip addr add 10.244.0.10/32 dev lo
ip -6 addr add fd00:10:244::10/128 dev lo nodad

WORK="$(mktemp -d /tmp/pod-e2e.XXXXXX)"
chmod 755 "$WORK"
cleanup() {
  [[ -n "${DEVENV_PID:-}" ]] && { exec 3>&-; wait "$DEVENV_PID" 2>/dev/null || true; }
  if [[ "${KEEP:-}" = 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Postgres (SCRAM, TLS with a test CA, certificate for "localhost") and moto.
mkfifo "$WORK/devenv.in"
"$PY" tests/harness/devenv.py up --dir "$WORK/devenv" <"$WORK/devenv.in" >"$WORK/devenv.json" 2>"$WORK/devenv.log" &
DEVENV_PID=$!
exec 3>"$WORK/devenv.in"   # devenv.py stops Postgres and moto when this closes
for _ in $(seq 1 600); do [[ -s "$WORK/devenv.json" ]] && break; sleep 0.1; done
[[ -s "$WORK/devenv.json" ]] || { log "devenv.py did not start: $(tail -c 2000 "$WORK/devenv.log")"; exit 1; }

# The connection the task uses: a role and database, and its secret in Secrets Manager.
"$AF3/bin/python" - "$WORK/devenv.json" <<'EOF'
import json, secrets, sys, psycopg2
env = json.load(open(sys.argv[1]))
password = secrets.token_urlsafe(18)
c = psycopg2.connect(host="127.0.0.1", port=env["pg_port"], user="postgres", password=env["pg_password"],
                     dbname="postgres", sslmode="disable")
c.autocommit = True
c.cursor().execute(f"CREATE ROLE app_user LOGIN PASSWORD '{password}'")
c.cursor().execute("CREATE DATABASE appdb OWNER app_user")
json.dump({"password": password}, open(sys.argv[1] + ".seed", "w"))
EOF
"$PY" - "$WORK/devenv.json" <<'EOF'
import json, sys, boto3
env = json.load(open(sys.argv[1]))
seed = json.load(open(sys.argv[1] + ".seed"))
sm = boto3.client("secretsmanager", endpoint_url=env["moto_url"], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
sm.create_secret(Name="airflow/connections/app_db", SecretString=json.dumps({
    "conn_type": "postgres", "host": "localhost", "port": env["pg_port"], "login": "app_user",
    "password": seed["password"], "schema": "appdb"}))
EOF

k8s=()
for d in "$DEPLOY/k8s" "$DEPLOY"/k8s/overlays/*/; do k8s+=("${d%/}"); done
helm=("$DEPLOY"/helm/values*.yaml)
# POD_E2E_LAYOUT_ONLY=1: only the Airflow 3 layout scenario (while working on it).
[[ "${POD_E2E_LAYOUT_ONLY:-}" = 1 ]] && { k8s=(); helm=(); }
rc=0
"$PY" deploy/pod-e2e/podrun.py --devenv "$WORK/devenv.json" --workdir "$WORK/pods" \
  --sidecar-bin "$SIDECAR_BIN" --airflow2 "$AF2" --airflow3 "$AF3" \
  --k8s "${k8s[@]+"${k8s[@]}"}" --helm "${helm[@]+"${helm[@]}"}" --layout-k8s "$DEPLOY/k8s" || rc=$?
log "finished in $((SECONDS - started))s (exit $rc)"
exit $rc
