"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved keys'
covariance, so what the model knew is (to first order) untouched, plus a running cache of the keys
edited earlier in the same sequential run.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "AlphaEdit: MEMIT projected onto the null space of preserved knowledge, for sequential runs"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("alphaedit", "medit.plugins.methods.alphaedit.method:AlphaEdit", description=DESCRIPTION))
