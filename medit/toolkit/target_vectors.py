"""Keys and target vectors for locate-then-edit methods (ROME, MEMIT, AlphaEdit, ...).

* :func:`compute_keys`: the rewrite module's input at the subject token, averaged over context
  templates, in one batched forward pass.
* :func:`optimise_deltas`: the ``v``/``z`` step — a vector added to the edit layer's output at
  the subject token, optimised so the model produces the target. The layers below the edit layer
  run once; each step runs only the layers above it, and the LM head only at the target positions
  (and the KL positions).

In a family with a norm after the MLP (the adapter's ``mlp_post_norm``, Gemma 2/3), a change
``d`` of the rewrite module's output moves the residual stream by ``norm(m + d) - norm(m)``: the
optimisation then adds exactly that, so what it finds is what a weight update inserting ``d``
does (:func:`residual_change`, :func:`rewrite_change` convert between the two spaces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from medit.core import distributed
from medit.toolkit.context import fill, subject_token_index, swapped_prompts
from medit.scoring.engine import Scorer
from medit.core.queries import kl_per_row
from medit.model.tracing import (capture, head_logits, layers_above, low_precision_above, mlp_post_norm,
                                 run_until)

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest


@dataclass
class _Rows:
    """Rows of the target-vector optimisation: token ids, subject position and owning request."""

    lookup: list[int]
    owner: list[int]
    targets: list[list[int]] = field(default_factory=list)  # target ids per row ([] for KL rows)
    starts: list[int] = field(default_factory=list)  # position predicting the first target token
    kl: list[bool] = field(default_factory=list)
    extra: list[bool] = field(default_factory=list)  # rows of spec.extra_prompts
    seqs: list[list[int]] = field(default_factory=list)


def _pad(handle: "ModelHandle", seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return Scorer(handle).pad(seqs)


def _aligned(handle: "ModelHandle", seqs: list[list[int]], lookup: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Left-pad each row so that every row's subject token sits in the same column S, then
    right-pad. Returns ids, mask, position ids and the per-row left padding. Everything left of
    S is a prefix that a change at the subject token cannot affect."""
    split = max(lookup)
    left = [split - k for k in lookup]
    width = max(p + len(s) for p, s in zip(left, seqs))
    pad = Scorer(handle).pad_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, s) in enumerate(zip(left, seqs)):
        ids[i, p:p + len(s)] = torch.tensor(s)
        mask[i, p:p + len(s)] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, pos, left


def subject_rows(handle: "ModelHandle", reqs: Sequence["EditRequest"], templates: Sequence[str],
                 which: str) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of each request's prompt in each template, the subject token's position in each
    row, and the request each row belongs to."""
    seqs, lookup, owner = [], [], []
    for i, r in enumerate(reqs):
        for text, at in _template_texts(r, templates):
            seqs.append(handle.tokenizer(text).input_ids)
            lookup.append(subject_token_index(handle, text, at, r.subject, which))
            owner.append(i)
    return seqs, lookup, owner


@torch.no_grad()
def compute_keys(handle: "ModelHandle", reqs: Sequence["EditRequest"], layers: Sequence[int],
                 templates: Sequence[str], which: str = "last", out_layer: int | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys [n_requests, d_in] per layer, averaged over templates; optionally also the residual
    stream after ``out_layer`` at the subject token of the bare prompt (template ``"{}"``)."""
    seqs, lookup, owner = subject_rows(handle, reqs, templates, which)
    rows_k, rows_z = _row_keys(handle, seqs, lookup, layers, out_layer)
    own = torch.tensor(owner, device=handle.device)
    keys = {layer: request_means(rows_k[layer], own, len(reqs)) for layer in layers}
    resid = rows_z[bare_rows(templates, len(reqs))] if rows_z is not None else None
    return keys, resid


