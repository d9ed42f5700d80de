#!/usr/bin/env bash
# Tests of the Airflow secrets backend (deploy/airflow) against real Airflow.
#
#   bash deploy/airflow/tests/run.sh          (from the repository root)
#
# Builds two virtualenvs under build/ (reused while their requirements are
# unchanged), installs the backend package into each, and runs
# deploy/airflow/tests with pytest in both:
#   build/airflow-2.10  apache-airflow==2.10.5 + a postgres provider that supports 2.10
#   build/airflow-3     apache-airflow==3.3.2  + apache-airflow-providers-postgres
# The integration tests start tests/harness/devenv.py (needs `make venv`) and
# the sidecar binary: $SIDECAR_BIN, default target/debug/airflow-secrets-sidecar.
#
# Environment: AIRFLOW_TEST_PYTHON (interpreter for the venvs, default python3),
# AIRFLOW_TEST_ONLY=2.10|3 (one venv only), extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$ROOT"
PYTHON="${AIRFLOW_TEST_PYTHON:-python3}"
export SIDECAR_BIN="${SIDECAR_BIN:-$ROOT/target/debug/airflow-secrets-sidecar}"
export SIDECAR_HARNESS_PYTHON="${SIDECAR_HARNESS_PYTHON:-$ROOT/.venv/bin/python}"

# name|requirements (space separated; keep in step with deploy/airflow/README.md)
VENVS=(
  "airflow-2.10|apache-airflow==2.10.5 apache-airflow-providers-postgres>=6.0,<6.5 pytest>=8 setuptools>=68 wheel"
  "airflow-3|apache-airflow==3.3.2 apache-airflow-providers-postgres pytest>=8 setuptools>=68 wheel"
)

log() { echo "run.sh: $*" >&2; }

make_venv() {
  local dir="$1" reqs="$2"
  # The marker holds the requirements and the interpreter: change either and the venv is rebuilt.
  local key
  key="$(printf '%s\n%s\n' "$reqs" "$("$PYTHON" -c 'import sys; print(sys.version)')")"
  if [[ -x "$dir/bin/python" && -f "$dir/.requirements" && "$(cat "$dir/.requirements")" == "$key" ]]; then
    log "reusing $dir"
  else
    log "creating $dir ($reqs)"
    local start=$SECONDS
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    # shellcheck disable=SC2086  # word splitting of the requirement list is intended
    "$dir/bin/pip" install --quiet --disable-pip-version-check $reqs
    printf '%s' "$key" > "$dir/.requirements"
    log "created $dir in $((SECONDS - start)) s"
  fi
  # The package under test: always reinstalled from the work tree (no deps, no network).
  "$dir/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall --no-index ./deploy/airflow
  rm -rf deploy/airflow/build deploy/airflow/src/*.egg-info
}

if [[ ! -x "$SIDECAR_HARNESS_PYTHON" ]]; then
  log "missing $SIDECAR_HARNESS_PYTHON: run \`make venv\` first"
  exit 1
fi

if [[ ! -x "$SIDECAR_BIN" ]]; then
  # pytest alone would skip the integration tests; here a missing binary is an error.
  log "missing sidecar binary $SIDECAR_BIN: run \`cargo build\` first (or set SIDECAR_BIN)"
  exit 1
fi

status=0
mkdir -p build
for entry in "${VENVS[@]}"; do
  name="${entry%%|*}"
  reqs="${entry#*|}"
  if [[ -n "${AIRFLOW_TEST_ONLY:-}" && "airflow-${AIRFLOW_TEST_ONLY}" != "$name" ]]; then
    continue
  fi
  dir="$ROOT/build/$name"
  make_venv "$dir" "$reqs"
  log "pytest in $name ($("$dir/bin/python" -c 'import airflow; print("Airflow", airflow.__version__)' 2>/dev/null))"
  # Each venv gets its own pytest cache dir so the two runs do not mix.
  if ! "$dir/bin/python" -m pytest -p no:cacheprovider -ra deploy/airflow/tests "$@"; then
    status=1
  fi
done
exit "$status"
