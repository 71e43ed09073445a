"""Typed exceptions. The CLI turns every :class:`MeditError` into a one-line message and exit code 2."""
from __future__ import annotations

from typing import Iterable


class MeditError(Exception):
    """Base class for errors caused by user input; ``str(err)`` is a complete one-line message."""

    exit_code = 2


class InputFileError(MeditError):
    """A file is missing, unreadable or malformed."""


class ValidationError(MeditError):
    """A record or value failed validation (e.g. subject not in prompt, empty target)."""


class HParamsError(MeditError):
    """Unknown, missing or mistyped hyperparameter."""


class UnknownNameError(MeditError):
    """A method, model family, metric, dataset format, protocol or alias is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        known_list = ", ".join(sorted(known)) or "(none)"
        msg = f"unknown {kind} {name!r}; known {kind}s: {known_list}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.kind, self.name = kind, name


class ModelError(MeditError):
    """The model cannot be loaded or does not fit the requested operation."""


class DeviceError(MeditError):
    """The requested device is not available."""


class PatchError(MeditError):
    """A patch cannot be read or does not match the model it is applied to."""


class EditError(MeditError):
    """An edit cannot be reverted or saved on its own (e.g. it belongs to a sequence that shares
    original weights)."""


class MethodError(MeditError):
    """A method cannot perform the requested edit (unsupported family or mode, bad layer...)."""


class CheckpointError(MeditError):
    """A trained-editor checkpoint is missing, unreadable, or made for another model or method."""
