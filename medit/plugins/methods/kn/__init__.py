"""Knowledge Neurons (Dai et al. 2022): locate the FFN neurons that express a fact by integrated
gradients, then edit their value vectors.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "Knowledge Neurons: integrated-gradients neuron attribution, then value-vector edits"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("kn", "medit.plugins.methods.kn.method:KnowledgeNeurons", description=DESCRIPTION))
