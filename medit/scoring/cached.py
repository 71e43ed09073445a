"""Scoring over key/value caches for causal models: every distinct prompt is run once.

A CounterFact case asks for the same prompt three ways: the target's tokens after it (teacher
forcing), the next-token distribution at its end (neighbourhood KL) and a greedy continuation
(``generate``). Here the prompts of a batch are run once, left-padded so that they all end in the
same column, with a key/value cache; every query then continues from that cache:

- a next-token query and the first token of every target read the prompt's last position;
- the rest of a multi-token target is fed as one chunk over a copy of the cache rows it needs;
- generation decodes greedily over its own copy, one token per step, dropping rows as they finish.

The results equal those of whole-sequence passes up to float rounding (the tests compare both).
The model must run unhooked (:meth:`medit.scoring.engine.Scorer.engine` checks), because an edit's
hook may look at the whole sequence, which a cached step does not show it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import torch

from medit.model.tracing import cache_kwarg

if TYPE_CHECKING:
    from medit.core.queries import NextToken, TFResult
    from medit.scoring.engine import Scorer

#: most padded prompt tokens in one forward pass.
TOKEN_BUDGET = 4096
#: what one more forward pass costs, in padded tokens: below about a thousand rows the matrix
#: products run slower per row (measured on a 2-core CPU: 77 GFLOP/s at 320 rows, 104 at 1280).
BATCH_COST = 128
#: most target positions read in one pass over targets: their log-probs over the vocabulary are
#: materialised (SmolLM2: 49k x 4 bytes each, twice: logits and log-softmax), so 64 held-out
#: paragraphs of 63 scored tokens would otherwise take 1.6 GB at once.
MAX_READS = 1024

T = TypeVar("T")


def cap_reads(items: Sequence[T], reads: Callable[[T], int], max_count: int | None = None) -> Iterator[list[T]]:
    """``items`` in order, cut into groups of at most :data:`MAX_READS` read positions (an item
    with more goes alone) and at most ``max_count`` items."""
    group: list[T] = []
    total = 0
    for item in items:
        n = reads(item)
        if group and (len(group) == max_count or total + n > MAX_READS):
            yield group
            group, total = [], 0
        group.append(item)
        total += n
    if group:
        yield group


def split_sorted(lengths: Sequence[int], max_count: int, budget: int = TOKEN_BUDGET,
                 batch_cost: int = BATCH_COST) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous batches [i, j) that minimise the padded tokens
    (count × longest) plus ``batch_cost`` per batch; each batch holds at most ``max_count`` items
    and ``budget`` padded tokens (a single longer item still gets a batch of its own)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            count = j - i
            padded = count * lengths[j - 1]
            if count > 1 and (count > max_count or padded > budget):
                break
            cost = best[i] + padded + batch_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    cuts: list[tuple[int, int]] = []
    j = n
    while j > 0:
        cuts.append((start[j], j))
        j = start[j]
    return cuts[::-1]


@dataclass
class _Prompt:
    """One distinct prompt and what is read after it: targets (query index, target ids),
    next-token queries and generations (query index, max new tokens)."""

    ids: list[int]
    tf: list[tuple[int, list[int]]] = field(default_factory=list)
    dist: list[int] = field(default_factory=list)
    gen: list[tuple[int, int]] = field(default_factory=list)

    @property
    def max_new(self) -> int:
        return max((m for _, m in self.gen), default=0)


def take_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding ``rows`` of ``cache`` (the original is left as it is)."""
    new = copy.copy(cache)
    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        new.layers = []
        for layer in cache.layers:
            lay = copy.copy(layer)
            if getattr(layer, "keys", None) is not None:
                lay.keys, lay.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            new.layers.append(lay)
    else:
        new.key_cache = [k.index_select(0, rows) for k in cache.key_cache]
        new.value_cache = [v.index_select(0, rows) for v in cache.value_cache]
    return new


