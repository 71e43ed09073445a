"""The conformance kit can fail: :func:`medit.testing.check_method` passes a small correct method
and catches each broken rule of the contract in a method that breaks it (an edit that does not
take, an inexact revert, a hook left behind or undeclared, a patch that does not reproduce the
edit, an unknown hparam accepted), and reports an edit that cannot be saved as skipped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from medit import Edit, EditRequest, HParams, Method, ModelHandle, WeightEdit
from medit.plugin.manager import get_plugins
from medit.testing import FAMILIES, check_method, default_requests, tiny_model, tiny_tokenizer, training_lines


@dataclass
class NudgeHParams(HParams):
    #: how far the target's output-embedding row moves towards the prompt's last hidden state
    alpha: float = 2.0


def _last_hidden(handle: ModelHandle, prompt: str) -> torch.Tensor:
    ids = torch.tensor([handle.tokenizer(prompt).input_ids])
    with torch.no_grad():
        return handle.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]


class Nudge(Method[NudgeHParams]):
    """A correct toy method (causal models): the first target token's output-embedding row moves
    along the prompt's final hidden state, so that token's logit rises."""

    name = "nudge-test"
    hparams_class = NudgeHParams
    modes = ("single",)
    unsupported_families = ("t5",)

    def delta(self, handle: ModelHandle, req: EditRequest, hp: NudgeHParams) -> tuple[str, torch.Tensor]:
        name = handle.param_name("lm_head")
        weight = dict(handle.model.named_parameters())[name]
        h = _last_hidden(handle, req.prompt)
        token = handle.tokenizer(" " + req.target_new, add_special_tokens=False).input_ids[0]
        d = torch.zeros_like(weight)
        d[token] = hp.alpha * h / h.norm()
        return name, d

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: NudgeHParams) -> Edit:
        name, d = self.delta(handle, requests[0], hparams)
        return WeightEdit.from_deltas(handle, self.name, requests, hparams.to_dict(), dense={name: d})


def test_a_correct_method_passes_every_check():
    report = check_method(Nudge(), family="llama")
    assert report.passed == ["contract", "bad hparams", "edit takes", "revert", "hooks", "patch"], report
    assert not report.skipped and report.logprob_after[0] > report.logprob_before[0]
    assert report.patch_max_diff is not None and report.patch_max_diff <= 1e-4
    assert "nudge-test" not in get_plugins().methods  # registered only while the check ran


def test_an_unsupported_family_is_checked_for_a_clean_refusal():
    report = check_method(Nudge(), family="t5")
    assert set(report.skipped) == {"edit takes", "revert", "hooks", "patch"}
    assert any("MethodError" in n for n in report.notes)


def test_an_edit_that_does_not_take_fails_unless_not_expected():
    class Weak(Nudge):
        name = "weak-test"

    with pytest.raises(AssertionError, match=r"\[edit takes\].*did not rise"):
        check_method(Weak(), family="llama", hparams={"alpha": 0.0})
    report = check_method(Weak(), family="llama", hparams={"alpha": 0.0}, expect_success=False)
    assert "expect_success=False" in report.skipped["edit takes"] and "revert" in report.passed


class _SloppyEdit(WeightEdit):
    def revert(self) -> None:
        was = self.active
        super().revert()
        if was:  # leaves one weight a hair off
            with torch.no_grad():
                next(iter(self._params().values())).view(-1)[0] += 1e-6


def test_an_inexact_revert_fails():
    class Sloppy(Nudge):
        name = "sloppy-test"

        def apply(self, handle, requests, hparams):  # type: ignore[no-untyped-def]
            name, d = self.delta(handle, requests[0], hparams)
            with _SloppyEdit.recording(handle, [name], self.name, requests, hparams.to_dict()) as edit:
                with torch.no_grad():
                    dict(handle.model.named_parameters())[name].add_(d)
            return edit

    with pytest.raises(AssertionError, match=r"\[revert\].*not bit-exact.*lm_head"):
        check_method(Sloppy(), family="llama")


def test_hooks_left_behind_or_undeclared_fail():
    class Leaky(Nudge):
        name = "leaky-test"
        cached_scoring = False

        def apply(self, handle, requests, hparams):  # type: ignore[no-untyped-def]
            handle.module("ln_f").register_forward_hook(lambda mod, args, out: None)
            return super().apply(handle, requests, hparams)

    with pytest.raises(AssertionError, match=r"\[hooks\].*left on the model after revert"):
        check_method(Leaky(), family="llama")

    class HookEdit(WeightEdit):
        hook: torch.utils.hooks.RemovableHandle

        def revert(self) -> None:
            self.hook.remove()
            super().revert()

    class Undeclared(Nudge):
        name = "undeclared-test"  # hooks while active, but keeps cached_scoring = True

        def apply(self, handle, requests, hparams):  # type: ignore[no-untyped-def]
            name, d = self.delta(handle, requests[0], hparams)
            edit = HookEdit.from_deltas(handle, self.name, requests, hparams.to_dict(), dense={name: d})
            edit.hook = handle.module("ln_f").register_forward_hook(lambda mod, args, out: None)
            return edit

    with pytest.raises(AssertionError, match=r"\[hooks\].*cached_scoring = True"):
        check_method(Undeclared(), family="llama")


def test_a_patch_that_does_not_reproduce_the_edit_fails():
    class HalfPatch(Nudge):
        name = "half-patch-test"

        def apply(self, handle, requests, hparams):  # type: ignore[no-untyped-def]
            edit = super().apply(handle, requests, hparams)
            (name, d), = edit.deltas().items()
            u, s, vh = torch.linalg.svd(d / 2)  # saves half the change it made
            edit.factors = {name: ((u[:, :1] * s[:1]).contiguous(), vh[:1].T.contiguous())}
            return edit

    with pytest.raises(AssertionError, match=r"\[patch\].*logits differ"):
        check_method(HalfPatch(), family="llama")


def test_an_edit_that_cannot_be_saved_is_reported_as_skipped():
    class PromptOnly(Edit):  # sets no kind: not saveable
        def transform_prompts(self, prompts: list[str]) -> list[str]:
            return [f"{self.requests[0].prompt} {self.requests[0].target_new}. {p}" if self.active else p
                    for p in prompts]

    class Prefix(Nudge):
        name = "prefix-test"

        def apply(self, handle, requests, hparams):  # type: ignore[no-untyped-def]
            return PromptOnly(handle, self.name, requests, hparams.to_dict())

    report = check_method(Prefix(), family="gpt2", expect_success=False)
    assert "cannot be saved" in report.skipped["patch"] and "revert" in report.passed


def test_accepting_an_unknown_hparam_fails():
    class Lenient(Nudge):
        name = "lenient-test"

        def resolve_hparams(self, handle, hparams_file=None, overrides=None):  # type: ignore[no-untyped-def]
            known = {k: v for k, v in (overrides or {}).items() if k in NudgeHParams.field_names()}
            return super().resolve_hparams(handle, hparams_file, known)

    with pytest.raises(AssertionError, match=r"\[bad hparams\].*resolve_hparams accepted"):
        check_method(Lenient(), family="llama")


def test_tiny_models_are_built_offline_from_the_packaged_corpus():
    assert len(training_lines()) == 400 + 20
    assert len(tiny_tokenizer("llama")) <= 512 and tiny_tokenizer("gptj") is tiny_tokenizer("gpt2")
    for family in FAMILIES:
        h = tiny_model(family)
        assert h.adapter.name == family and sum(p.numel() for p in h.model.parameters()) < 200_000
    assert default_requests()[0].prompt.endswith(default_requests()[0].subject)


def test_requests_beyond_the_method_modes_are_refused_before_any_work():
    two = default_requests() * 2
    with pytest.raises(ValueError, match="needs 'batch'"):
        check_method(Nudge(), family="llama", requests=two)
