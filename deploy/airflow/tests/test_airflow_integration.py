"""The backend in real Airflow (2.10 or 3.x, whichever this venv holds) against the real sidecar.

A module fixture starts tests/harness/devenv.py (Postgres with SCRAM and TLS,
moto), creates roles, seeds secrets, and starts the sidecar binary
($SIDECAR_BIN). Each check then runs in a fresh Python or `airflow` process of
this venv, configured only through Airflow's own environment variables, and
proves the result through Airflow's own APIs.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

import airflow
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
AIRFLOW_VERSION = tuple(int(p) for p in airflow.__version__.split(".")[:2])
V3 = AIRFLOW_VERSION >= (3, 0)
HAS_ACCESS_DENIED = AIRFLOW_VERSION >= (3, 2)
BACKEND = "airflow_secrets_sidecar.SidecarSecretsBackend"
VENV_BIN = os.path.dirname(sys.executable)
GREETING = "hello from Secrets Manager"

SIDECAR_BIN = os.environ.get("SIDECAR_BIN") or os.path.join(REPO, "target", "debug", "airflow-secrets-sidecar")
HARNESS_PYTHON = os.environ.get("SIDECAR_HARNESS_PYTHON") or os.path.join(REPO, ".venv", "bin", "python")

pytestmark = pytest.mark.skipif(
    not os.access(SIDECAR_BIN, os.X_OK),
    reason=f"sidecar binary {SIDECAR_BIN} not built (cargo build, or set SIDECAR_BIN)",
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout}s")


class Stack:
    """Postgres + moto (devenv.py) + the sidecar, seeded for these tests."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.devenv = None
        self.sidecar = None

    def start(self):
        self.devenv_log = open(os.path.join(self.workdir, "devenv.log"), "wb")
        self.devenv = subprocess.Popen(
            [HARNESS_PYTHON, os.path.join(REPO, "tests", "harness", "devenv.py"), "up"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.devenv_log,
        )
        line = self.devenv.stdout.readline()
        if not line:
            self.devenv.wait(timeout=30)
            raise RuntimeError(f"devenv.py failed: {self._tail(self.devenv_log.name)}")
        self.env = json.loads(line)
        self.pg_port = self.env["pg_port"]
        self.ca_file = self.env["ca_file"]
        self._seed()
        self._start_sidecar()

    def _seed(self):
        import psycopg2  # installed with the postgres provider

        self.app_password = secrets.token_urlsafe(18)
        admin = psycopg2.connect(
            host="127.0.0.1",
            port=self.pg_port,
            user="postgres",
            password=self.env["pg_password"],
            dbname="postgres",
            sslmode="disable",
        )
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE app_user LOGIN PASSWORD '{self.app_password}'")
            cur.execute("CREATE DATABASE appdb OWNER app_user")
            cur.execute(f"CREATE ROLE stale_user LOGIN PASSWORD '{secrets.token_urlsafe(18)}'")
        admin.close()

        def conn_secret(login, password, schema):
            return json.dumps(
                {
                    "conn_type": "postgres",
                    "host": "localhost",
                    "port": self.pg_port,
                    "login": login,
                    "password": password,
                    "schema": schema,
                }
            )

        seed = {
            "airflow/connections/app_db": conn_secret("app_user", self.app_password, "appdb"),
            # The role exists, the stored password is not its password: credentials_rejected.
            "airflow/connections/stale_db": conn_secret("stale_user", "not-the-password", "postgres"),
            "airflow/variables/greeting": GREETING,
        }
        script = textwrap.dedent("""
            import json, sys, boto3
            args = json.load(sys.stdin)
            sm = boto3.client("secretsmanager", endpoint_url=args["url"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
            for name, value in args["secrets"].items():
                sm.create_secret(Name=name, SecretString=value)
        """)
        subprocess.run(
            [HARNESS_PYTHON, "-c", script],
            input=json.dumps({"url": self.env["moto_url"], "secrets": seed}),
            text=True,
            check=True,
            timeout=60,
        )

    def _start_sidecar(self):
        self.token_file = os.path.join(self.workdir, "token")
        with open(self.token_file, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            {
                "AWS_ENDPOINT_URL": self.env["moto_url"],
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "SIDECAR_LISTEN": f"127.0.0.1:{self.port}",
                "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
                "SIDECAR_TOKEN_FILE": self.token_file,
                "SIDECAR_SSLROOTCERT": self.ca_file,
            }
        )
        self.sidecar_log = open(os.path.join(self.workdir, "sidecar.log"), "wb")
        self.sidecar = subprocess.Popen(
            [SIDECAR_BIN, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=self.sidecar_log, stderr=subprocess.STDOUT
        )
        wait_http(f"http://127.0.0.1:{self.admin_port}/livez", self.sidecar, "the sidecar")

    def ask(self, path):
        """GET path from the sidecar with the token: (status, parsed JSON)."""
        token = open(self.token_file).read().strip()
        req = urllib.request.Request(self.url + path, headers={"X-Sidecar-Token": token})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def sidecar_log_text(self):
        self.sidecar_log.flush()
        return self._tail(self.sidecar_log.name)

    @staticmethod
    def _tail(path, n=4000):
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def stop(self):
        if self.sidecar is not None and self.sidecar.poll() is None:
            os.kill(self.sidecar.pid, signal.SIGTERM)
            try:
                self.sidecar.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.sidecar.pid, signal.SIGKILL)
                self.sidecar.wait()
        if self.devenv is not None:
            self.devenv.stdin.close()  # devenv.py stops Postgres and moto when its stdin closes
            try:
                self.devenv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.devenv.pid, signal.SIGTERM)
                self.devenv.wait()


