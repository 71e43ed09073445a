"""Batched scoring: teacher-forced target log-probs, next-token distributions and greedy generation.

All prompts of a chunk are scored in padded batches, one forward pass per batch, shortest first so
that a batch holds sequences of similar length (little padding). Padding is built here (right
padding for teacher forcing, left padding for generation) so the tokenizer's own padding side never
matters. A target's tokens are the tokens that tokenizing ``prompt + target`` adds after the
prompt, so scoring sees exactly the text a user would type. The LM head is applied only at the
positions whose predictions are read (a 49k-token head on every position would cost a fifth of a
small model's forward pass).

For an unhooked causal model the work goes to :mod:`medit.scoring.cached` instead, which runs each
distinct prompt once over a key/value cache and continues every query (targets, next-token
distributions, greedy generation) from it; :attr:`Scorer.engine` says which engine runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from medit.errors import ValidationError
from medit.core.queries import (F16_FLOOR, DistQuery, GenQuery, NextToken, Progress, TFQuery,
                                 TFResult, Transform)
from medit.model.tracing import foreign_hooks

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.scoring.dists import DistFile

def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Row:
    """One forward-pass row: the tokens fed (causal) or the decoder input (encoder-decoder, with
    ``enc`` the encoder input), and the positions whose predictions are read."""

    fed: list[int]
    enc: list[int] | None = None
    cols: set[int] = field(default_factory=set)

    @property
    def cost(self) -> int:
        return len(self.fed) + (len(self.enc) if self.enc is not None else 0)


@dataclass
class _Job:
    """What one TF or distribution query reads from its row: ``n`` predictions from ``col`` on
    (scored against ``tgt`` when given)."""

    row: int
    col: int
    n: int
    tgt: list[int]


class Scorer:
    """Scores queries on a handle's model in batches. ``transform`` rewrites prompts first (an
    active edit's :meth:`~medit.core.edit.Edit.transform_prompts`)."""

    def __init__(self, handle: "ModelHandle", batch_size: int = 64, use_cache: bool = True) -> None:
        self.handle = handle
        self.tok = handle.tokenizer
        self.batch_size = max(1, int(batch_size))
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.use_cache = use_cache
        #: where next-token distributions go: memory, or a file while :meth:`dists_in` is active.
        self._dist_file: "DistFile | None" = None

    @contextlib.contextmanager
    def dists_in(self, store: "DistFile") -> Iterator["DistFile"]:
        """Within the block, next-token distributions are written to ``store`` as they are
        computed and the results name their rows (a long run's pre-edit scores, see
        :mod:`medit.scoring.dists`)."""
        old, self._dist_file = self._dist_file, store
        try:
            yield store
        finally:
            self._dist_file = old

    def keep_dist(self, logprobs: torch.Tensor) -> NextToken:
        """A computed next-token distribution [vocab] as the results hold it (float16, CPU)."""
        lp = logprobs.clamp_min(F16_FLOOR).to(torch.float16)
        return NextToken(lp.cpu()) if self._dist_file is None else self._dist_file.append(lp)

    @property
    def engine(self) -> str:
        """``"cached"`` when each prompt can be run once over a key/value cache
        (:mod:`medit.scoring.cached`), else ``"full"`` (whole-sequence passes, HF generate).

        The cached engine needs a causal model with no hook anywhere: an edit that hooks a module
        may decide from the whole sequence, which an incremental step would not show it.
        """
        if not self.use_cache or self.handle.is_encoder_decoder:
            return "full"
        from torch.nn.modules import module as nn_module
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return "full"
        hooked = any(foreign_hooks(m) for m in self.handle.model.modules())
        return "full" if hooked else "cached"

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

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids as the model reads them (a causal tokenizer's trailing EOS dropped)."""
        ids = list(self.tok(prompt).input_ids)
        if not self.handle.is_encoder_decoder:
            eos = self.tok.eos_token_id
            if eos is not None and len(ids) > 1 and ids[-1] == eos:
                ids = ids[:-1]
        return ids

    def target_length(self, prompt: str, target: str) -> int:
        return len(self.encode_pair(prompt, target)[1])

    # ------------------------------------------------------------------ teacher forcing
    def teacher_forced(self, queries: Sequence[TFQuery], transform: Transform | None = None) -> list[TFResult]:
        res = self.run(queries, transform)
        return [res[q] for q in queries]

    def next_token(self, queries: Sequence[DistQuery], transform: Transform | None = None) -> list[NextToken]:
        res = self.run(queries, transform)
        return [res[q] for q in queries]

    def selected_logits(self, batch: Sequence[tuple[list[int], list[int]]], last_only: bool = False) -> torch.Tensor:
        """Logits at the positions that predict each target token, stacked: [sum of target lengths, vocab].

        Differentiable (callers choose ``torch.no_grad``). With ``last_only`` every target token is
        predicted from the last prompt position (ROME's FT-L objective) and targets are not fed in.
        """
        dev = self.handle.device
        if self.handle.is_encoder_decoder:
            start = self._decoder_start()
            decs = [[start] if last_only else [start] + t[:-1] for _, t in batch]
            ids, mask = self.pad([c for c, _ in batch])
            dec, dmask = self.pad(decs)
            kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                  "decoder_input_ids": dec.to(dev), "decoder_attention_mask": dmask.to(dev)}
            cols = [torch.zeros(len(t), dtype=torch.long) if last_only else torch.arange(len(t)) for _, t in batch]
        else:
            seqs = [c if last_only else (c + t)[:-1] for c, t in batch]
            ids, mask = self.pad(seqs)
            kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
            cols = [torch.full((len(t),), len(c) - 1, dtype=torch.long) if last_only
                    else torch.arange(len(c) - 1, len(c) - 1 + len(t)) for c, t in batch]
        rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(cols)]).to(dev)
        at = torch.cat(cols).to(dev)
        # the head only at the target positions: a batch's full [batch, length, vocab] logits and
        # their gradient would be most of an edit's memory (~0.8 GB for 100 prompts on SmolLM2)
        with self.head_at(rows, at) as picked:
            logits = self.handle.model(**kw, use_cache=False).logits
        return logits if picked else logits[rows, at]

    def _decoder_start(self) -> int:
        start = self.handle.config.decoder_start_token_id
        return self.pad_id if start is None else int(start)

    def pad(self, seqs: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and attention mask: right-padded (positions of real tokens are unaffected),
        or ``left``-padded (every sequence ends in the last column, as generation needs)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask

    def target_nll(self, batch: Sequence[tuple[list[int], list[int]]], last_only: bool = False) -> torch.Tensor:
        """Mean negative log-likelihood of the target tokens (differentiable)."""
        sel = self.selected_logits(batch, last_only).float().log_softmax(-1)
        tgt = torch.tensor([t for _, ts in batch for t in ts], device=sel.device)
        return -sel.gather(1, tgt[:, None]).mean()

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[TFResult]:
        """Teacher-forced results for already tokenized (context, target) pairs, in one batch."""
        rows, jobs = [], []
        for c, t in pairs:
            if self.handle.is_encoder_decoder:
                rows.append(_Row([self._decoder_start()] + list(t[:-1]), list(c), set(range(len(t)))))
                jobs.append(_Job(len(rows) - 1, 0, len(t), list(t)))
            else:
                rows.append(_Row(list(c) + list(t[:-1]), None, set(range(len(c) - 1, len(c) - 1 + len(t)))))
                jobs.append(_Job(len(rows) - 1, len(c) - 1, len(t), list(t)))
        with torch.inference_mode():
            lps = self._forward(rows)
            return [self._read(j, j.row, lps) for j in jobs]  # type: ignore[misc]

    _tf_batch = score_pairs  # the name the example plugin (and older plugins) call

    @contextlib.contextmanager
    def head_at(self, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
        """Apply the LM head only at (rows, cols) of its input during the forward pass.

        Yields False (and does nothing) when another hook already sits on the head: an edit that
        wraps the head must see the whole sequence, as it would without this optimisation.
        """
        head = self.handle.module("lm_head")
        if head._forward_hooks or head._forward_pre_hooks:
            yield False
            return

        def pick(mod: torch.nn.Module, args: tuple) -> tuple:
            return (args[0][rows, cols],) + tuple(args[1:])

        h = head.register_forward_pre_hook(pick)
        try:
            yield True
        finally:
            h.remove()

    def _forward(self, batch: Sequence[_Row]) -> dict[tuple[int, int], torch.Tensor]:
        """One forward pass over ``batch``: log-probs [vocab] at each read (row in batch, column)."""
        dev = self.handle.device
        if self.handle.is_encoder_decoder:
            ids, mask = self.pad([r.enc or [] for r in batch])
            dec, dmask = self.pad([r.fed for r in batch])
            kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                  "decoder_input_ids": dec.to(dev), "decoder_attention_mask": dmask.to(dev)}
        else:
            ids, mask = self.pad([r.fed for r in batch])
            kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        reads = [(i, c) for i, r in enumerate(batch) for c in sorted(r.cols)]
        rows = torch.tensor([i for i, _ in reads], dtype=torch.long, device=dev)
        cols = torch.tensor([c for _, c in reads], dtype=torch.long, device=dev)
        with self.head_at(rows, cols) as picked:
            logits = self.handle.model(**kw, use_cache=False).logits
        if not picked:
            logits = logits[rows, cols]
        lp = logits.float().log_softmax(-1)
        return {rc: lp[k] for k, rc in enumerate(reads)}

    def _read(self, job: _Job, b: int, lps: dict[tuple[int, int], torch.Tensor]) -> TFResult | NextToken:
        if not job.tgt:
            return self.keep_dist(lps[(b, job.col)])
        sel = torch.stack([lps[(b, c)] for c in range(job.col, job.col + job.n)])
        tgt = torch.tensor(job.tgt, device=sel.device)
        return TFResult(tuple(job.tgt), tuple(sel.gather(1, tgt[:, None])[:, 0].tolist()),
                        tuple(sel.argmax(-1).tolist()))

    # ------------------------------------------------------------------ generation
    def generate(self, queries: Sequence[GenQuery], transform: Transform | None = None,
                 progress: Progress | None = None) -> list[str]:
        prompts = [q.prompt for q in queries]
        if transform is not None:
            prompts = transform(prompts)
        enc = [self.encode_prompt(p) for p in prompts]
        if self.engine == "cached":
            from medit.scoring.cached import CachedRunner
            _, _, toks = CachedRunner(self).run([], [], [(e, q.max_new_tokens) for e, q in zip(enc, queries)],
                                                progress)
            return [self.tok.decode(t, skip_special_tokens=True) for t in toks]
        out: list[str] = [""] * len(enc)
        finished = 0
        # Batches group equal token limits, so a short query never decodes as long as a long one.
        for idx in self._batches(list(range(len(enc))), lambda i: (queries[i].max_new_tokens, len(enc[i]))):
            for i, text in zip(idx, self._gen_batch([enc[i] for i in idx], [queries[i].max_new_tokens for i in idx])):
                out[i] = text
            finished += len(idx)
            if progress is not None:
                progress(finished, len(enc))
        return out

    @torch.inference_mode()
    def _gen_batch(self, enc: list[list[int]], max_new: list[int]) -> list[str]:
        dev = self.handle.device
        # a causal prompt is left-padded so that every prompt's last token is in the same column
        ids, mask = self.pad(enc, left=not self.handle.is_encoder_decoder)
        width = ids.shape[1]
        # generate() hands the head the last position as a strided view, which PyTorch multiplies
        # as one product per sequence; a contiguous copy makes it one matrix product.
        head = self.handle.module("lm_head")
        contiguous = head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(),) + tuple(args[1:]))
        try:
            gen = self.handle.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                             max_new_tokens=max(max_new), do_sample=False, num_beams=1,
                                             pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id)
        finally:
            contiguous.remove()
        new = gen if self.handle.is_encoder_decoder else gen[:, width:]
        extra = 1 if self.handle.is_encoder_decoder else 0  # the decoder start token
        return [self.tok.decode(new[row].tolist()[: m + extra], skip_special_tokens=True)
                for row, m in enumerate(max_new)]

    def _run_cached(self, tf: list[TFQuery], dq: list[DistQuery], gq: list[GenQuery],
                    prompts: Callable[[Sequence[Any]], list[str]], progress: Progress | None) -> dict:
        from medit.scoring.cached import CachedRunner
        tf_jobs = [self.encode_pair(p, q.target) for p, q in zip(prompts(tf), tf)]
        dist_jobs = [self.encode_prompt(p) for p in prompts(dq)]
        gen_jobs = [(self.encode_prompt(p), q.max_new_tokens) for p, q in zip(prompts(gq), gq)]
        tf_res, dist_res, toks = CachedRunner(self).run(tf_jobs, dist_jobs, gen_jobs, progress)
        res: dict = dict(zip(tf, tf_res))
        res.update(zip(dq, dist_res))
        res.update(zip(gq, (self.tok.decode(t, skip_special_tokens=True) for t in toks)))
        return res

    # ------------------------------------------------------------------ batching
    def _batches(self, items: list[int], length: Callable[[int], Any],
                 reads: Callable[[int], int] | None = None) -> Iterator[list[int]]:
        """Items sorted by length (ties keep their order), cut into batches of ``batch_size``
        and, with ``reads``, of at most :data:`~medit.scoring.cached.MAX_READS` read positions
        (an item with more goes alone)."""
        from medit.scoring.cached import cap_reads
        yield from cap_reads(sorted(items, key=length), reads or (lambda i: 0), self.batch_size)

    def run(self, queries: Iterable[Any], transform: Transform | None = None,
            progress: Progress | None = None) -> dict:
        """Score a mixed, de-duplicated set of TF/Dist/Gen queries; returns query -> result.

        Teacher-forced and distribution queries share forward passes wherever one's input is a
        prefix of another's; ``progress(done, total)`` is called after every batch.
        """
        uniq = list(dict.fromkeys(queries))
        tf = [q for q in uniq if isinstance(q, TFQuery)]
        dq = [q for q in uniq if isinstance(q, DistQuery)]
        gq = [q for q in uniq if isinstance(q, GenQuery)]
        bad = [q for q in uniq if not isinstance(q, (TFQuery, DistQuery, GenQuery))]
        if bad:
            raise TypeError(f"cannot score {bad[0]!r}: not a TFQuery, DistQuery or GenQuery")

        def prompts(qs: Sequence[Any]) -> list[str]:
            ps = [q.prompt for q in qs]
            return transform(ps) if transform is not None and ps else ps

        if self.engine == "cached":
            return self._run_cached(tf, dq, gq, prompts, progress)

        jobs: list[tuple[list[int], list[int] | None, int, list[int]]] = []  # fed, enc, first column, target
        if self.handle.is_encoder_decoder:
            start = self._decoder_start()
            for p, q in zip(prompts(tf), tf):
                ctx, tgt = self.encode_pair(p, q.target)
                jobs.append(([start] + tgt[:-1], ctx, 0, tgt))
            for p in prompts(dq):
                jobs.append(([start], self.encode_prompt(p), 0, []))
        else:
            for p, q in zip(prompts(tf), tf):
                ctx, tgt = self.encode_pair(p, q.target)
                jobs.append((ctx + tgt[:-1], None, len(ctx) - 1, tgt))
            for p in prompts(dq):
                ctx = self.encode_prompt(p)
                jobs.append((ctx, None, len(ctx) - 1, []))

        # A causal prediction depends only on the tokens up to it, so a query whose fed tokens are
        # a prefix of another row's is read from that row: P(target_true) after a prompt comes
        # from the forward pass of target_new, a next-token distribution from any TF row of its
        # prompt. Longest first, so every row is as long as it will get.
        rows: list[_Row] = []
        placed: list[_Job | None] = [None] * len(jobs)
        prefixes: dict[tuple, int] = {}
        for j in sorted(range(len(jobs)), key=lambda j: -len(jobs[j][0])):
            fed, enc, col, tgt = jobs[j]
            head = tuple(enc) if enc is not None else None
            r = prefixes.get((head, tuple(fed)))
            if r is None:
                r = len(rows)
                rows.append(_Row(list(fed), None if enc is None else list(enc)))
                for k in range(1, len(fed) + 1):
                    prefixes.setdefault((head, tuple(fed[:k])), r)
            n = max(1, len(tgt))
            rows[r].cols.update(range(col, col + n))
            placed[j] = _Job(r, col, n, tgt)

        # Progress is counted in tokens; a generated token costs about two prompt tokens.
        gen_unit = (sum(len(q.prompt) // 4 + 2 * q.max_new_tokens for q in gq) / len(gq)) if gq else 0.0
        tf_total = float(sum(r.cost for r in rows))
        total = tf_total + gen_unit * len(gq)
        done = 0.0

        by_row: dict[int, list[int]] = {}
        for j, job in enumerate(placed):
            assert job is not None
            by_row.setdefault(job.row, []).append(j)
        outs: list[Any] = [None] * len(jobs)
        with torch.inference_mode():
            for idx in self._batches(list(range(len(rows))), lambda i: rows[i].cost, lambda i: len(rows[i].cols)):
                lps = self._forward([rows[i] for i in idx])
                for b, i in enumerate(idx):
                    for j in by_row[i]:
                        outs[j] = self._read(placed[j], b, lps)  # type: ignore[arg-type]
                done += sum(rows[i].cost for i in idx)
                if progress is not None:
                    progress(done, total)
        res: dict = dict(zip(tf, outs[:len(tf)]))
        res.update(zip(dq, outs[len(tf):]))
        if gq:
            gen_progress = None if progress is None else (lambda n, _: progress(tf_total + n * gen_unit, total))
            res.update(zip(gq, self.generate(gq, transform, progress=gen_progress)))
        if progress is not None:
            progress(total, total)
        return res

