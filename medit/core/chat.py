"""Chat wrapping: every prompt of a request as a user turn of the tokenizer's own chat template.

With ``--chat`` (``chat=True`` in :mod:`medit.api`) the requests are wrapped once, here, before
any method or metric sees them: the edit prompt a weight editor optimises through, rephrasings,
``questions``, locality, portability and attribute prompts all become
``head + user message + tail``, where ``head``/``tail`` are what the template renders around one
user message with the generation prompt added. Targets are then scored as the start of the
assistant turn. A cloze prompt becomes a user message through :attr:`ChatFormat.user`
(``--chat-prompt``, default ``Complete the sentence: {prompt}``); a prompt that is already a
question (it ends with ``?``: zsRE, MQuAKE, the ``questions`` field) is passed as it is.

Code that puts text in front of a prompt (ROME-style context templates, IKE's demonstrations)
calls :func:`prefix`, which puts it inside the user turn of a wrapped prompt; code that compares
prompts by meaning (sentence embeddings) calls :func:`unwrap`. Both recognise the formats built
in this process (:func:`chat_format` registers them), so methods need no chat code of their own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from medit.core.requests import EditRequest, PromptAnswer
from medit.errors import ValidationError

DEFAULT_CHAT_PROMPT = "Complete the sentence: {prompt}"
_SENTINEL = "\x00MEDIT-USER-MESSAGE\x00"
#: formats built in this process, by (head, tail); :func:`prefix` and :func:`unwrap` consult them.
_FORMATS: dict[tuple[str, str], "ChatFormat"] = {}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template reduced to the text around one user message (``head`` ... ``tail``) and the
    run option turning a cloze prompt into that message (``user``, with ``{prompt}``)."""

    head: str
    tail: str
    user: str = DEFAULT_CHAT_PROMPT
    #: SHA-256 of the tokenizer's template text, for the run manifest.
    template_sha256: str = ""

    def message(self, prompt: str) -> str:
        """The user message for ``prompt``: a question as it is, a cloze prompt through ``user``."""
        return prompt if is_question(prompt) else self.user.replace("{prompt}", prompt)

    def wrap(self, prompt: str) -> str:
        """``prompt`` as a user turn followed by the start of the assistant turn."""
        if self.split(prompt) is not None:  # already wrapped (a request wrapped twice stays the same)
            return prompt
        return self.head + self.message(prompt) + self.tail

    def split(self, text: str) -> str | None:
        """The user message inside a text this format wrapped, else None."""
        if text.startswith(self.head) and text.endswith(self.tail) and len(text) >= len(self.head) + len(self.tail):
            return text[len(self.head):len(text) - len(self.tail)]
        return None

    def original(self, message: str) -> str:
        """The prompt a user message was made from (the ``user`` wrapper removed)."""
        pre, _, post = self.user.partition("{prompt}")
        if message.startswith(pre) and message.endswith(post) and len(message) >= len(pre) + len(post):
            return message[len(pre):len(message) - len(post)]
        return message

    def record(self) -> dict[str, Any]:
        """What a run manifest records: the template's hash, the text around the user message and
        the wrapper."""
        return {"template_sha256": self.template_sha256, "head": self.head, "tail": self.tail,
                "chat_prompt": self.user}


def is_question(prompt: str) -> bool:
    """A prompt written as a question (passed to a chat model as it is)."""
    return prompt.rstrip().endswith("?")


def chat_format(tokenizer: Any, user: str = DEFAULT_CHAT_PROMPT, model_id: str = "") -> ChatFormat:
    """The :class:`ChatFormat` of ``tokenizer``'s chat template; a tokenizer without one, or a
    ``user`` wrapper without ``{prompt}``, is a one-line error."""
    if "{prompt}" not in user:
        raise ValidationError(f"--chat-prompt {user!r} has no {{prompt}} placeholder; write e.g. "
                              f"--chat-prompt {DEFAULT_CHAT_PROMPT!r}")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = model_id or type(tokenizer).__name__
        raise ValidationError(f"the tokenizer of {name} has no chat template, so --chat cannot wrap prompts as "
                              "chat turns; drop --chat (or chat=True) for this base model, or use an instruct model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if not isinstance(text, str) or text.count(_SENTINEL) != 1:
        raise ValidationError(f"the chat template of {model_id or 'this tokenizer'} does not render a user "
                              "message once; drop --chat for this model")
    head, tail = text.split(_SENTINEL)
    bos = getattr(tokenizer, "bos_token", None) or ""
    # A tokenizer that puts BOS in front by itself would read the template's own BOS twice.
    if bos and head.startswith(bos) and _adds_bos(tokenizer):
        head = head[len(bos):]
    sha = hashlib.sha256(template.encode() if isinstance(template, str) else repr(template).encode()).hexdigest()
    fmt = ChatFormat(head, tail, user, sha)
    _FORMATS.setdefault((head, tail), fmt)
    return fmt


def _adds_bos(tokenizer: Any) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("x").input_ids
    return bool(ids) and ids[0] == bos_id


def _format_of(text: str) -> ChatFormat | None:
    for fmt in _FORMATS.values():
        if fmt.split(text) is not None:
            return fmt
    return None


def prefix(text: str, prompt: str) -> str:
    """``text`` put in front of ``prompt``; inside the user turn when ``prompt`` is chat-wrapped
    (the subject keeps its offset from the end of the prompt, so offsets shift by ``len(text)``)."""
    fmt = _format_of(prompt)
    if fmt is None:
        return text + prompt
    return fmt.head + text + prompt[len(fmt.head):]


def unwrap(text: str) -> str:
    """The prompt a chat-wrapped ``text`` was made from (``text`` itself when not wrapped)."""
    fmt = _format_of(text)
    if fmt is None:
        return text
    message = fmt.split(text)
    assert message is not None
    return fmt.original(message)


def wrap_request(req: EditRequest, fmt: ChatFormat) -> EditRequest:
    """``req`` with every prompt wrapped as a user turn; its ``questions`` join the rephrasings
    (they are scored like them under ``--chat``). Targets and the case id are unchanged."""
    def pas(items: tuple[PromptAnswer, ...]) -> tuple[PromptAnswer, ...]:
        return tuple(PromptAnswer(fmt.wrap(x.prompt), x.answer) for x in items)
    # a question that is the prompt or a rephrasing already (zsRE's) is not scored twice
    rephrase = tuple(fmt.wrap(p) for p in dict.fromkeys((*req.rephrase, *req.questions)) if p != req.prompt)
    return replace(req, prompt=fmt.wrap(req.prompt), rephrase=rephrase, questions=(),
                   locality=pas(req.locality), portability=pas(req.portability), attribute=pas(req.attribute),
                   generation_prompts=tuple(fmt.wrap(p) for p in req.generation_prompts))
