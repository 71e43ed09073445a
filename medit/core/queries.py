"""What metrics ask the scoring engines for, and what they get back: teacher-forced target
scores, next-token distributions and greedy generations. Importing this module does not import
torch (a :class:`NextToken` holds a tensor, built by the engines)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

Transform = Callable[[list[str]], list[str]]
#: ``progress(done, total)``: work units finished so far out of ``total`` (called after each batch).
Progress = Callable[[float, float], None]
#: log-probs are stored in float16; values are clamped above its lowest finite number.
F16_FLOOR = -6.0e4


@dataclass(frozen=True)
class TFQuery:
    """Teacher-forced scoring of ``target`` after ``prompt``."""

    prompt: str
    target: str


@dataclass(frozen=True)
class GenQuery:
    """Greedy generation of at most ``max_new_tokens`` tokens from ``prompt`` alone."""

    prompt: str
    max_new_tokens: int = 8


@dataclass(frozen=True)
class DistQuery:
    """The next-token distribution after ``prompt`` (its last position; for an encoder-decoder
    model, the first decoder step)."""

    prompt: str


@dataclass(frozen=True)
class TFResult:
    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    argmax: tuple[int, ...]

    @property
    def token_acc(self) -> float:
        return sum(a == t for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)

    @property
    def exact(self) -> float:
        return float(all(a == t for a, t in zip(self.argmax, self.target_ids)))

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)


class RowSource(Protocol):
    """Where stored distributions live (:class:`medit.scoring.dists.DistFile`)."""

    def row(self, i: int) -> "torch.Tensor": ...


class NextToken:
    """A next-token distribution as float16 log-probabilities on the CPU (98 KB for a 49k
    vocabulary): held in memory, or row ``row`` of a file (``source``) read each time it is asked
    for, so the pre-edit distributions of a long run need not all be in memory."""

    __slots__ = ("_held", "_source", "_row")

    def __init__(self, logprobs: "torch.Tensor | None" = None, *, source: RowSource | None = None,
                 row: int = 0) -> None:
        if (logprobs is None) == (source is None):
            raise ValueError("a NextToken holds its log-probs or names a source row, not both or neither")
        self._held = logprobs
        self._source = source
        self._row = row

    @property
    def logprobs(self) -> "torch.Tensor":
        if self._held is not None:
            return self._held
        assert self._source is not None
        return self._source.row(self._row)

    def __repr__(self) -> str:
        return "NextToken(held)" if self._held is not None else f"NextToken(row {self._row})"

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "NextToken":
        import torch
        lp = logits.float().log_softmax(-1).clamp_min(F16_FLOOR)
        return cls(lp.to(torch.float16).cpu())


def kl_per_row(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ other) of each row of two log-probability tensors [..., vocab] -> [...]."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def kl_divergence(p: NextToken, q: NextToken) -> float:
    """KL(p || q) in nats, computed in float64 from the stored (float16) log-probs.

    Both distributions are renormalised after the float16 rounding, so identical inputs give
    exactly 0 and the rounding error of the stored values stays around 1e-4 nats.
    """
    if p.logprobs.shape != q.logprobs.shape:
        raise ValueError(f"distributions over different vocabularies: {tuple(p.logprobs.shape)} vs "
                         f"{tuple(q.logprobs.shape)}")
    lp = p.logprobs.double()
    lq = q.logprobs.double()
    lp = lp - lp.logsumexp(-1)
    lq = lq - lq.logsumexp(-1)
    return max(0.0, float(kl_per_row(lp, lq).sum()))


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("\u2581", " ").split()).strip(" .,;:!?\"'")


def generation_matches(generated: str, target: str) -> float:
    """``generate`` protocol: 1.0 if the greedy output begins with the target (case/space-normalised)."""
    g, t = normalise(generated), normalise(target)
    return float(bool(t) and (g == t or g.startswith(t + " ") or g.startswith(t) and not g[len(t):len(t) + 1].isalnum()))


_ARTICLES = frozenset(("a", "an", "the"))


def normalise_answer(text: str) -> str:
    """``answer`` protocol normalisation: lower case, punctuation to spaces, articles dropped
    ("The United Kingdom." and "united kingdom" are equal)."""
    chars = "".join(c if c.isalnum() else " " for c in text.lower().replace("\u2581", " "))
    return " ".join(w for w in chars.split() if w not in _ARTICLES)


def first_sentence(text: str) -> str:
    """A generated answer up to the end of its first sentence or line (generation already stops at
    the end of the turn): ``.``, ``!`` or ``?`` followed by a space, or a newline after some text."""
    text = text.lstrip()
    cut = len(text)
    for i, c in enumerate(text):
        if c == "\n" and text[:i].strip():
            cut = i
            break
        if c in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            cut = i + 1
            break
    return text[:cut]


def answer_matches(answer: str, target: str, old: str | None = None) -> float:
    """``answer`` protocol: 1.0 when the normalised ``target`` appears (as whole words) in the
    first sentence of ``answer`` and the normalised ``old`` answer does not (outside the target
    itself, so an old answer that is part of the new one does not count against it)."""
    a, t = normalise_answer(first_sentence(answer)), normalise_answer(target)
    if not t or f" {t} " not in f" {a} ":
        return 0.0
    o = normalise_answer(old) if old else ""
    if o and o != t and f" {o} " in f" {a} ".replace(f" {t} ", " | "):
        return 0.0
    return 1.0
