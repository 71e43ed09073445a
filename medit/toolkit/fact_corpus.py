"""A statistics corpus that also holds facts of the kind edits touch (``medit corpus``).

AlphaEdit protects the directions that its statistics corpus's keys occupy. WikiText paragraphs
cover short "subject relation object" prompts poorly: on SmolLM2 (layers 3 and 5) the keys of
CounterFact's locality prompts keep 43-63 % of their energy outside the protected directions,
WikiText's own keys 26-35 %; with 5,000 CounterFact-train facts added, 16-28 %. Adding true
facts from a dataset's *training* split (each case's prompt with its true answer, and its locality
prompts with theirs) makes the protected directions cover them.

Cases that mention a subject of the cases you will evaluate (``exclude``) are left out, in both
directions (a kept fact's subject never occurs in an excluded case's text, and no excluded subject
occurs in a kept fact), so the statistics never hold the evaluation's own prompts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from medit.core.dataset import load_dataset
from medit.errors import InputFileError, ValidationError
from medit.core.io import atomic_write_text
from medit.core.requests import EditRequest
from medit.toolkit.stats import Corpus

__all__ = ["fact_lines", "build_corpus", "write_corpus"]


def _texts(req: EditRequest) -> list[str]:
    return [req.prompt, *req.rephrase, *(pa.prompt for pa in req.locality), *(pa.prompt for pa in req.portability)]


def fact_lines(req: EditRequest) -> list[str]:
    """The true facts a case states: its prompt with ``target_true``, its locality prompts with their answers."""
    lines = [f"{req.prompt} {req.target_true.strip()}."] if req.target_true and req.target_true.strip() else []
    return lines + [f"{pa.prompt} {pa.answer.strip()}." for pa in req.locality if pa.answer and pa.answer.strip()]


def build_corpus(facts: str, exclude: Sequence[str] = (), text: str | None = None, text_n: int = 1000,
                 facts_n: int | None = None) -> tuple[list[str], dict[str, int]]:
    """``text_n`` paragraphs of ``text`` (if given), then up to ``facts_n`` fact lines from the
    dataset ``facts``, leaving out cases that share a subject with any ``exclude`` dataset.

    Returns the lines and counts: ``text``, ``facts``, ``cases_read``, ``excluded_cases`` (of those read)."""
    if text_n < 1 or (facts_n is not None and facts_n < 1):
        raise ValidationError(f"--text-n and --facts-n must be >= 1, got {text_n} and {facts_n}")
    held: list[EditRequest] = [r for spec in exclude for r in load_dataset(spec)[0]]
    held_text = "\n".join(t for r in held for t in _texts(r))
    subjects = sorted({r.subject for r in held if r.subject}, key=len, reverse=True)
    mentions = re.compile("|".join(map(re.escape, subjects))) if subjects else None
    cases, _ = load_dataset(facts)
    out: list[str] = []
    excluded = read = 0
    for req in cases:
        read += 1
        if req.subject in held_text or (mentions and any(mentions.search(t) for t in _texts(req))):
            excluded += 1
            continue
        out.extend(fact_lines(req))
        if facts_n is not None and len(out) >= facts_n:
            out = out[:facts_n]
            break
    if not out:
        raise ValidationError(f"no fact of {facts!r} is left after excluding {', '.join(exclude)}; pass a "
                              f"dataset with true answers (target_true) and subjects the excluded cases lack")
    paragraphs = Corpus(text).paragraphs(text_n) if text else []
    return paragraphs + out, {"text": len(paragraphs), "facts": len(out), "cases_read": read,
                              "excluded_cases": excluded}


def check_corpus_target(out: str | Path, force: bool = False) -> None:
    """Refuse to write the corpus over a folder, or over an existing file unless ``force``."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputFileError(f"--out '{out}' is a folder; name the corpus file to write, e.g. {Path(out) / 'corpus.txt'}")
    if path.exists() and not force:
        raise InputFileError(f"--out '{out}' already exists; pass --force to replace it, or choose another file")


def write_corpus(lines: Sequence[str], out: str | Path) -> Path:
    """Write one sample per line, atomically; a line break inside a sample becomes a space."""
    path = Path(out).expanduser()
    atomic_write_text(path, "".join(" ".join(line.split()) + "\n" for line in lines))
    return path
