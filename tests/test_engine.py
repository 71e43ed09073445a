"""The evaluation engine on tiny random models: batched scoring equals one-by-one scoring, target
tokenization, neighbourhood KL, the pre-edit score cache, ``--also-immediate``, progress, resume
after a killed run, and the engine's bad inputs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from medit.cli import app
from medit.scoring import cache as scorecache
from medit.errors import MeditError
from medit.evaluation.engine import EvalConfig, evaluate
from medit.evaluation.summary import summary_table
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest, PromptAnswer
from medit.core.queries import DistQuery, GenQuery, NextToken, TFQuery, kl_divergence
from medit.scoring.engine import Scorer

# Strong enough for the tiny random GPT-2 to take an edit (about 0.1 s per edit).
FT = {"lr": "0.05", "steps": "40", "norm_constraint": "0.5", "layers": "[1]"}
FT_CLI = [arg for k, v in FT.items() for arg in ("--set", f"{k}={v}")]

REQS = [
    EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
                rephrase=("France has its capital in",),
                locality=(PromptAnswer("The river bank", "is near"), PromptAnswer("The quick brown fox", "")),
                case_id="a"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                target_new="English", target_true="French",
                locality=(PromptAnswer("The lazy dog jumps over the", "river"),), case_id="b"),
    EditRequest(prompt="Paris is the capital of", subject="Paris", target_new="Italy", target_true="France",
                rephrase=("The city of Paris is the capital of",), case_id="c"),
]


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MEDIT_CACHE so cache hits and misses are this test's own."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _all_queries(reqs: list[EditRequest], protocols=("generate", "token_acc", "exact", "prob")) -> list[Any]:
    metrics = [get_plugins().metrics.get(m) for m in ("reliability", "generalization", "locality", "portability")]
    return list(dict.fromkeys(q for r in reqs for m in metrics for q in m.queries(r, protocols, 6)))


# ------------------------------------------------------------------------------ batched scoring

@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_batched_scoring_equals_one_by_one(tiny_handle, family):
    """Every query scored in shared padded batches gives what it gives alone (TF log-probs to 1e-5,
    the same argmax, generations and next-token distributions), whatever the tokenizer's own
    padding side, and whether or not another hook sits on the LM head."""
    h = tiny_handle(family)
    queries = _all_queries(REQS) + [TFQuery("The", "capital of France is Paris and the river bank is near"),
                                    DistQuery("The mother tongue of"), GenQuery("The", 3)]
    assert {type(q) for q in queries} == {TFQuery, DistQuery, GenQuery}
    batched = Scorer(h, batch_size=4).run(queries)
    alone = {q: Scorer(h, batch_size=1).run([q])[q] for q in queries}
    side = h.tokenizer.padding_side
    hook = h.module("lm_head").register_forward_hook(lambda mod, args, out: None)
    try:
        h.tokenizer.padding_side = "left" if side == "right" else "right"
        other = Scorer(h, batch_size=8).run(queries)  # other padding side, head hooked: full logits
    finally:
        h.tokenizer.padding_side = side
        hook.remove()
    for q in queries:
        for got in (batched[q], other[q]):
            want = alone[q]
            if isinstance(q, TFQuery):
                assert got.target_ids == want.target_ids and got.argmax == want.argmax, q
                assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-5, q
            elif isinstance(q, DistQuery):
                torch.testing.assert_close(got.logprobs.float(), want.logprobs.float(), atol=1e-5, rtol=1e-3)
                assert kl_divergence(want, got) < 1e-5
            else:
                assert got == want, q


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_next_token_distribution_is_the_models(tiny_handle, family):
    """A distribution query (read from a teacher-forced row when the context matches) equals the
    model's own next-token log-softmax after the prompt (T5: at the first decoder step)."""
    h = tiny_handle(family)
    prompt = "The river bank"
    res = Scorer(h).run([TFQuery(prompt, "is near"), DistQuery(prompt), DistQuery("The capital of France is")])
    for p in (prompt, "The capital of France is"):
        ids = torch.tensor([Scorer(h).encode_prompt(p)])
        with torch.no_grad():
            if h.is_encoder_decoder:
                dec = torch.tensor([[h.config.decoder_start_token_id]])
                logits = h.model(input_ids=ids, decoder_input_ids=dec).logits[0, -1]
            else:
                logits = h.model(input_ids=ids).logits[0, -1]
        want = logits.float().log_softmax(-1)
        torch.testing.assert_close(res[DistQuery(p)].logprobs.float(), want, atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------ tokenization

TARGETS = ["Paris", " Paris", "is near the river", "Danielle Darrieux"]


def _check_pairs(scorer: Scorer, tok: Any, bos: int | None) -> None:
    for prompt in ("The capital of France is", "The capital of France is "):
        for target in TARGETS:
            ctx, tgt = scorer.encode_pair(prompt, target)
            joined = prompt + (target if target.startswith(" ") or prompt.endswith(" ") else " " + target)
            full = tok(joined).input_ids
            assert ctx + tgt == full, (prompt, target)
            assert tgt and (bos is None or (ctx[0] == bos and bos not in ctx[1:] + tgt)), (prompt, target)
            if not prompt.endswith(" "):  # no merge across the boundary: the context is the prompt alone
                assert ctx == tok(prompt).input_ids, (prompt, target)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_target_after_prompt_tokenizes_like_the_whole_text(tiny_handle, family):
    h = tiny_handle(family)
    bos = h.tokenizer.bos_token_id if family == "llama" else None
    _check_pairs(Scorer(h), h.tokenizer, bos)


def test_t5_target_is_the_decoder_text_without_eos(tiny_handle):
    h = tiny_handle("t5")
    ctx, tgt = Scorer(h).encode_pair("The capital of France is", " Paris")
    assert ctx == h.tokenizer("The capital of France is").input_ids
    assert tgt == h.tokenizer("Paris").input_ids[:-1] and h.tokenizer.eos_token_id not in tgt


@pytest.mark.slow
def test_smollm2_target_tokenization(smollm2):
    tok = smollm2.tokenizer
    first = tok("Paris").input_ids[0]
    bos = first if first == tok.bos_token_id else None
    _check_pairs(Scorer(smollm2), tok, bos)


# ------------------------------------------------------------------------------ neighbourhood KL

def _dist(probs: list[float]) -> NextToken:
    return NextToken.from_logits(torch.tensor(probs).log())


def test_kl_on_hand_made_distributions():
    p, q = _dist([0.5, 0.5]), _dist([0.9, 0.1])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert abs(kl_divergence(p, q) - want) < 1e-3
    assert abs(kl_divergence(q, p) - (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))) < 1e-3
    assert kl_divergence(p, p) == 0.0
    loc = get_plugins().metrics.get("locality")
    req = EditRequest(prompt="X is", subject="X", target_new="Y",
                      locality=(PromptAnswer("A is", ""), PromptAnswer("B is", "")), case_id="k")
    pre = {DistQuery("A is"): p, DistQuery("B is"): p}
    post = {DistQuery("A is"): q, DistQuery("B is"): p}
    vals = loc.compute(req, pre, post, ("token_acc",), {"gen_tokens": 8})
    assert abs(vals["kl"]["post"] - want / 2) < 1e-3 and vals["kl"]["pre"] is None
    assert DistQuery("A is") in loc.queries(req, ("exact",), 8)


