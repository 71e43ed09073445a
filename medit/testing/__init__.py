"""Conformance kit for editing methods: tiny offline models and :func:`check_method`.

A plugin author checks a method against medit's contract in their own test suite::

    from medit.testing import check_method
    from my_plugin.method import MyMethod

    def test_my_method_conforms():
        report = check_method(MyMethod(), family="llama", hparams={"steps": 5})
        print(report)

:func:`check_method` edits a tiny random model of the family (built offline in seconds, cached
for the process) and raises :class:`AssertionError` naming the broken rule unless

(a) the edit takes: the new target's teacher-forced log-probability after the edit prompt rises
    by at least ``min_gain`` nats for every request (``expect_success=False`` records the change
    without asserting it: tiny random models are weak, and some methods cannot move them much);
(b) :meth:`~medit.Edit.revert` restores every parameter and buffer bit for bit (``torch.equal``),
    with the same parameter names, shapes and ``requires_grad`` flags, and is idempotent;
(c) no forward hook or pre-hook is left on any module after the revert, and an edit that hooks
    modules while active belongs to a method that declares ``cached_scoring = False``;
(d) the edit saves as a patch (:meth:`~medit.Edit.save`), the patch loads onto a fresh copy of
    the model with :func:`medit.load_patch` (by its ``kind``, as ``medit apply`` does) and gives
    the same logits as the live edit on the edit prompts and the locality prompts (within
    ``atol``), and that loaded edit reverts bit for bit too; an edit that cannot be saved
    (``save`` raises :class:`NotImplementedError`: its class sets no ``kind`` of its own or does
    not implement ``payload``/``from_payload``) is reported as not saveable, the check skipped
    with that reason;
(e) an unknown hparam (``{"no_such_hparam": 1}``) is refused with :class:`medit.HParamsError`.

It returns a :class:`CheckReport` saying what passed, what was skipped and why. On a family the
method lists in ``unsupported_families`` only the contract and (e) are checked, and that the
method refuses the family with a :class:`medit.MethodError`. Learned methods
(``trainable = True``) given no ``checkpoint`` get a throwaway editor trained for
``train_steps`` steps first (10 by default, a second or two on a tiny model), so the edit
mechanics are checked, not the quality of a real editor; the report says so.

The tiny models: :func:`tiny_tokenizer` trains a byte-level BPE tokenizer (vocabulary ~512) on the
WikiText-2 text medit ships; :func:`build_tiny_model` builds a two-layer random model of a family
(``gpt2``, ``gptj``, ``gptneox``, ``llama``, ``t5``) with fixed seeds; :func:`tiny_model_dir` caches
one folder per family for the process and :func:`tiny_model` loads a fresh
:class:`~medit.ModelHandle` from it. Nothing touches the network.
"""
from __future__ import annotations

from medit.testing.contract import CheckReport, check_method
from medit.testing.tiny import (CHAT_TEMPLATES, FAMILIES, SEED, TINY_WINDOW, TOKENIZER_STYLE, build_tiny_model,
                                corpus_path, default_requests, tiny_model, tiny_model_dir, tiny_tokenizer,
                                tiny_tokenizers, training_lines, training_requests)

__all__ = ["FAMILIES", "TOKENIZER_STYLE", "CHAT_TEMPLATES", "SEED", "TINY_WINDOW", "CheckReport", "check_method",
           "default_requests", "training_requests", "tiny_tokenizer", "tiny_tokenizers", "build_tiny_model",
           "tiny_model_dir", "tiny_model", "corpus_path", "training_lines"]
