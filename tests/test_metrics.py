"""Protocol definitions on hand-made scoring results (no model involved)."""
from __future__ import annotations

from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest, PromptAnswer
from medit.core.queries import GenQuery, TFQuery, TFResult, generation_matches

REQ = EditRequest(prompt="The mother tongue of X is", subject="X", target_new="English", target_true="French",
                  rephrase=("X speaks",), locality=(PromptAnswer("Paris is in", "France"),), case_id="c")
CTX = {"gen_tokens": 8}


def _tf(target_ids, argmax, logprobs):
    return TFResult(tuple(target_ids), tuple(logprobs), tuple(argmax))


def test_token_acc_exact_and_prob():
    r = _tf([1, 2, 3, 4], [1, 2, 9, 4], [-0.1, -0.2, -3.0, -0.1])
    assert r.token_acc == 0.75 and r.exact == 0.0
    assert _tf([1, 2], [1, 2], [-1, -1]).exact == 1.0
    rel = get_plugins().metrics.get("reliability")
    post = {TFQuery(REQ.prompt, "English"): _tf([5], [5], [-0.5]),
            TFQuery(REQ.prompt, "French"): _tf([6], [5], [-2.0]),
            GenQuery(REQ.prompt, 8): " English, mostly"}
    pre = {TFQuery(REQ.prompt, "English"): _tf([5], [6], [-3.0]),
           TFQuery(REQ.prompt, "French"): _tf([6], [6], [-0.1]),
           GenQuery(REQ.prompt, 8): " French."}
    vals = rel.compute(REQ, pre, post, ("generate", "token_acc", "exact", "prob"), CTX)
    assert vals == {"generate": {"pre": 0.0, "post": 1.0}, "token_acc": {"pre": 0.0, "post": 1.0},
                    "exact": {"pre": 0.0, "post": 1.0}, "prob": {"pre": 0.0, "post": 1.0}}


def test_generation_match_is_a_normalised_prefix():
    assert generation_matches(" english. She", "English") == 1.0
    assert generation_matches("Englishman", "English") == 0.0
    assert generation_matches(" French", "English") == 0.0


def test_locality_agreement_and_ground_truth():
    loc = get_plugins().metrics.get("locality")
    q, g = TFQuery("Paris is in", "France"), GenQuery("Paris is in", 8)
    pre = {q: _tf([7, 8], [7, 3], [-0.1, -2]), g: " France."}
    post = {q: _tf([7, 8], [7, 4], [-0.2, -2]), g: " Spain."}
    vals = loc.compute(REQ, pre, post, ("generate", "token_acc"), CTX)
    assert vals["agreement"] == {"pre": None, "post": 0.5}
    assert vals["generate_agreement"] == {"pre": None, "post": 0.0}
    assert vals["token_acc"] == {"pre": 0.5, "post": 0.5}
    assert vals["generate"] == {"pre": 1.0, "post": 0.0}
