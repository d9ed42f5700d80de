"""Airflow secrets backend that asks the airflow-secrets-sidecar for connections.

The sidecar runs next to every Airflow component and answers
``GET /connections/<conn_id>`` with Airflow connection JSON whose credentials
it has just used to log in to Postgres. This module is the Airflow half: a
``BaseSecretsBackend`` that makes that HTTP call and maps the answer onto what
Airflow's lookup chain expects.

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
200                                    returns the body (Airflow parses the JSON)
404 ``not_found``                      returns ``None``: Airflow tries env vars, then the
                                       metastore (2.x) / the API server (3.x workers)
503 ``credentials_rejected``           raises :class:`SidecarAccessDenied`; on Airflow >= 3.2
                                       it is an ``AirflowSecretsBackendAccessDenied``, which
                                       stops the lookup chain (no fall-through to a stale
                                       connection of the same id elsewhere)
any other status, connection refused,  raises :class:`SidecarError` (Airflow logs it and
timeout, unreadable token file         tries the next source)
=====================================  =====================================================

Only the Python standard library is used, so the package installs into any
Airflow image without touching its pinned dependencies.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
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
        """The database refused the secret's credentials (``credentials_rejected``).

        On Airflow >= 3.2 this is an ``AirflowSecretsBackendAccessDenied``: Airflow
        stops looking and the task fails with this message instead of falling
        through to a connection of the same id in env vars or the metastore.
        """

else:

    class SidecarAccessDenied(SidecarError):  # type: ignore[no-redef]
        """The database refused the secret's credentials (``credentials_rejected``).

        This Airflow has no ``AirflowSecretsBackendAccessDenied`` (it arrived in
        3.2): like every backend exception, it is logged and Airflow tries the
        next source.
        """


# Sidecar error codes after which no other source may be consulted (when Airflow supports that).
ACCESS_DENIED_CODES = frozenset({"credentials_rejected"})


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
    """Connections (and optionally variables) from the airflow-secrets-sidecar.

    :param url: the sidecar's credential listener, default ``http://127.0.0.1:9797``.
    :param token_file: file holding the shared token sent as ``X-Sidecar-Token``;
        read on every lookup, so a re-created file is picked up. Empty or
        ``None``: send no token (only for a sidecar run with ``--insecure-no-token``).
    :param timeout: seconds to wait for the sidecar (connect, and each read);
        number or string (``"10"``, ``"2.5"``, ``"500ms"``). Default 10.
    :param variables: whether ``get_variable`` asks the sidecar (default true).
        When false, Variables come only from env vars and the metastore.

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
        **kwargs: Any,
    ):
        super().__init__()
        url = str(url).strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"url must look like http://127.0.0.1:9797, got {url!r}")
        self.url = url
        self.token_file = str(token_file).strip() if token_file not in (None, "") else None
        self.timeout = _parse_timeout(timeout)
        self.variables = _parse_bool("variables", variables)
        if kwargs:
            log.warning(
                "SidecarSecretsBackend: ignoring unknown backend_kwargs %s (known: url, token_file, "
                "timeout, variables)",
                ", ".join(sorted(kwargs)),
            )

    # --- Airflow's interface ------------------------------------------------------------

    def get_conn_value(self, conn_id: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """The connection's JSON, ``None`` when the sidecar does not know ``conn_id``.

        ``team_name`` (Airflow >= 3.2 multi-team) is accepted and not used: a
        sidecar serves the connections of the pod it runs in.
        """
        status, body = self._get("connections", conn_id)
        if status == 404:
            return None
        return body.decode("utf-8")

    def get_variable(self, key: str, team_name: str | None = None, **kwargs: Any) -> str | None:
        """The variable's value, ``None`` when the sidecar does not have it (or variables are off)."""
        if not self.variables:
            return None
        status, body = self._get("variables", key)
        if status == 404:
            return None
        try:
            value = json.loads(body)["value"]
        except (ValueError, TypeError, KeyError):
            value = None
        if not isinstance(value, str):
            raise self._logged(
                SidecarError(
                    f'variable {key!r}: the sidecar answered 200 without a string "value" field',
                    code="bad_response",
                    status=status,
                )
            )
        return value

    def get_config(self, key: str) -> str | None:
        """Airflow configuration is not served by the sidecar."""
        return None

    # --- HTTP ---------------------------------------------------------------------------

    def _get(self, kind: str, name: str) -> tuple[int, bytes]:
        """GET ``/<kind>/<name>``: ``(status, body)`` for 200 and 404, :class:`SidecarError` for the rest."""
        what = f"{kind[:-1]} {name!r}"
        headers = {"Accept": "application/json", "User-Agent": f"airflow-secrets-sidecar-backend/{__version__}"}
        token = self._token(what)
        if token is not None:
            headers[TOKEN_HEADER] = token
        url = f"{self.url}/{kind}/{urllib.parse.quote(str(name), safe='')}"
        request = urllib.request.Request(url, headers=headers, method="GET")
        started = time.monotonic()
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                status, body, reply_headers = response.status, response.read(_MAX_BODY + 1), response.headers
        except urllib.error.HTTPError as e:  # every status but 2xx (3xx too: redirects are not followed)
            try:
                status, body, reply_headers = e.code, e.read(_MAX_BODY + 1), e.headers
            except (OSError, http.client.HTTPException):
                status, body, reply_headers = e.code, b"", e.headers
            finally:
                e.close()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise self._logged(self._transport_error(e, what)) from None
        log.debug(
            "airflow-secrets-sidecar: %s -> HTTP %s in %.1f ms (stage %s, age %s)",
            what,
            status,
            (time.monotonic() - started) * 1000,
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

    def _transport_error(self, error: Exception, what: str) -> SidecarError:
        """The exception when no HTTP answer came back."""
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return SidecarError(
                f"{what}: no answer from the sidecar at {self.url} within {self.timeout:g} s", code="sidecar_timeout"
            )
        if isinstance(reason, ConnectionRefusedError):
            return SidecarError(
                f"{what}: connection refused by {self.url}: is the airflow-secrets-sidecar container running "
                "and listening there?",
                code="sidecar_unreachable",
            )
        detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return SidecarError(f"{what}: cannot reach the sidecar at {self.url}: {detail}", code="sidecar_unreachable")

    @staticmethod
    def _logged(error: SidecarError) -> SidecarError:
        # Airflow 3.x logs an exception that falls through to the next source only at DEBUG:
        # say it here so that the task log shows why the id then "isn't defined".
        log.warning("%s", error)
        return error

    def __repr__(self) -> str:
        return f"SidecarSecretsBackend(url={self.url!r}, token_file={self.token_file!r}, timeout={self.timeout:g})"
