"""Lazy registration: a plugin registers a name, a description and where the object lives; the
object's module is imported the first time something needs the object itself.

This keeps ``medit --help``, ``medit list`` and ``medit plugins`` from importing torch: a
registration module holds metadata only, and the heavy implementation module loads on use::

    @medit.hookimpl
    def register_methods(register):
        register(medit.lazy("my-method", "my_package.method:MyMethod", description="..."))

``target`` is ``"module:attribute"``; a class is instantiated with ``args`` (none by default).
Any keyword besides ``description`` is metadata answered without importing (e.g. ``trainable``).
"""
from __future__ import annotations

import importlib
from typing import Any

from medit.errors import MeditError


class Lazy:
    """A registered object not imported yet. The plugin manager resolves it on first use."""

    def __init__(self, name: str, target: str, description: str = "", args: tuple[Any, ...] = (),
                 **metadata: Any) -> None:
        if ":" not in target:
            raise ValueError(f"lazy target {target!r} must be 'module:attribute'")
        self.name = name
        self.target = target
        self.description = description
        self.args = tuple(args)
        self.metadata = metadata
        self._obj: Any = None

    def resolve(self) -> Any:
        """Import the target and return the object (instantiating a class); once."""
        if self._obj is None:
            module, _, attr = self.target.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise MeditError(f"plugin object {self.name!r} cannot be loaded from {self.target!r} "
                                 f"({type(exc).__name__}: {exc}); reinstall the package that provides it") from None
            if isinstance(obj, type):
                obj = obj(*self.args)
            if getattr(obj, "name", self.name) != self.name:
                raise MeditError(f"plugin object {self.target!r} is named {getattr(obj, 'name', None)!r}, but "
                                 f"was registered as {self.name!r}; the plugin must use one name")
            self._obj = obj
        return self._obj

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def __repr__(self) -> str:
        return f"<lazy {self.name!r} from {self.target!r}>"


def lazy(name: str, target: str, description: str = "", args: tuple[Any, ...] = (), **metadata: Any) -> Lazy:
    """Register ``target`` (``"module:attribute"``) under ``name`` without importing it yet."""
    return Lazy(name, target, description, args, **metadata)
