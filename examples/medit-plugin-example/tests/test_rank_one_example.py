"""The example plugin's own tests: medit's conformance kit on every model family, and a
registration module that imports no torch (so `medit --help` stays fast with the plugin installed).

Run them with ``pytest examples/medit-plugin-example/tests`` (medit's own suite runs them too).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from medit.testing import FAMILIES, check_method, tiny_model
from medit_plugin_example.method import RankOneExample


@pytest.mark.parametrize("family", FAMILIES)
def test_conforms_to_the_method_contract(family):
    # edit takes, bit-exact revert, no hooks left, patch round trip, unknown hparam refused
    report = check_method(RankOneExample(), family=family)
    assert not report.skipped, report  # every check ran: nothing refused, the edit saves as a patch
    print(report)


def test_defaults_come_from_the_packaged_hparams_folder():
    method = RankOneExample()
    path = method.default_hparams_file(tiny_model("llama"))
    assert path is not None and path.parent.name == "hparams" and path.name == "default.yaml"


def test_registration_imports_no_torch():
    code = ("import sys, medit_plugin_example as p; p.register_methods(register=lambda obj: None); "
            "print(sorted(m for m in ('torch', 'transformers', 'medit_plugin_example.method') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
