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
import urllib.parse
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
        self.parity = parity_secrets(self.pg_port, self.app_password)
        seed.update({f"airflow/connections/{k}": v for k, v in {**self.parity, **URI_JSON_SECRET}.items()})
        seed.update(TEAM_SECRETS)
        # The metadata database URI is proven to log in before the sidecar serves it,
        # so it must name a database that exists: the test Postgres, as app_user.
        # It is served as stored, so it must meet the sidecar's TLS floor itself
        # (verify-full with a CA: a URI asking for less is refused, not raised).
        self.metadb_uri = (
            f"postgresql+psycopg2://app_user:{self.app_password}@localhost:{self.pg_port}/appdb"
            f"?sslmode=verify-full&sslrootcert={self.ca_file}"
        )
        seed["airflow/config/sql_alchemy_conn"] = self.metadb_uri
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
        # The most verbose level: the log is checked for secret values at the end.
        self.sidecar, self.sidecar_log, self.port = self.launch_sidecar("sidecar", RUST_LOG="trace")
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_sidecars = []

    def launch_sidecar(self, name, port=None, **env_extra):
        """Start the sidecar binary on 127.0.0.1:port (a free port if None):
        (process, log file, port). Started again on other free ports if it
        exits first: another process's outgoing connection can take a port
        between picking it and binding it ("Address already in use")."""
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        for attempt in range(1, 6):
            api_port = port or free_port()
            env = dict(os.environ)
            env.update(
                {
                    "AWS_ENDPOINT_URL": self.env["moto_url"],
                    "AWS_REGION": "us-east-1",
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "SIDECAR_LISTEN": f"127.0.0.1:{api_port}",
                    "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
                    "SIDECAR_TOKEN_FILE": self.token_file,
                    "SIDECAR_SSLROOTCERT": self.ca_file,
                    # /config is off unless its options are listed.
                    "SIDECAR_CONFIG_KEYS": "fernet_key,sql_alchemy_conn,missing_option",
                }
            )
            env.update(env_extra)
            proc = subprocess.Popen(
                [SIDECAR_BIN, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                wait_http(f"http://{env['SIDECAR_ADMIN_LISTEN']}/livez", proc, name)
                return proc, log, api_port
            except RuntimeError:
                if proc.poll() is None or attempt == 5:
                    raise

    def extra_sidecar(self, name, **env_extra):
        """Another sidecar (pinned to a team, refusing unvalidated, ...): its URL."""
        proc, log, port = self.launch_sidecar(name, **env_extra)
        self.extra_sidecars.append(proc)
        return f"http://127.0.0.1:{port}"

    def ask_full(self, path, url=None):
        """GET path from a sidecar with the token: (status, headers, parsed JSON)."""
        token = open(self.token_file).read().strip()
        req = urllib.request.Request((url or self.url) + path, headers={"X-Sidecar-Token": token})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

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

    @staticmethod
    def stop_process(proc):
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self):
        for proc in [self.sidecar, *getattr(self, "extra_sidecars", [])]:
            self.stop_process(proc)
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
    elif section == "none":
        pass
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
try:
    missing = Variable.get("no_such_variable", **kwargs)
except ImportError as e:  # Airflow 3.0 outside a task: its API-server fallback needs the task runner
    missing = f"ImportError: {e}"
print(RESULT, json.dumps({"greeting": Variable.get("greeting"), "missing": missing,
                          "env": Variable.get("from_env")}))
""",
        AIRFLOW_VAR_FROM_ENV="env value",
    )
    if AIRFLOW_VERSION == (3, 0) and result["missing"].startswith("ImportError"):
        # Airflow 3.0's Variable.get, outside a task, asks SUPERVISOR_COMMS for an id no backend
        # has and fails before returning the default (3.1 fixed it); the 404 was answered first.
        assert "SUPERVISOR_COMMS" in result["missing"]
        result["missing"] = "fallback"
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


TRIVIAL_DAG = """
import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def trivial_probe():
    @task
    def hello():
        print("TRIVIAL_OK")

    hello()


trivial_probe()
"""


def skip_if_dags_test_is_broken_without_us(stack, airflow_home):
    """When `airflow dags test` fails, check that a trivial DAG with no secrets backend passes.

    Airflow 3.2.2 with today's dependencies fails every `dags test` in its in-process
    Execution API ('State' object has no attribute 'svcs_registry'): then the failure is
    not the backend's, and the test is skipped with Airflow's own error.
    """
    home = os.path.join(stack.workdir, "airflow-home-trivial")
    os.makedirs(os.path.join(home, "dags"), exist_ok=True)
    with open(os.path.join(home, "dags", "trivial_probe.py"), "w") as f:
        f.write(TRIVIAL_DAG if V3 else TRIVIAL_DAG.replace("from airflow.sdk import", "from airflow.decorators import"))
    env = airflow_env(stack, home, section="none")
    for args in (["db", "migrate"], ["dags", "test", "trivial_probe"]):
        done = subprocess.run(
            [os.path.join(VENV_BIN, "airflow"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
    if done.returncode != 0 or "TRIVIAL_OK" not in done.stdout:
        errors = [line for line in done.stdout.splitlines() if "Error" in line and not line.startswith(" ")]
        pytest.skip(f"Airflow {airflow.__version__}: `dags test` of a trivial DAG without any secrets backend "
                    f"fails too: {errors[-3:]}")


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
    if done.returncode != 0:
        skip_if_dags_test_is_broken_without_us(stack, airflow_home)
    assert done.returncode == 0, detail
    assert f"SIDECAR_PROBE user=app_user db=appdb greeting={GREETING}" in done.stdout, detail
    assert "state=success" in done.stdout, detail


# --- parity with the amazon provider's SecretsManagerBackend -------------------------------------

GCP_PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7gcpParity\n-----END PRIVATE KEY-----\n"
SLACK_TOKEN = "T0001AAAA/B0002BBBB/xoxSlackParityToken42"


def parity_secrets(pg_port, app_password):
    """conn_id -> SecretString: what platform teams keep under airflow/connections/ today."""
    return {
        "aws_role": json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIAIOSFODNN7PARITY1",
                "password": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY+ParityKey1",
                "extra": {
                    "role_arn": "arn:aws:iam::123456789012:role/airflow-tasks",
                    "region_name": "eu-west-1",
                    "assume_role_method": "assume_role",
                },
            }
        ),
        "http_special": json.dumps(
            {
                "conn_type": "http",
                "host": "api.example.com",
                "login": "svc@example.com",
                "password": 'p@ss:w/rd?#%&=+ é€ "quoted" \\ end',
                "port": 8443,
                "schema": "https",
                "extra": {"verify": False, "headers": {"X-Api": "1"}},
            }
        ),
        "snowflake": json.dumps(
            {
                "conn_type": "snowflake",
                "login": "AIRFLOW_SVC",
                "password": "Sn0w!flake#Parity-2026",
                "schema": "PUBLIC",
                "extra": {
                    "account": "xy12345",
                    "warehouse": "COMPUTE_WH",
                    "database": "ANALYTICS",
                    "role": "TRANSFORMER",
                    "region": "eu-central-1",
                },
            }
        ),
        "gcp_keyfile": json.dumps(
            {
                "conn_type": "google_cloud_platform",
                "extra": {
                    "keyfile_dict": {
                        "type": "service_account",
                        "project_id": "parity-project",
                        "private_key_id": "0123456789abcdef",
                        "private_key": GCP_PRIVATE_KEY,
                        "client_email": "airflow@parity-project.iam.gserviceaccount.com",
                    },
                    "project": "parity-project",
                    "scope": "https://www.googleapis.com/auth/cloud-platform",
                },
            }
        ),
        # An RDS-style MySQL secret: engine, username, pass, server, database; dbname is dropped.
        "mysql_aliases": json.dumps(
            {
                "engine": "mysql",
                "username": "shop_admin",
                "pass": "My$ql-Parity-P4ss",
                "server": "shop.cluster-abc.eu-west-1.rds.amazonaws.com",
                "port": "3306",
                "database": "shop",
                "dbname": "shop_db",
                "dbInstanceIdentifier": "shop-db",
            }
        ),
        # The first alias in the secret's own order wins (user before login, key before password).
        "alias_order": json.dumps(
            {
                "conn_type": "http",
                "user": "first-user",
                "login": "second-login",
                "key": "Alias-Key-Parity",
                "password": "Alias-Password-Parity",
                "remote_host": "alias.example.com",
            }
        ),
        "ssh_extra_string": json.dumps(
            {
                "conn_type": "ssh",
                "host": "bastion.example.com",
                "login": "airflow",
                "password": "ssh-Parity-pass-123",
                "port": 22,
                "extra": json.dumps({"key_file": "/keys/id_ed25519", "no_host_key_check": "true", "conn_timeout": 10}),
            }
        ),
        "http_uri": "http://api%40user:p%40ss%2Fw%3Ard%21Parity@api.example.com:8443/v1?timeout=30&verify=false",
        # Airflow's form for a host with a protocol: conn_type://protocol://login:password@host
        "slack_uri": f"slackwebhook://https://:{urllib.parse.quote(SLACK_TOKEN, safe='')}@hooks.slack.com/services",
        "ftp_uri": "ftp://ftp_user:ftp%20P%C3%A4ss-Parity@ftp.example.com:2121/?passive=true",
        "extra_param_uri": "mysql://u:UriExtra-Parity@db.example.com/app?__extra__=%7B%22charset%22%3A+%22utf8mb4%22%7D",
        # Validated by the sidecar (a real login to the test Postgres).
        "pg_rds": json.dumps(
            {
                "engine": "postgres",
                "username": "app_user",
                "password": app_password,
                "host": "localhost",
                "port": pg_port,
                "dbname": "appdb",
            }
        ),
    }


# Secrets whose JSON is {"uri": ...} alone: served as that URI. The provider drops the "uri"
# key (it is none of its words) and Airflow builds an empty connection from it.
URI_JSON_SECRET = {"ftp_uri_json": json.dumps({"uri": "ftp://ftp_user:JsonUri-Parity@ftp.example.com:2121"})}

TEAM_SECRETS = {
    "airflow/connections/team_a--team_api": json.dumps(
        {"conn_type": "http", "host": "a.example.com", "login": "team-a", "password": "TeamA-Secret-1"}
    ),
    "airflow/connections/team_api": json.dumps(
        {"conn_type": "http", "host": "shared.example.com", "login": "shared", "password": "Shared-Secret-1"}
    ),
    "airflow/connections/team_b--only_b": "http://team-b:TeamB-Secret-2@b.example.com",
    "airflow/variables/team_a--team_var": "team a's value",
    "airflow/variables/team_var": "the shared value",
    "airflow/config/fernet_key": "Fernet-Config-Secret-xJ3ZmVybmV0a2V5Zm9y",
    # airflow/config/sql_alchemy_conn is seeded with the test database's URI (Stack._seed).
}
SECRET_VALUES = [
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCY+ParityKey1",
    "p@ss:w/rd?#%&=+",
    "Sn0w!flake#Parity-2026",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7gcpParity",
    "My$ql-Parity-P4ss",
    "Alias-Key-Parity",
    "Alias-Password-Parity",
    "ssh-Parity-pass-123",
    "p%40ss%2Fw%3Ard%21Parity",
    "p@ss/w:rd!Parity",
    "xoxSlackParityToken42",
    "P%C3%A4ss-Parity",
    "Päss-Parity",
    "UriExtra-Parity",
    "JsonUri-Parity",
    "TeamA-Secret-1",
    "Shared-Secret-1",
    "TeamB-Secret-2",
    "Fernet-Config-Secret",
    "Metadata-Db-Secret-9",
]

PROVIDER = "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend"

FIELDS = """
import json
def conn_fields(c):
    return {"conn_type": c.conn_type, "host": c.host, "port": c.port, "login": c.login, "password": c.password,
            "schema": c.schema, "extra": c.extra_dejson}
def lookups(ids, team_name=None):
    try:
        from airflow.sdk import BaseHook            # Airflow 3.x: what hooks use (task SDK)
    except ImportError:
        from airflow.hooks.base import BaseHook     # Airflow 2.x
    from airflow.models.connection import Connection
    out = {}
    for conn_id in ids:
        for api, fn in (("hook", lambda: BaseHook.get_connection(conn_id)),
                        ("secrets", lambda: Connection.get_connection_from_secrets(conn_id, **(
                            {"team_name": team_name} if team_name else {})))):
            if team_name and api == "hook":
                continue  # only the server-side lookup takes a team
            try:
                out[f"{conn_id}/{api}"] = conn_fields(fn())
            except Exception as e:
                out[f"{conn_id}/{api}"] = {"error": type(e).__name__, "message": str(e)[:500]}
    return out
"""


def backend_env(stack, which, url=None, **extra):
    """Airflow configured with the provider's backend (against moto) or ours (against a sidecar)."""
    if which == "provider":
        kwargs = {"endpoint_url": stack.env["moto_url"], "region_name": "us-east-1"}
        env = {
            "AIRFLOW__SECRETS__BACKEND": PROVIDER,
            "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(kwargs),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    else:
        kwargs = {"url": url or stack.url, "token_file": stack.token_file, "timeout": 20}
        env = {"AIRFLOW__SECRETS__BACKEND": BACKEND, "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(kwargs)}
    env.update(extra)
    return env


def run_with(stack, home, which, code, url=None, **extra):
    """run_airflow_python with only the given backend configured."""
    return run_airflow_python(stack, home, code, section="none", **backend_env(stack, which, url=url, **extra))


def test_every_connection_type_matches_the_amazon_provider(stack, airflow_home):
    """The issue's "Done when": the same Connection, field by field, through both backends."""
    ids = sorted(stack.parity) + sorted(URI_JSON_SECRET)
    code = FIELDS + f"print(RESULT, json.dumps(lookups({ids!r})))\n"
    theirs, _ = run_with(stack, airflow_home, "provider", code)
    ours, _ = run_with(stack, airflow_home, "sidecar", code)
    for key in sorted(theirs):
        conn_id = key.split("/")[0]
        want, got = theirs[key], ours[key]
        assert "error" not in got, (key, got)
        if conn_id == "pg_rds":
            # Documented Postgres improvements: RDS dbname becomes schema (the provider drops it),
            # and extra carries the sslmode/sslrootcert the sidecar proved the login with.
            assert want["schema"] is None and got["schema"] == "appdb", key
            assert want["extra"] == {} and got["extra"] == {"sslmode": "verify-full", "sslrootcert": stack.ca_file}
            want = dict(want, schema="appdb", extra=got["extra"])
        if conn_id in URI_JSON_SECRET:
            # Documented difference: the provider turns {"uri": ...} into an empty connection.
            assert {k: v for k, v in want.items() if k != "extra"} == dict.fromkeys(
                ["conn_type", "host", "port", "login", "password", "schema"]
            ), want
            assert (got["conn_type"], got["login"], got["password"], got["host"], got["port"]) == (
                "ftp",
                "ftp_user",
                "JsonUri-Parity",
                "ftp.example.com",
                2121,
            )
            continue
        assert got == want, key
    # Spot checks that the table exercises what it claims (so the equality is not vacuous).
    assert ours["alias_order/secrets"]["login"] == "first-user"
    assert ours["alias_order/secrets"]["password"] == "Alias-Key-Parity"
    assert ours["mysql_aliases/secrets"]["schema"] == "shop" and ours["mysql_aliases/secrets"]["port"] == 3306
    assert ours["http_uri/secrets"]["password"] == "p@ss/w:rd!Parity"
    assert ours["slack_uri/secrets"]["host"] == "https://hooks.slack.com"
    assert ours["slack_uri/secrets"]["schema"] == "services"
    assert ours["slack_uri/secrets"]["password"] == SLACK_TOKEN
    assert ours["gcp_keyfile/secrets"]["extra"]["keyfile_dict"]["private_key"] == GCP_PRIVATE_KEY
    assert ours["ssh_extra_string/secrets"]["extra"]["conn_timeout"] == 10
    assert ours["extra_param_uri/secrets"]["extra"] == {"charset": "utf8mb4"}


def test_the_validated_header(stack):
    for conn_id in sorted(stack.parity) + sorted(URI_JSON_SECRET):
        status, headers, body = stack.ask_full(f"/connections/{conn_id}")
        assert status == 200, (conn_id, body)
        want = "true" if conn_id == "pg_rds" else "false"
        assert headers.get("X-Sidecar-Validated") == want, conn_id
        assert headers.get("X-Sidecar-Secret") == f"airflow/connections/{conn_id}", conn_id
        assert set(body) <= {"conn_type", "host", "port", "login", "password", "schema", "extra", "description", "uri"}


def test_unvalidated_refuse(stack, airflow_home):
    url = stack.extra_sidecar("sidecar-refuse", SIDECAR_UNVALIDATED="refuse")
    status, _, body = stack.ask_full("/connections/snowflake", url=url)
    assert (status, body["error"]) == (403, "unvalidated_refused"), body
    assert "snowflake" in body["message"]
    status, headers, _ = stack.ask_full("/connections/pg_rds", url=url)
    assert status == 200 and headers.get("X-Sidecar-Validated") == "true"
    code = FIELDS + 'print(RESULT, json.dumps(lookups(["snowflake", "pg_rds"])))\n'
    # A copy of the connection further down the chain (an env var).
    result, output = run_with(
        stack, airflow_home, "sidecar", code, url=url, AIRFLOW_CONN_SNOWFLAKE="snowflake://env:env@env-host/db"
    )
    assert result["pg_rds/secrets"]["login"] == "app_user"
    for api in ("hook", "secrets"):
        got = result[f"snowflake/{api}"]
        if HAS_ACCESS_DENIED:
            assert got["error"] == "SidecarAccessDenied" and "unvalidated_refused" in got["message"], got
        else:  # every backend exception falls through before 3.2
            assert got["host"] == "env-host", got
    assert "unvalidated_refused" in output


def test_config_options_with_a_secret_suffix(stack, airflow_home):
    """`[core] fernet_key_secret = fernet_key`: Airflow calls get_config("fernet_key")."""
    code = """
import json
from airflow.configuration import conf
print(RESULT, json.dumps({"fernet_key": conf.get("core", "fernet_key"),
                          "sql_alchemy_conn": conf.get("database", "sql_alchemy_conn")}))
"""
    extra = {"AIRFLOW__CORE__FERNET_KEY_SECRET": "fernet_key"}
    theirs, _ = run_with(stack, airflow_home, "provider", code, **extra)
    ours, _ = run_with(stack, airflow_home, "sidecar", code, **extra)
    assert ours == theirs
    assert ours["fernet_key"] == TEAM_SECRETS["airflow/config/fernet_key"]
    # `[database] sql_alchemy_conn_secret`: read here without importing anything that would connect.
    code = """
import json, os
from airflow.configuration import conf
print(RESULT, json.dumps(conf.get("database", "sql_alchemy_conn")))
"""
    extra = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET": "sql_alchemy_conn"}
    theirs, _ = run_with(stack, airflow_home, "provider", code, **extra)
    ours, _ = run_with(stack, airflow_home, "sidecar", code, **extra)
    assert ours == theirs == stack.metadb_uri
    status, _, body = stack.ask_full("/config/fernet_key")
    assert (status, body) == (200, {"value": TEAM_SECRETS["airflow/config/fernet_key"]})
    assert stack.ask_full("/config/missing_option")[0] == 404
    # An option not in SIDECAR_CONFIG_KEYS is refused, whatever AWS holds.
    status, _, body = stack.ask_full("/config/no_such_option")
    assert (status, body["error"]) == (403, "config_disabled"), body


@pytest.mark.skipif(not HAS_ACCESS_DENIED, reason="teams (team_name) arrived in Airflow 3.2")
def test_team_lookups_match_the_provider(stack, airflow_home):
    code = (
        FIELDS
        + """
from airflow.models.variable import Variable
out = {}
for team in ("team_a", "team_b"):
    out[team] = lookups(["team_api", "only_b", "aws_role"], team_name=team)
    out[team]["var"] = Variable.get("team_var", team_name=team)
print(RESULT, json.dumps(out))
"""
    )
    multi = {"AIRFLOW__CORE__MULTI_TEAM": "True"}
    theirs, _ = run_with(stack, airflow_home, "provider", code, **multi)
    ours, _ = run_with(stack, airflow_home, "sidecar", code, **multi)
    assert ours == theirs
    assert ours["team_a"]["team_api/secrets"]["login"] == "team-a"  # team-scoped first
    assert ours["team_b"]["team_api/secrets"]["login"] == "shared"  # then the shared secret
    assert ours["team_b"]["only_b/secrets"]["password"] == "TeamB-Secret-2"
    assert ours["team_a"]["only_b/secrets"]["error"] == "AirflowNotFoundException"  # never another team's
    assert ours["team_a"]["aws_role/secrets"]["login"] == "AKIAIOSFODNN7PARITY1"
    assert (ours["team_a"]["var"], ours["team_b"]["var"]) == ("team a's value", "the shared value")
    status, headers, _ = stack.ask_full("/connections/team_api?team=team_a")
    assert status == 200 and headers.get("X-Sidecar-Secret") == "airflow/connections/team_a--team_api"
    status, headers, _ = stack.ask_full("/connections/team_api?team=team_b")
    assert status == 200 and headers.get("X-Sidecar-Secret") == "airflow/connections/team_api"
    status, _, body = stack.ask_full("/connections/b--c?team=team_a")
    assert (status, body["error"]) == (400, "invalid_conn_id")


@pytest.mark.skipif(not HAS_ACCESS_DENIED, reason="teams (team_name) arrived in Airflow 3.2")
def test_a_pinned_sidecar_refuses_other_teams(stack, airflow_home):
    url = stack.extra_sidecar("sidecar-team-a", SIDECAR_TEAM="team_a")
    assert stack.ask_full("/connections/team_api?team=team_a", url=url)[0] == 200
    status, _, body = stack.ask_full("/connections/team_api?team=team_b", url=url)
    assert (status, body["error"]) == (403, "team_forbidden"), body
    code = (
        FIELDS
        + """
print(RESULT, json.dumps({"a": lookups(["team_api"], team_name="team_a"),
                          "b": lookups(["team_api"], team_name="team_b")}))
"""
    )
    result, _ = run_with(
        stack,
        airflow_home,
        "sidecar",
        code,
        url=url,
        AIRFLOW__CORE__MULTI_TEAM="True",
        AIRFLOW_CONN_TEAM_API="http://env:env@env-host",  # must not be reached for team_b
    )
    assert result["a"]["team_api/secrets"]["login"] == "team-a"
    got = result["b"]["team_api/secrets"]
    assert got["error"] == "SidecarAccessDenied" and "team_forbidden" in got["message"], got


# --- the backend class: retries and the async path ------------------------------------------------

RETRY_PROBE = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.WARNING)
logging.getLogger("airflow_secrets_sidecar").setLevel(logging.DEBUG)
try:
    from airflow.sdk import BaseHook
except ImportError:
    from airflow.hooks.base import BaseHook
attempts = []
class Count(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "attempt(s)" in msg:
            attempts.append(int(msg.split(" attempt(s)")[0].rsplit(" ", 1)[1]))
logging.getLogger("airflow_secrets_sidecar").addHandler(Count())
go = os.environ["PROBE_GO_FILE"]
logins = []
print("LOOKUP_START", flush=True)
logins.append(BaseHook.get_connection("aws_role").login)   # the sidecar is not listening yet
print("FIRST_DONE", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
logins.append(BaseHook.get_connection("aws_role").login)   # the sidecar was restarted meanwhile
print(RESULT, json.dumps({"logins": logins, "attempts": attempts}))
"""


def wait_line(proc, marker):
    """Read proc's output up to a line that is `marker` (Airflow may log lines before it)."""
    seen = []
    for line in proc.stdout:
        if line.strip() == marker:
            return
        seen.append(line)
    raise AssertionError(f"no {marker} line; output:\n{''.join(seen)[-4000:]}")


def test_lookups_wait_for_a_sidecar_that_starts_late_or_restarts(stack, airflow_home):
    port = free_port()
    go = os.path.join(stack.workdir, "probe-go")
    env = airflow_env(stack, airflow_home, section="none")
    env.update(backend_env(stack, "sidecar", url=f"http://127.0.0.1:{port}"), PROBE_GO_FILE=go)
    probe = subprocess.Popen(
        [sys.executable, "-c", "RESULT = 'RESULT:'\n" + RETRY_PROBE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    late = None
    try:
        wait_line(probe, "LOOKUP_START")
        time.sleep(0.5)  # the probe's first connects are refused (counted below, not timed)
        late, _, _ = stack.launch_sidecar("sidecar-late", port)
        wait_line(probe, "FIRST_DONE")
        stack.stop_process(late)  # a restart: down while the next lookup starts
        open(go, "w").close()
        time.sleep(0.5)
        late, _, _ = stack.launch_sidecar("sidecar-late", port)
        output, _ = probe.communicate(timeout=120)
    finally:
        if probe.poll() is None:
            probe.kill()
        stack.stop_process(late)
    result = json.loads([line for line in output.splitlines() if line.startswith("RESULT: ")][-1][8:])
    assert result["logins"] == ["AKIAIOSFODNN7PARITY1"] * 2, output
    # Both lookups were answered after refused connects, not "isn't defined".
    assert len(result["attempts"]) == 2 and all(n >= 2 for n in result["attempts"]), result


@pytest.mark.skipif(AIRFLOW_VERSION < (3, 1), reason="Airflow >= 3.1 calls a backend's aget_connection")
def test_the_async_path_is_what_airflow_uses(stack, airflow_home):
    """BaseHook.aget_connection (triggers, async tasks) reaches the backend's coroutine, not the blocking call."""
    code = """
import asyncio, json
import airflow_secrets_sidecar as mod
calls = {"async": 0, "sync": 0}
real_async, real_sync = mod.SidecarSecretsBackend.aget_conn_value, mod.SidecarSecretsBackend.get_conn_value
async def counted_async(self, *a, **k):
    calls["async"] += 1
    return await real_async(self, *a, **k)
def counted_sync(self, *a, **k):
    calls["sync"] += 1
    return real_sync(self, *a, **k)
mod.SidecarSecretsBackend.aget_conn_value = counted_async
mod.SidecarSecretsBackend.get_conn_value = counted_sync
from airflow.sdk import BaseHook
async def main():
    conns = await asyncio.gather(*(BaseHook.aget_connection(c) for c in ("http_special", "gcp_keyfile", "pg_rds")))
    return [[c.conn_type, c.login, c.password, c.extra_dejson] for c in conns]
print(RESULT, json.dumps({"conns": asyncio.run(main()), "calls": calls}))
"""
    result, _ = run_airflow_python(stack, airflow_home, code, section="workers")
    assert result["calls"] == {"async": 3, "sync": 0}
    http, gcp, pg = result["conns"]
    assert http[:3] == ["http", "svc@example.com", json.loads(stack.parity["http_special"])["password"]]
    assert gcp[3]["keyfile_dict"]["private_key"] == GCP_PRIVATE_KEY
    assert pg[:3] == ["postgres", "app_user", stack.app_password]


TRIGGER_MODULE = """
import json

import airflow_secrets_sidecar as mod
from airflow.triggers.base import BaseTrigger, TriggerEvent

CALLS = {"async": 0, "sync": 0}
_real_async, _real_sync = mod.SidecarSecretsBackend.aget_conn_value, mod.SidecarSecretsBackend.get_conn_value


async def _counted_async(self, *args, **kwargs):
    CALLS["async"] += 1
    return await _real_async(self, *args, **kwargs)


def _counted_sync(self, *args, **kwargs):
    CALLS["sync"] += 1
    return _real_sync(self, *args, **kwargs)


mod.SidecarSecretsBackend.aget_conn_value = _counted_async
mod.SidecarSecretsBackend.get_conn_value = _counted_sync


class SidecarConnTrigger(BaseTrigger):
    def __init__(self, conn_ids):
        super().__init__()
        self.conn_ids = conn_ids

    def serialize(self):
        return ("sidecar_trigger.SidecarConnTrigger", {"conn_ids": self.conn_ids})

    async def run(self):
        from airflow.sdk import BaseHook

        conns = [await BaseHook.aget_connection(c) for c in self.conn_ids]
        yield TriggerEvent({"conns": [[c.conn_type, c.login, c.password] for c in conns], "calls": dict(CALLS)})
"""

TRIGGER_DAG = """
import json

import pendulum
from airflow.sdk import BaseOperator, dag

from sidecar_trigger import SidecarConnTrigger


class DeferToTheTrigger(BaseOperator):
    def execute(self, context):
        self.defer(trigger=SidecarConnTrigger(["http_special", "pg_rds"]), method_name="resume")

    def resume(self, context, event=None):
        print("TRIGGER_EVENT " + json.dumps(event))


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def sidecar_trigger_probe():
    DeferToTheTrigger(task_id="defer")


sidecar_trigger_probe()
"""


@pytest.mark.skipif(AIRFLOW_VERSION < (3, 1), reason="Airflow >= 3.1 calls a backend's aget_connection")
def test_a_trigger_looks_connections_up_on_the_async_path(stack, airflow_home):
    """A deferred task's trigger (run by `airflow dags test` in-process, with the trigger comms
    of the triggerer's runner) awaits BaseHook.aget_connection: it reaches aget_conn_value."""
    dags = os.path.join(airflow_home, "dags")
    with open(os.path.join(dags, "sidecar_trigger.py"), "w") as f:
        f.write(TRIGGER_MODULE)
    with open(os.path.join(dags, "sidecar_trigger_probe.py"), "w") as f:
        f.write(TRIGGER_DAG)
    env = airflow_env(stack, airflow_home, section="workers", PYTHONPATH=dags)
    done = subprocess.run(
        [os.path.join(VENV_BIN, "airflow"), "dags", "test", "sidecar_trigger_probe"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        skip_if_dags_test_is_broken_without_us(stack, airflow_home)
    events = [line.split("TRIGGER_EVENT ", 1)[1] for line in done.stdout.splitlines() if "TRIGGER_EVENT " in line]
    assert done.returncode == 0 and events, done.stdout[-8000:]
    event = json.loads(events[-1])
    assert event["calls"] == {"async": 2, "sync": 0}
    assert event["conns"] == [
        ["http", "svc@example.com", json.loads(stack.parity["http_special"])["password"]],
        ["postgres", "app_user", stack.app_password],
    ]


def test_no_secret_value_in_the_sidecar_log(stack):
    """Runs last: after every lookup above, the sidecar's log names ids and causes, never a password."""
    with open(stack.sidecar_log.name, "rb") as f:
        log = f.read().decode(errors="replace")
    assert "app_db" in log  # the log is the one the lookups above wrote
    assert "TRACE" in log  # at the most verbose level
    for value in [stack.app_password, "not-the-password", *SECRET_VALUES]:
        assert value not in log, value
        assert json.dumps(value)[1:-1] not in log, value
