"""The exceptions the SDK raises.

Every refusal from kilnd is an :class:`ApiError` subclass chosen by its HTTP status and carrying
kilnd's own message (which names the thing: the sandbox id, the template, the path).
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class KilnError(Exception):
    """The base of every error the SDK raises."""


class KilnConnectionError(KilnError):
    """kilnd could not be reached (no socket, nothing listening), or the connection broke."""


class ProtocolError(KilnError):
    """kilnd answered something that is not its API (a bad JSON line, a stream cut short)."""


class ApiError(KilnError):
    """kilnd refused a request: ``status`` is the HTTP status, ``message`` kilnd's ``error``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        #: The HTTP status.
        self.status = status
        #: kilnd's message.
        self.message = message


class BadRequest(ApiError):
    """400: bad input (an unknown field, a relative path, an invalid spec)."""


class Unauthorized(ApiError):
    """401: the TCP listener wants a bearer token and got none or a wrong one."""


class NotFound(ApiError):
    """404: no such sandbox, template or file."""


class Conflict(ApiError):
    """409: the sandbox is in the wrong state (a paused sandbox asked to run something)."""


class LimitReached(ApiError):
    """429: a host or template limit (VMs, memory, sandboxes per template)."""


class ServerError(ApiError):
    """5xx: kilnd failed."""


class ExecError(KilnError):
    """A command could not run (``could_not_start``: bad program, directory or user), or the
    sandbox failed under it."""

    def __init__(self, message: str, could_not_start: bool) -> None:
        super().__init__(message)
        #: kilnd's message.
        self.message = message
        #: The process never started.
        self.could_not_start = could_not_start


class BuildFailed(KilnError):
    """A template build ended with ``failed``; the message is kilnd's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: kilnd's message.
        self.message = message


_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    429: LimitReached,
}


def api_error(status: int, message: str) -> ApiError:
    """The exception for an error answer with ``status`` and kilnd's ``message``."""
    cls: Optional[Type[ApiError]] = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ApiError
    return cls(status, message)
