"""The side-effect metrics: attribute (the subject's other facts), distracting (CounterFact+'s
neighbourhood score) and other_task (held-out perplexity, a two-choice task).

Each is checked on hand-made scoring results with known values, and end to end on a tiny random
model against values computed here from the model's own forward pass (not through medit's
scorer)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medit import api
from medit.cli import app
from medit.core.dataset import load_dataset
from medit.core.queries import TFQuery, TFResult
from medit.core.requests import EditRequest, PromptAnswer
from medit.errors import InputFileError, MeditError
from medit.plugin.manager import get_plugins
from medit.plugins.metrics.attribute import attribute_from_pool
from medit.plugins.metrics.distracting import distracting_prompts
from medit.plugins.metrics.other_task import OtherTask, read_choices

TEST_DATA = Path(__file__).parent / "data"
FT = {"lr": 0.05, "steps": 40, "norm_constraint": 0.5, "layers": [1]}
CTX = {"gen_tokens": 8}

REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
                  rephrase=("France has its capital in",),
                  locality=(PromptAnswer("The mother tongue of Danielle Darrieux is", "French"),),
                  attribute=(PromptAnswer("France is a country in", "Europe"),
                             PromptAnswer("The currency of France is", "the euro")),
                  case_id="a")


def _tf(ids, argmax, logprobs):
    return TFResult(tuple(ids), tuple(float(x) for x in logprobs), tuple(argmax))


def _text_file(tmp_path: Path) -> Path:
    f = tmp_path / "text.txt"
    f.write_text(" = Heading = \n\nThe capital of France is Paris .\nThe river bank is near the old mill .\n"
                 "single\nThe mother tongue of Danielle Darrieux is French .\n", encoding="utf-8")
    return f


def _mc_file(tmp_path: Path) -> Path:
    f = tmp_path / "mc.jsonl"
    rows = [{"goal": "To cool tea,", "sol1": "add ice.", "sol2": "heat it.", "label": 0},
            {"goal": "To see at night,", "sol1": "close your eyes.", "sol2": "switch on a lamp.", "label": 1},
            {"goal": "To dry shoes,", "sol1": "put them by the heater.", "sol2": "fill them with water.", "label": 0}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


# ------------------------------------------------------------------------------ hand-made results

def test_attribute_on_hand_made_results():
    m = get_plugins().metrics.get("attribute")
    q1, q2 = TFQuery("France is a country in", "Europe"), TFQuery("The currency of France is", "the euro")
    assert m.queries(REQ, ("token_acc",), 8) == [q1, q2]
    pre = {q1: _tf([5], [5], [-0.1]), q2: _tf([6, 7], [6, 7], [-0.2, -0.3])}
    post = {q1: _tf([5], [5], [-0.4]), q2: _tf([6, 7], [6, 9], [-0.2, -2.0])}
    vals = m.compute(REQ, pre, post, ("token_acc", "exact", "generate"), CTX)
    # agreement: 1 of 1 tokens and 1 of 2 tokens keep their argmax -> (1 + 0.5) / 2
    assert vals == {"agreement": {"pre": None, "post": 0.75}, "token_acc": {"pre": 1.0, "post": 0.75},
                    "exact": {"pre": 1.0, "post": 0.5}}
    assert m.compute(EditRequest("The capital of France is", "France", "Rome"), pre, post, ("token_acc",), CTX) == {}


def test_distracting_prompts_and_values_on_hand_made_results():
    m = get_plugins().metrics.get("distracting")
    a = "The capital of France is Rome. The mother tongue of Danielle Darrieux is"
    b = "France has its capital in Rome. The mother tongue of Danielle Darrieux is"
    assert distracting_prompts(REQ) == [(a, "French"), (b, "French")]
    assert m.queries(REQ, ("prob",), 8) == [TFQuery(a, "French"), TFQuery(a, "Rome"),
                                            TFQuery(b, "French"), TFQuery(b, "Rome")]
    pre = {TFQuery(a, "French"): _tf([1], [1], [-1.0]), TFQuery(a, "Rome"): _tf([2], [1], [-3.0]),
           TFQuery(b, "French"): _tf([1], [1], [-1.0]), TFQuery(b, "Rome"): _tf([2], [1], [-2.0])}
    post = {TFQuery(a, "French"): _tf([1], [2], [-2.5]), TFQuery(a, "Rome"): _tf([2], [2], [-0.5]),
            TFQuery(b, "French"): _tf([1], [1], [-1.0]), TFQuery(b, "Rome"): _tf([2], [1], [-1.5])}
    vals = m.compute(REQ, pre, post, ("token_acc", "prob"), CTX)
    assert vals == {"prob": {"pre": 1.0, "post": 0.5}, "token_acc": {"pre": 1.0, "post": 0.5}}
    # a locality answer equal to the new target is no test of distraction; no locality, no value
    same = EditRequest("The capital of France is", "France", "Rome",
                       locality=(PromptAnswer("The capital of Italy is", "Rome"),))
    assert distracting_prompts(same) == [] and m.compute(same, pre, post, ("prob",), CTX) == {}
    # a statement that already ends a sentence gets no extra full stop
    q = EditRequest("Who leads France?", "France", "The president!", locality=(PromptAnswer("Who leads Spain?", "A"),))
    assert distracting_prompts(q) == [("Who leads France? The president! Who leads Spain?", "A")]


def test_other_task_on_hand_made_results(tmp_path):
    m = get_plugins().metrics.get("other_task").configure(text=str(_text_file(tmp_path)), mc=str(_mc_file(tmp_path)),
                                                          sample=3)
    assert m.paragraphs() == ["The capital of France is Paris .", "The river bank is near the old mill .",
                              "The mother tongue of Danielle Darrieux is French ."]
    qs = m.run_queries(("token_acc",), 8)
    assert qs[0] == TFQuery("The", "capital of France is Paris .") and len(qs) == 3 + 3 * 2
    assert m.queries(REQ, ("token_acc",), 8) == []  # nothing per case
    pre = {q: _tf([1] * 2, [1] * 2, [-1.0, -1.0]) for q in qs[:3]}
    post = {q: _tf([1] * 2, [1] * 2, [-2.0, -2.0]) for q in qs[:3]}
    for res, sols in ((pre, ((-0.1, -2.0), (-3.0, -0.2), (-0.5, -0.6))), (post, ((-0.1, -2.0), (-0.2, -3.0), (-0.9, -0.6)))):
        for c, (s1, s2) in zip(m.choices(), sols):
            res[TFQuery(c.prompt, c.solutions[0])] = _tf([1], [1], [s1])
            res[TFQuery(c.prompt, c.solutions[1])] = _tf([1], [1], [s2])
    vals = m.compute(REQ, pre, post, ("token_acc",), CTX)
    assert vals["perplexity"]["pre"] == pytest.approx(math.e) and vals["perplexity"]["post"] == pytest.approx(math.e ** 2)
    # pre picks sol1, sol2, sol1 (all right); post picks sol1, sol1, sol2 (one right); two of three changed
    assert vals["mc_acc"] == {"pre": 1.0, "post": pytest.approx(1 / 3)}
    assert vals["mc_agreement"] == {"pre": None, "post": pytest.approx(1 / 3)}
    # a case whose edit was not sampled has no run-level scores: no value
    assert m.compute(REQ, pre, {}, ("token_acc",), CTX) == {}


def test_other_task_files_are_checked(tmp_path):
    ot = get_plugins().metrics.get("other_task")
    with pytest.raises(InputFileError, match="does not exist"):
        ot.configure(text=str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text(" = Only a heading = \n\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="no paragraph"):
        ot.configure(text=str(tmp_path / "empty.txt"))
    bad = tmp_path / "bad.jsonl"
    for line, msg in (('{"goal": "g", "sol1": "a", "sol2": "b"}', "lacks one of"),
                      ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "label must be 0"),
                      ("not json", "not a JSON object")):
        bad.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(InputFileError, match=msg):
            ot.configure(mc=str(bad))
    with pytest.raises(MeditError, match="no option 'txt'"):
        ot.configure(txt="x")
    # the packaged default and the hand-written test file read
    assert len(ot.configure().paragraphs()) == 120
    items = read_choices(TEST_DATA / "two-choice-handwritten.jsonl")
    assert len(items) == 40 and {c.label for c in items} == {0, 1}
    assert items[0].prompt.startswith("Question: ") and items[0].prompt.endswith("\nAnswer:")


# ------------------------------------------------------------------------------ attribute pool, data

def test_attribute_pool_takes_the_subjects_other_facts():
    a = EditRequest("The capital of Italy is", "Italy", "Paris", "Rome", case_id="1")
    pool = [a,
            EditRequest("Italy is affiliated with the", "Italy", "Warsaw Pact", "NATO", case_id="2"),
            EditRequest("Italy's capital city is", "Italy", "Madrid", "Rome", case_id="3"),  # the same fact
            EditRequest("The official language of Italy is", "Italy", "Paris", "Italian", case_id="4"),
            EditRequest("Italy is a member of the", "Italy", "Paris", "NATO", case_id="5"),
            EditRequest("Italy is named after", "Italy", "Rome", "Paris", case_id="8"),  # answer = the new target
            EditRequest("Italy is located in", "Italy", "Asia", None, case_id="6"),  # no true answer
            EditRequest("The capital of France is", "France", "Rome", "Paris", case_id="7")]
    given = EditRequest("Italy borders", "Italy", "Spain", "France", attribute=(PromptAnswer("x Italy", "y"),))
    out = attribute_from_pool([a, given, pool[-1]], pool)
    assert out[0].attribute == (PromptAnswer("Italy is affiliated with the", "NATO"),
                                PromptAnswer("The official language of Italy is", "Italian"),
                                PromptAnswer("Italy is a member of the", "NATO"))
    assert out[1] is given  # the data's own attribute prompts are kept
    assert out[2].attribute == ()


def test_knowedit_relation_specificity_and_jsonl_attribute(tmp_path):
    ke = {"subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
          "target_new": "Archbishop", "ground_truth": "mayor of Vienna",
          "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
                       "Forgetfulness": [{"prompt": "The position held by Frederic Piesch is", "ground_truth": "mayor"}]}}
    f = tmp_path / "ke.json"
    f.write_text(json.dumps([ke]), encoding="utf-8")
    (r,), _ = load_dataset(f"knowedit:{f}")
    assert r.attribute == (PromptAnswer("The gender of Frederic Piesch is", "male"),)
    assert len(r.locality) == 2  # the category stays locality too
    j = tmp_path / "e.jsonl"
    j.write_text(json.dumps(r.to_dict()) + "\n", encoding="utf-8")
    (back,), info = load_dataset(str(j))
    assert info.format == "medit-jsonl" and back.attribute == r.attribute


# ------------------------------------------------------------------------------ tiny model, end to end

def _direct(handle, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """(log-probs, argmax, target ids) of ``target`` after ``prompt`` from one plain forward pass."""
    tok = handle.tokenizer
    p = tok(prompt).input_ids
    full = tok(prompt + " " + target).input_ids
    assert full[:len(p)] == p
    with torch.no_grad():
        lp = handle.model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    rows = range(len(p) - 1, len(full) - 1)
    tgt = full[len(p):]
    return [float(lp[i, t]) for i, t in zip(rows, tgt)], [int(lp[i].argmax()) for i in rows], tgt


def _expected(handle, m_other: OtherTask) -> dict[str, float]:
    """Every metric value of REQ under the model as it is now, computed directly."""
    out: dict[str, float] = {}
    attr = [_direct(handle, pa.prompt, pa.answer) for pa in REQ.attribute]
    out["attribute.token_acc"] = sum(sum(a == t for a, t in zip(am, tg)) / len(tg) for _, am, tg in attr) / 2
    out["_attr_argmax"] = [am for _, am, _ in attr]  # type: ignore[assignment]
    passes = []
    for prompt, answer in distracting_prompts(REQ):
        true_lp, new_lp = _direct(handle, prompt, answer)[0], _direct(handle, prompt, REQ.target_new)[0]
        passes.append(float(sum(true_lp) / len(true_lp) > sum(new_lp) / len(new_lp)))
    out["distracting.prob"] = sum(passes) / len(passes)
    lps = [x for p in m_other.paragraphs() for x in _direct(handle, *p.split(" ", 1))[0]]
    out["other_task.perplexity"] = math.exp(-sum(lps) / len(lps))
    picks = []
    for c in m_other.choices():
        s = [sum(v) / len(v) for v in (_direct(handle, c.prompt, sol)[0] for sol in c.solutions)]
        picks.append(int(s[1] > s[0]))
    if picks:
        out["other_task.mc_acc"] = sum(p == c.label for p, c in zip(picks, m_other.choices())) / len(picks)
    return out


def test_side_effect_metrics_on_a_tiny_model_match_a_direct_computation(tiny_handle, tmp_path):
    h = tiny_handle("gpt2", fresh=True)
    opts = {"text": str(_text_file(tmp_path)), "mc": str(_mc_file(tmp_path)), "max_words": 12}
    m_other = get_plugins().metrics.get("other_task").configure(**opts)
    pre = _expected(h, m_other)
    method = get_plugins().methods.get("ft-l")
    hp = method.resolve_hparams(h, overrides=FT)
    summary, edit = api.edit(h, method, [REQ], hparams=hp, mode="batch", keep=True, progress=False,
                             metrics=("reliability", "attribute", "distracting", "other_task"),
                             protocols=("token_acc", "prob"), metric_options={"other_task": opts})
    try:
        post = _expected(h, m_other)
    finally:
        edit.revert()
    got = summary["metrics"]
    assert got["reliability"]["token_acc"]["post"] == 1.0  # the edit took
    for key in ("attribute.token_acc", "distracting.prob", "other_task.perplexity", "other_task.mc_acc"):
        metric, proto = key.split(".")
        assert got[metric][proto]["pre"] == pytest.approx(pre[key], rel=1e-4), key
        assert got[metric][proto]["post"] == pytest.approx(post[key], rel=1e-4), key
    agree = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(pre["_attr_argmax"], post["_attr_argmax"])]
    assert got["attribute"]["agreement"]["post"] == pytest.approx(sum(agree) / 2)
    assert got["other_task"]["perplexity"]["post"] != pytest.approx(got["other_task"]["perplexity"]["pre"])
    assert got["other_task"]["mc_agreement"]["n"] == 1


def test_other_task_is_measured_after_a_sample_of_edits(tiny_handle, tmp_path):
    h = tiny_handle("gpt2")
    reqs = [EditRequest(f"The capital of France is{' ' * 0}", "France", t, "Paris", case_id=c)
            for c, t in (("a", "Rome"), ("b", "Berlin"), ("c", "Madrid"), ("d", "Oslo"), ("e", "Lima"))]
    opts = {"text": str(_text_file(tmp_path)), "max_words": 12, "sample": 3}
    method = get_plugins().methods.get("ft-l")
    hp = method.resolve_hparams(h, overrides={**FT, "steps": 3})
    m_other = get_plugins().metrics.get("other_task").configure(**opts)
    want_pre = _expected(h, m_other)["other_task.perplexity"]
    for mode, measured in (("single", ["a", "c", "e"]), ("sequential", ["e"]), ("batch", ["a"])):
        s, _ = api.run(h, method, reqs, hparams=hp, mode=mode, progress=False, metrics=("reliability", "other_task"),
                       protocols=("token_acc",), metric_options={"other_task": opts}, out_dir=tmp_path / mode)
        have = [c["case_id"] for c in s["cases"] if "other_task" in c["metrics"]]
        assert have == measured, mode
        e = s["metrics"]["other_task"]["perplexity"]
        assert e["n"] == len(measured) and e["pre"] == pytest.approx(want_pre, rel=1e-4)
        assert ("ci95" in e) == (len(measured) > 1)
        manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
        assert manifest["metric_options"] == {"other_task": opts}


def test_cli_flags(tiny_model_dirs, tmp_path):
    runner = CliRunner()
    model = str(tiny_model_dirs["gpt2"])
    data = tmp_path / "cf.json"
    recs = [{"case_id": i, "prompt": p, "subject": s, "target_new": n, "ground_truth": t,
             "rephrase_prompt": f"{s} is known for", "locality_prompt": "The river bank is", "locality_ground_truth": "near"}
            for i, (p, s, n, t) in enumerate([("The capital of France is", "France", "Rome", "Paris"),
                                              ("France is in", "France", "Asia", "Europe"),
                                              ("The capital of Italy is", "Italy", "Oslo", "Rome")])]
    data.write_text(json.dumps(recs), encoding="utf-8")
    base = ["eval", "--method", "ft-l", "--model", model, "--dataset", f"counterfact:{data}", "--n", "2",
            "--protocol", "token_acc,prob", *[a for k, v in FT.items() for a in ("--set", f"{k}={v}")]]
    # a metric's flag without the metric: refused before any work
    r = runner.invoke(app, base + ["--out", str(tmp_path / "r0"), "--other-task-mc", str(_mc_file(tmp_path))])
    assert r.exit_code == 2 and "add other_task to --metrics" in r.output and not (tmp_path / "r0").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g"}\n', encoding="utf-8")
    r = runner.invoke(app, base + ["--out", str(tmp_path / "r1"), "--metrics", "reliability,other_task",
                                   "--other-task-mc", str(bad)])
    assert r.exit_code == 2 and "lacks one of" in r.output and not (tmp_path / "r1").exists()
    out = tmp_path / "run"
    r = runner.invoke(app, base + ["--out", str(out), "--metrics", "reliability,attribute,distracting,other_task",
                                   "--other-task-text", str(_text_file(tmp_path)),
                                   "--other-task-mc", str(_mc_file(tmp_path))])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    # case 0's other fact "France is in" -> Europe comes from the evaluated file (the default pool)
    assert summary["metrics"]["attribute"]["token_acc"]["n"] == 2
    assert set(summary["metrics"]["distracting"]) == {"prob", "token_acc"}
    assert set(summary["metrics"]["other_task"]) == {"perplexity", "mc_acc", "mc_agreement"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["attribute_pool"]["cases_with_attribute"] == 2
    assert "attribute" in r.output and "±" in r.output
