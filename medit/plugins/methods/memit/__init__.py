"""MEMIT (Meng et al. 2023): many edits at once, spread over several MLP layers.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "MEMIT: batch edits spread over several MLP layers by covariance-weighted least squares"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("memit", "medit.plugins.methods.memit.method:MEMIT", description=DESCRIPTION))
