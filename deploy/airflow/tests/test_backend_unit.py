"""Unit tests of SidecarSecretsBackend against a scripted HTTP server on 127.0.0.1.

They run inside the real Airflow venvs (see run.sh), so the exception classes
and base class are Airflow's own, for 2.10 and 3.x alike.
"""

import asyncio
import http.server
import json
import logging
import os
import pickle
import socket
import threading
import time

import airflow
import pytest

import airflow_secrets_sidecar as sidecar_mod
from airflow_secrets_sidecar import SidecarAccessDenied, SidecarError, SidecarSecretsBackend

AIRFLOW_VERSION = tuple(int(p) for p in airflow.__version__.split(".")[:2])
TOKEN = "t0ken-for-unit-tests"

CONN_JSON = {
    "conn_type": "postgres",
    "host": "db.example.internal",
    "port": 5432,
    "login": "app",
    "password": "s3cret",
    "schema": "appdb",
    "extra": {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/rds.pem"},
    "description": "validated by the sidecar",
}


class ScriptedSidecar:
    """A tiny HTTP server: path -> (status, body bytes, delay seconds); records every request."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests.append({"path": self.path, "headers": dict(self.headers.items())})
                status, body, delay, headers = outer.routes.get(
                    self.path, (404, json.dumps({"error": "not_found", "message": f"nothing at {self.path}"}), 0, {})
                )
                if delay:
                    time.sleep(delay)
                data = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def route(self, path, status, body, delay=0, headers=None):
        if not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        self.routes[path] = (status, body, delay, headers or {})

    def error(self, path, status, code, message):
        self.route(path, status, {"error": code, "message": message})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = ScriptedSidecar()
    yield s
    s.close()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def backend(server, token_file):
    return SidecarSecretsBackend(url=server.url, token_file=token_file, timeout=5)


def with_connection_class(backend):
    """What Airflow 3.x's loader does to every backend it builds; 2.x needs nothing."""
    if hasattr(backend, "_set_connection_class"):
        try:
            from airflow.sdk.definitions.connection import Connection
        except ImportError:
            from airflow.models.connection import Connection
        backend._set_connection_class(Connection)
    return backend


# --- answers -------------------------------------------------------------------------------


def test_200_returns_the_body_verbatim_and_airflow_parses_it(server, backend):
    server.route("/connections/app_db", 200, CONN_JSON, headers={"X-Sidecar-Stage": "AWSCURRENT"})
    value = backend.get_conn_value("app_db")
    assert json.loads(value) == CONN_JSON
    conn = with_connection_class(backend).get_connection("app_db")
    assert (conn.conn_type, conn.host, conn.port, conn.login, conn.password, conn.schema) == (
        "postgres",
        "db.example.internal",
        5432,
        "app",
        "s3cret",
        "appdb",
    )
    assert conn.extra_dejson == CONN_JSON["extra"]


def test_404_returns_none(server, backend):
    server.error("/connections/elsewhere", 404, "not_found", "no secret airflow/connections/elsewhere")
    assert backend.get_conn_value("elsewhere") is None
    assert with_connection_class(backend).get_connection("elsewhere") is None


def test_team_name_is_forwarded(server, backend):
    """Airflow >= 3.2 calls get_conn_value(conn_id=..., team_name=...); the team goes to the sidecar."""
    server.route("/connections/app_db?team=team_a", 200, CONN_JSON)
    server.route("/connections/app_db", 200, dict(CONN_JSON, login="shared"))
    assert json.loads(backend.get_conn_value(conn_id="app_db", team_name="team_a")) == CONN_JSON
    assert json.loads(backend.get_conn_value(conn_id="app_db", team_name=None))["login"] == "shared"
    server.route("/variables/v?team=team%2Fodd", 200, {"value": "x"})
    assert backend.get_variable(key="v", team_name="team/odd") == "x"
    assert [r["path"] for r in server.requests] == [
        "/connections/app_db?team=team_a",
        "/connections/app_db",
        "/variables/v?team=team%2Fodd",
    ]


def test_an_id_with_the_team_separator_is_not_looked_up_with_a_team(server, backend, caplog):
    """As the amazon provider: "a" + "--" + "b--c" would name team "a--b"'s secret "c"."""
    with caplog.at_level(logging.WARNING, logger="airflow_secrets_sidecar"):
        assert backend.get_conn_value("b--c", team_name="a") is None
        assert backend.get_variable("b--c", team_name="a") is None
    assert server.requests == [] and "'b--c'" in caplog.text
    server.route("/connections/b--c", 200, CONN_JSON)  # no team, no multi-team mode: an ordinary id
    assert backend.get_conn_value("b--c") is not None


@pytest.mark.skipif(AIRFLOW_VERSION < (3, 2), reason="[core] multi_team arrived in Airflow 3.2")
def test_in_multi_team_mode_an_id_with_the_separator_is_never_looked_up(server, backend, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")
    assert backend.get_conn_value("b--c") is None
    assert backend.get_config("b--c") is None
    assert server.requests == []


def test_a_uri_answer_is_handed_to_airflow_as_the_uri(server, backend):
    uri = "http://api%40user:p%40ss%2Fw%3Ard@api.example.com:8443/v1?timeout=30"
    server.route("/connections/api", 200, {"uri": uri}, headers={"X-Sidecar-Validated": "false"})
    assert backend.get_conn_value("api") == uri
    conn = with_connection_class(backend).get_connection("api")
    assert (conn.conn_type, conn.login, conn.password, conn.host, conn.port, conn.schema) == (
        "http",
        "api@user",
        "p@ss/w:rd",
        "api.example.com",
        8443,
        "v1",
    )
    # Airflow's own URI parser decides the extra's types (3.1's task SDK makes "30" an int).
    assert conn.extra_dejson in ({"timeout": "30"}, {"timeout": 30})
    # JSON that merely contains a "uri" key among others is passed as it is.
    server.route("/connections/both", 200, {"uri": uri, "conn_type": "http"})
    assert json.loads(backend.get_conn_value("both")) == {"uri": uri, "conn_type": "http"}


@pytest.mark.skipif(AIRFLOW_VERSION < (3, 2), reason="team_name dispatch arrived in Airflow 3.2")
def test_airflow_dispatch_with_team_name(server, backend):
    try:  # 3.3
        from airflow.sdk._shared.secrets_backend.base import call_secrets_backend_method
    except ImportError:  # 3.2 passes team_name to every backend

        def call_secrets_backend_method(method, **kwargs):
            return method(**kwargs)

    server.route("/connections/app_db?team=team_a", 200, CONN_JSON)
    with_connection_class(backend)
    conn = call_secrets_backend_method(backend.get_connection, team_name="team_a", conn_id="app_db")
    assert conn.login == "app"


@pytest.mark.parametrize(
    "status, code",
    [
        (400, "invalid_conn_id"),
        (401, "unauthorized"),
        (502, "upstream_error"),
        (502, "secret_malformed"),
        (503, "database_unreachable"),
        (504, "timeout"),
    ],
)
def test_error_answers_raise_sidecar_error_with_the_sidecar_message(server, backend, status, code, caplog):
    message = f"connection 'app_db' (secret airflow/connections/app_db): something about {code}"
    server.error("/connections/app_db", status, code, message)
    with caplog.at_level(logging.WARNING, logger="airflow_secrets_sidecar"):
        with pytest.raises(SidecarError) as info:
            backend.get_conn_value("app_db")
    err = info.value
    assert (err.status, err.code, err.message) == (status, code, message)
    assert message in str(err) and code in str(err) and str(status) in str(err)
    assert not isinstance(err, SidecarAccessDenied)
    assert isinstance(err, airflow.exceptions.AirflowException)
    # Airflow 3.x logs fall-through errors only at DEBUG: the backend says it at WARNING.
    assert message in caplog.text


@pytest.mark.parametrize(
    "status, code", [(503, "credentials_rejected"), (403, "team_forbidden"), (403, "unvalidated_refused")]
)
def test_refusals_are_access_denied(server, backend, status, code):
    message = f"connection 'app_db': refused ({code})"
    server.error("/connections/app_db", status, code, message)
    with pytest.raises(SidecarAccessDenied) as info:
        backend.get_conn_value("app_db")
    err = info.value
    assert isinstance(err, SidecarError)
    assert (err.status, err.code, err.message) == (status, code, message)
    assert message in str(err)
    if AIRFLOW_VERSION >= (3, 2):
        from airflow.sdk.exceptions import AirflowSecretsBackendAccessDenied

        assert isinstance(err, AirflowSecretsBackendAccessDenied)
    else:
        assert not isinstance(err, PermissionError)


def test_errors_survive_pickling(server, backend):
    server.error("/connections/app_db", 503, "credentials_rejected", "rejected")
    with pytest.raises(SidecarError) as info:
        backend.get_conn_value("app_db")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is type(info.value)
    assert (copy.code, copy.status, copy.message, str(copy)) == (
        "credentials_rejected",
        503,
        "rejected",
        str(info.value),
    )


@pytest.mark.parametrize("body", ["<html>bad gateway</html>", "", '{"error": 1}', "[]"])
def test_an_answer_that_is_not_the_sidecars_json_is_bad_response(server, backend, body):
    server.route("/connections/app_db", 502, body)
    with pytest.raises(SidecarError) as info:
        backend.get_conn_value("app_db")
    assert info.value.code == "bad_response" and info.value.status == 502
    if body:
        assert body[:20] in str(info.value)


def test_redirects_are_not_followed(server, backend):
    server.route("/connections/app_db", 302, "", headers={"Location": server.url + "/connections/other"})
    server.route("/connections/other", 200, CONN_JSON)
    with pytest.raises(SidecarError) as info:
        backend.get_conn_value("app_db")
    assert info.value.status == 302
    assert [r["path"] for r in server.requests] == ["/connections/app_db"]


# --- the request ----------------------------------------------------------------------------


def test_request_has_the_token_and_a_quoted_id_and_no_forwarding_header(server, backend):
    backend.get_conn_value("odd id/with?chars")
    (req,) = server.requests
    assert req["path"] == "/connections/odd%20id%2Fwith%3Fchars"
    assert req["headers"]["X-Sidecar-Token"] == TOKEN
    assert not any(h.lower() == "x-forwarded-for" for h in req["headers"])


def test_proxy_environment_is_ignored(server, backend, monkeypatch):
    # A proxy that does not exist: a request through it would fail.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    server.route("/connections/app_db", 200, CONN_JSON)
    assert backend.get_conn_value("app_db") is not None


def test_token_file_is_read_on_every_call(server, backend, token_file):
    backend.get_conn_value("a")
    os.unlink(token_file)
    with open(token_file, "w") as f:
        f.write("rotated-token")
    backend.get_conn_value("a")
    assert [r["headers"]["X-Sidecar-Token"] for r in server.requests] == [TOKEN, "rotated-token"]


def test_missing_or_empty_token_file_is_a_clear_error(server, tmp_path):
    missing = SidecarSecretsBackend(url=server.url, token_file=str(tmp_path / "nope"))
    with pytest.raises(SidecarError) as info:
        missing.get_conn_value("a")
    assert info.value.code == "token_unreadable" and str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").write_text("\n")
    empty = SidecarSecretsBackend(url=server.url, token_file=str(tmp_path / "empty"))
    with pytest.raises(SidecarError, match="empty"):
        empty.get_conn_value("a")
    assert server.requests == []


def test_no_token_file_sends_no_token(server):
    SidecarSecretsBackend(url=server.url, token_file="").get_conn_value("a")
    SidecarSecretsBackend(url=server.url, token_file=None).get_conn_value("a")
    assert all("X-Sidecar-Token" not in r["headers"] for r in server.requests)


# --- no answer -------------------------------------------------------------------------------


def test_connection_refused_is_a_clear_error_after_retrying_within_the_timeout(token_file):
    with socket.socket() as s:  # bound, not listening: every connect is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        backend = SidecarSecretsBackend(url=f"http://127.0.0.1:{port}", token_file=token_file, timeout="400ms")
        with pytest.raises(SidecarError) as info:
            backend.get_conn_value("app_db")
    err = info.value
    assert err.code == "sidecar_unreachable" and err.status is None
    assert "connection refused" in str(err) and f"127.0.0.1:{port}" in str(err) and "app_db" in str(err)
    # 50 + 100 + 200 ms of backoff fit in 400 ms: the lookup was tried 4 times.
    assert "(4 attempts)" in str(err)


class ResettingThenServing:
    """Accepts connections, resets the first ``resets`` of them (a sidecar restarting), then answers."""

    def __init__(self, resets, body):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.resets, self.body = resets, json.dumps(body).encode()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.resets:
                conn.recv(65536)
                # SO_LINGER 0: close sends RST, as a process killed mid-request does.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
                continue
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(self.body)}\r\n\r\n".encode()
                + self.body
            )
            conn.close()

    def close(self):
        self.sock.close()


