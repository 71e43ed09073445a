"""Typed run state: what methods and toolkit helpers keep about one loaded model.

Data derived from a model (statistics, context templates, projections, solvers, trained editors)
and live objects attached to it (the hooks of edits that keep the weights) belong to that model,
not to the process: a state class is a dataclass whose fields all have defaults, and
``handle.state(MyState)`` returns the one instance of ``MyState`` for that model handle, created
on first use. Two handles never share one; the class is the key, so there are no string keys to
collide and type checkers see the fields::

    @dataclass
    class PreservedKeys:
        by_layer: dict[int, torch.Tensor] = field(default_factory=dict)

    cache = handle.state(PreservedKeys).by_layer

State lives as long as its handle. What must not outlive one evaluation run (AlphaEdit's keys of
earlier edits) is dropped in :meth:`~medit.core.method.Method.start_run`, which the evaluation
engine calls before a run's first edit, with ``handle.reset_state(PreservedKeys)``.

A cache of values computed from another object (a solver built from a statistics matrix) holds an
:class:`IdentityCache`, which recomputes when given a different object.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, TypeVar, cast

S = TypeVar("S")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RunState:
    """One instance per state class (see the module docstring); a model handle owns one."""

    def __init__(self) -> None:
        self._items: dict[type[Any], Any] = {}

    def get(self, cls: type[S]) -> S:
        """The instance of ``cls``, created with ``cls()`` on first use."""
        item = self._items.get(cls)
        if item is None:
            item = self._items[cls] = cls()
        return cast(S, item)

    def reset(self, cls: type[Any]) -> None:
        """Drop the instance of ``cls``; the next :meth:`get` creates a fresh one."""
        self._items.pop(cls, None)

    def __contains__(self, cls: type[Any]) -> bool:
        return cls in self._items


class IdentityCache(Generic[K, V]):
    """Values derived from a source object, by key, each computed once per source object.

    An entry keeps its source beside the value and serves only that very object (checked with
    ``is``), so a new object that reuses a freed one's ``id`` never gets a stale value, and a new
    source (new statistics) recomputes.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[K, int], tuple[object, V]] = {}

    def get(self, source: object, key: K, build: Callable[[], V]) -> V:
        """``build()`` for ``source`` and ``key``, computed on the first call and kept."""
        full = (key, id(source))
        hit = self._entries.get(full)
        if hit is None or hit[0] is not source:
            hit = self._entries[full] = (source, build())
        return hit[1]

    def __len__(self) -> int:
        return len(self._entries)