def request_means(rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """The mean [n, d] of the per-row vectors ``rows`` [rows, d] of each request (``owner``: the
    request of each row)."""
    summed = torch.zeros(n, rows.shape[1], device=rows.device).index_add_(0, owner, rows)
    return summed / torch.bincount(owner, minlength=n)[:, None]


def bare_rows(templates: Sequence[str], n: int) -> list[int]:
    """The row of each of ``n`` requests' bare prompt (template ``"{}"``) among
    :func:`subject_rows`' rows."""
    return [templates.index("{}") + i * len(templates) for i in range(n)]


@torch.no_grad()
def subject_outputs(handle: "ModelHandle", reqs: Sequence["EditRequest"], layer: int, which: str = "last"
                    ) -> torch.Tensor:
    """The rewrite module's output [n_requests, d_out] at ``layer`` at the subject token of each
    bare prompt (the row :func:`compute_keys` measures the residual stream on)."""
    seqs, lookup, _ = subject_rows(handle, reqs, ["{}"], which)
    ids, mask = _pad(handle, seqs)
    ids, mask = ids.to(handle.device), mask.to(handle.device)
    with capture(handle, "mlp_out", [layer], what="output") as ms, \
            capture(handle, "layers", [layer], what="output", stop=True):
        run_until(handle, lambda: handle.model(input_ids=ids, attention_mask=mask, use_cache=False))
    return ms[layer][torch.arange(len(seqs), device=handle.device), torch.tensor(lookup, device=handle.device)].float()


@torch.no_grad()
def template_keys(handle: "ModelHandle", req: "EditRequest", layer: int, templates: Sequence[str],
                  which: str = "last") -> tuple[torch.Tensor, list[int]]:
    """The rewrite module's input at the subject token of ``req.prompt`` under each template
    ([len(templates), d_in]), and that token's position in each row."""
    seqs, lookup, _ = subject_rows(handle, [req], templates, which)
    return _row_keys(handle, seqs, lookup, [layer])[0][layer], lookup


@torch.no_grad()
def delta_row_keys(handle: "ModelHandle", req: "EditRequest", layer: int, templates: Sequence[str],
                   spec: "DeltaSpec", which: str = "last") -> torch.Tensor:
    """The rewrite module's input at the subject token of every row the target-vector
    optimisation uses for ``req`` (each template, each extra prompt, then the KL prompt):
    [len(templates) + len(spec.extra_prompts) + 1, d_in]."""
    texts = _rewrite_texts(req, templates, spec)
    seqs = [handle.tokenizer(text).input_ids for text, _ in texts]
    lookup = [subject_token_index(handle, text, at, req.subject, which) for text, at in texts]
    ids, pos = _kl_row(handle, req, spec, which)
    seqs.append(ids)
    lookup.append(pos)
    return _row_keys(handle, seqs, lookup, [layer])[0][layer]


def _template_texts(req: "EditRequest", templates: Sequence[str]) -> list[tuple[str, int]]:
    """The prompt in each template, with the character offset of the subject in it."""
    at = req.prompt.index(req.subject)
    return [(text, off + at) for text, off in (fill(t, req.prompt) for t in templates)]


def _rewrite_texts(req: "EditRequest", templates: Sequence[str], spec: "DeltaSpec") -> list[tuple[str, int]]:
    """The texts whose continuation must become target_new (the prompt in each template, then each
    extra prompt), each with the character offset of the subject in it."""
    return _template_texts(req, templates) + [fill(p, req.subject) for p in spec.extra_prompts]


def _kl_row(handle: "ModelHandle", req: "EditRequest", spec: "DeltaSpec", which: str) -> tuple[list[int], int]:
    """Token ids of the KL ("essence") prompt for ``req`` and the position of its subject token."""
    text = spec.kl_prompt.format(req.subject)
    return handle.tokenizer(text).input_ids, subject_token_index(handle, text, text.index(req.subject),
                                                                  req.subject, which)


def _row_keys(handle: "ModelHandle", seqs: list[list[int]], lookup: list[int], layers: Sequence[int],
              out_layer: int | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Per-row rewrite-module inputs at ``lookup`` for ``layers`` (and the residual after
    ``out_layer``), from one forward pass that stops at the deepest layer needed."""
    ids, mask = _pad(handle, seqs)
    ids, mask = ids.to(handle.device), mask.to(handle.device)
    rows = torch.arange(len(seqs), device=handle.device)
    pos = torch.tensor(lookup, device=handle.device)
    deepest = max(list(layers) + ([out_layer] if out_layer is not None else []))
    with capture(handle, "mlp_out", layers, what="input") as kstore, \
            capture(handle, "layers", [out_layer] if out_layer is not None else [], what="output") as zstore:
        with capture(handle, "layers", [deepest], what="output", stop=True):
            run_until(handle, lambda: handle.model(input_ids=ids, attention_mask=mask, use_cache=False))
    keys = {layer: kstore[layer][rows, pos].float() for layer in layers}
    resid = zstore[out_layer][rows, pos].float() if out_layer is not None else None
    return keys, resid


@dataclass
class DeltaSpec:
    """Settings of the target-vector optimisation (shared by every locate-then-edit method)."""

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    #: a request whose own prompt (the template rows, not the extra prompts) is still above
    #: ``early_stop_nll`` after ``steps`` gets up to ``max_clamp_steps`` more with the norm clamp
    #: raised to this factor (None: no second phase).
    clamp_norm_factor_max: float | None = None
    max_clamp_steps: int = 25
    early_stop_nll: float = 0.05
    kl_prompt: str = "{} is a"
    #: requests optimised together (the optimisation of each stays independent).
    chunk: int = 8
    #: weight of the KL term on subject-swapped prompts (see :class:`Negatives`).
    negative_kl_factor: float = 1.0
    #: further prompts (``{}``: the subject) whose continuation should also be target_new; they
    #: follow the templates' rows (without templates), before the KL row.
    extra_prompts: tuple[str, ...] = ()
    #: dtype of the matrix products in the layers above the edit layer while δ is optimised
    #: (:func:`medit.model.tracing.low_precision_above`); None: the model's own.
    autocast: str | None = None


@dataclass
class Negatives:
    """Prompts an edit must leave alone (its prompt with the subject swapped for another), prepared
    for the target-vector optimisation of one rank-one insertion ``ΔW = δ leftᵀ``.

    Such an update adds ``δ · (x_t · left)`` to the edit layer's output at every position t, with
    ``x_t`` the rewrite module's input there (which the update itself cannot change). So the
    optimisation can run these prompts exactly as the finished edit will, and penalise the KL of
    their next-token distribution: δ learns to avoid directions that leak to the relation."""

    hidden: torch.Tensor  # [rows, T, d] residual stream after the edit layer
    mask: torch.Tensor  # [rows, T]
    coef: torch.Tensor  # [rows, T] x_t · left (0 on padding)
    last: torch.Tensor  # [rows] position of each row's last token
    #: [rows, T, d] the rewrite module's output, kept when a norm follows it (see module docstring)
    mlp: torch.Tensor | None = None


@torch.no_grad()
def negative_rows(handle: "ModelHandle", req: "EditRequest", layer: int, left: torch.Tensor,
                  subjects: Sequence[str]) -> Negatives | None:
    """:class:`Negatives` for ``req``: its prompt with the subject replaced by each of ``subjects``
    (those equal to the edit's subject are skipped); None when none is left."""
    prompts = swapped_prompts(req.prompt, req.subject, subjects)
    if not prompts:
        return None
    ids, mask = _pad(handle, [handle.tokenizer(p).input_ids for p in prompts])
    ids, mask = ids.to(handle.device), mask.to(handle.device)
    with capture(handle, "mlp_out", [layer], what="input") as ks, \
            capture(handle, "mlp_out", [layer], what="output") as ms, \
            capture(handle, "layers", [layer], what="output", stop=True) as hs:
        run_until(handle, lambda: handle.model(input_ids=ids, attention_mask=mask, use_cache=False))
    coef = (ks[layer].float() @ left.to(handle.device).float()) * mask
    mlp = ms[layer].detach() if mlp_post_norm(handle, layer) is not None else None
    return Negatives(hs[layer].detach(), mask, coef, mask.sum(1) - 1, mlp)


def residual_change(post: torch.nn.Module | None, mlp: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """How much changing the rewrite module's output from ``mlp`` to ``mlp + d`` moves the residual
    stream: ``d`` itself, or through the family's post-MLP norm ``post`` (:func:`mlp_post_norm`,
    looked up before any :func:`layers_above`, which renumbers the layers)
    ``post(mlp + d) - post(mlp)`` (differentiable in ``d``)."""
    if post is None:
        return d
    return post(mlp + d.to(mlp.dtype)) - post(mlp)


def rewrite_change(handle: "ModelHandle", layer: int, mlp: torch.Tensor, r: torch.Tensor,
                   steps: int = 200) -> torch.Tensor:
    """The change ``d`` of the rewrite module's output ``mlp`` [n, d] at ``layer`` that moves the
    residual stream by ``r`` [n, d] (the inverse of :func:`residual_change`): ``r`` itself without
    a post-MLP norm; with one, the least-squares ``d`` found by gradient steps through the norm
    module (a norm's output has a fixed scale, so a large ``r`` is met only in part)."""
    post = mlp_post_norm(handle, layer)
    if post is None:
        return r
    mlp, r = mlp.detach().float(), r.detach().float()
    scale = mlp.norm(dim=1, keepdim=True).clamp_min(1e-6)
    d = torch.zeros_like(mlp, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.02)
    with torch.enable_grad():
        for _ in range(steps):  # in units of |mlp| per row, so one rate fits every layer
            loss = (residual_change(post, mlp, d * scale) - r).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (d * scale).detach()


def optimise_deltas(handle: "ModelHandle", reqs: Sequence["EditRequest"], layer: int,
                    templates: Sequence[str], spec: DeltaSpec, ref: str = "resid",
                    which: str = "last", row_scale: torch.Tensor | None = None,
                    negatives: Negatives | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Vectors δ [n_requests, d_model] added after ``layer`` at the subject token that make the
    model produce each request's target_new. ``ref`` names what the norm clamp and weight decay
    are relative to: the residual stream (``resid``, MEMIT) or the MLP output (``mlp``, ROME; also
    for ``resid`` in a family with a post-MLP norm). δ is optimised as a change of the rewrite
    module's output; with a post-MLP norm (see the module docstring) ``ref="mlp"`` returns it as
    such (what ROME inserts), ``ref="resid"`` returns
    the residual-stream change it makes at the bare prompt (what MEMIT spreads).

    ``row_scale`` [n_requests, len(templates) + len(spec.extra_prompts) + 1] optionally scales δ
    per row (each template, each extra prompt, then the KL prompt): a rank-one update inserts
    δ·(kᵀu) for a key k, not δ, so optimising with those factors optimises what will be inserted.

    ``negatives`` (one request only) adds ``spec.negative_kl_factor`` × the mean KL of those
    prompts' next-token distributions under the insertion."""
    if negatives is not None and len(reqs) != 1:
        raise ValueError("negatives apply to the optimisation of a single request")
    # Each step runs every row of a chunk to the chunk's widest suffix (subject token to the last
    # target token): chunks of requests with equal suffix lengths waste no columns on padding. The
    # optimisation of each request is independent of its chunk, so the order changes no result.
    widths = [max(len(q) - k for q, k in zip(r.seqs, r.lookup))
              for r in (_build_rows(handle, [req], templates, spec, which) for req in reqs)]
    order = sorted(range(len(reqs)), key=lambda i: widths[i])
    # torchrun ranks applying one batch together (medit.core.distributed.shared): each optimises
    # every ranks-th request of that order, then all ranks gather every vector
    ranks = distributed.collective_world() if negatives is None else 1
    if ranks > 1:
        order = distributed.shard(order, ranks, distributed.rank())
    out: list[torch.Tensor] = [torch.empty(0)] * len(reqs)
    infos: list[dict] = [{}] * len(reqs)
    for start in range(0, len(order), spec.chunk):
        part = order[start:start + spec.chunk]
        scale = None if row_scale is None else row_scale[part]
        d, info = _optimise_chunk(handle, [reqs[i] for i in part], layer, templates, spec, ref, which, scale,
                                  negatives)
        for j, i in enumerate(part):
            out[i], infos[i] = d[j], info[j]
    if ranks > 1:
        for share in distributed.all_gather_objects([(i, out[i].cpu(), infos[i]) for i in order]):
            for i, vec, info in share:
                out[i], infos[i] = vec.to(handle.device), info
    return torch.stack(out), infos


def _build_rows(handle: "ModelHandle", reqs: Sequence["EditRequest"], templates: Sequence[str],
                spec: DeltaSpec, which: str) -> _Rows:
    scorer = Scorer(handle)
    seqs: list[list[int]] = []
    r = _Rows([], [])
    for i, req in enumerate(reqs):
        for j, (text, at) in enumerate(_rewrite_texts(req, templates, spec)):
            r.extra.append(j >= len(templates))
            ctx, tgt = scorer.encode_pair(text, req.target_new)
            seqs.append(ctx + tgt[:-1])
            r.lookup.append(subject_token_index(handle, text, at, req.subject, which))
            r.owner.append(i)
            r.targets.append(tgt)
            r.starts.append(len(ctx) - 1)
            r.kl.append(False)
        ids, pos = _kl_row(handle, req, spec, which)
        # the KL term reads the subject position only, which the tokens after it cannot change
        # (causal attention): without them the row is never the widest of its chunk
        seqs.append(ids[:pos + 1])
        r.lookup.append(pos)
        r.owner.append(i)
        r.targets.append([])
        r.starts.append(0)
        r.kl.append(True)
        r.extra.append(False)
    r.seqs = seqs
    return r


class _Live:
    """The rows of the requests still optimised, and where their target and KL positions sit
    among them (``targets``/``kl`` select from the full lists, ``t_rows``/``kl_rows`` index the
    live rows)."""

    def __init__(self, owner: torch.Tensor, done: torch.Tensor, t_rows: torch.Tensor, kl_rows: torch.Tensor,
                 mask: torch.Tensor) -> None:
        keep = ~done[owner]
        self.rows = torch.nonzero(keep).flatten()
        # right padding that only finished rows needed is cut off
        self.width = int(mask[self.rows].sum(0).nonzero().max()) + 1
        new_index = keep.long().cumsum(0) - 1
        self.targets = keep[t_rows]
        self.t_rows = new_index[t_rows[self.targets]]
        self.kl = keep[kl_rows]
        self.kl_rows = new_index[kl_rows[self.kl]]


def _optimise_chunk(handle: "ModelHandle", reqs: Sequence["EditRequest"], layer: int,
                    templates: Sequence[str], spec: DeltaSpec, ref: str, which: str,
                    row_scale: torch.Tensor | None = None, negatives: Negatives | None = None
                    ) -> tuple[torch.Tensor, list[dict]]:
    dev = handle.device
    rows = _build_rows(handle, reqs, templates, spec, which)
    ids, mask, pos, left = (t.to(dev) if isinstance(t, torch.Tensor) else t for t in _aligned(handle, rows.seqs, rows.lookup))
    split = max(rows.lookup)
    n = len(reqs)
    with torch.no_grad():
        with capture(handle, "layers", [layer], what="output") as hs, \
                capture(handle, "mlp_out", [layer], what="output") as ms:
            with capture(handle, "layers", [layer], what="output", stop=True):
                run_until(handle, lambda: handle.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                       use_cache=False))
    hidden = hs[layer].detach()
    # the rewrite module's output at the subject column, when a post-MLP norm follows it (the norm
    # is looked up here: inside layers_above the layer list is renumbered)
    post = mlp_post_norm(handle, layer)
    mlp_at = ms[layer].detach()[:, split:split + 1] if post is not None else None
    owner = torch.tensor(rows.owner, device=dev)
    first_row = torch.tensor([rows.owner.index(i) for i in range(n)], device=dev)
    # With a post-MLP norm δ changes the rewrite module's output, whose direction alone reaches the
    # residual stream: the clamp and decay are then relative to that output whatever ``ref`` says.
    ref_vec = (hidden if ref == "resid" and mlp_at is None else ms[layer].detach())[first_row, split].float()
    ref_norm = ref_vec.norm(dim=1)

    # Target positions (rewrite rows) and KL positions (KL rows), as columns of the suffix.
    t_rows, t_cols, t_ids, t_own, t_main = [], [], [], [], []
    for i, (tg, st) in enumerate(zip(rows.targets, rows.starts)):
        for j, t in enumerate(tg):
            t_rows.append(i)
            t_cols.append(left[i] + st + j - split)
            t_ids.append(t)
            t_own.append(rows.owner[i])
            t_main.append(not rows.extra[i])
    t_rows_t, t_cols_t = torch.tensor(t_rows, device=dev), torch.tensor(t_cols, device=dev)
    t_ids_t, t_own_t = torch.tensor(t_ids, device=dev), torch.tensor(t_own, device=dev)
    kl_rows = torch.tensor([i for i, k in enumerate(rows.kl) if k], device=dev)
    n_tok = torch.bincount(t_own_t, minlength=n).float()
    main_t = torch.tensor(t_main, device=dev, dtype=torch.float32)
    n_main = torch.zeros(n, device=dev).index_add(0, t_own_t, main_t)
    # rows are ordered per request: its templates, its extra prompts, then its KL prompt (see _build_rows)
    scale = (torch.ones(len(rows.owner), device=dev) if row_scale is None
             else row_scale.to(dev, torch.float32).reshape(-1))

    delta = torch.zeros(n, hidden.shape[-1], device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=spec.lr)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    frozen = torch.zeros_like(delta)
    kl_ref = neg_ref = None
    total = spec.steps + (0 if spec.clamp_norm_factor_max is None else spec.max_clamp_steps)
    infos = [{"steps": total, "nll": None} for _ in range(n)]
    with low_precision_above(handle, layer, spec.autocast), layers_above(handle, layer) as above:
        live = None
        cache: Any = None
        cached_rows: torch.Tensor | None = None  # the rows ``cache`` holds
        for step in range(total):
            if live is None:  # the rows of the requests still optimised (all at first)
                before = cached_rows
                live = _Live(owner, done, t_rows_t, kl_rows, mask)
                # the prefix of a row does not depend on the other rows: when edits leave, their
                # rows leave the cache instead of the prefix being computed again
                if split > 0 and before is not None:
                    cache = above.select(cache, torch.searchsorted(before, live.rows))
                if split > 0 and (before is None or cache is None):
                    cache = above.prefix(hidden[live.rows, :split], mask[live.rows, :split], pos[live.rows, :split])
                cached_rows = live.rows if split > 0 else None
                lt = live.targets
                cols, ids_l, own_l, main_l = t_cols_t[lt], t_ids_t[lt], t_own_t[lt], main_t[lt]
                n_t = len(ids_l)
            rs, w = live.rows, live.width
            add = (delta[owner[rs]] * scale[rs, None])[:, None].to(hidden.dtype)
            if mlp_at is not None:
                add = residual_change(post, mlp_at[rs], add)
            at = hidden[rs, split:split + 1] + add
            final = above.suffix(torch.cat([at, hidden[rs, split + 1:w]], 1), mask[rs, :w], pos[rs, split:w], cache)
            # one head call for the target and the KL positions: its cost hardly grows with rows
            logp = head_logits(handle, torch.cat([final[live.t_rows, cols], final[live.kl_rows, 0]])
                               ).float().log_softmax(-1)
            tok_lp = logp[:n_t].gather(1, ids_l[:, None])[:, 0]
            nll = -torch.zeros(n, device=dev).index_add(0, own_l, tok_lp) / n_tok
            kl_logp = logp[n_t:]
            if kl_ref is None:
                kl_ref = kl_logp.detach()
            kl = kl_per_row(kl_ref[live.kl], kl_logp)
            kl_per = torch.zeros(n, device=dev).index_add(0, owner[kl_rows[live.kl]], kl)
            decay = spec.weight_decay * delta.norm(dim=1) ** 2 / ref_norm ** 2
            neg_kl: torch.Tensor | float = 0.0  # one scalar: negatives serve a single request
            if negatives is not None:  # a single request (checked above)
                ng = negatives
                add = (ng.coef[..., None] * delta[0]).to(ng.hidden.dtype)
                if ng.mlp is not None:
                    add = residual_change(post, ng.mlp, add)
                nf = above(ng.hidden + add, ng.mask)
                neg_logp = head_logits(handle, nf[torch.arange(len(ng.last), device=dev), ng.last]).float().log_softmax(-1)
                if neg_ref is None:
                    neg_ref = neg_logp.detach()
                neg_kl = kl_per_row(neg_ref, neg_logp).mean()
            newly = (nll.detach() < spec.early_stop_nll) & ~done
            if step == spec.steps:  # the raised clamp is only for edits whose own prompt misses its target
                nll_main = -torch.zeros(n, device=dev).index_add(0, own_l, tok_lp.detach() * main_l) / n_main
                newly |= (nll_main < spec.early_stop_nll) & ~done
            for i in torch.nonzero(newly).flatten().tolist():
                infos[i].update(steps=step, nll=float(nll[i].detach()))
                frozen[i] = delta.detach()[i]
            done |= newly
            if bool(done.all()):
                break
            loss = (nll + spec.kl_factor * kl_per + decay + spec.negative_kl_factor * neg_kl)[~done].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                factor = spec.clamp_norm_factor if step < spec.steps else spec.clamp_norm_factor_max
                max_norm = factor * ref_norm
                shrink = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(shrink[:, None])
                delta[done] = frozen[done]  # a request that reached its target keeps that delta
            if bool(newly.any()):
                # a request that reached its target leaves the forward pass too (its loss already
                # left the sum): the others' steps do not depend on it, so their deltas are unchanged
                live = None
        for i in range(n):
            if infos[i]["nll"] is None:
                infos[i]["nll"] = float(nll[i].detach())
    if mlp_at is not None and ref == "resid":
        with torch.no_grad():
            return residual_change(post, mlp_at[first_row, 0], delta.detach()), infos
    return delta.detach(), infos
