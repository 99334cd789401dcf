"""The client: which kilnd to talk to, and the calls that are not about one sandbox."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence
from urllib.parse import quote

from ._transport import Transport, path_query
from .models import BuildEvent, PortSpec, SandboxInfo, TemplateInfo, network_request
from .sandbox import Sandbox
from .template import BuildStream, SpecLike, Template


class Kiln:
    """A client for one kilnd.

    ``Kiln(socket="/var/lib/kiln/kilnd.sock")`` talks over its Unix socket;
    ``Kiln(url="http://127.0.0.1:7777", token=...)`` over its TCP listener (``kilnd --listen``),
    with the bearer token. With neither: ``$KILND_URL`` (and ``$KILND_TOKEN``) if set, else
    ``$KILND_SOCKET``, else the socket in kilnd's default state folder, as the ``kiln`` CLI does.
    ``timeout`` bounds connecting and each unary answer, in seconds (``None``: no bound); the
    streams of commands and builds last as long as they run.
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = 300.0,
    ) -> None:
        if socket is None and url is None and os.environ.get("KILND_URL"):
            url = os.environ["KILND_URL"]
        if url is not None and token is None:
            token = os.environ.get("KILND_TOKEN") or None
        self._t = Transport(socket, url, token, timeout)

    def __repr__(self) -> str:
        return f"Kiln({self._t.where!r})"

    def health(self) -> bool:
        """Whether kilnd answers."""
        return bool(self._t.json("GET", "/health").get("ok"))

    def metrics(self) -> str:
        """kilnd's Prometheus text: sandboxes by state, warm VMs, limits, each sandbox's figures."""
        return self._t.read("GET", "/metrics").decode("utf-8", "replace")

    # ---- sandboxes ----

    def create_sandbox(
        self,
        template: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        allow_domains: Optional[Sequence[str]] = None,
        allow_net: Optional[bool] = None,
        publish: Optional[Sequence[PortSpec]] = None,
    ) -> Sandbox:
        """A new sandbox: see :meth:`kiln.Sandbox.create`."""
        req: Dict[str, Any] = {"template": template}
        net = network_request(allow_domains, allow_net, publish)
        if net is not None:
            req["network"] = net
        if timeout is not None:
            req["timeout_s"] = int(timeout)
        if env:
            req["env"] = {str(k): str(v) for k, v in env.items()}
        if metadata:
            req["metadata"] = {str(k): str(v) for k, v in metadata.items()}
        return Sandbox(self, SandboxInfo.from_json(self._t.json("POST", "/sandboxes", req)))

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """Sandbox ``sandbox_id`` (:class:`~kiln.errors.NotFound` if there is none)."""
        info = self._t.json("GET", f"/sandboxes/{quote(sandbox_id, safe='')}")
        return Sandbox(self, SandboxInfo.from_json(info))

    def sandboxes(
        self,
        *,
        template: Optional[str] = None,
        state: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> List[Sandbox]:
        """Every sandbox, or those of ``template``, in ``state`` (``"running"``, ``"paused"``)
        and with all of ``metadata``'s labels."""
        q: Dict[str, str] = {}
        if template is not None:
            q["template"] = template
        if state is not None:
            q["state"] = state
        for k, v in (metadata or {}).items():
            q[f"metadata.{k}"] = v
        ans = self._t.json("GET", path_query("/sandboxes", q))
        return [Sandbox(self, SandboxInfo.from_json(i)) for i in ans]

    # ---- templates ----

    def templates(self) -> List[Template]:
        """Every template."""
        return [Template(self, TemplateInfo.from_json(i)) for i in self._t.json("GET", "/templates")]

    def template(self, name: str) -> Template:
        """Template ``name`` (or id)."""
        info = self._t.json("GET", f"/templates/{quote(name, safe='')}")
        return Template(self, TemplateInfo.from_json(info))

    def build_template(
        self, spec: SpecLike, *, on_event: Optional[Callable[[BuildEvent], Any]] = None
    ) -> Template:
        """Builds a template: see :meth:`kiln.Template.build`."""
        return Template.build(spec, on_event=on_event, client=self)

    def build_template_stream(self, spec: SpecLike) -> BuildStream:
        """Starts a build: see :meth:`kiln.Template.build_stream`."""
        return Template.build_stream(spec, client=self)

    def remove_template(self, name: str) -> None:
        """Removes template ``name`` and its files."""
        self._t.read("DELETE", f"/templates/{quote(name, safe='')}")
