"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "MEND: a trained editor network turns the fine-tuning gradient into a low-rank edit"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("mend", "medit.plugins.methods.mend.method:MEND", description=DESCRIPTION, trainable=True))
