"""Typed run state: one instance per state class and model handle, identity-checked derived caches."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medit.core.state import IdentityCache, RunState


@dataclass
class Counts:
    by_layer: dict[int, int] = field(default_factory=dict)


@dataclass
class Other:
    value: int = 0


def test_one_instance_per_class_until_reset():
    state = RunState()
    assert Counts not in state
    first = state.get(Counts)
    first.by_layer[3] = 1
    assert state.get(Counts) is first and Counts in state
    assert state.get(Other) is not first and state.get(Other).value == 0
    state.reset(Counts)
    assert state.get(Counts).by_layer == {} and state.get(Counts) is not first
    state.reset(Counts)
    state.reset(Counts)  # resetting what is not there is fine


def test_two_handles_never_share_state(tiny_handle):
    a, b = tiny_handle("gpt2", fresh=True), tiny_handle("gpt2", fresh=True)
    a.state(Counts).by_layer[0] = 1
    assert b.state(Counts).by_layer == {}
    assert a.state(Counts) is a.state(Counts) and a.state(Counts) is not b.state(Counts)
    a.reset_state(Counts)
    assert a.state(Counts).by_layer == {}


def test_identity_cache_recomputes_for_another_source_object():
    cache: IdentityCache[tuple[str, int], float] = IdentityCache()
    calls = []

    def build(x: torch.Tensor) -> float:
        calls.append(1)
        return float(x.sum())

    src = torch.ones(3)
    assert cache.get(src, ("sum", 0), lambda: build(src)) == 3.0
    assert cache.get(src, ("sum", 0), lambda: build(src)) == 3.0 and len(calls) == 1
    assert cache.get(src, ("sum", 1), lambda: build(src)) == 3.0 and len(calls) == 2  # another key
    equal = torch.ones(3)  # equal values, another object: a new entry, never a stale hit
    assert cache.get(equal, ("sum", 0), lambda: build(equal)) == 3.0 and len(calls) == 3
    assert len(cache) == 3
