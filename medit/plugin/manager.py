"""Plugin manager: discovers the ``medit`` entry-point group and fills the registries.

Built-in plugins are declared in medit's own setup.cfg under the same group a third-party
package uses, so there is exactly one discovery path.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

import pluggy

from medit.plugin import hookspecs
from medit.plugin.lazy import Lazy
from medit.errors import UnknownNameError

ENTRY_POINT_GROUP = "medit"
BUILTIN_DIST = "medit"
KINDS = ("methods", "models", "metrics", "datasets")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered object and where it came from. An object registered with
    :func:`medit.plugin.lazy.lazy` is imported on the first access to :attr:`obj`."""

    name: str
    registered: Any
    plugin: str
    dist: str
    version: str

    @property
    def obj(self) -> T:
        if isinstance(self.registered, Lazy):
            return self.registered.resolve()  # type: ignore[no-any-return]
        return self.registered  # type: ignore[no-any-return]

    @property
    def description(self) -> str:
        if isinstance(self.registered, Lazy):
            return self.registered.description
        return getattr(self.registered, "description", "") or ""

    def attr(self, key: str, default: Any = None) -> Any:
        """An attribute of the object, answered from a lazy registration's metadata when it has
        it (so listing does not import the implementation)."""
        if isinstance(self.registered, Lazy) and key in self.registered.metadata:
            return self.registered.metadata[key]
        return getattr(self.obj, key, default)


class Registry(Generic[T]):
    """Name -> object for one kind (methods, models, metrics or datasets)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, entry: Entry[T]) -> None:
        self._entries[entry.name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        return self._entries[name]

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; raise :class:`UnknownNameError` otherwise."""
        try:
            return self._entries[name].obj
        except KeyError:
            singular = {"methods": "method", "models": "model family", "metrics": "metric",
                        "datasets": "dataset format"}[self.kind]
            raise UnknownNameError(singular, name, self._entries,
                                   hint="run `medit plugins` to see what is loaded") from None


@dataclass
class PluginInfo:
    name: str
    dist: str
    version: str
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """Everything discovered: the registries, per-plugin info and the problems met on the way."""

    pm: pluggy.PluginManager
    registries: dict[str, Registry[Any]]
    info: list[PluginInfo]
    problems: list[str]

    @property
    def methods(self) -> Registry[Any]:
        return self.registries["methods"]

    @property
    def models(self) -> Registry[Any]:
        return self.registries["models"]

    @property
    def metrics(self) -> Registry[Any]:
        return self.registries["metrics"]

    @property
    def datasets(self) -> Registry[Any]:
        return self.registries["datasets"]


_cached: Plugins | None = None
_extra: list[tuple[Any, str]] = []


def _allowed_third_party() -> set[str] | None:
    raw = os.environ.get("MEDIT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a problem is always reported on one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _dist_of(ep: md.EntryPoint, seen: dict[int, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(distribution name, version) of an entry point. Each ``metadata`` access parses the whole
    METADATA file (medit's holds its README), so ``seen`` keeps one answer per distribution:
    this runs at every start of ``medit``, ``--help`` included."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    if seen is not None and id(dist) in seen:
        return seen[id(dist)]
    meta = dist.metadata
    found = (meta["Name"] or "unknown", meta["Version"] or "")
    if seen is not None:
        seen[id(dist)] = found
    return found


def _load_entry_points(pm: pluggy.PluginManager, problems: list[str]) -> dict[str, tuple[str, str]]:
    allowed = _allowed_third_party()
    origins: dict[str, tuple[str, str]] = {}
    eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
    seen: dict[int, tuple[str, str]] = {}
    # Built-ins first, so a third-party entry point reusing a built-in's name is the one skipped.
    for ep in sorted(eps, key=lambda e: (_dist_of(e, seen)[0] != BUILTIN_DIST, e.name)):
        dist, version = _dist_of(ep, seen)
        builtin = dist == BUILTIN_DIST
        if not builtin and allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.has_plugin(ep.name):
            problems.append(f"plugin {ep.name!r} from {dist} skipped: a plugin of that name is already loaded")
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must never take medit down
            problems.append(f"plugin {ep.name!r} from {dist} failed to load and was skipped: "
                            f"{_one_line(exc)}")
            continue
        origins[ep.name] = (dist, version)
    return origins


def _collect(pm: pluggy.PluginManager, origins: dict[str, tuple[str, str]],
             problems: list[str]) -> tuple[dict[str, Registry[Any]], list[PluginInfo]]:
    registries: dict[str, Registry[Any]] = {k: Registry(k) for k in KINDS}
    infos: dict[str, PluginInfo] = {}
    for plugin_name, plugin in pm.list_name_plugin():
        dist, version = origins.get(plugin_name, ("(runtime)", ""))
        infos[plugin_name] = PluginInfo(plugin_name, dist, version)
    # Builtins first, so a third-party name clash is attributed to (and skipped for) the newcomer.
    order = sorted(infos.values(), key=lambda i: (i.dist != BUILTIN_DIST, i.name))
    for kind in KINDS:
        caller = getattr(pm.hook, f"register_{kind}")
        impls = {impl.plugin_name: impl for impl in caller.get_hookimpls()}
        for info in order:
            impl = impls.get(info.name)
            if impl is None:
                continue
            registry = registries[kind]

            def register(obj: Any, _info: PluginInfo = info, _reg: Registry[Any] = registry) -> None:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not _NAME_RE.match(name):
                    problems.append(f"plugin {_info.name!r} registered {kind[:-1]} with invalid name "
                                    f"{name!r} (names are lowercase: a-z, 0-9, '-', '_', '.'); skipped")
                    return
                if name in _reg:
                    other = _reg.entry(name)
                    problems.append(f"plugin {_info.name!r} ({_info.dist}) registers {kind[:-1]} {name!r} "
                                    f"already registered by {other.plugin!r} ({other.dist}); skipped")
                    return
                _reg.add(Entry(name, obj, _info.name, _info.dist, _info.version))
                _info.registered.setdefault(kind, []).append(name)

            try:
                impl.function(register=register)
            except Exception as exc:
                problems.append(f"plugin {info.name!r} failed in register_{kind} and was skipped: "
                                f"{_one_line(exc)}")
    return registries, list(infos.values())


def get_plugins(reload: bool = False) -> Plugins:
    """Discover (once per process) and return all plugins and registries."""
    global _cached
    if _cached is not None and not reload:
        return _cached
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    problems: list[str] = []
    origins = _load_entry_points(pm, problems)
    for obj, name in _extra:
        if not pm.has_plugin(name):
            pm.register(obj, name=name)
    registries, info = _collect(pm, origins, problems)
    _cached = Plugins(pm, registries, info, problems)
    for p in problems:
        print(f"medit: warning: {p}", file=sys.stderr)
    return _cached


def register_plugin(obj: Any, name: str) -> None:
    """Register an in-process plugin object (a module or class with hookimpls); mainly for tests."""
    _extra.append((obj, name))
    get_plugins(reload=True)


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    _extra[:] = [(o, n) for o, n in _extra if n != name]
    get_plugins(reload=True)
