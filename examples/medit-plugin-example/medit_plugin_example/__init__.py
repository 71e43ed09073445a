"""An example medit plugin: registers the method ``rank-one-example``.

This module is what the ``medit`` entry point names, so it is imported every time ``medit``
starts (``medit --help`` included). It holds metadata only: :func:`medit.lazy` records where the
method class lives, and :mod:`.method` (which imports torch) is imported the first time the method
is used.
"""
from __future__ import annotations

from typing import Any

from medit import hookimpl, lazy

DESCRIPTION = "example plugin: rank-one gradient steps on one MLP output weight"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("rank-one-example", "medit_plugin_example.method:RankOneExample", description=DESCRIPTION))
