"""The method contract: a typed hparams dataclass plus ``apply(handle, requests, hparams) -> Edit``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Sequence, TypeVar, cast

from medit.errors import MethodError, UnknownNameError
from medit.core.hparams import HParams, read_yaml

if TYPE_CHECKING:
    from medit.core.edit import Edit
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

MODES = ("single", "batch", "sequential")

#: the hparams dataclass of a method: ``class ROME(Method[ROMEHParams])``.
H = TypeVar("H", bound=HParams)


class Method(Generic[H]):
    """Base class for editing methods, generic in their hparams dataclass: a subclass declares
    ``class MyMethod(Method[MyHParams])``, sets the class attributes (``hparams_class = MyHParams``)
    and implements :meth:`apply`, which receives a ``MyHParams``.

    ``hparams_dir`` holds ``<family-or-model>.yaml`` files with default values; lookup order is
    the model alias (e.g. ``smollm2-135m.yaml``), then the family (``llama.yaml``), then ``default.yaml``.
    Left unset, it is found by default: ``hparams/<name>/``, then ``hparams/``, beside the module
    that defines the method class (see :meth:`hparams_dirs`).

    A method instance serves every model, so what it keeps about one model (statistics,
    projections, installed hooks, caches of a run) lives in that model's typed run state:
    ``handle.state(MyState)``, the one instance of the dataclass ``MyState`` for that handle (see
    :mod:`medit.core.state`); :meth:`start_run` drops what must not outlive a run.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the dataclass of :meth:`apply`'s ``hparams`` (the base class, which takes none, has HParams).
    hparams_class: type[H] = cast("type[H]", HParams)
    modes: ClassVar[tuple[str, ...]] = ("single", "sequential")
    #: families this method refuses (e.g. ROME on T5), by adapter registry name.
    unsupported_families: ClassVar[tuple[str, ...]] = ()
    hparams_dir: ClassVar[Path | None] = None
    #: False for methods whose edits hook modules. Their runs score with whole-sequence passes
    #: before and after the edit alike (the cached engine cannot run a hooked model), so scores
    #: of prompts an edit leaves alone compare bit for bit.
    cached_scoring: ClassVar[bool] = True

    def apply(self, handle: "ModelHandle", requests: Sequence["EditRequest"], hparams: H) -> "Edit":
        """Edit ``handle``'s model for ``requests`` and return the Edit, which reverts exactly."""
        raise NotImplementedError

    def start_run(self, handle: "ModelHandle") -> None:
        """Called by the evaluation engine before the first edit of a run: drop the run state
        that must be scoped to one run with ``handle.reset_state(MyState)`` (AlphaEdit drops its
        keys of earlier edits, ``PreservedKeys``)."""

    # ---------------------------------------------------------------- hparams resolution
    def hparams_dirs(self) -> list[Path]:
        """Folders searched for default hparams files: ``hparams_dir`` when the class sets it;
        otherwise ``hparams/<name>/``, then ``hparams/``, beside the module defining the class (so a
        plugin package finds ``my_plugin/hparams/default.yaml`` without setting anything)."""
        if self.hparams_dir is not None:
            return [Path(self.hparams_dir)]
        file = getattr(sys.modules.get(type(self).__module__), "__file__", None)
        if not file:
            return []
        base = Path(file).resolve().parent / "hparams"
        return [base / self.name, base] if self.name else [base]

    def default_hparams_file(self, handle: "ModelHandle") -> Path | None:
        """The first of ``<model alias>.yaml``, ``<family>.yaml``, ``default.yaml`` in the first of
        :meth:`hparams_dirs` holding any of them; None when there is none (the dataclass defaults)."""
        for folder in self.hparams_dirs():
            for stem in (handle.model_id, handle.adapter.name, "default"):
                p = folder / f"{stem}.yaml"
                if p.is_file():
                    return p
        return None

    def resolve_hparams(self, handle: "ModelHandle", hparams_file: str | Path | None = None,
                        overrides: dict[str, Any] | None = None) -> H:
        """Defaults for this model (or ``hparams_file``), then ``overrides`` (from ``--set``)."""
        values: dict[str, Any] = {}
        source = "defaults"
        path = Path(hparams_file) if hparams_file else self.default_hparams_file(handle)
        if path is not None:
            values.update(read_yaml(path))
            source = str(path)
        values.update(overrides or {})
        return self.hparams_class.from_dict(values, source if not overrides else f"{source} and --set")

    def precheck_hparams(self, hparams_file: str | Path | None = None,
                         overrides: dict[str, Any] | None = None) -> None:
        """Check what can be checked before a model is loaded: a given ``hparams_file`` is read and
        built in full with ``overrides``; without one (the defaults depend on the model) each
        override's name and type is checked."""
        if hparams_file:
            values = {**read_yaml(hparams_file), **(overrides or {})}
            self.hparams_class.from_dict(values, f"{hparams_file}" + (" and --set" if overrides else ""))
        elif overrides:
            self.hparams_class.convert_values(overrides, "--set")

    def check_supported(self, handle: "ModelHandle", mode: str) -> None:
        if handle.adapter.name in self.unsupported_families:
            raise MethodError(f"method {self.name!r} does not support the {handle.adapter.name} family "
                              f"({handle.model_id}); choose another method (see `medit list methods`)")
        self.check_mode(mode)

    def check_mode(self, mode: str) -> None:
        """Refuse a mode this method cannot run in, naming the modes it can (no model needed)."""
        if mode not in MODES:
            raise UnknownNameError("mode", mode, MODES)
        if mode not in self.modes:
            raise MethodError(f"method {self.name!r} cannot run in {mode!r} mode; use --mode "
                              f"{' or --mode '.join(self.modes)}")
