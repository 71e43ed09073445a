"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

The weights never change: every prompt scored while the edit is active is prefixed with k
demonstrations and the new fact. Demonstrations come from a pool of edit cases (default: the
first 2,000 cases of the CounterFact train split, shipped in the package) in three kinds, each
written ``New Fact: <fact>\\nPrompt: <prompt> <answer>``:
*copy* (the fact's own prompt answered with its new target), *update* (a paraphrase answered with
the new target) and *retain* (an unrelated prompt answered with its unchanged answer). The k
demonstrations whose text is closest to the new fact (all-MiniLM-L6-v2 cosine similarity) are
used, the closest last. Pool embeddings are computed once and cached on disk.

With several facts in one edit, each prompt gets the context of the fact closest to it. A prompt
whose similarity to every edited fact is below ``scope_threshold`` is left unchanged (an
in-scope test in the manner of SERAC's classifier). The paper puts the context in front of every
prompt (``scope_threshold: null``), which on SmolLM2 changed 80% of unrelated answers.

With ``--chat`` the prompts arrive wrapped as chat turns (:mod:`medit.core.chat`): the context goes
inside the user turn, and facts and scope tests use the prompts the turns wrap.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import medit
from medit.core.chat import prefix, unwrap
from medit.core.dataset import COUNTERFACT_TRAIN, load_dataset, resolve_packaged_spec
from medit.core.edit import Edit, patch_requests
from medit.toolkit.embeddings import embed
from medit.errors import ValidationError, HParamsError, PatchError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.plugins.methods.ike import DESCRIPTION
from medit.core.timing import setup_phase
from medit.model.guards import context_limit

DEFAULT_POOL = COUNTERFACT_TRAIN


@dataclass
class IKEHParams(HParams):
    """Hyperparameters of IKE."""

    #: number of demonstrations before the new fact.
    k: int = 16
    #: demonstration pool: a dataset spec (``FORMAT:PATH``); relative paths are tried from the
    #: working directory, then from the folder holding the medit package.
    pool: str = DEFAULT_POOL
    #: pool cases used (the first ones of the file).
    pool_size: int = 2000
    #: prompts less similar than this to every edited fact are left unchanged; null: never (the
    #: paper's setting). 0.65 was chosen on the first 300 CounterFact *train* cases: 2.0% of
    #: neighbourhood prompts and 72.7% of paraphrases (100% of the edit prompts) pass it.
    scope_threshold: float | None = 0.65

    def __post_init__(self) -> None:
        if self.k < 0:
            raise HParamsError(f"hparam 'k' must be >= 0, got {self.k}")
        if self.pool_size < 1:
            raise HParamsError(f"hparam 'pool_size' must be >= 1, got {self.pool_size}")
        if self.scope_threshold is not None and not -1 <= self.scope_threshold <= 1:
            raise HParamsError(f"hparam 'scope_threshold' must be a cosine similarity in [-1, 1] or null, "
                               f"got {self.scope_threshold}")


def fact(req: EditRequest) -> str:
    return f"{unwrap(req.prompt)} {req.target_new}"


def demo(new_fact: str, prompt: str, answer: str) -> str:
    return f"New Fact: {new_fact}\nPrompt: {prompt} {answer}\n\n"


def pool_demos(hp: IKEHParams) -> list[str]:
    """Copy, update and retain demonstrations of the first ``pool_size`` pool cases."""
    reqs, _ = load_dataset(resolve_packaged_spec(hp.pool, "IKE demonstration pool", "pool"), n=hp.pool_size)
    out = []
    for r in reqs:
        f = fact(r)
        out.append(demo(f, r.prompt, r.target_new))
        out += [demo(f, p, r.target_new) for p in r.rephrase[:1]]
        out += [demo(f, loc.prompt, loc.answer) for loc in r.locality[:1] if loc.answer]
    return out


def fit_context(handle: ModelHandle, req: EditRequest, demos: list[str], tail: str) -> tuple[str, int]:
    """``demos`` (least similar first) + ``tail``, leaving out the least similar demonstrations
    until the longest prompt + answer of ``req`` fits the model's context after it. Returns the
    context and how many demonstrations were left out; a fact that does not fit even alone is a
    one-line error."""
    limit = context_limit(handle)
    tok = handle.tokenizer
    texts = [req.prompt + " " + req.target_new, *req.rephrase,
             *(f"{x.prompt} {x.answer or ''}" for x in (*req.locality, *req.portability))]
    longest = max(len(tok(t + "\nPrompt: ").input_ids) for t in texts)
    for start in range(len(demos) + 1):
        context = "".join(demos[start:]) + tail
        if len(tok(context).input_ids) + longest <= limit:
            return context, start
    raise ValidationError(f"case {req.case_id!r}: IKE's fact and prompts alone take more than the "
                          f"{limit} tokens {handle.model_id} reads; shorten the case or use a weight-editing method")


class IKEEdit(Edit):
    """Facts with their demonstration contexts; :meth:`transform_prompts` puts them in front."""

    kind = "in-context"

    def __init__(self, handle: ModelHandle, method: str, requests: Sequence[EditRequest],
                 hparams: dict[str, Any], contexts: list[str]) -> None:
        super().__init__(handle, method, requests, hparams)
        self.contexts = contexts
        self.facts = [fact(r) for r in requests]
        self.threshold = hparams.get("scope_threshold")
        self._fact_emb: torch.Tensor | None = None

    def _choose(self, prompts: list[str]) -> list[int]:
        """Per prompt: the index of the fact whose context it gets, or -1 for none."""
        if len(self.facts) == 1 and self.threshold is None:
            return [0] * len(prompts)
        if self._fact_emb is None:
            self._fact_emb = embed(self.facts)
        sims = embed(prompts) @ self._fact_emb.T
        best, idx = sims.max(dim=1)
        own = {r.prompt: i for i, r in enumerate(self.requests)}  # an edit's own prompt is always in scope
        return [own[p] if p in own else int(i) if self.threshold is None or float(b) >= self.threshold else -1
                for p, b, i in zip(prompts, best, idx)]

    def wrap(self, context: str, prompt: str) -> str:
        return prefix(f"{context}Prompt: ", prompt)

    def transform_prompts(self, prompts: list[str]) -> list[str]:
        if not self.active:
            return prompts
        picks = self._choose(prompts)
        return [p if i < 0 else self.wrap(self.contexts[i], p) for p, i in zip(prompts, picks)]

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"facts": self.facts, "contexts": self.contexts,
                "note": "in-context edit: the facts and their demonstrations; no weights are stored or changed"}, {}

    @classmethod
    def from_payload(cls, handle: ModelHandle, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "IKEEdit":
        contexts = manifest.get("contexts")
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise PatchError("IKE patch manifest has no list of 'contexts'; re-create the patch with medit edit --save-patch")
        return cls(handle, manifest["method"], patch_requests(manifest), manifest.get("hparams", {}), contexts)


class IKE(Method[IKEHParams]):
    name = "ike"
    description = DESCRIPTION
    hparams_class = IKEHParams
    modes = ("single", "batch")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "ike"

    def _pool(self, hp: IKEHParams) -> tuple[list[str], torch.Tensor]:
        key = (hp.pool, hp.pool_size)
        cache = getattr(self, "_pools", None)
        if cache is None:
            cache = self._pools = {}
        if key not in cache:
            with setup_phase("pool"):  # built once per pool, reused by every later edit
                demos = pool_demos(hp)
                cache[key] = (demos, embed(demos))
        return cache[key]

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: IKEHParams) -> Edit:
        hp = hparams
        contexts = []
        if hp.k:
            demos, emb = self._pool(hp)
            q = embed([fact(r) for r in requests])
            top = (q @ emb.T).topk(min(hp.k, len(demos)), dim=1).indices
        dropped = 0
        for i, r in enumerate(requests):
            chosen = [demos[j] for j in reversed(top[i].tolist())] if hp.k else []
            context, n_dropped = fit_context(handle, r, chosen, f"New Fact: {fact(r)}\n")
            contexts.append(context)
            dropped += n_dropped
        edit = IKEEdit(handle, self.name, requests, hp.to_dict(), contexts)
        edit.info["demos_dropped"] = dropped
        edit.info["context_chars"] = sum(map(len, contexts)) / len(contexts)
        return edit