def test_connection_reset_is_retried(token_file):
    server = ResettingThenServing(2, CONN_JSON)
    try:
        backend = SidecarSecretsBackend(url=server.url, token_file=token_file, timeout=10)
        assert json.loads(backend.get_conn_value("app_db")) == CONN_JSON
        assert server.accepted == 3
        server.accepted = 0
        assert json.loads(asyncio.run(backend.aget_conn_value("app_db"))) == CONN_JSON
        assert server.accepted == 3
    finally:
        server.close()


def test_a_sidecar_that_starts_late_is_waited_for(token_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # refused until it listens
        port = s.getsockname()[1]
        backend = SidecarSecretsBackend(url=f"http://127.0.0.1:{port}", token_file=token_file, timeout=20)
        attempts = []
        real_open = sidecar_mod._OPENER.open

        def counting_open(*args, **kwargs):
            attempts.append(1)
            if len(attempts) == 3:
                s.listen(4)  # the sidecar comes up while the lookup is retrying
                threading.Thread(target=_answer_once, args=(s, CONN_JSON), daemon=True).start()
            return real_open(*args, **kwargs)

        sidecar_mod._OPENER.open = counting_open
        try:
            assert json.loads(backend.get_conn_value("app_db")) == CONN_JSON
        finally:
            sidecar_mod._OPENER.open = real_open
    assert len(attempts) == 3


def _answer_once(sock, body):
    conn, _ = sock.accept()
    conn.recv(65536)
    data = json.dumps(body).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    conn.close()


def test_timeout(server, token_file):
    server.route("/connections/slow", 200, CONN_JSON, delay=2)
    backend = SidecarSecretsBackend(url=server.url, token_file=token_file, timeout="300ms")
    started = time.monotonic()
    with pytest.raises(SidecarError) as info:
        backend.get_conn_value("slow")
    assert time.monotonic() - started < 1.5
    assert info.value.code == "sidecar_timeout" and "0.3 s" in str(info.value)


# --- variables -------------------------------------------------------------------------------


def test_variables(server, backend):
    server.route("/variables/greeting", 200, {"value": "hello"})
    assert backend.get_variable("greeting") == "hello"
    assert backend.get_variable("absent") is None  # 404, never NotImplementedError
    server.error("/variables/broken", 502, "upstream_error", "Secrets Manager said no")
    with pytest.raises(SidecarError, match="Secrets Manager said no"):
        backend.get_variable("broken")
    server.route("/variables/weird", 200, {"val": "x"})
    with pytest.raises(SidecarError) as info:
        backend.get_variable("weird")
    assert info.value.code == "bad_response"


def test_variables_can_be_switched_off(server, token_file):
    backend = SidecarSecretsBackend(url=server.url, token_file=token_file, variables="false")
    assert backend.get_variable("greeting") is None
    assert server.requests == []


def test_config(server, backend):
    server.route("/config/sql_alchemy_conn", 200, {"value": "postgresql://u:p@db/airflow"})
    assert backend.get_config("sql_alchemy_conn") == "postgresql://u:p@db/airflow"
    assert backend.get_config("absent") is None
    server.error("/config/broken", 502, "upstream_error", "Secrets Manager said no")
    with pytest.raises(SidecarError, match="Secrets Manager said no"):
        backend.get_config("broken")


def test_config_can_be_switched_off(server, token_file):
    backend = SidecarSecretsBackend(url=server.url, token_file=token_file, config="false")
    assert backend.get_config("sql_alchemy_conn") is None
    assert server.requests == []


# --- kwargs ----------------------------------------------------------------------------------


def test_defaults():
    backend = SidecarSecretsBackend()
    assert backend.url == "http://127.0.0.1:9797"
    assert backend.token_file == "/var/run/airflow-secrets-sidecar/token"
    assert backend.timeout == 10
    assert backend.variables is True
    assert backend.config is True


@pytest.mark.parametrize(
    "given, seconds",
    [(3, 3.0), (2.5, 2.5), ("10", 10.0), ("2.5", 2.5), ("500ms", 0.5), ("10s", 10.0), (" 7 ", 7.0)],
)
def test_timeout_accepts_numbers_and_strings(given, seconds):
    assert SidecarSecretsBackend(timeout=given).timeout == seconds


@pytest.mark.parametrize("given", ["0", 0, "-1", "soon", "10m", True, "nan"])
def test_bad_timeout_is_refused(given):
    with pytest.raises(ValueError, match="timeout"):
        SidecarSecretsBackend(timeout=given)


@pytest.mark.parametrize("given", ["127.0.0.1:9797", "ftp://127.0.0.1", "file:///etc/passwd", "http://"])
def test_bad_url_is_refused(given):
    with pytest.raises(ValueError, match="url"):
        SidecarSecretsBackend(url=given)


def test_string_kwargs_as_airflow_3_2_passes_them(server, token_file):
    """AIRFLOW__SECRETS__BACKEND_KWARG__<NAME> values arrive as strings."""
    backend = SidecarSecretsBackend(
        **{"url": server.url + "/", "token_file": token_file, "timeout": "4", "variables": "True"}
    )
    assert (backend.url, backend.timeout, backend.variables) == (server.url, 4.0, True)
    server.route("/connections/app_db", 200, CONN_JSON)
    assert backend.get_conn_value("app_db") is not None


def test_unknown_kwargs_are_logged_not_fatal(caplog):
    with caplog.at_level(logging.WARNING, logger="airflow_secrets_sidecar"):
        SidecarSecretsBackend(connections_prefix="airflow/connections")
    assert "connections_prefix" in caplog.text


def test_construction_does_no_io(monkeypatch):
    """Airflow 3.0-3.2 build a new backend for every lookup: no file or socket work up front."""

    def forbidden(*args, **kwargs):
        raise AssertionError("I/O in __init__")

    monkeypatch.setattr(sidecar_mod, "open", forbidden, raising=False)
    monkeypatch.setattr(sidecar_mod._OPENER, "open", forbidden)
    SidecarSecretsBackend(url="http://127.0.0.1:1", token_file="/nonexistent/token")


# --- async (the triggerer) -------------------------------------------------------------------


def test_async_lookup_matches_the_sync_one(server, backend):
    server.route("/connections/app_db?team=t1", 200, CONN_JSON, headers={"X-Sidecar-Validated": "true"})
    server.route("/variables/greeting", 200, {"value": "hello"})
    server.error("/connections/stale", 503, "credentials_rejected", "rejected by Postgres")
    with_connection_class(backend)

    async def lookups():
        conn = await backend.aget_connection("app_db", team_name="t1")
        missing = await backend.aget_connection("absent")
        variable = await backend.aget_variable("greeting")
        try:
            await backend.aget_conn_value("stale")
        except SidecarAccessDenied as e:
            denied = e
        return conn, missing, variable, denied

    conn, missing, variable, denied = asyncio.run(lookups())
    assert (conn.login, conn.password, conn.port, conn.extra_dejson) == ("app", "s3cret", 5432, CONN_JSON["extra"])
    assert missing is None and variable == "hello"
    assert (denied.code, denied.status, denied.message) == ("credentials_rejected", 503, "rejected by Postgres")
    assert server.requests[0]["headers"]["X-Sidecar-Token"] == TOKEN


def test_async_timeout_and_refused(server, token_file):
    server.route("/connections/slow", 200, CONN_JSON, delay=2)
    slow = SidecarSecretsBackend(url=server.url, token_file=token_file, timeout="300ms")
    with pytest.raises(SidecarError) as info:
        asyncio.run(slow.aget_conn_value("slow"))
    assert info.value.code == "sidecar_timeout"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = SidecarSecretsBackend(url=f"http://127.0.0.1:{s.getsockname()[1]}", token_file=token_file,
                                        timeout="400ms")
        with pytest.raises(SidecarError) as info:
            asyncio.run(refused.aget_conn_value("app_db"))
    assert info.value.code == "sidecar_unreachable" and "(4 attempts)" in str(info.value)


class GatedSidecar(ScriptedSidecar):
    """Holds every answer until ``gate`` is set (or ``hold`` seconds pass): a slow cold lookup."""

    def __init__(self, hold):
        super().__init__()
        self.gate = threading.Event()
        self.released_by_gate = None
        outer, handler = self, self.server.RequestHandlerClass

        class Gated(handler):
            def do_GET(self):  # noqa: N802
                outer.released_by_gate = outer.gate.wait(hold)
                super().do_GET()

        self.server.RequestHandlerClass = Gated


def _loop_keeps_running_during(lookup_factory, hold):
    """Run a lookup next to a ticker that opens the server's gate after 3 ticks of the event loop."""
    server = GatedSidecar(hold)
    server.route("/connections/app_db", 200, CONN_JSON)
    ticks = []

    async def ticker():
        while len(ticks) < 3:
            await asyncio.sleep(0.01)
            ticks.append(1)
        server.gate.set()

    async def main():
        t = asyncio.ensure_future(ticker())
        value = await lookup_factory(server.url)
        ticks_during = len(ticks)
        await t
        return value, ticks_during

    try:
        value, ticks_during = asyncio.run(main())
    finally:
        server.close()
    return value, ticks_during, server.released_by_gate


def test_the_async_lookup_does_not_block_the_event_loop(token_file):
    def lookup(url):
        return SidecarSecretsBackend(url=url, token_file=token_file).aget_conn_value("app_db")

    value, ticks_during, released_by_gate = _loop_keeps_running_during(lookup, hold=20)
    assert json.loads(value) == CONN_JSON
    # The answer came only after the ticker, running on the same loop, opened the gate.
    assert released_by_gate is True and ticks_during == 3


def test_the_blocking_lookup_would_block_it(token_file):
    """The control: the sync method called on the loop stalls it, so the check above can fail."""

    async def blocking(url):
        return SidecarSecretsBackend(url=url, token_file=token_file).get_conn_value("app_db")

    value, ticks_during, released_by_gate = _loop_keeps_running_during(blocking, hold=0.5)
    assert json.loads(value) == CONN_JSON
    assert released_by_gate is False and ticks_during == 0


def test_async_reads_a_chunked_answer(token_file):
    data = json.dumps(CONN_JSON).encode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        def serve():
            conn, _ = s.accept()
            conn.recv(65536)
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i : i + 7]), data[i : i + 7]) for i in range(0, len(data), 7))
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        backend = SidecarSecretsBackend(url=f"http://127.0.0.1:{s.getsockname()[1]}", token_file=token_file)
        assert json.loads(asyncio.run(backend.aget_conn_value("app_db"))) == CONN_JSON
