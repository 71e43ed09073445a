"""medit: edit the facts a language model holds, measure the edit, save and undo it."""
from __future__ import annotations

__version__ = "0.1.0"

from medit.plugin.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
