"""The public API a plugin author uses: ``from medit import ...`` resolves every exported name
lazily (``import medit`` imports no torch), and a method's default hparams folder is found
beside its module without being set."""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import medit
from medit.errors import HParamsError

PLUGIN_NAMES = {"Method", "Edit", "WeightEdit", "CompositeEdit", "HParams", "EditRequest", "PromptAnswer",
                "Metric", "ModelAdapter", "ModelAlias", "DatasetFormat", "ModelHandle", "lazy", "load_model",
                "MeditError", "HParamsError", "hookimpl", "__version__"}


def _fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_medit_imports_no_torch():
    out = _fresh_python("""
        import sys
        import medit
        medit.hookimpl, medit.lazy, medit.Method, medit.HParams, medit.EditRequest, medit.MeditError
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    assert out == "[]", f"`import medit` pulled in {out}"


def test_every_public_name_resolves_to_its_defining_object():
    assert PLUGIN_NAMES <= set(medit.__all__)
    assert set(medit.__all__) == set(medit._LAZY) | {"__version__", "hookimpl"}
    assert len(medit.__all__) == len(set(medit.__all__))
    for name in medit._LAZY:
        obj = getattr(medit, name)
        assert obj is getattr(importlib.import_module(medit._LAZY[name]), name), name
    assert set(medit.__all__) <= set(dir(medit))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        medit.no_such_name  # noqa: B018
    from medit import EditRequest, HParams, Method, WeightEdit  # noqa: F401  (the star of the docs)
    assert issubclass(medit.WeightEdit, medit.Edit) and issubclass(medit.HParamsError, medit.MeditError)


# ------------------------------------------------------------------ hparams_dir found by default

def _plugin_package(root: Path, name: str, folders: dict[str, dict[str, str]]) -> type:
    """A package ``<name>`` under ``root`` with a method class in ``<name>/method.py`` and the given
    hparams files (folder relative to the package -> file name -> YAML text); returns the class."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from medit import HParams, Method

        @dataclass
        class TinyHParams(HParams):
            steps: int = 1
            lr: float = 0.1

        class TinyMethod(Method):
            name = "tiny-method"
            hparams_class = TinyHParams
    """))
    for folder, files in folders.items():
        (pkg / folder).mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (pkg / folder / fname).write_text(text)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"{name}.method").TinyMethod  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(root))


def _handle(model_id: str = "tiny-llama", family: str = "llama") -> SimpleNamespace:
    return SimpleNamespace(model_id=model_id, adapter=SimpleNamespace(name=family))


def test_hparams_dir_defaults_to_the_method_folder_then_the_shared_folder(tmp_path):
    cls = _plugin_package(tmp_path, "medit_hp_probe_a", {
        "hparams/tiny-method": {"llama.yaml": "steps: 3\n", "default.yaml": "steps: 4\n"},
        "hparams": {"tiny-llama.yaml": "steps: 9\n", "default.yaml": "steps: 5\n"},
    })
    m = cls()
    base = tmp_path / "medit_hp_probe_a" / "hparams"
    assert m.hparams_dir is None
    assert m.hparams_dirs() == [base.resolve() / "tiny-method", base.resolve()]
    # the method's own folder first (alias, then family, then default), the shared folder after it
    assert m.default_hparams_file(_handle()) == base.resolve() / "tiny-method" / "llama.yaml"
    assert m.resolve_hparams(_handle()).steps == 3
    assert m.resolve_hparams(_handle(family="gpt2")).steps == 4
    assert m.resolve_hparams(_handle(family="gpt2"), overrides={"lr": "0.5"}).lr == 0.5


def test_hparams_dir_shared_folder_keeps_alias_family_default_order(tmp_path):
    cls = _plugin_package(tmp_path, "medit_hp_probe_b", {
        "hparams": {"tiny-llama.yaml": "steps: 9\n", "llama.yaml": "steps: 7\n", "default.yaml": "steps: 5\n"},
    })
    m = cls()
    assert m.resolve_hparams(_handle()).steps == 9
    assert m.resolve_hparams(_handle(model_id="other")).steps == 7
    assert m.resolve_hparams(_handle(model_id="other", family="t5")).steps == 5
    with pytest.raises(HParamsError, match="no_such_hparam"):
        m.resolve_hparams(_handle(), overrides={"no_such_hparam": 1})


def test_no_hparams_folder_means_the_dataclass_defaults(tmp_path):
    m = _plugin_package(tmp_path, "medit_hp_probe_c", {})()
    assert m.default_hparams_file(_handle()) is None
    assert dataclasses.asdict(m.resolve_hparams(_handle())) == {"steps": 1, "lr": 0.1}


def test_an_explicit_hparams_dir_is_the_only_folder(tmp_path):
    cls = _plugin_package(tmp_path, "medit_hp_probe_d", {"hparams": {"default.yaml": "steps: 5\n"},
                                                        "elsewhere": {"default.yaml": "steps: 6\n"}})
    explicit = type("Explicit", (cls,), {"hparams_dir": tmp_path / "medit_hp_probe_d" / "elsewhere"})()
    assert explicit.resolve_hparams(_handle()).steps == 6
    # the built-ins keep theirs
    from medit.plugin.manager import get_plugins
    rome = get_plugins().methods.get("rome")
    assert rome.hparams_dirs() == [Path(medit.__file__).parent / "hparams" / "rome"]