def test_kl_on_a_tiny_model_is_zero_without_an_edit_and_positive_with_one(tiny_handle):
    h = tiny_handle("gpt2")
    queries = [q for q in _all_queries(REQS) if isinstance(q, DistQuery)]
    scorer = Scorer(h)
    pre = scorer.run(queries)
    again = Scorer(h, batch_size=1).run(queries)
    assert all(kl_divergence(pre[q], again[q]) < 1e-6 for q in queries)
    ft = get_plugins().methods.get("ft-l")
    edit = ft.apply(h, [REQS[0]], ft.resolve_hparams(h, overrides=FT))
    try:
        post = scorer.run(queries)
    finally:
        edit.revert()
    kls = [kl_divergence(pre[q], post[q]) for q in queries]
    assert all(k > 0 for k in kls) and max(kls) > 1e-3, kls


# ------------------------------------------------------------------------------ pre-edit score cache

def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "scores").rglob("*") if p.is_file())


def test_pre_score_cache_hit_miss_and_invalidation(tiny_handle, cache_root, monkeypatch):
    h = tiny_handle("gpt2")
    calls: list[int] = []
    real = Scorer.run

    def counting(self, queries, transform=None, progress=None):
        if transform is None:
            calls.append(1)
        return real(self, queries, transform, progress)

    monkeypatch.setattr(Scorer, "run", counting)
    scorer = Scorer(h)
    settings = {"protocols": ["exact", "generate"], "gen_tokens": 6}
    queries = _all_queries(REQS, ("exact", "generate"))
    first, hit = scorecache.cached_run(h, scorer, queries, settings)
    assert not hit and len(calls) == 1 and len(_cache_files(cache_root)) == 1
    second, hit = scorecache.cached_run(h, Scorer(h), list(reversed(queries)), settings)
    assert hit and len(calls) == 1  # order of the queries does not matter
    direct = Scorer(h).run(queries)
    for q in queries:
        if isinstance(q, DistQuery):  # kept on disk, read when asked for
            assert first[q]._held is None and second[q]._held is None
            assert torch.equal(first[q].logprobs, second[q].logprobs)
            assert torch.equal(first[q].logprobs, direct[q].logprobs)
        else:
            assert first[q] == second[q] == direct[q]
    assert not [p for p in (cache_root / "scores").rglob("*.tmp")]
    from safetensors import safe_open  # the entry stays a safetensors file
    with safe_open(str(_cache_files(cache_root)[0]), "pt") as f:
        assert f.get_tensor("dists").shape[0] == sum(isinstance(q, DistQuery) for q in set(queries))

    # Anything the scores depend on gives another entry.
    for qs, st, sc in ((queries[:-1], settings, Scorer(h)),
                       (queries, {**settings, "gen_tokens": 7}, Scorer(h)),
                       (queries, {**settings, "protocols": ["exact"]}, Scorer(h)),
                       (queries, settings, Scorer(h, batch_size=3))):
        n = len(calls)
        _, hit = scorecache.cached_run(h, sc, qs, st)
        assert not hit and len(calls) == n + 1
    ft = get_plugins().methods.get("ft-l")
    edit = ft.apply(h, [REQS[0]], ft.resolve_hparams(h, overrides=FT))
    try:  # an edited model is another model
        _, hit = scorecache.cached_run(h, Scorer(h), queries, settings)
    finally:
        edit.revert()
    assert not hit
    _, hit = scorecache.cached_run(h, Scorer(h), queries, settings)
    assert hit

    # A corrupt entry is recomputed and rewritten.
    path = scorecache.cache_path(scorecache.cache_key(h, scorer, queries, settings))
    path.write_bytes(b"not a safetensors file")
    n = len(calls)
    _, hit = scorecache.cached_run(h, Scorer(h), queries, settings)
    assert not hit and len(calls) == n + 1
    key = scorecache.cache_key(h, scorer, queries, settings)
    assert scorecache.load(path, key, queries) is not None
    path.write_bytes(path.read_bytes()[:-10])  # cut inside the last distribution
    assert scorecache.load(path, key, queries) is None


