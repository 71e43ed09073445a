"""FT-L on the real SmolLM2-135M-Instruct: 5 CounterFact dev cases (tests/data), single mode,
default hyperparameters (medit/hparams/ft-l/default.yaml). Slow: run with ``pytest -m slow``."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from medit import api
from medit.evaluation.summary import summary_table

_HERE = Path(__file__).resolve()
COUNTERFACT = _HERE.parent / "data" / "counterfact-dev-300.json"
#: the default statistics corpus: the WikiText-2 text the package ships
CORPUS = _HERE.parents[1] / "medit" / "datasets" / "wikitext-2-valid.txt"


@pytest.mark.slow
def test_ft_l_on_smollm2_counterfact(smollm2, tmp_path):
    before = {k: v.detach().clone() for k, v in smollm2.model.state_dict().items()}
    t = time.perf_counter()
    summary, kept = api.run(smollm2, "ft-l", f"counterfact:{COUNTERFACT}", n=5, mode="single",
                            out_dir=tmp_path / "run", progress=False)
    elapsed = time.perf_counter() - t
    print()
    print(summary_table(summary))
    print(f"wall time {elapsed:.1f} s")

    assert kept is None
    assert summary["n"] == 5 and summary["mode"] == "single"
    assert [c["case_id"] for c in summary["cases"]] == ["0", "1", "4", "5", "6"]
    reliability = summary["metrics"]["reliability"]
    assert reliability["exact"]["pre"] <= 0.2  # counterfactual targets: the model does not say them
    assert reliability["exact"]["post"] >= 0.8, reliability
    assert reliability["token_acc"]["post"] >= reliability["token_acc"]["pre"]
    for name in ("manifest.json", "cases.jsonl", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    # single mode reverts every edit in place: the shared model is bit-for-bit unchanged
    after = smollm2.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.slow
@pytest.mark.parametrize("method,mode", [("rome", "single"), ("memit", "batch")])
def test_locate_then_edit_on_smollm2(smollm2, tmp_path, method, mode):
    """ROME one edit at a time, MEMIT all five at once: the edits take and unrelated prompts keep
    their predictions; the model is restored exactly afterwards."""
    before = {k: v.detach().clone() for k, v in smollm2.model.state_dict().items()}
    summary, _ = api.run(smollm2, method, f"counterfact:{COUNTERFACT}", n=5, mode=mode,
                         overrides={"stats_corpus": str(CORPUS), "stats_samples": "300"},
                         protocols=("token_acc", "exact"), out_dir=tmp_path / "run", progress=False)
    print()
    print(summary_table(summary))
    m = summary["metrics"]
    assert m["reliability"]["token_acc"]["post"] >= 0.9, m["reliability"]
    assert m["locality"]["agreement"]["post"] >= 0.9, m["locality"]
    after = smollm2.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
