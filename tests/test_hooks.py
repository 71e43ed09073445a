"""Adaptors see whether a model call continues a cached generation, whatever the transformers
version names the cache argument (``cache`` in 5.x, ``past_key_values`` before)."""
from __future__ import annotations

import pytest

from medit.model.adaptors import Adaptor
from medit.core.queries import GenQuery
from medit.scoring.engine import Scorer


class _Watch(Adaptor):
    def __init__(self, handle, module) -> None:
        super().__init__(handle, module)
        self.calls: list[bool] = []

    def rewrite(self, x, y):
        self.calls.append(self.continuing)
        return y


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adaptor_knows_a_generation_step_from_a_prompt(tiny_handle, family):
    h = tiny_handle(family)
    watch = _Watch(h, h.module("layers", 0))
    try:
        Scorer(h).generate([GenQuery("The capital of France is", 4)])
    finally:
        watch.remove()
    assert watch.calls[0] is False and len(watch.calls) > 1 and all(watch.calls[1:]), watch.calls
