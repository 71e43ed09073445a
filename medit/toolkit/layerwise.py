"""Loss of the layers above one layer, for methods that train an edit at that layer (GRACE, WISE):
the prompt+target pairs run once up to the layer, and each step reruns only the layers above it."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from medit.model.tracing import capture, layers_above, run_until
from medit.scoring.engine import Scorer

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle


class LayerwiseLM:
    """Teacher-forced target logits of a fixed batch of (context ids, target ids) pairs, where
    only ``layer`` and the blocks above it are recomputed at each call (the layers below cannot
    change). Hooks on modules at or above ``layer`` act on every call.

    Causal models run from the cached input of block ``layer``; encoder-decoder models (and
    ``layer`` 0) run the whole model. ``first_pos[i]`` is the position (in row i) that predicts
    the first target token; ``mask`` is the [rows, seq] attention mask of the sequences fed.
    """

    def __init__(self, handle: "ModelHandle", pairs: Sequence[tuple[list[int], list[int]]], layer: int) -> None:
        self.handle, self.pairs, self.layer = handle, list(pairs), layer
        self.scorer = Scorer(handle)
        self.fast = not handle.is_encoder_decoder and layer > 0
        if handle.is_encoder_decoder:
            self.first_pos = [0] * len(self.pairs)
            self.mask = self.scorer.pad([[0] + t[:-1] for _, t in self.pairs])[1].to(handle.device)
        else:
            self.first_pos = [len(c) - 1 for c, _ in self.pairs]
            ids, mask = self.scorer.pad([(c + t)[:-1] for c, t in self.pairs])
            self.ids, self.mask = ids.to(handle.device), mask.to(handle.device)
        if self.fast:
            self.pos = (self.mask.cumsum(1) - 1).clamp_min(0)
            with torch.no_grad(), capture(handle, "layers", [layer], what="input", stop=True) as store:
                run_until(handle, lambda: handle.model(input_ids=self.ids, attention_mask=self.mask,
                                                       position_ids=self.pos, use_cache=False))
            self.hidden = store[layer].detach()
            rows = [torch.full((len(t),), i, dtype=torch.long) for i, (_, t) in enumerate(self.pairs)]
            cols = [torch.arange(len(c) - 1, len(c) - 1 + len(t)) for c, t in self.pairs]
            self.rows = torch.cat(rows).to(handle.device)
            self.cols = torch.cat(cols).to(handle.device)
        self.targets = torch.tensor([t for _, ts in self.pairs for t in ts], device=handle.device)
        self.owner = torch.tensor([i for i, (_, ts) in enumerate(self.pairs) for _ in ts], device=handle.device)
        self._above: Any = None

    @contextlib.contextmanager
    def session(self) -> Iterator["LayerwiseLM"]:
        """Keep the upper-layer runner open for many :meth:`logits` calls."""
        if not self.fast:
            yield self
            return
        with layers_above(self.handle, self.layer - 1) as above:
            self._above = above
            try:
                yield self
            finally:
                self._above = None

    def logits(self) -> torch.Tensor:
        """[sum of target lengths, vocab] logits (differentiable w.r.t. hooked parameters)."""
        if not self.fast:
            return self.scorer.selected_logits(self.pairs)
        if self._above is None:
            with self.session():
                return self.logits()
        final = self._above(self.hidden, self.mask, self.pos)
        return self.handle.module("lm_head")(final[self.rows, self.cols])

    def row_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean target-token NLL per row, from :meth:`logits`."""
        lp = logits.float().log_softmax(-1).gather(1, self.targets[:, None])[:, 0]
        n = len(self.pairs)
        tot = torch.zeros(n, device=lp.device).index_add(0, self.owner, -lp)
        return tot / torch.bincount(self.owner, minlength=n).float()

    def row_correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row: True when every target token is the argmax."""
        ok = (logits.argmax(-1) == self.targets).float()
        n = len(self.pairs)
        tot = torch.zeros(n, device=ok.device).index_add(0, self.owner, ok)
        return tot == torch.bincount(self.owner, minlength=n).float()
