"""GRACE (Hartvigsen et al. 2023): a discrete key-value codebook at one layer's output.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "GRACE: codebook of (key, value, radius) replacing one block's output; weights unchanged"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("grace", "medit.plugins.methods.grace.method:GRACE", description=DESCRIPTION))