def test_dist_file_rows_round_trip_outside_memory(cache_root):
    from medit.scoring.dists import DistFile
    store = DistFile.temporary()
    lps = [torch.randn(50).log_softmax(-1) for _ in range(3)]
    kept = [store.append(lp) for lp in lps]
    assert [k._held for k in kept] == [None] * 3
    for k, lp in zip(kept, lps):
        assert torch.equal(k.logprobs, lp.to(torch.float16))
    with pytest.raises(ValueError, match="50"):
        store.append(torch.zeros(49))
    assert kl_divergence(kept[0], kept[0]) == 0.0 and kl_divergence(kept[0], kept[1]) > 0


def test_engine_reuses_pre_scores_across_methods(tiny_handle, cache_root, tmp_path):
    h = tiny_handle("gpt2")
    a = evaluate(h, "ft-l", REQS[:2], get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT),
                 out_dir=tmp_path / "a", protocols=("exact", "generate"))
    hp_m = get_plugins().methods.get("ft-m").resolve_hparams(h, overrides={k: v for k, v in FT.items()
                                                                           if k != "norm_constraint"})
    b = evaluate(h, "ft-m", REQS[:2], hp_m, out_dir=tmp_path / "b", protocols=("exact", "generate"))
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert ma["pre_scores_cached"] is False and mb["pre_scores_cached"] is True
    for m in ("reliability", "generalization", "locality"):
        for p, stages in a["metrics"][m].items():
            assert stages["pre"] == b["metrics"][m][p]["pre"], (m, p)
    c = evaluate(h, "ft-m", REQS[:2], hp_m, out_dir=tmp_path / "c", protocols=("exact", "generate"),
                 score_cache=False)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["pre_scores_cached"] is False
    assert c["metrics"]["reliability"]["exact"]["pre"] == b["metrics"]["reliability"]["exact"]["pre"]


