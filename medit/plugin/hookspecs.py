"""Hook specifications. A plugin implements any of these with ``@medit.hookimpl``.

Every hook receives a ``register`` callback; the core validates each registered object
(lowercase unique name) and records the distribution that supplied it.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("medit")
hookimpl = pluggy.HookimplMarker("medit")

Register = Callable[[Any], None]


@hookspec
def register_methods(register: Register) -> None:
    """Register editing methods: ``register(MyMethod())`` with a :class:`medit.core.method.Method`."""


@hookspec
def register_models(register: Register) -> None:
    """Register model families: ``register(MyAdapter)`` with a :class:`medit.core.adapter.ModelAdapter` subclass."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics: ``register(MyMetric())`` with a :class:`medit.core.metric.Metric`."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset formats: ``register(MyFormat())`` with a :class:`medit.core.dataset.DatasetFormat`."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``medit`` typer app (``cli`` is a :class:`typer.Typer`)."""
