"""T-Patcher (Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "T-Patcher: a trainable neuron per edit in the last FFN, silent on other inputs"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("t-patcher", "medit.plugins.methods.tpatcher.method:TPatcher", description=DESCRIPTION))
