"""The edit request: one fact to change, plus the prompts used to evaluate the change."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

from medit.errors import ValidationError

#: The fields of a medit JSONL record.
FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "rephrase", "locality",
          "portability", "generation_prompts", "attribute", "questions")


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt and the answer expected after it (``answer`` may be empty when unknown)."""

    prompt: str
    answer: str = ""


@dataclass(frozen=True)
class EditRequest:
    """One edit: make the model complete ``prompt`` (which contains ``subject``) with ``target_new``.

    ``rephrase`` prompts measure generalization, ``locality`` prompts what must not change,
    ``portability`` prompts the consequences of the edit. Two optional fields come from ROME's
    CounterFact layout: ``generation_prompts`` (open-ended prompts about the subject, used by the
    ``fluency`` metric). ``attribute`` holds prompts about the edited subject's *other* relations,
    each answered with its true answer (the ``attribute`` metric checks they keep it; KnowEdit's
    ``Relation_Specificity`` prompts, or other records of the subject, see
    :mod:`medit.plugins.metrics.attribute`). Validated on construction.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()
    case_id: str = "0"
    where: str = ""  # where the record came from (file:line), for error messages only
    generation_prompts: tuple[str, ...] = ()
    attribute: tuple[PromptAnswer, ...] = ()
    #: the fact asked as questions ("What is the mother tongue of Danielle Darrieux?"); with
    #: ``--chat`` they are scored like rephrasings (see :mod:`medit.core.chat`).
    questions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        origin = f"case {self.case_id!r}" + (f" ({self.where})" if self.where else "")
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"{origin}: field {name!r} must be a non-empty string, got {value!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise ValidationError(f"{origin}: field 'target_true' must be a string, got {self.target_true!r}")
        if self.subject not in self.prompt:
            raise ValidationError(f"{origin}: subject {self.subject!r} does not occur in prompt "
                                  f"{self.prompt!r}; put the subject verbatim into the prompt")
        for name in ("rephrase", "generation_prompts", "questions"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(x, str) for x in value):
                raise ValidationError(f"{origin}: field {name!r} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "locality", tuple(_pa(x, origin, "locality") for x in self.locality))
        object.__setattr__(self, "portability", tuple(_pa(x, origin, "portability") for x in self.portability))
        object.__setattr__(self, "attribute", tuple(_pa(x, origin, "attribute") for x in self.attribute))

    def to_dict(self) -> dict[str, Any]:
        """The medit JSONL representation (the optional ``generation_prompts``, ``attribute`` and
        ``questions`` only when non-empty)."""
        d = asdict(self)
        d.pop("where")
        d["rephrase"] = list(self.rephrase)
        d["locality"] = [asdict(x) for x in self.locality]
        d["portability"] = [asdict(x) for x in self.portability]
        d["generation_prompts"] = list(self.generation_prompts)
        d["attribute"] = [asdict(x) for x in self.attribute]
        d["questions"] = list(self.questions)
        for key in ("generation_prompts", "attribute", "questions"):
            if not d[key]:
                d.pop(key)
        if d["target_true"] is None:
            d.pop("target_true")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_id: str = "0", where: str = "") -> "EditRequest":
        """Build from a medit JSONL record; unknown keys are rejected."""
        allowed = set(FIELDS)
        case_id = str(d.get("case_id", default_id))
        extra = sorted(set(d) - allowed)
        if extra:
            raise ValidationError(f"case {case_id!r} ({where}): unknown field(s) {', '.join(extra)}; "
                                  f"valid fields: {', '.join(sorted(allowed))}")
        rephrase = d.get("rephrase") or ()
        if isinstance(rephrase, str):
            rephrase = (rephrase,)
        generation = d.get("generation_prompts") or ()
        if isinstance(generation, str):
            generation = (generation,)
        questions = d.get("questions") or ()
        if isinstance(questions, str):
            questions = (questions,)
        # the fields' types are checked by __post_init__, which names the case and the field
        return cls(prompt=cast(str, d.get("prompt")), subject=cast(str, d.get("subject")),
                   target_new=cast(str, d.get("target_new")),
                   target_true=d.get("target_true"), rephrase=tuple(rephrase),
                   locality=tuple(d.get("locality") or ()), portability=tuple(d.get("portability") or ()),
                   case_id=case_id, where=where, generation_prompts=tuple(generation),
                   attribute=tuple(d.get("attribute") or ()), questions=tuple(questions))


def _pa(x: Any, origin: str, field_name: str) -> PromptAnswer:
    if isinstance(x, PromptAnswer):
        return x
    if isinstance(x, str):
        return PromptAnswer(x, "")
    if isinstance(x, dict) and isinstance(x.get("prompt"), str):
        ans = x.get("answer", "")
        if isinstance(ans, list):
            ans = ans[0] if ans else ""
        return PromptAnswer(x["prompt"], str(ans or ""))
    raise ValidationError(f"{origin}: each {field_name!r} item must be {{'prompt': str, 'answer': str}}, got {x!r}")
