#!/usr/bin/env bash
# Tests of the Airflow secrets backend (deploy/airflow) against real Airflow.
#
#   bash deploy/airflow/tests/run.sh          (from the repository root)
#
# Builds one virtualenv per Airflow line under build/ (reused while their
# requirements are unchanged), installs the backend package into each, and runs
# deploy/airflow/tests with pytest in each. Every venv has the postgres provider
# and the amazon provider (whose SecretsManagerBackend the parity test compares with):
#   build/airflow-2.10  apache-airflow==2.10.5 (providers that still support 2.10)
#   build/airflow-3.0   apache-airflow==3.0.6
#   build/airflow-3.1   apache-airflow==3.1.8
#   build/airflow-3.2   apache-airflow==3.2.2
#   build/airflow-3.3   apache-airflow==3.3.2
# By default all five run (`make test`); AIRFLOW_TEST_ONLY="2.10 3.3" runs the two ends.
# The integration tests start tests/harness/devenv.py (needs `make venv`) and
# the sidecar binary: $SIDECAR_BIN, default target/debug/airflow-secrets-sidecar.
#
# Environment: AIRFLOW_TEST_PYTHON (interpreter for the venvs, default python3),
# AIRFLOW_TEST_ONLY: the Airflow lines to test, space or comma separated, or "all"
# (default "all"; "3" means 3.3). RUN_SH_SETUP_ONLY=1 builds the venvs and stops.
# Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$ROOT"
PYTHON="${AIRFLOW_TEST_PYTHON:-python3}"
export SIDECAR_BIN="${SIDECAR_BIN:-$ROOT/target/debug/airflow-secrets-sidecar}"
export SIDECAR_HARNESS_PYTHON="${SIDECAR_HARNESS_PYTHON:-$ROOT/.venv/bin/python}"

# name|requirements (space separated; keep in step with deploy/airflow/README.md)
COMMON="pytest>=8 setuptools>=68 wheel"
# Without Airflow's constraint files, pip picks today's cadwyn/fastapi, with which the
# Execution API of 3.0.6 and 3.2.2 fails (`airflow dags test` of any DAG: a validation
# error / a pydantic discriminator error). These are the ranges the next Airflow
# releases declare (3.1: fastapi<0.118; 3.3: fastapi<0.137, cadwyn 7).
PINS_3_0="fastapi<0.118 cadwyn<6"
PINS_3_2="fastapi<0.137 cadwyn<8"
VENVS=(
  "airflow-2.10|apache-airflow==2.10.5 apache-airflow-providers-postgres>=6.0,<6.5 apache-airflow-providers-amazon<9.18 $COMMON"
  "airflow-3.0|apache-airflow==3.0.6 apache-airflow-providers-postgres apache-airflow-providers-amazon $PINS_3_0 $COMMON"
  "airflow-3.1|apache-airflow==3.1.8 apache-airflow-providers-postgres apache-airflow-providers-amazon $COMMON"
  "airflow-3.2|apache-airflow==3.2.2 apache-airflow-providers-postgres apache-airflow-providers-amazon $PINS_3_2 $COMMON"
  "airflow-3.3|apache-airflow==3.3.2 apache-airflow-providers-postgres apache-airflow-providers-amazon $COMMON"
)
ONLY="${AIRFLOW_TEST_ONLY:-all}"
ONLY="${ONLY//,/ }"
[[ "$ONLY" == "all" ]] && ONLY="2.10 3.0 3.1 3.2 3.3"
wanted() {
  local line
  for line in $ONLY; do
    [[ "$line" == "3" ]] && line="3.3"
    [[ "airflow-$line" == "$1" ]] && return 0
  done
  return 1
}

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
  wanted "$name" || continue
  dir="$ROOT/build/$name"
  make_venv "$dir" "$reqs"
  [[ -n "${RUN_SH_SETUP_ONLY:-}" ]] && continue
  log "pytest in $name ($("$dir/bin/python" -c 'import airflow; print("Airflow", airflow.__version__)' 2>/dev/null))"
  # Each venv gets its own pytest cache dir so the two runs do not mix.
  if ! "$dir/bin/python" -m pytest -p no:cacheprovider -ra deploy/airflow/tests "$@"; then
    status=1
  fi
done
exit "$status"