class CachedRunner:
    """Runs teacher-forced, next-token and generation jobs for a :class:`Scorer` over prompt caches."""

    def __init__(self, scorer: "Scorer") -> None:
        self.scorer = scorer
        self.handle = scorer.handle
        self.model = scorer.handle.model
        self.cache_kw = cache_kwarg(self.model.forward)
        self.eos = scorer.tok.eos_token_id

    # ------------------------------------------------------------------ planning
    @staticmethod
    def plan(tf: Sequence[tuple[list[int], list[int]]], dist: Sequence[list[int]],
             gen: Sequence[tuple[list[int], int]]) -> list[_Prompt]:
        """Group the jobs by prompt ids (job indices: TF first, then next-token, then generation)."""
        prompts: dict[tuple[int, ...], _Prompt] = {}

        def get(ids: list[int]) -> _Prompt:
            return prompts.setdefault(tuple(ids), _Prompt(list(ids)))

        for i, (ctx, tgt) in enumerate(tf):
            get(ctx).tf.append((i, list(tgt)))
        for i, ctx in enumerate(dist):
            get(ctx).dist.append(i)
        for i, (ctx, m) in enumerate(gen):
            get(ctx).gen.append((i, m))
        return list(prompts.values())

    def batches(self, prompts: list[_Prompt]) -> Iterator[list[_Prompt]]:
        """Prompts of equal generation length, sorted by length and cut where padding costs most.

        Within each group the cut points minimise the padded tokens plus :data:`BATCH_COST` per
        batch (dynamic programming over the sorted lengths), with at most ``batch_size`` prompts
        and :data:`TOKEN_BUDGET` padded tokens in a batch.
        """
        groups: dict[int, list[_Prompt]] = {}
        for p in prompts:
            groups.setdefault(p.max_new, []).append(p)
        for _, group in sorted(groups.items()):
            group.sort(key=lambda p: len(p.ids))
            for i, j in split_sorted([len(p.ids) for p in group], self.scorer.batch_size, TOKEN_BUDGET, BATCH_COST):
                yield group[i:j]

    # ------------------------------------------------------------------ running
    def run(self, tf: Sequence[tuple[list[int], list[int]]], dist: Sequence[list[int]],
            gen: Sequence[tuple[list[int], int]], progress: Callable[[float, float], None] | None = None
            ) -> tuple[list["TFResult"], list["NextToken"], list[list[int]]]:
        """Results for the TF jobs, next-token jobs and generations (new token ids, EOS dropped).

        ``progress(done, total)`` counts tokens run, a generated token as two.
        """
        tf_out: list[Any] = [None] * len(tf)
        dist_out: list[Any] = [None] * len(dist)
        gen_out: list[list[int]] = [[] for _ in gen]
        prompts = self.plan(tf, dist, gen)

        def cost(p: _Prompt) -> int:
            return len(p.ids) + sum(len(t) - 1 for _, t in p.tf) + 2 * sum(m for _, m in p.gen)

        total, done = float(sum(cost(p) for p in prompts)), 0.0
        with torch.inference_mode():
            for batch in self.batches(prompts):
                self._run_batch(batch, tf_out, dist_out, gen_out)
                done += sum(cost(p) for p in batch)
                if progress is not None:
                    progress(done, total)
        return tf_out, dist_out, gen_out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Log-probs at (rows, cols) of ``ids``; ``cache`` is extended in place.

        The head runs on the gathered positions as one 2-D product. (``logits_to_keep=1`` would
        hand it a strided [batch, 1, d] view, which PyTorch multiplies as a batched product that
        reads the 49k-row head once per sequence: 300 ms instead of 40 ms for 64 prompts.)
        """
        dev = self.handle.device
        rows, cols = rows.to(dev), cols.to(dev)
        with self.scorer.head_at(rows, cols) as picked:
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                             use_cache=True, **{self.cache_kw: cache})
        logits = out.logits if picked else out.logits[rows, cols]
        return logits.float().log_softmax(-1)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache
        try:
            return DynamicCache(config=self.handle.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _run_batch(self, batch: list[_Prompt], tf_out: list[Any], dist_out: list[Any],
                   gen_out: list[list[int]]) -> None:
        from medit.core.queries import TFResult

        ids, mask = self.scorer.pad([p.ids for p in batch], left=True)  # every prompt ends in the last column
        n, width = ids.shape
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        cache = self._new_cache()
        last = self._forward(ids, mask, pos, cache, torch.arange(n), torch.full((n,), width - 1))
        first = last.argmax(-1)

        for r, p in enumerate(batch):
            for j in p.dist:
                dist_out[j] = self.scorer.keep_dist(last[r])
            for j, tgt in p.tf:
                if len(tgt) == 1:
                    tf_out[j] = TFResult((tgt[0],), (float(last[r, tgt[0]]),), (int(first[r]),))

        longer = [(r, j, tgt) for r, p in enumerate(batch) for j, tgt in p.tf if len(tgt) > 1]
        if longer:
            self._targets(longer, cache, mask, last, first, tf_out)
        gens = [(r, j, m) for r, p in enumerate(batch) for j, m in p.gen]
        if gens:
            self._generate(gens, cache, mask, first, gen_out)

    def _targets(self, jobs: list[tuple[int, int, list[int]]], cache: Any, mask: torch.Tensor,
                 last: torch.Tensor, first: torch.Tensor, tf_out: list[Any]) -> None:
        """Feed targets' tokens (all but the last) after their prompts; read each next token. Jobs
        go in groups of at most :data:`MAX_READS` read positions (a longer target goes alone)."""
        for group in cap_reads(jobs, lambda job: len(job[2]) - 1):
            self._target_group(group, cache, mask, last, first, tf_out)

    def _target_group(self, jobs: list[tuple[int, int, list[int]]], cache: Any, mask: torch.Tensor,
                      last: torch.Tensor, first: torch.Tensor, tf_out: list[Any]) -> None:
        from medit.core.queries import TFResult

        src = torch.tensor([r for r, _, _ in jobs])
        ids, cmask = self.scorer.pad([t[:-1] for _, _, t in jobs])
        span = ids.shape[1]
        prefix = mask.index_select(0, src)
        pos = prefix.sum(1, keepdim=True) + torch.arange(span)[None, :]
        rows = torch.cat([torch.full((len(t) - 1,), k) for k, (_, _, t) in enumerate(jobs)])
        cols = torch.cat([torch.arange(len(t) - 1) for _, _, t in jobs])
        lp = self._forward(ids, torch.cat([prefix, cmask], 1), pos, take_rows(cache, src.to(self.handle.device)),
                           rows, cols)
        at = 0
        for r, j, t in jobs:
            rest = lp[at:at + len(t) - 1]
            at += len(t) - 1
            tgt = torch.tensor(t[1:], device=rest.device)
            logprobs = [float(last[r, t[0]])] + rest.gather(1, tgt[:, None])[:, 0].tolist()
            tf_out[j] = TFResult(tuple(t), tuple(logprobs), (int(first[r]),) + tuple(rest.argmax(-1).tolist()))

    def _generate(self, jobs: list[tuple[int, int, int]], cache: Any, mask: torch.Tensor, first: torch.Tensor,
                  gen_out: list[list[int]]) -> None:
        """Greedy decoding; a row stops at EOS or its own token limit and leaves the batch."""
        dev = self.handle.device
        src = torch.tensor([r for r, _, _ in jobs])
        alive = list(range(len(jobs)))  # positions in ``jobs`` still decoding
        cache = take_rows(cache, src.to(dev))
        amask = mask.index_select(0, src)
        tok = first.index_select(0, src.to(first.device)).cpu()
        step = 0
        while True:
            keep = []
            for k, a in enumerate(alive):
                _, j, limit = jobs[a]
                t = int(tok[k])
                if t != self.eos and step < limit:
                    gen_out[j].append(t)
                if t != self.eos and step + 1 < limit:
                    keep.append(k)
            if not keep:
                return
            if len(keep) < len(alive):
                sel = torch.tensor(keep)
                cache = take_rows(cache, sel.to(dev))
                amask, tok = amask.index_select(0, sel), tok.index_select(0, sel)
                alive = [alive[k] for k in keep]
            pos = amask.sum(1, keepdim=True)
            amask = torch.cat([amask, torch.ones((len(alive), 1), dtype=torch.long)], 1)
            lp = self._forward(tok[:, None], amask, pos, cache, torch.arange(len(alive)), torch.zeros(len(alive),
                                                                                                      dtype=torch.long))
            tok = lp.argmax(-1).cpu()
            step += 1