def test_case_rows_carry_the_methods_edit_diagnostics(tiny_handle, cache_root, tmp_path, monkeypatch):
    """Each case row says which edit made it (its position among the edit's requests) and carries
    the JSON-able part of the method's ``edit.info``, once per edit: a batch stores it on its
    first case only, a sequential run on every case."""
    from medit.plugins.methods.ft.method import FineTune

    h = tiny_handle("gpt2")
    hp = get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT)
    real_apply = FineTune.apply

    def apply(self, handle, requests, hparams):
        edit = real_apply(self, handle, requests, hparams)
        edit.info["not_json"] = torch.zeros(2)  # dropped from the row, not an error
        return edit

    monkeypatch.setattr(FineTune, "apply", apply)
    for mode in ("batch", "sequential"):
        evaluate(h, "ft-l", REQS, hp, mode=mode, protocols=("exact",), out_dir=tmp_path / mode)
        rows = [json.loads(ln) for ln in (tmp_path / mode / "cases.jsonl").read_text().splitlines()]
        if mode == "batch":
            assert [r["edit"]["index"] for r in rows] == [0, 1, 2] and {r["edit"]["size"] for r in rows} == {3}
            assert "info" in rows[0]["edit"] and all("info" not in r["edit"] for r in rows[1:])
            infos = [rows[0]["edit"]["info"]]
        else:
            assert all(r["edit"]["index"] == 0 and r["edit"]["size"] == 1 for r in rows)
            infos = [r["edit"]["info"] for r in rows]
        for info in infos:
            assert info["steps"] >= 1 and isinstance(info["final_loss"], float) and "not_json" not in info


def test_sequential_batches_apply_chunks_in_order(tiny_handle, cache_root, tmp_path, monkeypatch):
    """``--batch-size K`` in sequential mode applies the cases K at a time, one after another:
    one chunk of all cases equals batch mode, each row names its chunk, and the last chunk's
    immediate scores equal the final ones."""
    from medit.plugins.methods.ft.method import FineTune

    h = tiny_handle("gpt2")
    hp = get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT)
    sizes: list[int] = []
    real_apply = FineTune.apply

    def apply(self, handle, requests, hparams):
        sizes.append(len(requests))
        return real_apply(self, handle, requests, hparams)

    monkeypatch.setattr(FineTune, "apply", apply)
    protos = ("exact", "prob")
    whole = evaluate(h, "ft-l", REQS, hp, mode="batch", protocols=protos, score_cache=False)
    one = evaluate(h, "ft-l", REQS, hp, mode="sequential", batch_size=3, protocols=protos, score_cache=False)
    assert sizes == [3, 3]
    assert [c["metrics"] for c in one["cases"]] == [c["metrics"] for c in whole["cases"]]
    sizes.clear()
    evaluate(h, "ft-l", REQS, hp, mode="sequential", batch_size=2, also_immediate=True, protocols=protos,
             out_dir=tmp_path / "two", score_cache=False)
    assert sizes == [2, 1]
    rows = [json.loads(ln) for ln in (tmp_path / "two" / "cases.jsonl").read_text().splitlines()]
    assert [(r["edit"]["index"], r["edit"]["size"]) for r in rows] == [(0, 2), (1, 2), (0, 1)]
    assert "info" in rows[0]["edit"] and "info" not in rows[1]["edit"] and "info" in rows[2]["edit"]
    assert rows[0]["efficiency"]["edit_s"] == rows[1]["efficiency"]["edit_s"]  # the chunk's time, shared
    # the last chunk's immediate scores are taken in the final state
    last = rows[2]["metrics"]["reliability"]["prob"]
    assert last["immediate"] == pytest.approx(last["post"], abs=1e-9)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["batch_size"] == 2


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


