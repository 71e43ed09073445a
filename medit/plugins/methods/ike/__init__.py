"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "IKE: in-context editing with retrieved copy/update/retain demonstrations; weights unchanged"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("ike", "medit.plugins.methods.ike.method:IKE", description=DESCRIPTION))
