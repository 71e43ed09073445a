"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale").

Edits are kept in a memory; the base model's weights never change. A **scope classifier** (a
trained projection head over all-MiniLM-L6-v2 sentence embeddings, scored by scaled cosine
similarity) decides whether a query falls in the scope of a stored edit. In-scope queries are
answered by a **counterfactual model** given the edit: the same causal LM, with the edit written
in front of the query and low-rank adapters on its MLP output projections (trained with
``medit train``) that are active for those rows only. Out-of-scope queries run through the
untouched base model, bit-for-bit.

Routing happens inside the scoring interface: :meth:`SeracEdit.transform_prompts` prefixes
in-scope prompts with the edit context (which starts with a marker), and a hook on the model
input marks the rows that carry the marker, so the adapters act on those rows alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn

import medit
from medit.core.edit import Edit, patch_requests
from medit.toolkit.embeddings import get_embedder
from medit.model.adaptors import call_cache
from medit.errors import HParamsError
from medit.toolkit.gradient_editors import outer_pairs
from medit.model.handle import ModelHandle
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.toolkit.training import LearnedHParams, LearnedMethod
from medit.plugins.methods.serac import DESCRIPTION

HPARAMS = Path(medit.__file__).parent / "hparams"
MARKER = "[edit]"


@dataclass
class SERACHParams(LearnedHParams):
    """Hyperparameters of SERAC (classifier, counterfactual adapters, training)."""

    #: width of the classifier's projection of the sentence embeddings.
    proj_dim: int = 128
    #: a query is in scope of the best-matching edit when its probability exceeds this.
    scope_threshold: float = 0.5
    #: rank of the counterfactual model's adapters.
    cf_rank: int = 8
    #: layers with adapters (indices, negative from the end) or ``auto``: every layer.
    cf_layers: list[int] | str = "auto"
    #: weight of the classifier loss against the counterfactual model's NLL.
    c_cls: float = 1.0

    def __post_init__(self) -> None:
        self.check_training()
        if self.proj_dim < 1 or self.cf_rank < 1:
            raise HParamsError(f"hparams 'proj_dim' and 'cf_rank' must be >= 1, got {self.proj_dim} and {self.cf_rank}")
        if not 0.0 < self.scope_threshold < 1.0:
            raise HParamsError(f"hparam 'scope_threshold' must be in (0, 1), got {self.scope_threshold}")
        if isinstance(self.cf_layers, str) and self.cf_layers != "auto":
            raise HParamsError(f"hparam 'cf_layers' must be a list of layer indices or 'auto', got {self.cf_layers!r}")
        if self.c_cls < 0:
            raise HParamsError(f"hparam 'c_cls' must be >= 0, got {self.c_cls}")


def edit_context(req: EditRequest) -> str:
    """The text the counterfactual model reads before an in-scope query."""
    return f"{MARKER} {req.prompt} {req.target_new.strip()}.\n"


