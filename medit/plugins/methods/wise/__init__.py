"""WISE (Wang et al. 2024): a side memory for one FFN's output projection, with a router.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "WISE: side memory of one MLP output projection with an activation router, shards and TIES merging"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("wise", "medit.plugins.methods.wise.method:WISE", description=DESCRIPTION))