def test_sequence_is_scored_in_groups_after_its_last_edit(tiny_handle, cache_root, monkeypatch):
    """After a sequence's last edit its cases are scored ``POST_GROUP`` at a time (a long run never
    holds every case's post-edit results) with the scores of one pass over all of them."""
    from medit.evaluation import engine

    h = tiny_handle("gpt2")
    hp = get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT)
    calls: list[int] = []
    real = Scorer.run

    def counting(self, queries, transform=None, progress=None):
        if transform is not None:
            calls.append(1)
        return real(self, queries, transform, progress)

    monkeypatch.setattr(Scorer, "run", counting)
    protos = ("exact", "prob")
    one = evaluate(h, "ft-l", REQS, hp, mode="sequential", protocols=protos, score_cache=False)
    once = len(calls)
    monkeypatch.setattr(engine, "POST_GROUP", 1)
    grouped = evaluate(h, "ft-l", REQS, hp, mode="sequential", protocols=protos, score_cache=False)
    assert len(calls) - once == once + len(REQS) - 1  # one scoring pass per case instead of one for all
    for a, b in zip(one["cases"], grouped["cases"]):
        fa, fb = _flat(a["metrics"]), _flat(b["metrics"])
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k] == pytest.approx(fb[k], abs=1e-5), k


def test_batch_size_outside_batches_is_refused(tiny_handle):
    from medit.errors import MethodError
    from medit.evaluation.engine import check_batched

    with pytest.raises(MeditError, match="--batch-size 2.*single mode"):
        EvalConfig(mode="single", batch_size=2)
    with pytest.raises(MeditError, match="-1"):
        EvalConfig(mode="batch", batch_size=-1)
    EvalConfig(mode="single", batch_size=1)
    rome = get_plugins().methods.get("rome")
    with pytest.raises(MethodError, match="'rome' cannot apply 4 edits at once"):
        check_batched(rome, "sequential", 4)
    check_batched(rome, "sequential", 1)


# ------------------------------------------------------------------------------ --also-immediate

