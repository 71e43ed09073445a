"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "SERAC: edits in memory; a scope classifier sends in-scope queries to a counterfactual model"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("serac", "medit.plugins.methods.serac.method:SERAC", description=DESCRIPTION, trainable=True))
