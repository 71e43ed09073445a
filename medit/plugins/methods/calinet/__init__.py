"""CaliNET (Dong et al. 2022, "Calibrating Factual Knowledge in Pretrained Language Models").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "CaliNET: FFN-parallel calibration memory slots trained on the edits, base frozen"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("calinet", "medit.plugins.methods.calinet.method:CaliNET", description=DESCRIPTION))
