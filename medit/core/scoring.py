"""Batched scoring: teacher-forced target log-probs and greedy generation.

All prompts of a chunk are scored in padded batches, one forward pass per batch. Padding is
built here (right padding for teacher forcing, left padding for generation) so the tokenizer's
own padding side never matters. A target's tokens are the tokens that tokenizing
``prompt + target`` adds after the prompt, so scoring sees exactly the text a user would type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from .errors import ValidationError

if TYPE_CHECKING:
    from .handle import ModelHandle

Transform = Callable[[list[str]], list[str]]


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


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("\u2581", " ").split()).strip(" .,;:!?\"'")


def generation_matches(generated: str, target: str) -> float:
    """``generate`` protocol: 1.0 if the greedy output begins with the target (case/space-normalised)."""
    g, t = normalise(generated), normalise(target)
    return float(bool(t) and (g == t or g.startswith(t + " ") or g.startswith(t) and not g[len(t):len(t) + 1].isalnum()))


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scorer:
    """Scores queries on a handle's model in batches. ``transform`` rewrites prompts first (an
    active edit's :meth:`~medit.core.edit.Edit.transform_prompts`)."""

    def __init__(self, handle: "ModelHandle", batch_size: int = 32) -> None:
        self.handle = handle
        self.tok = handle.tokenizer
        self.batch_size = batch_size
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    # ------------------------------------------------------------------ tokenisation
    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(context ids, target ids) such that context + target == tokenize(prompt + target)."""
        prompt, target = self.handle.adapter.join(prompt, target)
        if self.handle.is_encoder_decoder:
            ctx = self.tok(prompt).input_ids
            tgt = self.tok(target).input_ids
            if tgt and tgt[-1] == self.tok.eos_token_id:
                tgt = tgt[:-1]
        else:
            p = self.tok(prompt).input_ids
            full = self.tok(prompt + target).input_ids
            eos = self.tok.eos_token_id
            if eos is not None and p and full and p[-1] == eos and full[-1] == eos:
                p, full = p[:-1], full[:-1]
            # A merge across the prompt/target boundary moves the split to the last shared token.
            cut = _lcp(p, full)
            ctx, tgt = full[:cut], full[cut:]
        if not tgt:
            raise ValidationError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}; use a non-empty target")
        return list(ctx), list(tgt)

    def target_length(self, prompt: str, target: str) -> int:
        return len(self.encode_pair(prompt, target)[1])

    # ------------------------------------------------------------------ teacher forcing
    @torch.no_grad()
    def teacher_forced(self, queries: Sequence[TFQuery], transform: Transform | None = None) -> list[TFResult]:
        prompts = [q.prompt for q in queries]
        if transform is not None:
            prompts = transform(prompts)
        pairs = [self.encode_pair(p, q.target) for p, q in zip(prompts, queries)]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        results: list[TFResult | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [pairs[i] for i in idx]
            for i, r in zip(idx, self._tf_batch(batch)):
                results[i] = r
        return results  # type: ignore[return-value]

    def selected_logits(self, batch: Sequence[tuple[list[int], list[int]]], last_only: bool = False) -> torch.Tensor:
        """Logits at the positions that predict each target token, stacked: [sum of target lengths, vocab].

        Differentiable (callers choose ``torch.no_grad``). With ``last_only`` every target token is
        predicted from the last prompt position (ROME's FT-L objective) and targets are not fed in.
        """
        dev = self.handle.device
        n = len(batch)
        if self.handle.is_encoder_decoder:
            start = self.handle.config.decoder_start_token_id
            start = self.pad_id if start is None else start
            decs = [[start] if last_only else [start] + t[:-1] for _, t in batch]
            ids, mask = self._pad([c for c, _ in batch])
            dec, dmask = self._pad(decs)
            logits = self.handle.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                       decoder_input_ids=dec.to(dev), decoder_attention_mask=dmask.to(dev)).logits
            cols = [torch.zeros(len(t), dtype=torch.long) if last_only else torch.arange(len(t)) for _, t in batch]
        else:
            seqs = [c if last_only else (c + t)[:-1] for c, t in batch]
            ids, mask = self._pad(seqs)
            logits = self.handle.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            cols = [torch.full((len(t),), len(c) - 1, dtype=torch.long) if last_only
                    else torch.arange(len(c) - 1, len(c) - 1 + len(t)) for c, t in batch]
        rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(cols)])
        return logits[rows.to(logits.device), torch.cat(cols).to(logits.device)]

    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask (positions of real tokens are unaffected)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids, mask

    def target_nll(self, batch: Sequence[tuple[list[int], list[int]]], last_only: bool = False) -> torch.Tensor:
        """Mean negative log-likelihood of the target tokens (differentiable)."""
        sel = self.selected_logits(batch, last_only).float().log_softmax(-1)
        tgt = torch.tensor([t for _, ts in batch for t in ts], device=sel.device)
        return -sel.gather(1, tgt[:, None]).mean()

    def _tf_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[TFResult]:
        sel = self.selected_logits(batch).float().log_softmax(-1)
        tgt = torch.tensor([t for _, ts in batch for t in ts], device=sel.device)
        lp = sel.gather(1, tgt[:, None])[:, 0].cpu().tolist()
        am = sel.argmax(-1).cpu().tolist()
        out, k = [], 0
        for _, ts in batch:
            n = len(ts)
            out.append(TFResult(tuple(ts), tuple(lp[k:k + n]), tuple(am[k:k + n])))
            k += n
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, queries: Sequence[GenQuery], transform: Transform | None = None) -> list[str]:
        prompts = [q.prompt for q in queries]
        if transform is not None:
            prompts = transform(prompts)
        enc = [self.tok(p).input_ids for p in prompts]
        if not self.handle.is_encoder_decoder:
            eos = self.tok.eos_token_id
            enc = [e[:-1] if (eos is not None and len(e) > 1 and e[-1] == eos) else e for e in enc]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        out: list[str] = [""] * len(enc)
        dev = self.handle.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                e = torch.tensor(enc[i])
                if self.handle.is_encoder_decoder:
                    ids[row, :len(e)], mask[row, :len(e)] = e, 1
                else:  # left padding keeps every prompt's last token at the same position
                    ids[row, width - len(e):], mask[row, width - len(e):] = e, 1
            max_new = max(queries[i].max_new_tokens for i in idx)
            gen = self.handle.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                             max_new_tokens=max_new, do_sample=False, num_beams=1,
                                             pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id)
            new = gen if self.handle.is_encoder_decoder else gen[:, width:]
            for row, i in enumerate(idx):
                toks = [t for t in new[row].tolist()][: queries[i].max_new_tokens + (1 if self.handle.is_encoder_decoder else 0)]
                out[i] = self.tok.decode(toks, skip_special_tokens=True)
        return out

    def run(self, queries: Iterable[TFQuery | GenQuery], transform: Transform | None = None) -> dict:
        """Score a mixed, de-duplicated set of queries; returns query -> result."""
        uniq = list(dict.fromkeys(queries))
        tf = [q for q in uniq if isinstance(q, TFQuery)]
        gq = [q for q in uniq if isinstance(q, GenQuery)]
        res: dict = {}
        if tf:
            res.update(zip(tf, self.teacher_forced(tf, transform)))
        if gq:
            res.update(zip(gq, self.generate(gq, transform)))
        return res