class SERACEditor(nn.Module):
    """Scope classifier head and counterfactual adapters (``delta = B A x`` on each MLP output)."""

    def __init__(self, emb_dim: int, proj_dim: int, shapes: dict[int, tuple[int, int]], rank: int) -> None:
        super().__init__()
        self.proj = nn.Linear(emb_dim, proj_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # cosine x 10 at start
        self.bias = nn.Parameter(torch.tensor(-5.0))
        self.layers = list(shapes)
        self.lora_a = nn.ParameterList(nn.Parameter(torch.randn(rank, i) / i ** 0.5) for _, (o, i) in shapes.items())
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(o, rank)) for _, (o, i) in shapes.items())

    def scope_logits(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """[n_queries, n_edits] logits of "query is in the scope of edit"."""
        q = nn.functional.normalize(self.proj(queries), dim=-1)
        m = nn.functional.normalize(self.proj(memory), dim=-1)
        return q @ m.T * self.log_scale.exp() + self.bias


class Router:
    """Hooks shared by every active SERAC edit of one model: marks rows that carry the edit marker
    and adds the adapters' output on those rows only. Installed by the first edit, removed with
    the last, so a model without active edits carries no hook."""

    def __init__(self, handle: ModelHandle, editor: SERACEditor) -> None:
        self.handle, self.editor = handle, editor
        self.edits: list["SeracEdit"] = []
        self.rows: torch.Tensor | None = None
        self.force = False  # training: every row is in scope
        tok = handle.tokenizer
        self.marker = tok(MARKER, add_special_tokens=False).input_ids
        self.hooks: list[Any] = []

    def install(self) -> None:
        h = self.handle
        top = h.model.get_encoder() if h.is_encoder_decoder else h.model
        self.hooks.append(top.register_forward_pre_hook(self._mark, with_kwargs=True))
        for j, layer in enumerate(self.editor.layers):
            self.hooks.append(h.module("mlp_out", layer).register_forward_hook(self._adapter(j)))

    def remove(self) -> None:
        for hk in self.hooks:
            hk.remove()
        self.hooks = []

    def _mark(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        cache = call_cache(kwargs)
        if self.rows is not None and cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return  # a generation step continues the rows marked at its first step
        n = len(self.marker)
        windows = ids.unfold(1, n, 1) if ids.shape[1] >= n else ids.new_zeros(ids.shape[0], 0, n)
        target = torch.tensor(self.marker, device=ids.device)
        self.rows = (windows == target).all(-1).any(-1)

    def _adapter(self, j: int) -> Any:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            rows = self.rows
            if not self.force and (rows is None or not bool(rows.any()) or rows.shape[0] != out.shape[0]):
                return out
            a, b = self.editor.lora_a[j], self.editor.lora_b[j]
            delta = (args[0].to(a.dtype) @ a.T) @ b.T
            if self.force:
                return out + delta.to(out.dtype)
            return torch.where(rows.view(-1, *([1] * (out.dim() - 1))), out + delta.to(out.dtype), out)
        return hook


@dataclass
class SeracRouter:
    """Run state: the router of one model's SERAC edits (None before the first)."""

    router: Router | None = None


def _router(handle: ModelHandle, editor: SERACEditor) -> Router:
    state = handle.state(SeracRouter)
    r = state.router
    if r is None or r.editor is not editor:
        if r is not None and r.edits:
            raise HParamsError("SERAC edits from another checkpoint are still active on this model; revert them first")
        r = state.router = Router(handle, editor)
    return r


class SeracEdit(Edit):
    """Edits held in memory; reverting removes them (and the hooks with the last one)."""

    kind = "memory"

    def __init__(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: SERACHParams,
                 editor: SERACEditor) -> None:
        super().__init__(handle, "serac", requests, hparams.to_dict())
        self.editor, self.threshold = editor, hparams.scope_threshold
        self.memory = get_embedder().embed([r.prompt for r in requests]).to(editor.bias.device)
        self.router = _router(handle, editor)
        if not self.router.edits:
            self.router.install()
        self.router.edits.append(self)

    def transform_prompts(self, prompts: list[str]) -> list[str]:
        if self.router.edits[0] is not self:  # the first active edit routes for all of them
            return prompts
        reqs = [r for e in self.router.edits for r in e.requests]
        memory = torch.cat([e.memory for e in self.router.edits])
        with torch.no_grad():
            probs = torch.sigmoid(self.editor.scope_logits(get_embedder().embed(prompts).to(memory.device), memory))
        best, idx = probs.max(-1)
        return [edit_context(reqs[i]) + p if b > self.threshold and MARKER not in p else p
                for p, b, i in zip(prompts, best.tolist(), idx.tolist())]

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # The edit is its requests plus the trained editor: the patch names the checkpoint
        # (hparams) and lists the requests; applying it reloads the checkpoint.
        return {"note": "SERAC edits: the requests; applying the patch loads the editor in hparams.checkpoint"}, {}

    @classmethod
    def from_payload(cls, handle: ModelHandle, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SeracEdit":
        method = SERAC()
        hp = method.hparams_class.from_dict(manifest.get("hparams", {}), "patch manifest")
        return cast(SeracEdit, method.apply(handle, patch_requests(manifest), hp))  # SERAC edits are SeracEdits

    def revert(self) -> None:
        if not self.active:
            return
        self.router.edits.remove(self)
        if not self.router.edits:
            self.router.remove()
        self.active = False


class SERAC(LearnedMethod[SERACHParams, SERACEditor]):
    name = "serac"
    description = DESCRIPTION
    hparams_class = SERACHParams
    cached_scoring = False  # edits hook modules
    modes = ("single", "batch", "sequential")
    hparams_dir = HPARAMS / "serac"

    def init_editor(self, handle: ModelHandle, hparams: SERACHParams) -> SERACEditor:
        from medit.toolkit.gradient_editors import out_in_shape
        n = handle.n_layers
        layers = list(range(n)) if hparams.cf_layers == "auto" else [x % n for x in hparams.cf_layers]
        shapes = {layer: out_in_shape(handle, handle.param_name("mlp_out", layer)) for layer in layers}
        return SERACEditor(get_embedder().dim, hparams.proj_dim, shapes, hparams.cf_rank)

    def train_loss(self, handle: ModelHandle, editor: SERACEditor, batch: Sequence[EditRequest],
                   hparams: SERACHParams) -> tuple[torch.Tensor, dict[str, float]]:
        emb = get_embedder()
        dev = editor.bias.device
        memory = emb.embed([r.prompt for r in batch]).to(dev)
        # Positives: each edit's prompt and rephrasings; negatives: locality prompts and the other
        # edits' prompts (other subjects), as SERAC's classifier is trained.
        texts, owner = [], []
        for i, r in enumerate(batch):
            for p in (r.prompt, *r.rephrase, *(x.prompt for x in r.locality)):
                texts.append(p)
                owner.append(i if p in (r.prompt, *r.rephrase) else -1)
        logits = editor.scope_logits(emb.embed(texts).to(dev), memory)
        labels = torch.zeros_like(logits)
        for row, i in enumerate(owner):
            if i >= 0:
                labels[row, i] = 1.0
        cls = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        scorer = Scorer(handle)
        ctx_reqs = [EditRequest(prompt=edit_context(r) + p, subject=r.subject, target_new=r.target_new)
                    for r in batch for p in (r.prompt, *r.rephrase)]
        router = _router(handle, editor)
        router.install()
        router.force = True
        try:
            nll = scorer.target_nll(outer_pairs(scorer, ctx_reqs))
        finally:
            router.force = False
            router.remove()
        loss = nll + hparams.c_cls * cls
        return loss, {"cf_nll": float(nll.detach()), "cls_bce": float(cls.detach())}

    def edit_with(self, handle: ModelHandle, editor: SERACEditor, requests: Sequence[EditRequest],
                  hparams: SERACHParams) -> SeracEdit:
        edit = SeracEdit(handle, requests, hparams, editor)
        edit.info["checkpoint"] = hparams.checkpoint
        return edit