def test_also_immediate_scores_each_case_right_after_its_edit(tiny_handle, cache_root, tmp_path):
    h = tiny_handle("gpt2")
    hp = get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT)
    evaluate(h, "ft-l", REQS, hp, mode="sequential", also_immediate=True, out_dir=tmp_path / "run",
             protocols=("generate", "token_acc", "exact", "prob"))
    cases = [json.loads(ln) for ln in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert [c["case_id"] for c in cases] == ["a", "b", "c"]
    for c in cases:
        for metric, protos in c["metrics"].items():
            for proto, stages in protos.items():
                assert set(stages) == {"pre", "post", "immediate"}, (metric, proto)
        assert "immediate" in c["generated"]
    # The last case is scored right after its edit and after the last edit: the same state.
    last = cases[-1]["metrics"]
    for metric, protos in last.items():
        for proto, stages in protos.items():
            assert stages["immediate"] == pytest.approx(stages["post"], abs=1e-9), (metric, proto)
    assert cases[-1]["generated"]["immediate"] == cases[-1]["generated"]["post"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rel = summary["metrics"]["reliability"]["exact"]
    assert set(rel) - {"ci95", "delta_ci95", "n"} == {"pre", "post", "immediate"}
    assert rel["immediate"] == pytest.approx(sum(c["metrics"]["reliability"]["exact"]["immediate"]
                                                 for c in cases) / 3)
    assert rel["immediate"] == 1.0  # each edit takes when it is made
    header = summary_table(summary).splitlines()[0]
    assert "exact (immediate)" in header and "generate (immediate)" in header
    assert header.index("| exact ") < header.index("exact (immediate)") < header.index("| prob ")


def test_also_immediate_outside_sequential_is_refused():
    for mode in ("single", "batch"):
        with pytest.raises(MeditError, match="--mode sequential"):
            EvalConfig(mode=mode, also_immediate=True)
    EvalConfig(mode="sequential", also_immediate=True)


def test_without_also_immediate_there_is_no_immediate_stage(tiny_handle, cache_root, tmp_path):
    h = tiny_handle("gpt2")
    hp = get_plugins().methods.get("ft-l").resolve_hparams(h, overrides=FT)
    s = evaluate(h, "ft-l", REQS[:2], hp, mode="sequential", protocols=("exact",), out_dir=tmp_path / "r")
    assert all(set(st) - {"ci95", "delta_ci95", "n"} == {"pre", "post"} for p in s["metrics"].values() for st in p.values())
    assert "immediate" not in summary_table(s)


# ------------------------------------------------------------------------------ progress

def test_progress_reports_reach_the_total_in_cases(tiny_handle):
    from medit.evaluation.engine import _case_progress

    h = tiny_handle("gpt2")
    seen: list[tuple[float, float]] = []
    Scorer(h, batch_size=2).run(_all_queries(REQS), progress=lambda d, t: seen.append((d, t)))
    assert len(seen) > 3
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:])) and seen[-1][0] == seen[-1][1] > 0

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            assert k > 0
            self.n += k

    bar = Bar()
    cb = _case_progress(bar, 7)
    for d, t in seen:
        cb(d, t)
    assert bar.n == 7


# ------------------------------------------------------------------------------ CLI: resume after a kill

