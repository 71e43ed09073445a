"""Context templates and subject token positions, shared by ROME-style methods.

Templates are short generated prefixes ("The team said that. {}") that make keys and target
vectors robust to what precedes the prompt. They are generated once per model with a fixed seed
and cached on disk by model fingerprint, and in the model's :class:`ContextTemplates` state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from medit.errors import ValidationError
from medit.core.io import atomic_write_json
from medit.core.timing import setup_phase

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
#: stand-in subjects (people, places, organisations, things) for subject-swapped negatives: the
#: edit prompt about another subject, which an edit must leave alone (T-Patcher, WISE).
NEGATIVE_SUBJECTS = ("Paris", "Germany", "John Smith", "Microsoft", "the Beatles", "Tokyo", "Mary",
                     "the Amazon River", "Albert", "Toyota", "Canada", "the company")


def swapped_prompts(prompt: str, subject: str, subjects: Sequence[str]) -> list[str]:
    """``prompt`` about each of ``subjects`` instead of ``subject`` (which is skipped if listed)."""
    return [prompt.replace(subject, s) for s in subjects if s != subject]


@dataclass
class ContextTemplates:
    """Run state: one model's context templates, by (spec, seed)."""

    by_spec: dict[tuple[tuple[tuple[int, ...], ...], int], list[str]] = field(default_factory=dict)


def context_templates(handle: "ModelHandle", spec: Sequence[Sequence[int]] = ((5, 10),),
                      seed: int = 0) -> list[str]:
    """``["{}"]`` plus, for each (length, count) in ``spec``, ``count`` sampled prefixes of
    ``length`` new tokens, each ending in ``. {}``. Deterministic for a model and seed."""
    kept = handle.state(ContextTemplates).by_spec
    key = (tuple(map(tuple, spec)), seed)
    if key in kept:
        return kept[key]
    from medit.core.io import cache_dir
    path = cache_dir("templates") / f"{handle.fingerprint()}-{seed}-{'_'.join(f'{a}x{b}' for a, b in spec)}.json"
    templates: list[str] | None = None
    if path.is_file():
        try:
            templates = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            templates = None
    if templates is None:
        with setup_phase("templates"):
            templates = ["{}"] + [t for length, count in spec for t in _generate(handle, length, count, seed)]
        atomic_write_json(path, templates)
    kept[key] = templates
    return templates


@torch.no_grad()
def _generate(handle: "ModelHandle", length: int, count: int, seed: int) -> list[str]:
    tok = handle.tokenizer
    prompts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(count)]
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + length)
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p).input_ids], device=handle.device)
        for _ in range(length):
            logits = handle.model(input_ids=ids).logits[0, -1].float().cpu()
            top = torch.topk(logits, 5)
            pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
            ids = torch.cat([ids, pick.to(ids.device)[None]], 1)
        text = tok.decode(ids[0], skip_special_tokens=True)
        text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        out.append(f"{text}. {{}}")
    return out


def subject_token_index(handle: "ModelHandle", text: str, subject_start: int, subject: str,
                        which: str = "last") -> int:
    """Index of the subject's first or last token in ``tokenize(text)``.

    Uses the fast tokenizer's offsets (a token belongs to the subject if its characters overlap
    the subject's); falls back to tokenizing the text up to the subject's end.
    """
    tok = handle.tokenizer
    start, end = subject_start, subject_start + len(subject)
    enc = None
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        idx = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
        if idx:
            return idx[-1] if which == "last" else idx[0]
    else:
        n_end = len(tok(text[:end]).input_ids)
        n_start = len(tok(text[:start]).input_ids)
        if n_end > n_start:
            return n_end - 1 if which == "last" else n_start
    raise ValidationError(f"the tokens of subject {subject!r} cannot be found in {text!r}; "
                          "check the subject is spelled as in the prompt")


def fill(template: str, prompt: str) -> tuple[str, int]:
    """(template with the prompt inserted, character offset of the prompt in it).

    A context template (``"<text>. {}"``) around a chat-wrapped prompt goes inside its user turn
    (:func:`medit.core.chat.prefix`); the offset then still moves everything after the turn's
    head by the template's text, so ``offset + prompt.index(subject)`` finds the subject."""
    offset = template.index("{}")
    if offset and template.endswith("{}") and template.count("{}") == 1:
        from medit.core.chat import prefix
        return prefix(template[:offset], prompt), offset
    return template.replace("{}", prompt, 1), offset
