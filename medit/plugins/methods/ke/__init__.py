"""KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in Language Models").

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "KnowledgeEditor: a hyper-network predicts a constrained, gradient-shaped update per edit"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("ke", "medit.plugins.methods.ke.method:KE", description=DESCRIPTION, trainable=True))