def _write_cases(path: Path, n: int) -> Path:
    words = ["France", "Paris", "river", "dog", "fox", "bank", "capital", "tongue"]
    lines = []
    for i in range(n):
        w = words[i % len(words)]
        lines.append({"case_id": f"k{i}", "prompt": f"The {w} of case {i} is", "subject": w,
                      "target_new": words[(i + 3) % len(words)], "target_true": words[(i + 5) % len(words)],
                      "rephrase": [f"Case {i} has the {w}"], "locality": [{"prompt": "The river bank", "answer": "is near"}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run / "cases.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow  # a second Python process costs seconds of imports; the run itself is tiny
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_model_dirs, tmp_path):
    """`medit eval` in a subprocess is killed (SIGKILL) once some cases are written; --resume
    finishes the run: every case once, in order, with the metric values of an uninterrupted run."""
    n = 5
    data = _write_cases(tmp_path / "cases.jsonl", n)
    model = tiny_model_dirs["gpt2"]
    run = tmp_path / "killed"
    args = ["eval", "--method", "ft-l", "--model", str(model), "--dataset", str(data), "--mode", "single",
            "--protocol", "exact,prob,generate", "--gen-tokens", "4", *FT_CLI, "--set", "steps=30",
            "--set", "early_stop_loss=0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MEDIT_LOAD_PLUGINS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "medit.cli", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "cases.jsonl").is_file() and _records(run):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    written = _records(run)
    assert 1 <= len(written) < n, f"{len(written)} cases written before the kill"

    runner = CliRunner()
    resumed = runner.invoke(app, args + ["--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    whole = tmp_path / "whole"
    full = runner.invoke(app, args + ["--out", str(whole), "--no-score-cache"])
    assert full.exit_code == 0, full.output

    got, want = _records(run), _records(whole)
    assert [r["case_id"] for r in got] == [f"k{i}" for i in range(n)] == [r["case_id"] for r in want]
    for a, b in zip(got, want):
        assert a["metrics"] == b["metrics"], a["case_id"]
        assert a["generated"] == b["generated"], a["case_id"]
    assert json.loads((run / "summary.json").read_text())["metrics"] == \
        json.loads((whole / "summary.json").read_text())["metrics"]


# ------------------------------------------------------------------------------ CLI: bad input

def _one_line_error(result: Any, *needles: str) -> str:
    text = (result.output or "") + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) >= 1, text
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def one_case(tmp_path: Path) -> Path:
    return _write_cases(tmp_path / "one.jsonl", 1)


def test_eval_bad_inputs(tiny_model_dirs, one_case, tmp_path):
    runner = CliRunner()
    base = ["eval", "--model", str(tiny_model_dirs["gpt2"]), "--dataset", str(one_case), "--out", str(tmp_path / "r")]
    msg = _one_line_error(runner.invoke(app, base + ["--method", "ft-l", "--protocol", "exact,bleu"]), "'bleu'")
    assert all(p in msg for p in ("generate", "token_acc", "exact", "prob"))
    _one_line_error(runner.invoke(app, base + ["--method", "rome", "--mode", "batch"]),
                    "'rome'", "'batch'", "--mode single or --mode sequential")
    for mode in ("single", "batch"):
        _one_line_error(runner.invoke(app, base + ["--method", "ft-l", "--mode", mode, "--also-immediate"]),
                        "--also-immediate", "--mode sequential", repr(mode))
    _one_line_error(runner.invoke(app, base + ["--method", "ft-l", "--score-batch-size", "0"]), "0", "--score-batch-size")
    _one_line_error(runner.invoke(app, base + ["--method", "ft-l", "--batch-size", "2"]), "--batch-size 2", "single mode")
    _one_line_error(runner.invoke(app, base + ["--method", "rome", "--mode", "sequential", "--batch-size", "2"]),
                    "'rome'", "2 edits at once", "drop --batch-size")
    assert not (tmp_path / "r").exists()


def test_sequential_resume_scores_the_rest_after_every_edit(tiny_model_dirs, tmp_path):
    """A sequential run cut off while writing its records resumes with the same edits applied
    (all of them, in order), so the remaining cases get the values of an uninterrupted run."""
    n = 4
    data = _write_cases(tmp_path / "cases.jsonl", n)
    args = ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]), "--dataset", str(data),
            "--mode", "sequential", "--protocol", "exact,prob", *FT_CLI, "--no-score-cache"]
    runner = CliRunner()
    whole = tmp_path / "whole"
    assert runner.invoke(app, args + ["--out", str(whole)]).exit_code == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (whole / "cases.jsonl").read_text().splitlines(keepends=True)
    (cut / "cases.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # killed mid-record
    resumed = runner.invoke(app, args + ["--out", str(cut), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    got, want = _records(cut), _records(whole)
    assert [r["case_id"] for r in got] == [r["case_id"] for r in want]
    assert [r["metrics"] for r in got] == [r["metrics"] for r in want]


def test_sequential_run_keeps_one_copy_per_matrix_and_trims_the_heap(tiny_model_dirs, tmp_path, monkeypatch):
    """Sequential mode: after the run every edit but the first shares the original weights (one
    copy per edited matrix, not one per edit), every edit is reverted at the end, and the heap is
    trimmed after each edit; each case records the resident memory right after its edit."""
    import medit.evaluation.engine as engine
    from medit.core.edit import WeightEdit
    calls = []
    monkeypatch.setattr(engine, "trim_heap", lambda: calls.append(1))
    seen: list = []
    real = engine.Evaluator._apply

    def spy(self, reqs):
        edit, s = real(self, reqs)
        seen.append(edit)
        return edit, s
    monkeypatch.setattr(engine.Evaluator, "_apply", spy)
    data = _write_cases(tmp_path / "cases.jsonl", 3)
    args = ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]), "--dataset", str(data),
            "--mode", "sequential", "--protocol", "exact", *FT_CLI, "--no-score-cache", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(calls) == 3 and len(seen) == 3
    assert all(isinstance(e, WeightEdit) for e in seen)
    assert seen[0].originals and not seen[0].shared
    assert all(not e.originals and e.shared == set(seen[0].originals) for e in seen[1:])
    assert not any(e.active for e in seen)
    rss = [r["efficiency"]["rss_mb"] for r in _records(tmp_path / "r")]
    assert len(rss) == 3 and all(x > 0 for x in rss)  # resident memory after each case's edit
