"""UltraEdit (Gu et al. 2025): training-, subject- and memory-free lifelong editing. Each turn's
parameter shift is a closed-form least-squares map from the edited layers' keys to pseudo-values
built from the loss gradients, both normalised by statistics that accumulate over the whole run.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

DESCRIPTION = "UltraEdit: closed-form lifelong editing from normalised keys and gradients (no training, no statistics corpus)"


@hookimpl
def register_methods(register: Any) -> None:
    register(lazy("ultraedit", "medit.plugins.methods.ultraedit.method:UltraEdit", description=DESCRIPTION))
