"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "ROME: rank-one MLP update at one layer, covariance-weighted, consistent keys (r-ROME)"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("rome", "medit.plugins.methods.rome.method:ROME", description=DESCRIPTION))
