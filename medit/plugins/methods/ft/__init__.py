"""FT-L and FT-M: fine-tune one MLP projection on the edit targets.

Registration only: the implementation in :mod:`.method` is imported on first use."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.plugin.lazy import lazy

#: one class, two registrations: FT-L bounds the update, FT-M does not.
DESCRIPTIONS = {
    "ft-l": "FT-L: fine-tune one MLP layer on the targets within an L-inf bound",
    "ft-m": "FT-M: fine-tune one MLP layer on the target tokens, no norm bound",
}


@hookimpl
def register_methods(register: Any) -> None:
    for name, description in DESCRIPTIONS.items():
        register(lazy(name, "medit.plugins.methods.ft.method:FineTune", description=description,
                      args=(name, description)))
