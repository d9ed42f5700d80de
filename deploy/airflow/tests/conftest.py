"""Shared setup: Airflow gets a private AIRFLOW_HOME before anything imports it."""

import atexit
import os
import shutil
import tempfile

# Airflow reads its configuration when first imported: give it an empty home of
# its own (no airflow.cfg of the machine, sqlite in a temp dir, no examples).
_HOME = tempfile.mkdtemp(prefix="airflow-home-unit-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
for _name in list(os.environ):
    # A backend configured in the caller's environment must not leak into the tests.
    if _name.startswith(("AIRFLOW__SECRETS__", "AIRFLOW__WORKERS__SECRETS_BACKEND", "AIRFLOW_CONN_", "AIRFLOW_VAR_")):
        del os.environ[_name]

