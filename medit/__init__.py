"""medit: edit the facts a language model holds, measure the edit, save and undo it.

The public API is what this module exports (``__all__``). Everything a plugin needs comes from
here, so a plugin never imports ``medit.core`` or ``medit.model`` itself::

    from medit import EditRequest, HParams, Method, ModelHandle, WeightEdit, hookimpl, lazy

Names are resolved on first use: ``import medit`` costs the version and :data:`hookimpl` alone, and
neither it nor ``medit.lazy`` imports torch (a plugin's registration module stays cheap). The
conformance kit for methods is :mod:`medit.testing`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medit.plugin.hookspecs import hookimpl  # noqa: E402

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    # contracts a plugin implements or returns
    "Method": "medit.core.method",
    "HParams": "medit.core.hparams",
    "Edit": "medit.core.edit",
    "WeightEdit": "medit.core.edit",
    "CompositeEdit": "medit.core.edit",
    "EditRequest": "medit.core.requests",
    "PromptAnswer": "medit.core.requests",
    "Metric": "medit.core.metric",
    "ModelAdapter": "medit.core.adapter",
    "ModelAlias": "medit.core.adapter",
    "DatasetFormat": "medit.core.dataset",
    "ModelHandle": "medit.model.handle",
    # registration and use
    "lazy": "medit.plugin.lazy",
    "load_model": "medit.model.loading",
    "load_patch": "medit.core.edit",
    # errors (each a MeditError: the CLI prints it as one line)
    "MeditError": "medit.errors",
    "InputFileError": "medit.errors",
    "ValidationError": "medit.errors",
    "HParamsError": "medit.errors",
    "UnknownNameError": "medit.errors",
    "ModelError": "medit.errors",
    "DeviceError": "medit.errors",
    "PatchError": "medit.errors",
    "EditError": "medit.errors",
    "MethodError": "medit.errors",
    "CheckpointError": "medit.errors",
}

__all__ = [
    "__version__", "hookimpl", "lazy",
    "Method", "HParams", "Edit", "WeightEdit", "CompositeEdit", "EditRequest", "PromptAnswer",
    "Metric", "ModelAdapter", "ModelAlias", "DatasetFormat", "ModelHandle", "load_model", "load_patch",
    "MeditError", "InputFileError", "ValidationError", "HParamsError", "UnknownNameError", "ModelError",
    "DeviceError", "PatchError", "EditError", "MethodError", "CheckpointError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


if TYPE_CHECKING:  # type checkers and IDEs see the real objects (``X as X``: a re-export)
    from medit.core.adapter import ModelAdapter as ModelAdapter, ModelAlias as ModelAlias
    from medit.core.dataset import DatasetFormat as DatasetFormat
    from medit.core.edit import (CompositeEdit as CompositeEdit, Edit as Edit, WeightEdit as WeightEdit,
                                 load_patch as load_patch)
    from medit.core.hparams import HParams as HParams
    from medit.core.method import Method as Method
    from medit.core.metric import Metric as Metric
    from medit.core.requests import EditRequest as EditRequest, PromptAnswer as PromptAnswer
    from medit.errors import (CheckpointError as CheckpointError, DeviceError as DeviceError,
                              EditError as EditError, HParamsError as HParamsError,
                              InputFileError as InputFileError, MeditError as MeditError,
                              MethodError as MethodError, ModelError as ModelError, PatchError as PatchError,
                              UnknownNameError as UnknownNameError, ValidationError as ValidationError)
    from medit.model.handle import ModelHandle as ModelHandle
    from medit.model.loading import load_model as load_model
    from medit.plugin.lazy import lazy as lazy
