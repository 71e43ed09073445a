"""Keys measured again and again while MEMIT-style methods edit their layers lowest first.

After each layer's update the spreading needs the next layer's keys and the residual after the
last edited layer. An edit of layer ``d``'s MLP changes nothing below it, nor the key (the MLP's
input) at ``d`` itself: so :class:`LayerKeys` keeps the residual stream entering the layer it
measured last and, after that layer is edited, runs only the layers from it upwards
(:func:`medit.model.tracing.layers_above`) instead of a whole forward pass from the embeddings.
The keys equal a whole pass's up to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from medit.model.tracing import capture, layers_above, run_until
from medit.scoring.engine import Scorer
from medit.toolkit.target_vectors import bare_rows, request_means, subject_rows

if TYPE_CHECKING:
    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle


class LayerKeys:
    """Keys (averaged over templates) at the subject token of each request at one layer at a
    time, and the residual stream after ``out_layer`` at the bare prompt (template ``"{}"``), for
    a model whose layers are edited between calls; tell it each edited layer (:meth:`edited`)."""

    def __init__(self, handle: "ModelHandle", reqs: Sequence["EditRequest"], templates: Sequence[str],
                 which: str, out_layer: int) -> None:
        self.handle, self.out_layer, self.n = handle, out_layer, len(reqs)
        seqs, lookup, owner = subject_rows(handle, reqs, templates, which)
        ids, mask = Scorer(handle).pad(seqs)
        self.ids, self.mask = ids.to(handle.device), mask.to(handle.device)
        self.rows = torch.arange(len(seqs), device=handle.device)
        self.pos = torch.tensor(lookup, device=handle.device)
        self.own = torch.tensor(owner, device=handle.device)
        self.bare = torch.tensor(bare_rows(templates, len(reqs)), device=handle.device)
        #: layer -> residual stream entering it ([rows, T, d]), kept while nothing below it changes
        self.entering: dict[int, torch.Tensor] = {}
        #: layer -> per-request keys there, kept while nothing below it changes
        self.keys: dict[int, torch.Tensor] = {}
        self.resid: torch.Tensor | None = None
        self.lowest_edit: int | None = None  # the lowest layer edited since ``resid`` was measured
        self.first: int | None = None  # the lowest layer ever asked for: its entering stream is kept

    def edited(self, layer: int) -> None:
        """Layer ``layer``'s weights changed: what depends on them is measured again."""
        self.resid = None
        self.lowest_edit = layer if self.lowest_edit is None else min(self.lowest_edit, layer)
        self.entering = {k: v for k, v in self.entering.items() if k <= layer}
        self.keys = {k: v for k, v in self.keys.items() if k <= layer}

    @torch.no_grad()
    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [n_requests, d_in] at ``layer`` and the residual [n_requests, d] after
        ``out_layer``."""
        if layer > self.out_layer:
            raise ValueError(f"keys at layer {layer} above the measured residual's layer {self.out_layer}")
        if self.first is None or layer < self.first:
            self.first = layer
        if layer not in self.keys or self.resid is None:
            self._run(layer)
        assert self.resid is not None
        return self.keys[layer], self.resid

    def _run(self, layer: int) -> None:
        # the lowest layer whose input changed: layers below it need not run again
        need = layer if layer not in self.keys else self.out_layer
        if self.lowest_edit is not None:
            need = min(need, self.lowest_edit)
        starts = [k for k in self.entering if k <= need]
        start = max(starts) if starts else 0
        keep = sorted({layer, self.first or layer} - {0})  # (layer 0's input is the embeddings': not kept)
        h, top = self.handle, self.out_layer
        if start == 0:
            with self._captures(layer, keep, 0) as (ks, es, zs):
                run_until(h, lambda: h.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False))
        else:
            hidden = self.entering[start]
            with layers_above(h, start - 1) as above, self._captures(layer, keep, start) as (ks, es, zs):
                run_until(h, lambda: above(hidden, self.mask))
        if layer not in self.keys:
            self.keys[layer] = request_means(ks[layer - start].float()[self.rows, self.pos], self.own, self.n)
        for k in keep:
            if k > start:
                self.entering[k] = es[k - 1 - start]
        # only these are read again (the next edit is at ``layer``; a new pass starts at ``first``)
        self.entering = {k: v for k, v in self.entering.items() if k in keep}
        self.resid = zs[top - start].float()[self.bare, self.pos[self.bare]]
        self.lowest_edit = None

    @contextlib.contextmanager
    def _captures(self, layer: int, keep: list[int], start: int
                  ) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
        """The captures of one pass over the layers from ``start`` (numbered from ``start``): keys
        at ``layer`` (unless below ``start``), the streams entering ``keep``, and the residual after
        ``out_layer``, where the pass stops."""
        h, top = self.handle, self.out_layer - start
        with capture(h, "mlp_out", [layer - start] if layer >= start else [], what="input") as ks, \
                capture(h, "layers", [k - 1 - start for k in keep if k > start], what="output") as es, \
                capture(h, "layers", [top], what="output") as zs, \
                capture(h, "layers", [top], what="output", stop=True):  # last: runs after the others' hooks
            yield ks, es, zs