@pytest.fixture(scope="module")
def stack():
    workdir = tempfile.mkdtemp(prefix="airflow-sidecar-it-")
    s = Stack(workdir)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def airflow_home(stack):
    """An AIRFLOW_HOME with a migrated sqlite metastore, as every Airflow deployment has."""
    home = os.path.join(stack.workdir, "airflow-home")
    os.makedirs(os.path.join(home, "dags"))
    migrate = subprocess.run(
        [os.path.join(VENV_BIN, "airflow"), "db", "migrate"],
        env=airflow_env(stack, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stdout[-4000:]
    return home


def airflow_env(stack, home, section="secrets", **extra):
    """A clean environment configuring the backend the way a deployment would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
    env.update(
        {
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(home, "dags"),
            "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    kwargs = json.dumps({"url": stack.url, "token_file": stack.token_file, "timeout": 20})
    if section == "secrets":
        env["AIRFLOW__SECRETS__BACKEND"] = BACKEND
        env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = kwargs
    elif section == "workers":
        env["AIRFLOW__WORKERS__SECRETS_BACKEND"] = BACKEND
        env["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"] = kwargs
    env.update(extra)
    return env


def run_airflow_python(stack, home, code, **env_extra):
    """Run `code` in a fresh interpreter of this venv; it ends with print(RESULT, json.dumps(...))."""
    env = airflow_env(stack, home, **env_extra)
    done = subprocess.run(
        [sys.executable, "-c", "RESULT = 'RESULT:'\n" + textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT: ")]
    assert done.returncode == 0 and lines, (
        f"exit {done.returncode}\n--- output\n{done.stdout[-6000:]}\n--- sidecar log\n{stack.sidecar_log_text()}"
    )
    return json.loads(lines[-1][len("RESULT: ") :]), done.stdout


# Snippets shared by the checks: the lookup APIs a DAG author and Airflow itself use.
GET_CONNECTION = """
import json, traceback
def conn_fields(c):
    return {"conn_type": c.conn_type, "host": c.host, "port": c.port, "login": c.login, "password": c.password,
            "schema": c.schema, "extra": c.extra_dejson}
def base_hook_get(conn_id):
    try:
        from airflow.sdk import BaseHook          # Airflow 3.x (task SDK: what hooks use)
    except ImportError:
        from airflow.hooks.base import BaseHook   # Airflow 2.x
    return BaseHook.get_connection(conn_id)
def from_secrets(conn_id):
    from airflow.models.connection import Connection  # 2.x everywhere; 3.x API server / scheduler
    return Connection.get_connection_from_secrets(conn_id)
def outcome(fn, *args):
    try:
        return {"ok": conn_fields(fn(*args))}
    except Exception as e:
        return {"error": str(e), "type": type(e).__name__,
                "mro": [f"{k.__module__}.{k.__name__}" for k in type(e).__mro__]}
"""


def test_connection_fields_and_a_real_login(stack, airflow_home):
    result, _ = run_airflow_python(
        stack,
        airflow_home,
        GET_CONNECTION
        + """
from airflow.providers.postgres.hooks.postgres import PostgresHook
row = PostgresHook(postgres_conn_id="app_db").get_first(
    "select current_user, current_database(), (select ssl from pg_stat_ssl where pid = pg_backend_pid())")
print(RESULT, json.dumps({"hook": conn_fields(base_hook_get("app_db")),
                          "secrets": conn_fields(from_secrets("app_db")), "row": list(row)}))
""",
    )
    expected = {
        "conn_type": "postgres",
        "host": "localhost",
        "port": stack.pg_port,
        "login": "app_user",
        "password": stack.app_password,
        "schema": "appdb",
    }
    for api in ("hook", "secrets"):
        got = result[api]
        assert {k: got[k] for k in expected} == expected, api
        assert got["extra"].get("sslmode") == "verify-full", got["extra"]
        assert got["extra"].get("sslrootcert") == stack.ca_file, got["extra"]
    # PostgresHook logged in over TLS (verify-full against the test CA) with what the sidecar served.
    assert result["row"] == ["app_user", "appdb", True]


def test_missing_id_falls_through_to_an_env_var(stack, airflow_home):
    status, body = stack.ask("/connections/only_in_env")
    assert status == 404 and body["error"] == "not_found", body
    result, output = run_airflow_python(
        stack,
        airflow_home,
        GET_CONNECTION
        + """
print(RESULT, json.dumps({"hook": outcome(base_hook_get, "only_in_env"),
                          "secrets": outcome(from_secrets, "only_in_env"),
                          "nowhere": outcome(base_hook_get, "defined_nowhere")}))
""",
        AIRFLOW_CONN_ONLY_IN_ENV="postgres://env_user:env_pw@env-host:5433/env_db",
    )
    for api in ("hook", "secrets"):
        got = result[api]["ok"]
        assert (got["host"], got["port"], got["login"], got["schema"]) == ("env-host", 5433, "env_user", "env_db")
    assert "isn't defined" in result["nowhere"]["error"]
    # A 404 is not an error: nothing is logged about it.
    assert "airflow-secrets-sidecar" not in output and "Traceback" not in output


def test_rejected_credential_surfaces_the_sidecars_message(stack, airflow_home):
    status, body = stack.ask("/connections/stale_db")
    assert status == 503 and body["error"] == "credentials_rejected", body
    message = body["message"]
    code = (
        GET_CONNECTION
        + """
print(RESULT, json.dumps({"hook": outcome(base_hook_get, "stale_db"), "secrets": outcome(from_secrets, "stale_db")}))
"""
    )
    # Alone, and with a (stale) connection of the same id in an env var further down the chain.
    result, output = run_airflow_python(stack, airflow_home, code)
    shadowed, shadowed_output = run_airflow_python(
        stack, airflow_home, code, AIRFLOW_CONN_STALE_DB="postgres://old_user:old_pw@old-host:5432/old_db"
    )

    for api in ("hook", "secrets"):
        if HAS_ACCESS_DENIED:
            # Airflow >= 3.2: the lookup stops with the sidecar's message, env var or not.
            for got in (result[api], shadowed[api]):
                assert got["type"] == "SidecarAccessDenied", got
                assert "airflow.sdk.exceptions.AirflowSecretsBackendAccessDenied" in got["mro"]
                assert message in got["error"] and "credentials_rejected" in got["error"]
        else:
            # Airflow 2.x / 3.0 / 3.1: every backend exception falls through; the message is in the log,
            # the lookup ends at the next source that has the id, or "isn't defined".
            assert "isn't defined" in result[api]["error"], result[api]
            assert shadowed[api]["ok"]["host"] == "old-host"
    for out in (output, shadowed_output):
        assert message in out, out[-4000:]  # logged by the backend (and by Airflow 2.x)


def test_variable(stack, airflow_home):
    status, body = stack.ask("/variables/greeting")
    assert (status, body) == (200, {"value": GREETING})
    result, output = run_airflow_python(
        stack,
        airflow_home,
        """
import json
try:
    from airflow.sdk import Variable      # Airflow 3.x
except ImportError:
    from airflow.models import Variable   # Airflow 2.x
import inspect
default = "default_var" if "default_var" in inspect.signature(Variable.get).parameters else "default"
kwargs = {default: "fallback"}
print(RESULT, json.dumps({"greeting": Variable.get("greeting"), "missing": Variable.get("no_such_variable", **kwargs),
                          "env": Variable.get("from_env")}))
""",
        AIRFLOW_VAR_FROM_ENV="env value",
    )
    assert result == {"greeting": GREETING, "missing": "fallback", "env": "env value"}
    # 2.x logs a traceback for a backend whose get_variable raises NotImplementedError: none here.
    assert "NotImplementedError" not in output and "Traceback" not in output


@pytest.mark.skipif(AIRFLOW_VERSION < (3, 2), reason="AIRFLOW__SECRETS__BACKEND_KWARG__* arrived in Airflow 3.2")
def test_per_key_kwargs_from_env_arrive_as_strings(stack, airflow_home):
    env = {
        "AIRFLOW__SECRETS__BACKEND_KWARG__URL": stack.url,
        "AIRFLOW__SECRETS__BACKEND_KWARG__TOKEN_FILE": stack.token_file,
        "AIRFLOW__SECRETS__BACKEND_KWARG__TIMEOUT": "15",
        "AIRFLOW__SECRETS__BACKEND_KWARG__VARIABLES": "false",
    }
    result, _ = run_airflow_python(
        stack,
        airflow_home,
        GET_CONNECTION
        + """
from airflow.sdk import Variable
print(RESULT, json.dumps({"hook": outcome(base_hook_get, "app_db"),
                          "variable": Variable.get("greeting", default=None)}))
""",
        section="secrets",
        AIRFLOW__SECRETS__BACKEND_KWARGS="{}",
        **env,
    )
    assert result["hook"]["ok"]["login"] == "app_user"
    assert result["variable"] is None  # variables=false arrived as a string and was honoured


DAG = """
import pendulum

try:
    from airflow.sdk import Variable, dag, task           # Airflow 3.x
except ImportError:
    from airflow.decorators import dag, task              # Airflow 2.x
    from airflow.models import Variable


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def sidecar_probe():
    @task
    def query():
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        user, db = PostgresHook(postgres_conn_id="app_db").get_first("select current_user, current_database()")
        print(f"SIDECAR_PROBE user={user} db={db} greeting={Variable.get('greeting')}")
        if (user, db) != ("app_user", "appdb"):
            raise ValueError(f"unexpected login {user}@{db}")

    query()


sidecar_probe()
"""


def test_dags_test_runs_a_task_through_the_hook(stack, airflow_home):
    """`airflow dags test` of a DAG whose task queries Postgres with the sidecar's connection.

    Airflow 3.x: configured only with [workers] secrets_backend (task execution);
    Airflow 2.x: with [secrets] backend.
    """
    with open(os.path.join(airflow_home, "dags", "sidecar_probe.py"), "w") as f:
        f.write(DAG)
    env = airflow_env(stack, airflow_home, section="workers" if V3 else "secrets")
    done = subprocess.run(
        [os.path.join(VENV_BIN, "airflow"), "dags", "test", "sidecar_probe"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    detail = f"--- airflow dags test\n{done.stdout[-8000:]}\n--- sidecar log\n{stack.sidecar_log_text()}"
    assert done.returncode == 0, detail
    assert f"SIDECAR_PROBE user=app_user db=appdb greeting={GREETING}" in done.stdout, detail
    assert "state=success" in done.stdout, detail


def test_no_secret_value_in_the_sidecar_log(stack):
    """Runs last: after every lookup above, the sidecar's log names ids and causes, never a password."""
    with open(stack.sidecar_log.name, "rb") as f:
        log = f.read().decode(errors="replace")
    assert "app_db" in log  # the log is the one the lookups above wrote
    assert stack.app_password not in log
    assert "not-the-password" not in log
