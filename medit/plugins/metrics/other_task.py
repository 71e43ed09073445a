"""Other task: the model's skill at unrelated work must survive the edit.

A run-level metric (see :mod:`medit.core.metric`): it measures the model, not a case, before
editing and after editing. In ``single`` mode after the edits of a sample of cases
(``run_sample``, default 10, evenly spaced over the run; each measured with that case's edit
applied, then reverted), in ``batch`` mode after as many batches, in ``sequential`` mode once,
after the last edit. The sampled cases' rows in ``cases.jsonl`` hold the values; the summary mean
is the mean over the sampled edits (``n`` says how many), and its interval is over those edits.

Protocols:

- ``perplexity``: the perplexity of a held-out text sample, ``exp`` of the mean negative
  log-likelihood per token over all its paragraphs. The default text is the WikiText-2 *test*
  sample medit ships (``medit/datasets/wikitext-2-test-sample.txt``, 120 paragraphs;
  ``--other-task-text FILE`` names another: one paragraph per line, blank lines and ``=`` headings
  skipped). Each paragraph is cut to its first ``max_words`` (48) words and at most
  ``max_paragraphs`` (120) are read; a paragraph's first word is its context and every following
  token is scored.
- ``mc_acc`` (with ``--other-task-mc FILE``): accuracy on a two-choice task in PIQA's JSONL
  format, one ``{"goal", "sol1", "sol2", "label"}`` per line (label 0 or 1). The prompt is
  ``"Question: {goal}\\nAnswer:"`` and the chosen solution the one with the higher mean log-
  probability per token (length-normalised log-likelihood).
- ``mc_agreement``: the fraction of items whose chosen solution is the same after the edit as
  before (post only; more sensitive than accuracy, which can stay while answers swap).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.metric import Metric, Results, Values
from medit.core.queries import TFQuery
from medit.core.requests import EditRequest
from medit.errors import InputFileError, ValidationError

#: the default held-out text (medit/datasets/DATA.md)
DEFAULT_TEXT = "medit/datasets/wikitext-2-test-sample.txt"
MC_FIELDS = ("goal", "sol1", "sol2", "label")


@dataclass(frozen=True)
class Choice:
    """One two-choice item: the prompt and the two solutions; ``label`` the correct one (0 or 1)."""

    prompt: str
    solutions: tuple[str, str]
    label: int


def _read_text(path: str | os.PathLike[str], what: str, flag: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputFileError(f"{what} {str(path)!r} does not exist or is not a file; pass an existing file to {flag}")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{what} {str(path)!r} cannot be read as UTF-8 text ({exc}); pass a text file to "
                             f"{flag}") from None


def read_paragraphs(path: str | os.PathLike[str], max_paragraphs: int, max_words: int) -> list[str]:
    """The text sample: paragraphs (non-blank lines that are not ``=`` headings) cut to
    ``max_words`` words, at most ``max_paragraphs``; paragraphs of one word are skipped (nothing
    to score after the context word)."""
    out = []
    for line in _read_text(path, "other-task text", "--other-task-text").splitlines():
        words = line.split()
        if len(words) < 2 or words[0].startswith("="):
            continue
        out.append(" ".join(words[:max_words]))
        if len(out) >= max_paragraphs:
            break
    if not out:
        raise InputFileError(f"other-task text {str(path)!r} holds no paragraph of two or more words; pass a text "
                             "file with one paragraph per line to --other-task-text")
    return out


def read_choices(path: str | os.PathLike[str]) -> list[Choice]:
    """Two-choice items from a PIQA-format JSONL file (blank lines skipped)."""
    items = []
    for i, line in enumerate(_read_text(path, "two-choice file", "--other-task-mc").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{where} is not a JSON object ({exc.msg}); --other-task-mc takes PIQA's JSONL "
                                 f"format, one {{\"goal\", \"sol1\", \"sol2\", \"label\"}} per line") from None
        if not isinstance(rec, dict) or any(k not in rec for k in MC_FIELDS):
            found = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise InputFileError(f"{where} lacks one of {', '.join(MC_FIELDS)} (found: {found}); --other-task-mc "
                                 "takes PIQA's JSONL format")
        sols = (rec["sol1"], rec["sol2"])
        if not all(isinstance(x, str) and x.strip() for x in (rec["goal"], *sols)):
            raise InputFileError(f"{where}: goal, sol1 and sol2 must be non-empty strings")
        label = rec["label"]
        if isinstance(label, str) and label.strip() in ("0", "1"):
            label = int(label)
        if label not in (0, 1) or isinstance(label, bool):
            raise InputFileError(f"{where}: label must be 0 (sol1) or 1 (sol2), got {label!r}")
        items.append(Choice(f"Question: {rec['goal'].strip()}\nAnswer:", (sols[0].strip(), sols[1].strip()),
                            int(label)))
    if not items:
        raise InputFileError(f"two-choice file {str(path)!r} holds no item; pass a PIQA-format JSONL file to "
                             "--other-task-mc")
    return items


class OtherTask(Metric):
    name = "other_task"
    description = ("perplexity of held-out text and accuracy on a two-choice task (PIQA format, --other-task-mc) "
                   "before and after editing; run-level, over a sample of edits (opt-in)")
    protocols = ()

    def __init__(self, text: str | None = None, mc: str | None = None, sample: int = 10,
                 max_paragraphs: int = 120, max_words: int = 48) -> None:
        for name, value in (("sample", sample), ("max_paragraphs", max_paragraphs), ("max_words", max_words)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "max_words" else 2):
                raise ValidationError(f"other_task {name} must be a positive integer"
                                      f"{' of at least 2' if name == 'max_words' else ''}, got {value!r}")
        self.text, self.mc = text, mc
        self.run_sample = sample
        self.max_paragraphs, self.max_words = max_paragraphs, max_words
        self._paragraphs: list[str] | None = None
        self._choices: list[Choice] | None = None

    def configure(self, **options: Any) -> "OtherTask":
        """A copy with ``text`` (file), ``mc`` (file), ``sample``, ``max_paragraphs`` or
        ``max_words`` set; the files are read (and checked) now."""
        known = ("text", "mc", "sample", "max_paragraphs", "max_words")
        bad = sorted(set(options) - set(known))
        if bad:
            raise ValidationError(f"metric 'other_task' has no option {bad[0]!r}; its options: {', '.join(known)}")
        kw = {k: getattr(self, k) if k != "sample" else self.run_sample for k in known}
        kw.update({k: v for k, v in options.items() if v is not None})
        m = OtherTask(**kw)
        m.paragraphs()
        m.choices()
        return m

    def paragraphs(self) -> list[str]:
        if self._paragraphs is None:
            from medit.core.dataset import packaged_path
            path = self.text if self.text is not None else packaged_path(DEFAULT_TEXT)
            self._paragraphs = read_paragraphs(path, self.max_paragraphs, self.max_words)
        return self._paragraphs

    def choices(self) -> list[Choice]:
        if self._choices is None:
            self._choices = read_choices(self.mc) if self.mc is not None else []
        return self._choices

    @staticmethod
    def text_query(paragraph: str) -> TFQuery:
        first, _, rest = paragraph.partition(" ")
        return TFQuery(first, rest)

    def run_queries(self, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        qs: list[Any] = [self.text_query(p) for p in self.paragraphs()]
        qs += [TFQuery(c.prompt, s) for c in self.choices() for s in c.solutions]
        return qs

    def perplexity(self, res: Results) -> float:
        lps = [lp for p in self.paragraphs() for lp in res[self.text_query(p)].logprobs]
        return math.exp(-sum(lps) / len(lps))

    def picks(self, res: Results) -> list[int]:
        return [int(res[TFQuery(c.prompt, c.solutions[1])].mean_logprob > res[TFQuery(c.prompt, c.solutions[0])].mean_logprob)
                for c in self.choices()]

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        if not self.paragraphs() or self.text_query(self.paragraphs()[0]) not in post:
            return {}  # not a sampled case: the run's queries were not scored after its edit
        have_pre = pre is not None and self.text_query(self.paragraphs()[0]) in pre
        out: Values = {"perplexity": {"pre": self.perplexity(pre) if have_pre else None,  # type: ignore[arg-type]
                                      "post": self.perplexity(post)}}
        if self.choices():
            labels = [c.label for c in self.choices()]
            after = self.picks(post)
            before = self.picks(pre) if have_pre else None  # type: ignore[arg-type]

            def acc(p: list[int]) -> float:
                return sum(a == b for a, b in zip(p, labels)) / len(labels)

            out["mc_acc"] = {"pre": None if before is None else acc(before), "post": acc(after)}
            if before is not None:
                out["mc_agreement"] = {"pre": None, "post": sum(a == b for a, b in zip(before, after)) / len(after)}
        return out


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(OtherTask())
