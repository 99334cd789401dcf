"""HTTP/1.1 to kilnd over its Unix socket or a local TCP port, with the standard library.

One connection per request (kilnd's own CLI does the same): a unary answer is read whole and the
connection closed; a streamed answer (newline-delimited JSON) keeps its connection until the last
line is read or the caller closes the stream, so abandoning a stream never leaves one half-read
on a shared connection.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any, Dict, Iterator, Mapping, Optional
from urllib.parse import quote, urlencode, urlsplit

from .errors import KilnConnectionError, ProtocolError, api_error


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to a Unix socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("kilnd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def default_socket() -> str:
    """kilnd's socket as the ``kiln`` CLI finds it: ``$KILND_SOCKET``, else the default state
    folder's (``/var/lib/kiln`` as root, else ``$XDG_DATA_HOME/kiln`` or
    ``~/.local/share/kiln``)."""
    env = os.environ.get("KILND_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        base = "/var/lib/kiln"
    elif os.environ.get("XDG_DATA_HOME"):
        base = os.path.join(os.environ["XDG_DATA_HOME"], "kiln")
    else:
        base = os.path.join(os.path.expanduser("~"), ".local/share/kiln")
    return os.path.join(base, "kilnd.sock")


def path_query(path: str, params: Optional[Mapping[str, str]] = None) -> str:
    """``path`` with ``params`` percent-encoded as its query."""
    if not params:
        return path
    return f"{path}?{urlencode(params, quote_via=quote)}"


class Transport:
    """Sends requests to one kilnd: on ``socket`` (a path), or at ``url`` (``http://HOST:PORT``)
    with ``token`` as the bearer token. ``timeout`` bounds connecting and each read of a unary
    answer, in seconds; streams wait as long as their command or build runs."""

    def __init__(
        self,
        socket_path: Optional[str],
        url: Optional[str],
        token: Optional[str],
        timeout: Optional[float],
    ) -> None:
        if socket_path is not None and url is not None:
            raise ValueError("give kilnd's socket or its url, not both")
        self.token = token
        self.timeout = timeout
        self.socket_path: Optional[str] = None
        self._host = ""
        self._port = 0
        self._https = False
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"kilnd url {url!r} is not http://HOST:PORT")
            if parts.path not in ("", "/") or parts.query:
                raise ValueError(f"kilnd url {url!r} has a path; give only http://HOST:PORT")
            self._https = parts.scheme == "https"
            self._host = parts.hostname
            self._port = parts.port or (443 if self._https else 80)
            self.where = url
        else:
            self.socket_path = socket_path if socket_path is not None else default_socket()
            self.where = self.socket_path

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, timeout)
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def open(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        stream: bool = False,
    ) -> http.client.HTTPResponse:
        """Sends a request and returns the answer with its body unread; an error status raises
        the :class:`~kiln.errors.ApiError` for it. The caller closes the answer."""
        conn = self._connection(self.timeout)
        headers: Dict[str, str] = {
            "Content-Type": content_type,
            "Connection": "close",
        }
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            hint = " (is kilnd running?)"
            raise KilnConnectionError(f"cannot reach kilnd at {self.where}: {e}{hint}") from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise KilnConnectionError(f"talking to kilnd at {self.where}: {e}") from e
        if stream and conn.sock is not None:
            # A command may be quiet for longer than any unary timeout.
            conn.sock.settimeout(None)
        if resp.status >= 400:
            try:
                text = resp.read().decode("utf-8", "replace")
            finally:
                resp.close()
                conn.close()
            try:
                message = str(json.loads(text)["error"])
            except (ValueError, KeyError, TypeError):
                message = text.strip() or resp.reason
            raise api_error(resp.status, message)
        return resp

    def read(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
        """The whole body of the answer to a request."""
        resp = self.open(method, path, body, content_type)
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise KilnConnectionError(f"reading {method} {path} from kilnd: {e}") from e
        finally:
            resp.close()

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        """The JSON answer to a request with ``payload`` (if any) as its JSON body."""
        body = b"" if payload is None else json.dumps(payload).encode()
        data = self.read(method, path, body)
        try:
            return json.loads(data)
        except ValueError as e:
            raise ProtocolError(f"{method} {path}: kilnd answered non-JSON {data[:200]!r}") from e


class LineStream:
    """The JSON lines of a streamed answer, as dicts, read as they arrive. ``close()`` drops the
    connection (kilnd notices when it next has a line to send, and cancels a command)."""

    def __init__(self, resp: http.client.HTTPResponse, what: str) -> None:
        self._resp = resp
        self._what = what

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        while True:
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise KilnConnectionError(f"{self._what}: the stream broke: {e}") from e
            if not line:
                self.close()
                raise StopIteration
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                self.close()
                raise ProtocolError(f"{self._what}: not a JSON line: {line[:200]!r}") from e
            if not isinstance(item, dict) or "type" not in item:
                self.close()
                raise ProtocolError(f"{self._what}: a line without a type: {line[:200]!r}")
            return item

    def close(self) -> None:
        """Drops the connection."""
        self._resp.close()
