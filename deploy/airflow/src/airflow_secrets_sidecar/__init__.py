"""Airflow secrets backend that asks the airflow-secrets-sidecar for connections.

The sidecar runs next to Airflow components and answers
``GET /connections/<conn_id>`` with Airflow connection JSON (for Postgres,
credentials it has just used to log in; every other conn_type as Airflow's
amazon provider would give it, marked ``X-Sidecar-Validated: false``),
``GET /variables/<key>`` and ``GET /config/<key>``. This module is the Airflow
half: a ``BaseSecretsBackend`` that makes those HTTP calls (blocking, or on
asyncio streams for the triggerer) and maps the answers onto what Airflow's
lookup chain expects.

Configuration (Airflow 2.x, and the API server / dag-processor / triggerer of 3.x)::

    [secrets]
    backend = airflow_secrets_sidecar.SidecarSecretsBackend
    backend_kwargs = {"url": "http://127.0.0.1:9797", "token_file": "/var/run/airflow-secrets-sidecar/token"}

Airflow 3.x task execution reads ``[workers] secrets_backend`` and
``[workers] secrets_backend_kwargs`` (same values), falling back to ``[secrets]``.

How answers map (``get_conn_value``):

=====================================  =====================================================
sidecar answer                         what the backend does
=====================================  =====================================================
200                                    returns the body (Airflow parses the JSON); a
                                       ``{"uri": ...}`` body is returned as the URI itself
404 ``not_found``                      returns ``None``: Airflow tries env vars, then the
                                       metastore (2.x) / the API server (3.x workers)
503 ``credentials_rejected``,          raises :class:`SidecarAccessDenied`; on Airflow >= 3.2
403 ``team_forbidden``,                it is an ``AirflowSecretsBackendAccessDenied``, which
403 ``unvalidated_refused``            stops the lookup chain (no fall-through to a stale
                                       connection of the same id elsewhere)
any other status, connection refused,  raises :class:`SidecarError` (Airflow logs it and
timeout, unreadable token file         tries the next source); refused / reset connections
                                       are first retried until ``timeout`` is used up
=====================================  =====================================================

Only the Python standard library is used, so the package installs into any
Airflow image without touching its pinned dependencies.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

try:  # Airflow 3.x: the task SDK's base class (present in every 3.x install, core or worker-only)
    from airflow.sdk.bases.secrets_backend import BaseSecretsBackend
except ImportError:  # Airflow 2.x, and 3.x releases before the SDK base class existed
    from airflow.secrets import BaseSecretsBackend

try:  # Airflow 3.x
    from airflow.sdk.exceptions import AirflowException
except ImportError:  # Airflow 2.x
    from airflow.exceptions import AirflowException

try:  # Airflow >= 3.2 (task SDK >= 1.2.2): an exception that stops the lookup chain
    from airflow.sdk.exceptions import AirflowSecretsBackendAccessDenied as _AccessDeniedBase
except ImportError:  # Airflow 2.x, 3.0, 3.1: every exception falls through to the next source
    _AccessDeniedBase = None

__all__ = ["SidecarSecretsBackend", "SidecarError", "SidecarAccessDenied", "__version__"]
__version__ = "0.1.0"

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9797"
DEFAULT_TOKEN_FILE = "/var/run/airflow-secrets-sidecar/token"
# A cold lookup includes AWS calls and a Postgres login (tens of milliseconds when
# all is well); a cached one takes under a millisecond. Past this, the task gets
# ``sidecar_timeout`` instead of waiting on; the sidecar finishes the lookup and
# caches it for the next try.
DEFAULT_TIMEOUT = 10.0
TOKEN_HEADER = "X-Sidecar-Token"
# Answers are small JSON documents; anything bigger is not the sidecar.
_MAX_BODY = 1 << 20
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SidecarError(AirflowException):
    """A lookup that the sidecar (or the way to it) could not answer.

    ``code`` is the sidecar's error code (``credentials_rejected``,
    ``database_unreachable``, ``upstream_error``, ``secret_malformed``,
    ``timeout``, ``unauthorized``, ``invalid_conn_id``, ...) or one of this
    backend's own: ``sidecar_unreachable`` (nothing listening, connection
    reset), ``sidecar_timeout`` (no answer within ``timeout``),
    ``token_unreadable``, ``bad_response`` (an answer that is not the sidecar's
    JSON). ``status`` is the HTTP status, ``None`` when there was no answer.
    ``message`` is the sidecar's own text when it answered (it names the conn_id
    or secret and the cause, never a secret value), else this backend's.
    """

    def __init__(self, message: str, *, code: str = "sidecar_error", status: int | None = None):
        self.message = message
        self.code = code
        self.status = status
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"airflow-secrets-sidecar: {message} [{code}, {where}]")

    def __reduce__(self):  # keep the keyword-only fields through pickling (multiprocessing, 3.x comms)
        return (_rebuild, (type(self), self.message, self.code, self.status))


def _rebuild(cls, message, code, status):
    return cls(message, code=code, status=status)


if _AccessDeniedBase is not None:

    class SidecarAccessDenied(SidecarError, _AccessDeniedBase):
        """A refusal no other source may override: ``credentials_rejected``,
        ``team_forbidden`` or ``unvalidated_refused``.

        On Airflow >= 3.2 this is an ``AirflowSecretsBackendAccessDenied``: Airflow
        stops looking and the task fails with this message instead of falling
        through to a connection of the same id in env vars or the metastore.
        """

else:

    class SidecarAccessDenied(SidecarError):  # type: ignore[no-redef]
        """A refusal: ``credentials_rejected``, ``team_forbidden`` or ``unvalidated_refused``.

        This Airflow has no ``AirflowSecretsBackendAccessDenied`` (it arrived in
        3.2): like every backend exception, it is logged and Airflow tries the
        next source.
        """


# Sidecar error codes after which no other source may be consulted (when Airflow supports that):
# the database refused the stored credentials, this sidecar does not serve the caller's team,
# or it serves only credentials it has proven (``unvalidated = refuse``).
ACCESS_DENIED_CODES = frozenset({"credentials_rejected", "team_forbidden", "unvalidated_refused"})
# Separator between a team and an id in a team-scoped secret name (as in the amazon provider).
TEAM_SEP = "--"
# Transport failures that mean "the sidecar is not there right now" (starting, restarting):
# retried with a short backoff until the lookup's timeout is used up.
_RETRIED = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
            http.client.RemoteDisconnected, asyncio.IncompleteReadError)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the token somewhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No ProxyHandler: HTTP(S)_PROXY in an Airflow image must not route the token
# (and the credentials in the answer) through a proxy. Built once per process;
# Airflow 3.0-3.2 create a new backend object for every lookup.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _parse_timeout(value: Any) -> float:
    """Seconds as a number or a string: ``10``, ``"2.5"``, ``"500ms"``, ``"10s"``."""
    if isinstance(value, bool):
        raise ValueError(f"timeout must be a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", str(value))
        if not match:
            raise ValueError(f"timeout must be seconds like 10, '2.5', '500ms' or '10s', got {value!r}")
        seconds = float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {value!r}")
    return seconds


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


class SidecarSecretsBackend(BaseSecretsBackend):
    """Connections, variables and config options from the airflow-secrets-sidecar.

    :param url: the sidecar's credential listener, default ``http://127.0.0.1:9797``.
    :param token_file: file holding the shared token sent as ``X-Sidecar-Token``;
        read on every lookup, so a re-created file is picked up. Empty or
        ``None``: send no token (only for a sidecar run with ``--insecure-no-token``).
    :param timeout: seconds one lookup may take in all (connect, retries while
        the sidecar is not listening, the answer); number or string (``"10"``,
        ``"2.5"``, ``"500ms"``). Default 10.
    :param variables: whether ``get_variable`` asks the sidecar (default true).
        When false, Variables come only from env vars and the metastore.
    :param config: whether ``get_config`` asks the sidecar (default true).
        Airflow calls it only for options configured with a ``_secret`` suffix.

    Every value may be a string: Airflow >= 3.2 passes
    ``AIRFLOW__SECRETS__BACKEND_KWARG__<NAME>`` environment values as strings.
    Construction does no I/O: Airflow 3.0-3.2 build a new backend for every lookup.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token_file: str | None = DEFAULT_TOKEN_FILE,
        timeout: float | str = DEFAULT_TIMEOUT,
        variables: bool | str = True,
        config: bool | str = True,
        **kwargs: Any,
    ):
        super().__init__()
        url = str(url).strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"url must look like http://127.0.0.1:9797, got {url!r}")
        try:
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"url must look like http://127.0.0.1:9797, got {url!r}") from None
        self._host = parts.hostname or ""
        self._https = parts.scheme == "https"
        self._base_path = parts.path
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self.url = url
        self.token_file = str(token_file).strip() if token_file not in (None, "") else None
        self.timeout = _parse_timeout(timeout)
        self.variables = _parse_bool("variables", variables)
        self.config = _parse_bool("config", config)
        if kwargs:
            log.warning(
                "SidecarSecretsBackend: ignoring unknown backend_kwargs %s (known: url, token_file, "
                "timeout, variables, config)",
                ", ".join(sorted(kwargs)),
            )

    # --- Airflow's interface ------------------------------------------------------------

    def get_conn_value(self, conn_id: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """The connection as Airflow JSON or URI, ``None`` when the sidecar does not have ``conn_id``.

        ``team_name`` (Airflow >= 3.2 multi-team) is forwarded: the sidecar tries
        ``<prefix>/<team>--<conn_id>``, then ``<prefix>/<conn_id>``.
        """
        if self._ambiguous("connection", conn_id, team_name):
            return None
        status, body = self._get("connections", conn_id, self._query(team_name))
        if status == 404:
            return None
        return self._conn_value(body)

    def get_variable(self, key: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """The variable's value, ``None`` when the sidecar does not have it (or variables are off)."""
        if not self.variables or self._ambiguous("variable", key, team_name):
            return None
        status, body = self._get("variables", key, self._query(team_name))
        if status == 404:
            return None
        return self._value(status, body, f"variable {key!r}")

    def get_config(self, key: str, **kwargs: Any) -> str | None:
        """The stored value of ``<config_prefix>/<key>`` (an option set with a ``_secret`` suffix)."""
        if not self.config or self._ambiguous("configuration option", key, None):
            return None
        status, body = self._get("config", key)
        if status == 404:
            return None
        return self._value(status, body, f"config {key!r}")

    async def aget_conn_value(self, conn_id: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """:meth:`get_conn_value` without blocking the event loop (asyncio streams)."""
        if self._ambiguous("connection", conn_id, team_name):
            return None
        status, body = await self._aget("connections", conn_id, self._query(team_name))
        if status == 404:
            return None
        return self._conn_value(body)

    async def aget_connection(self, conn_id: str, team_name: str | None = None, **kwargs: Any):
        """The ``Connection`` for the triggerer and async tasks (Airflow >= 3.1 calls it when present).

        Airflow's own fallback would run the blocking lookup in asgiref's single
        shared thread, one lookup at a time; this one is a coroutine on the event loop.
        """
        value = await self.aget_conn_value(conn_id, team_name=team_name)
        if value:
            return self.deserialize_connection(conn_id=conn_id, value=value)
        return None

    async def aget_variable(self, key: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """:meth:`get_variable` without blocking the event loop."""
        if not self.variables or self._ambiguous("variable", key, team_name):
            return None
        status, body = await self._aget("variables", key, self._query(team_name))
        if status == 404:
            return None
        return self._value(status, body, f"variable {key!r}")

    # --- answers ------------------------------------------------------------------------

    @staticmethod
    def _conn_value(body: bytes) -> str:
        text = body.decode("utf-8")
        # A URI secret comes as {"uri": "..."}: hand Airflow the URI itself, so that it
        # parses it with the same code as for the amazon provider's SecretsManagerBackend
        # (the task SDK's Connection of 3.0/3.1 takes no ``uri`` keyword in from_json).
        if text.startswith('{"uri":'):
            try:
                doc = json.loads(text)
            except ValueError:
                return text
            if isinstance(doc, dict) and len(doc) == 1 and isinstance(doc.get("uri"), str):
                return doc["uri"]
        return text

    def _value(self, status: int, body: bytes, what: str) -> str:
        try:
            value = json.loads(body)["value"]
        except (ValueError, TypeError, KeyError):
            value = None
        if not isinstance(value, str):
            raise self._logged(
                SidecarError(
                    f'{what}: the sidecar answered 200 without a string "value" field',
                    code="bad_response",
                    status=status,
                )
            )
        return value

    @staticmethod
    def _query(team_name: str | None) -> str:
        return f"team={urllib.parse.quote(str(team_name), safe='')}" if team_name else ""

    @staticmethod
    def _ambiguous(kind: str, name: str, team_name: str | None) -> bool:
        """An id containing ``--`` in multi-team mode is refused, as the amazon provider does.

        ``team`` + ``--`` + id names a team-scoped secret, so such an id could reach
        another team's namespace. Like the provider, it is logged and not looked up
        (``None``: Airflow tries the next source).
        """
        if TEAM_SEP not in str(name):
            return False
        if not team_name and not _multi_team():
            return False
        log.warning(
            "airflow-secrets-sidecar: %s id %r contains %r, which separates the team name from the id "
            "in a team-scoped secret name; not looked up",
            kind,
            name,
            TEAM_SEP,
        )
        return True

    # --- HTTP ---------------------------------------------------------------------------

    def _request_parts(self, kind: str, name: str, query: str) -> tuple[str, str, dict[str, str]]:
        what = f"{kind.rstrip('s')} {name!r}"
        headers = {"Accept": "application/json", "User-Agent": f"airflow-secrets-sidecar-backend/{__version__}"}
        token = self._token(what)
        if token is not None:
            headers[TOKEN_HEADER] = token
        path = f"{self._base_path}/{kind}/{urllib.parse.quote(str(name), safe='')}"
        if query:
            path += "?" + query
        return what, path, headers

    def _get(self, kind: str, name: str, query: str = "") -> tuple[int, bytes]:
        """GET ``/<kind>/<name>``: ``(status, body)`` for 200 and 404, :class:`SidecarError` for the rest.

        Connection refused / reset (a sidecar starting or restarting) is retried
        with a short backoff until ``timeout`` is used up.
        """
        what, path, headers = self._request_parts(kind, name, query)
        request = urllib.request.Request(self._origin + path, headers=headers, method="GET")
        started = time.monotonic()
        deadline = started + self.timeout
        delay, attempts = _BACKOFF_FIRST, 0
        while True:
            attempts += 1
            left = deadline - time.monotonic()
            try:
                with _OPENER.open(request, timeout=max(left, 0.001)) as response:
                    status, body, reply_headers = response.status, response.read(_MAX_BODY + 1), response.headers
                break
            except urllib.error.HTTPError as e:  # every status but 2xx (3xx too: redirects are not followed)
                try:
                    status, body, reply_headers = e.code, e.read(_MAX_BODY + 1), e.headers
                except (OSError, http.client.HTTPException):
                    status, body, reply_headers = e.code, b"", e.headers
                finally:
                    e.close()
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(reason, _RETRIED) and time.monotonic() + delay < deadline:
                    log.debug("airflow-secrets-sidecar: %s: %s; retrying in %.0f ms", what, type(reason).__name__,
                              delay * 1000)
                    time.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                raise self._logged(self._transport_error(e, what, attempts)) from None
        return self._answer(status, body, reply_headers, what, started, attempts)

    async def _aget(self, kind: str, name: str, query: str = "") -> tuple[int, bytes]:
        """:meth:`_get` on asyncio streams: the event loop keeps running while the sidecar works."""
        what, path, headers = self._request_parts(kind, name, query)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = loop.time() + self.timeout
        delay, attempts = _BACKOFF_FIRST, 0
        while True:
            attempts += 1
            try:
                status, body, reply_headers = await asyncio.wait_for(
                    self._aexchange(path, headers), timeout=max(deadline - loop.time(), 0.001)
                )
                break
            except asyncio.TimeoutError as e:
                raise self._logged(self._transport_error(socket.timeout(), what, attempts)) from e
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                if isinstance(e, _RETRIED) and loop.time() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                if isinstance(e, (OSError, asyncio.IncompleteReadError)):
                    raise self._logged(self._transport_error(e, what, attempts)) from None
                raise self._logged(
                    SidecarError(f"{what}: unreadable answer from {self.url}", code="bad_response")
                ) from None
        return self._answer(status, body, reply_headers, what, started, attempts)

    async def _aexchange(self, path: str, headers: dict[str, str]):
        """One HTTP/1.1 GET (``Connection: close``): ``(status, body, headers)``."""
        context = ssl.create_default_context() if self._https else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context, limit=_MAX_BODY + 1)
        try:
            host = self._host if ":" not in self._host else f"[{self._host}]"
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{self._port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            version, code, *_ = status_line.split(" ", 2)
            if not version.startswith("HTTP/1."):
                raise ValueError("not HTTP/1.x")
            reply_headers = http.client.HTTPMessage()
            for line in header_lines:
                if ":" in line:
                    k, v = line.split(":", 1)
                    reply_headers[k.strip()] = v.strip()
            length = reply_headers.get("Content-Length")
            if "chunked" in reply_headers.get("Transfer-Encoding", "").lower():
                body = await self._read_chunked(reader)
            elif length is not None:
                body = await reader.readexactly(min(int(length), _MAX_BODY + 1))
            else:
                body = await reader.read(_MAX_BODY + 1)
            return int(code), body, reply_headers
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    @staticmethod
    async def _read_chunked(reader) -> bytes:
        body = b""
        while len(body) <= _MAX_BODY:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            body += await reader.readexactly(min(size, _MAX_BODY + 1 - len(body)))
            await reader.readexactly(2)
        return body

    def _answer(self, status, body, reply_headers, what, started, attempts) -> tuple[int, bytes]:
        log.debug(
            "airflow-secrets-sidecar: %s -> HTTP %s in %.1f ms, %d attempt(s) (validated %s, secret %s, stage %s, "
            "age %s)",
            what,
            status,
            (time.monotonic() - started) * 1000,
            attempts,
            reply_headers.get("X-Sidecar-Validated"),
            reply_headers.get("X-Sidecar-Secret"),
            reply_headers.get("X-Sidecar-Stage"),
            reply_headers.get("X-Sidecar-Age"),
        )
        if len(body) > _MAX_BODY:
            raise self._logged(
                SidecarError(
                    f"{what}: the answer from {self.url} is larger than {_MAX_BODY} bytes",
                    code="bad_response",
                    status=status,
                )
            )
        if status in (200, 404):
            return status, body
        raise self._logged(self._answer_error(status, body, what))

    def _token(self, what: str) -> str | None:
        if self.token_file is None:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except OSError as e:
            raise self._logged(
                SidecarError(
                    f"{what}: cannot read the sidecar token from {self.token_file}: {e.strerror or e}",
                    code="token_unreadable",
                )
            ) from None
        if not token:
            raise self._logged(
                SidecarError(f"{what}: the sidecar token file {self.token_file} is empty", code="token_unreadable")
            )
        return token

    def _answer_error(self, status: int, body: bytes, what: str) -> SidecarError:
        """The exception for a sidecar answer other than 200/404: the sidecar's own code and message."""
        try:
            doc = json.loads(body)
            code, message = doc["error"], doc["message"]
            if not isinstance(code, str) or not isinstance(message, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            text = body.decode("utf-8", "replace").strip()[:200] or "(empty body)"
            return SidecarError(
                f"{what}: unexpected answer from {self.url}: {text}", code="bad_response", status=status
            )
        # The sidecar's message names the conn_id/secret and the cause (and never a secret value).
        cls = SidecarAccessDenied if code in ACCESS_DENIED_CODES else SidecarError
        return cls(message, code=code, status=status)

    def _transport_error(self, error: Exception, what: str, attempts: int = 1) -> SidecarError:
        """The exception when no HTTP answer came back."""
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        tried = f" ({attempts} attempts)" if attempts > 1 else ""
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return SidecarError(
                f"{what}: no answer from the sidecar at {self.url} within {self.timeout:g} s{tried}",
                code="sidecar_timeout",
            )
        if isinstance(reason, ConnectionRefusedError):
            return SidecarError(
                f"{what}: connection refused by {self.url} for {self.timeout:g} s{tried}: is the "
                "airflow-secrets-sidecar container running and listening there?",
                code="sidecar_unreachable",
            )
        detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return SidecarError(f"{what}: cannot reach the sidecar at {self.url}{tried}: {detail}",
                            code="sidecar_unreachable")

    @staticmethod
    def _logged(error: SidecarError) -> SidecarError:
        # Airflow 3.x logs an exception that falls through to the next source only at DEBUG:
        # say it here so that the task log shows why the id then "isn't defined".
        log.warning("%s", error)
        return error

    def __repr__(self) -> str:
        return f"SidecarSecretsBackend(url={self.url!r}, token_file={self.token_file!r}, timeout={self.timeout:g})"


def _multi_team() -> bool:
    """Airflow's ``[core] multi_team`` (3.2+); false when it cannot be read."""
    for module in ("airflow.sdk.configuration", "airflow.configuration"):
        try:
            conf = __import__(module, fromlist=["conf"]).conf
            return conf.getboolean("core", "multi_team", fallback=False)
        except Exception:  # noqa: BLE001 (an unreadable option is "not multi-team")
            continue
    return False
