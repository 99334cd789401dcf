"""Templates: build one from a spec (its progress streamed), list, get, remove, and size its
warm pool.

A spec is what ``kiln template build`` reads (pool/src/template/spec.rs documents every key):
give it as a dict, or as the path of a TOML file, whose relative ``[from]`` paths are taken from
the file's folder as the CLI does. kilnd refuses unknown keys by name.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Union
from urllib.parse import quote

from ._transport import LineStream
from .errors import BuildFailed, KilnError, ProtocolError
from .models import BuildEvent, BuildFailedLine, Done, TemplateInfo, build_event

if TYPE_CHECKING:
    from .client import Kiln
    from .sandbox import Sandbox

#: A template spec: a dict, or the path of a TOML file.
SpecLike = Union[Mapping[str, Any], str, "os.PathLike[str]"]


def load_spec(spec: SpecLike) -> Dict[str, Any]:
    """The spec as the JSON kilnd takes: a dict as given, a TOML file parsed with its relative
    ``from.dir``, ``from.image`` and ``from.oci`` made absolute from the file's folder."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = os.fspath(spec)
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ModuleNotFoundError:
            raise KilnError(
                f"template spec {path}: reading TOML needs Python 3.11 or `pip install kiln-sdk[toml]`"
            ) from None
    try:
        with open(path, "rb") as f:
            data: Dict[str, Any] = tomllib.load(f)
    except OSError as e:
        raise KilnError(f"template spec {path}: {e}") from e
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise KilnError(f"template spec {path}: {e}") from e
    source = data.get("from")
    if isinstance(source, dict):
        base = os.path.dirname(os.path.abspath(path))
        for key in ("dir", "image", "oci"):
            v = source.get(key)
            if isinstance(v, str) and not os.path.isabs(v):
                source[key] = os.path.join(base, v)
    return data


class BuildStream:
    """A template build's progress (:class:`~kiln.models.Step`, :class:`~kiln.models.Progress`,
    :class:`~kiln.models.Output`, and last :class:`~kiln.models.Done`), as kilnd sends it; a
    failed build raises :class:`~kiln.errors.BuildFailed` with kilnd's reason."""

    def __init__(self, kiln: "Kiln", lines: LineStream, name: str) -> None:
        self._kiln = kiln
        self._lines = lines
        self._name = name
        #: The last event, once the build finished.
        self.done: Optional[Done] = None

    def __iter__(self) -> Iterator[BuildEvent]:
        return self

    def __next__(self) -> BuildEvent:
        if self.done is not None:
            raise StopIteration
        try:
            line = next(self._lines)
        except StopIteration:
            raise ProtocolError(f"the build of {self._name!r} ended without a result") from None
        ev = build_event(line)
        if isinstance(ev, BuildFailedLine):
            self.close()
            raise BuildFailed(ev.message)
        if isinstance(ev, Done):
            self.done = ev
            self.close()
        return ev

    def wait(self, on_event: Optional[Callable[[BuildEvent], Any]] = None) -> "Template":
        """Follows the build to its end, passing each event to ``on_event``; the template."""
        for ev in self:
            if on_event is not None:
                on_event(ev)
        assert self.done is not None
        return Template(self._kiln, self.done.template)

    def close(self) -> None:
        """Stops following (the build goes on in kilnd)."""
        self._lines.close()

    def __enter__(self) -> "BuildStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Template:
    """One of kilnd's templates."""

    def __init__(self, kiln: "Kiln", info: TemplateInfo) -> None:
        self._kiln = kiln
        self._info = info

    def __repr__(self) -> str:
        return f"Template(name={self.name!r}, id={self.id!r})"

    @classmethod
    def build(
        cls,
        spec: SpecLike,
        *,
        on_event: Optional[Callable[[BuildEvent], Any]] = None,
        client: Optional["Kiln"] = None,
    ) -> "Template":
        """Builds ``spec`` (found at once when the same spec and inputs were built before),
        passing each progress event to ``on_event``."""
        return cls.build_stream(spec, client=client).wait(on_event)

    @classmethod
    def build_stream(cls, spec: SpecLike, *, client: Optional["Kiln"] = None) -> BuildStream:
        """Starts building ``spec`` and returns its progress as it comes."""
        from .client import Kiln

        kiln = client or Kiln()
        body = load_spec(spec)
        resp = kiln._t.open("POST", "/templates", json.dumps(body).encode(), stream=True)
        name = str(body.get("name", "?"))
        return BuildStream(kiln, LineStream(resp, f"build of template {name!r}"), name)

    @classmethod
    def list(cls, *, client: Optional["Kiln"] = None) -> List["Template"]:
        """Every template."""
        from .client import Kiln

        return (client or Kiln()).templates()

    @classmethod
    def get(cls, name: str, *, client: Optional["Kiln"] = None) -> "Template":
        """Template ``name`` (or id)."""
        from .client import Kiln

        return (client or Kiln()).template(name)

    @property
    def name(self) -> str:
        """Its name."""
        return self._info.name

    @property
    def id(self) -> str:
        """Its content hash."""
        return self._info.id

    @property
    def info(self) -> TemplateInfo:
        """Everything kilnd last reported about it."""
        return self._info

    def refresh(self) -> TemplateInfo:
        """Asks kilnd for it now (warm VMs ready, pool settings)."""
        self._info = self._kiln.template(self.name).info
        return self._info

    def set_pool(self, min_ready: int, max_sandboxes: int = 0) -> None:
        """Keeps ``min_ready`` warm sandboxes ready; at most ``max_sandboxes`` at once (0: no
        limit beyond the host's)."""
        ans = self._kiln._t.json(
            "PUT",
            f"/templates/{quote(self.name, safe='')}/pool",
            {"min_ready": int(min_ready), "max_sandboxes": int(max_sandboxes)},
        )
        self._info = TemplateInfo.from_json(ans)

    def create_sandbox(self, **kwargs: Any) -> "Sandbox":
        """A sandbox of this template (options as :meth:`kiln.Sandbox.create`)."""
        return self._kiln.create_sandbox(self.name, **kwargs)

    def remove(self) -> None:
        """Removes it and its files."""
        self._kiln.remove_template(self.name)
