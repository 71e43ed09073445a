"""WISE (Wang et al. 2024): a side memory for one FFN's output projection, with a router.

The side memory holds weight deltas ΔW for the MLP output projection of one layer (the main
memory, the model's own weight, never changes). A sequence's activation score for a memory is
the largest over its tokens of ‖ΔW a‖ (a: the projection's input) relative to the mean of ‖W a‖
(so the margins below do not depend on the model's scale); the router sends the sequence to
the memory with the highest score when that score exceeds the memory's threshold (``act_ratio``
times the lowest score of its edits' prompts), else to the main memory, whose output is then
exactly the unedited one. Generation keeps the routing decided on the prompt.

The router also has a subject gate (``key_gate``, a medit addition to the paper's router): a memory
keeps, for each of its edits, the projection's input at the subject's last token of the edit
prompt (bare and under each context prefix), and a sequence may go to that memory only if one of
its tokens after the first has cosine similarity at least ``key_gate`` to one of those keys. The
score alone does not keep out prompts of the same relation about other subjects (CounterFact's
neighbourhood prompts), which the gate does; the first token is skipped because its activation
is much the same in every sequence (an attention sink).

Edits train the current *shard*: ΔW restricted to a random mask of ``mask_ratio`` of the entries,
by Adam on the target NLL plus margin losses that push the score of the edit prompt (under context
prefixes) above ``beta`` and that of unrelated rows below ``alpha`` (and at least ``gamma`` under
the edit's). Unrelated rows are text sampled from the model and the edit prompt about other
subjects (``negative_subjects``, plus ``pool_negatives`` real subjects drawn from
``negative_pool`` for each edit), so that the router keys on the subject, not on the relation;
the subject-swapped rows of the shard's earlier edits are replayed too (``replay_negatives``), so
training a later edit does not wake the router for them again.
After ``save_freq`` edits the shard is closed and a new one starts; after ``merge_freq`` edits
the closed shards are merged into one memory by TIES merging (trim to the ``density`` largest
entries, elect signs, average the agreeing entries). Reverting an edit restores the state before
it exactly; WISE edits revert last-first (as every mode does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import medit
from medit.toolkit.context import NEGATIVE_SUBJECTS, context_templates, fill, swapped_prompts
from medit.core.dataset import COUNTERFACT_TRAIN, load_dataset, resolve_packaged_spec
from medit.core.edit import Edit, patch_requests
from medit.errors import HParamsError, MethodError, PatchError
from medit.model.handle import ModelHandle
from medit.model.adaptors import Adaptor, attach, installed, release
from medit.toolkit.layerwise import LayerwiseLM
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.toolkit.merging import ties_merge
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.toolkit.target_vectors import template_keys
from medit.scoring.engine import Scorer
from medit.model.tracing import capture, run_until
from medit.plugins.methods.wise import DESCRIPTION

AUTO_DEPTH = 0.85
#: unrelated sentences for models whose own text cannot be sampled cheaply (encoder-decoders).
NEUTRAL = ("The weather was mild that week", "She opened the window", "A new road was built last year",
           "The book has twelve chapters", "He plays the piano every evening", "Prices rose in the spring",
           "The museum opens at nine", "They walked along the river", "The report was published online",
           "Water boils at a high temperature")


@dataclass
class WISEHParams(HParams):
    """Hyperparameters of WISE."""

    #: layer whose MLP output projection gets the side memory (index or ``auto``).
    layer: int | str = "auto"
    #: fraction of the side memory's entries one shard may change.
    mask_ratio: float = 0.2
    #: Adam steps and learning rate per edit.
    steps: int = 40
    lr: float = 0.005
    #: bound on every entry of ΔW.
    norm_constraint: float = 0.1
    #: margins of the routing loss, on the activation score (largest ‖ΔW a‖ relative to mean ‖W a‖):
    #: unrelated rows below ``alpha``, the edit above ``beta``, and a gap of at least ``gamma``.
    #: Training stops early once the edit's target is the argmax and ``beta``/``gamma`` hold.
    alpha: float = 0.1
    beta: float = 1.0
    gamma: float = 0.5
    #: routing threshold: this fraction of the lowest score of the memory's edit prompts (those of
    #: the open shard are re-scored after each edit, as training it moves their scores).
    act_ratio: float = 0.88
    #: subject gate: least cosine similarity between a token (after the first) of a sequence and
    #: one of a memory's subject keys for the router to consider that memory; null: no gate (the
    #: paper's router). Causal models only.
    key_gate: float | None = 0.9
    #: edits per shard, and edits between merges of the closed shards.
    save_freq: int = 25
    merge_freq: int = 100
    #: TIES merging: fraction of each shard's entries kept before electing signs.
    density: float = 0.53
    #: context prefixes of the edit prompt: [new tokens, count] pairs (plus the bare prompt).
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 3]])
    #: unrelated texts (generated by the model) that the router must send to the main memory.
    n_irrelevant: int = 4
    #: the edit prompt with its subject swapped for each of these is also sent to the main memory,
    #: so the router keys on the subject rather than on the relation's wording.
    negative_subjects: list[str] = field(default_factory=lambda: list(NEGATIVE_SUBJECTS))
    #: dataset spec (``FORMAT:PATH``) whose subjects also stand in for the edit's subject in
    #: unrelated rows (relative paths: from the working directory, then the folder holding the medit
    #: package; default: the 2,000 CounterFact train cases the package ships); null: only
    #: ``negative_subjects``.
    negative_pool: str | None = COUNTERFACT_TRAIN
    #: subjects drawn from ``negative_pool`` for each edit.
    pool_negatives: int = 8
    #: earlier edits of the open shard replayed while training a new one (0: none).
    replay: int = 25
    #: subject-swapped rows of each replayed edit that are replayed with it, as unrelated rows.
    replay_negatives: int = 2
    early_stop_nll: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layer, str) and self.layer != "auto":
            raise HParamsError(f"hparam 'layer' must be an integer or 'auto', got {self.layer!r}")
        if not 0 < self.mask_ratio <= 1:
            raise HParamsError(f"hparam 'mask_ratio' must be in (0, 1], got {self.mask_ratio}")
        if not 0 < self.density <= 1:
            raise HParamsError(f"hparam 'density' must be in (0, 1], got {self.density}")
        for name in ("replay", "replay_negatives", "pool_negatives"):
            if getattr(self, name) < 0:
                raise HParamsError(f"hparam {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "save_freq", "merge_freq", "n_irrelevant"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        if self.merge_freq % self.save_freq:
            raise HParamsError(f"hparam 'merge_freq' ({self.merge_freq}) must be a multiple of "
                               f"'save_freq' ({self.save_freq})")
        for name in ("lr", "norm_constraint", "act_ratio"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        if self.key_gate is not None and not -1 <= self.key_gate <= 1:
            raise HParamsError(f"hparam 'key_gate' must be a cosine similarity in [-1, 1] or null, got {self.key_gate}")
        if not self.beta > self.alpha >= 0:
            raise HParamsError(f"hparams must satisfy beta > alpha >= 0, got alpha={self.alpha}, beta={self.beta}")


@dataclass
class Memory:
    """One side memory: ΔW in (out, in) orientation, the mask it may change (None: merged), the
    lowest in-scope score of its edits, how many edits it holds and its edits' unit subject keys
    [n, d_in] for the subject gate (None: no gate)."""

    delta: torch.Tensor
    mask: torch.Tensor | None
    min_act: float = float("inf")
    count: int = 0
    keys: torch.Tensor | None = None
    #: (context ids, target ids) of the bare prompts of the edits in an open shard (replayed).
    replay: list = field(default_factory=list)
    #: per edit of an open shard, the subject-swapped rows replayed as unrelated rows.
    replay_neg: list = field(default_factory=list)


class SideMemory(Adaptor):
    """The WISE adaptor on one MLP output projection."""

    def __init__(self, handle: ModelHandle, layer: int, hp: WISEHParams) -> None:
        super().__init__(handle, handle.module("mlp_out", layer))
        self.layer = layer
        self.hp = hp
        self.closed: list[Memory] = []
        self.current: Memory | None = None
        self.total = 0
        self.routes: torch.Tensor | None = None  # last fresh call's choice per row (-1: main)
        #: while training: the memory being trained, applied to every row of the call (the edit's
        #: own rows); their scores are left in ``train_scores``.
        self.training: Memory | None = None
        self.train_scores: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(hp.seed)

    def memories(self) -> list[Memory]:
        return self.closed + ([self.current] if self.current is not None and self.current.count else [])

    def empty(self) -> bool:
        return self.total == 0 and self.current is None and not self.closed

    def scores(self, a: torch.Tensor, y_main: torch.Tensor, delta: torch.Tensor, tmask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(side output ΔW a [B, T, out], per-row activation score [B]: the largest norm of ΔW a
        over the row's tokens relative to the mean norm of the main output W a).

        The largest, not the mean: the tokens before the subject are the same in an edit prompt
        and in a prompt of the same relation about another subject, so a mean over them cannot
        tell the two apart."""
        side = a @ delta.to(a.dtype).T
        n = tmask.sum(1).clamp_min(1.0)
        num = (side.float().norm(dim=-1) * tmask).amax(1)
        return side, num / ((y_main.float().norm(dim=-1) * tmask).sum(1) / n).clamp_min(1e-6)

    def rewrite(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tmask = self.token_mask(y)
        if self.training is not None:
            side, s = self.scores(x, y, self.training.delta, tmask)
            self.train_scores = s
            return y + side.to(y.dtype)
        mems = self.memories()
        if not mems:
            return y
        if self.continuing and self.routes is not None and self.routes.shape[0] == y.shape[0]:
            routes = self.routes
            sides = {int(r): x @ mems[int(r)].delta.to(x.dtype).T for r in routes.unique() if r >= 0}
        else:
            best = torch.full((y.shape[0],), -1, dtype=torch.long, device=y.device)
            best_s = torch.full((y.shape[0],), -1.0, device=y.device)
            sides = {}
            gates = self.gates(x, tmask, mems)
            for i, m in enumerate(mems):
                side, s = self.scores(x, y, m.delta, tmask)
                sides[i] = side
                take = (s > self.hp.act_ratio * m.min_act) & (s > best_s) & gates[:, i]
                best = torch.where(take, torch.full_like(best, i), best)
                best_s = torch.where(take, s, best_s)
            routes = self.routes = best
        if not bool((routes >= 0).any()):
            return y
        out = y.clone()
        for i, side in sides.items():
            rows = routes == i
            if bool(rows.any()):
                out[rows] = y[rows] + side[rows].to(y.dtype)
        return out

    def gates(self, x: torch.Tensor, tmask: torch.Tensor, mems: Sequence[Memory]) -> torch.Tensor:
        """[B, len(mems)] bool: rows with a token after their first whose input is within
        ``key_gate`` (cosine) of one of the memory's subject keys (all True for a memory without
        keys, and everywhere without a gate)."""
        out = torch.ones(x.shape[0], len(mems), dtype=torch.bool, device=x.device)
        keyed = [i for i, m in enumerate(mems) if m.keys is not None and len(m.keys)]
        if self.hp.key_gate is None or not keyed:
            return out
        real = tmask > 0
        later = real & (real.long().cumsum(1) > 1)
        unit = torch.nn.functional.normalize(x.float(), dim=-1)  # once per call, not per memory
        for i in keyed:
            sim = (unit @ mems[i].keys.to(x.device).T).amax(-1)  # type: ignore[union-attr]
            out[:, i] = sim.masked_fill(~later, -2.0).amax(1) >= self.hp.key_gate
        return out

    def new_shard(self) -> Memory:
        w = self.handle.weight_out_in("mlp_out", self.layer)
        mask = torch.rand(w.shape, generator=self.gen) < self.hp.mask_ratio
        return Memory(torch.zeros(w.shape, dtype=torch.float32, device=w.device), mask.to(w.device))


class WiseEdit(Edit):
    """Edits trained into a :class:`SideMemory`; revert restores the memory state before them."""

    kind = "side-memory"

    def __init__(self, handle: ModelHandle, method: str, requests: Sequence[EditRequest],
                 hparams: dict[str, Any], layer: int) -> None:
        super().__init__(handle, method, requests, hparams)
        self.layer = layer
        self.before: tuple | None = None
        self.after: int | None = None  # memory's edit count once this edit was complete

    def revert(self) -> None:
        if not self.active:
            return
        sm = installed(self.handle, SideMemory, self.layer)
        if sm is not None and self.before is not None:
            if self.after is not None and sm.total != self.after:
                raise MethodError("WISE edits must be reverted last-first; revert the later WISE edits first")
            closed, current, cur_state, total = self.before
            sm.closed, sm.current, sm.total = closed, current, total
            if current is not None:
                vals, min_act, count, replay, replay_neg, keys = cur_state
                current.delta[current.mask] = vals
                current.min_act, current.count, current.replay, current.replay_neg = min_act, count, replay, replay_neg
                current.keys = keys
            if total == 0:
                sm.closed, sm.current = [], None
            release(self.handle, SideMemory, self.layer)
        self.active = False

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sm = installed(self.handle, SideMemory, self.layer)
        if sm is None or self.before is None or self.before[-1] != 0:
            raise PatchError("only WISE edits made on an unedited model can be saved; save the edits "
                             "together (medit edit --mode batch)")
        mems = sm.memories()
        tensors = {f"delta.{i}": m.delta for i, m in enumerate(mems)}
        tensors.update({f"keys.{i}": m.keys for i, m in enumerate(mems) if m.keys is not None})
        extra = {"layer": self.layer, "min_act": [m.min_act for m in mems], "counts": [m.count for m in mems],
                 "note": "WISE side memories: weight deltas of one MLP output projection, routed per sequence; "
                         "the model's weights are unchanged"}
        return extra, tensors

    @classmethod
    def from_payload(cls, handle: ModelHandle, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WiseEdit":
        layer = int(manifest.get("layer", -1))
        if not 0 <= layer < handle.n_layers:
            raise PatchError(f"WISE patch layer {layer} does not exist in {handle.model_id}; apply the patch "
                             f"to the model it was made for ({manifest['model']['id']})")
        hp = WISEHParams.from_dict(manifest.get("hparams", {}), "patch manifest")
        if installed(handle, SideMemory, layer) is not None:
            raise PatchError(f"the model already holds WISE edits at layer {layer}; revert them before applying a patch")
        sm = attach(handle, SideMemory, layer, lambda: SideMemory(handle, layer, hp))
        reqs = patch_requests(manifest)
        edit = cls(handle, manifest["method"], reqs, hp.to_dict(), layer)
        edit.before = ([], None, None, 0)
        edit.after = len(reqs)
        for i, (min_act, count) in enumerate(zip(manifest["min_act"], manifest["counts"])):
            keys = tensors.get(f"keys.{i}")
            sm.closed.append(Memory(tensors[f"delta.{i}"].to(handle.device).float(), None, float(min_act), int(count),
                                    None if keys is None else keys.to(handle.device).float()))
        sm.total = len(reqs)
        return edit


class WISE(Method[WISEHParams]):
    name = "wise"
    description = DESCRIPTION
    hparams_class = WISEHParams
    cached_scoring = False  # edits hook modules
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "wise"

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: WISEHParams) -> Edit:
        hp = hparams
        layer = resolve_layers(handle, [hp.layer] if isinstance(hp.layer, int) else hp.layer,
                               auto=(AUTO_DEPTH,), what="layer")[0]
        sm = attach(handle, SideMemory, layer, lambda: SideMemory(handle, layer, hp))
        sm.hp = hp
        edit = WiseEdit(handle, self.name, requests, hp.to_dict(), layer)
        cur = sm.current
        edit.before = (list(sm.closed), cur,
                       (cur.delta[cur.mask].clone(), cur.min_act, cur.count, cur.replay, cur.replay_neg, cur.keys)
                       if cur else None, sm.total)
        try:
            infos = [self._one(handle, sm, r, hp) for r in requests]
        except BaseException:
            edit.revert()
            raise
        edit.after = sm.total
        edit.info.update(layer=layer, edits=infos)
        return edit

    def _pool_subjects(self, hp: WISEHParams) -> list[str]:
        """Distinct subjects of ``hp.negative_pool`` (read once per pool)."""
        if not hp.negative_pool:
            return []
        cache = self.__dict__.setdefault("_pools", {})
        if hp.negative_pool not in cache:
            reqs, _ = load_dataset(resolve_packaged_spec(hp.negative_pool, "WISE negative pool", "negative_pool",
                                                    optional=True))
            cache[hp.negative_pool] = sorted({r.subject for r in reqs})
        return cache[hp.negative_pool]

    def _negative_subjects(self, req: EditRequest, hp: WISEHParams, index: int) -> list[str]:
        subjects = list(hp.negative_subjects)  # (swapped_prompts drops the edit's own subject)
        pool = [s for s in self._pool_subjects(hp) if s != req.subject]  # before the draw: picks stay as they were
        if pool and hp.pool_negatives:
            g = torch.Generator().manual_seed(hp.seed * 1_000_003 + index)  # reproducible per edit
            picks = torch.randperm(len(pool), generator=g)[:hp.pool_negatives].tolist()
            subjects += [pool[i] for i in picks]
        return subjects

    @staticmethod
    def _templates(handle: ModelHandle, hp: WISEHParams) -> tuple[list[str], list[str]]:
        """(the edit prompt's context templates, the unrelated texts)."""
        if handle.is_encoder_decoder:  # (templates are sampled from a causal LM's continuations)
            return ["{}"] + [f"{t}. {{}}" for t in NEUTRAL[:2]], list(NEUTRAL[2:2 + hp.n_irrelevant])
        templates = context_templates(handle, [tuple(x) for x in hp.context_templates])  # type: ignore[misc]
        irr_texts = [t.replace("{}", "").strip()
                     for t in context_templates(handle, [(12, hp.n_irrelevant)], seed=hp.seed + 1)[1:]]
        return templates, irr_texts

    @staticmethod
    def _subject_keys(handle: ModelHandle, sm: SideMemory, req: EditRequest, hp: WISEHParams) -> torch.Tensor | None:
        """Unit keys of ``req`` for the subject gate: the projection's input at the subject's last
        token under each context template, where that token is not a row's first (None: no gate)."""
        if hp.key_gate is None or handle.is_encoder_decoder:  # (the subject is in the encoder's input)
            return None
        keys, pos = template_keys(handle, req, sm.layer, WISE._templates(handle, hp)[0])
        keep = torch.tensor([p > 0 for p in pos], device=keys.device)
        return torch.nn.functional.normalize(keys[keep].float(), dim=-1)

    def _rows(self, handle: ModelHandle, req: EditRequest, hp: WISEHParams, index: int = 0) -> tuple[list, list, list]:
        """(edit prompt under each context template, sampled unrelated texts, the edit prompt
        about other subjects) as (context ids, target ids) pairs."""
        scorer = Scorer(handle)
        templates, irr_texts = self._templates(handle, hp)
        edit_pairs = [scorer.encode_pair(fill(t, req.prompt)[0], req.target_new) for t in templates]
        texts = []
        for t in irr_texts:
            ids = handle.tokenizer(t).input_ids
            texts.append((ids[:-1], ids[-1:]) if not handle.is_encoder_decoder else (ids, ids[:2]))
        swapped = [scorer.encode_pair(p, req.target_new)
                   for p in swapped_prompts(req.prompt, req.subject, self._negative_subjects(req, hp, index))]
        return edit_pairs, texts, swapped

    @staticmethod
    def _activations(handle: ModelHandle, sm: SideMemory, pairs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input a, main output W a, token mask) of the side memory's projection for ``pairs``
        fed as the LM batch feeds them. A row's activation score needs only these, and they do
        not depend on ΔW, so the unrelated rows are run once per edit up to the projection
        instead of through the upper layers at every step."""
        with torch.no_grad(), capture(handle, "mlp_out", [sm.layer], what="input", stop=True) as store:
            run_until(handle, lambda: Scorer(handle).selected_logits(pairs))
        a = store[sm.layer].detach()
        tmask = sm.token_mask(a)  # the base model's pre-hook noted this call's mask
        w = handle.weight_out_in("mlp_out", sm.layer)
        bias = getattr(sm.module, "bias", None)
        return a, torch.nn.functional.linear(a, w.to(a.dtype), None if bias is None else bias.to(a.dtype)), tmask

    def _one(self, handle: ModelHandle, sm: SideMemory, req: EditRequest, hp: WISEHParams) -> dict[str, Any]:
        if sm.current is None:
            sm.current = sm.new_shard()
        mem = sm.current
        edit_pairs, texts, swapped = self._rows(handle, req, hp, sm.total)
        # Earlier edits of this shard are replayed so that training the shard on this edit
        # does not overwrite them (the WISE paper's replay, restricted to the open shard).
        replay = mem.replay[-hp.replay:] if hp.replay else []
        old_neg = [row for rows_ in (mem.replay_neg[-hp.replay:] if hp.replay else []) for row in rows_]
        a_out, y_out, m_out = self._activations(handle, sm, texts + swapped + old_neg)
        lm = LayerwiseLM(handle, edit_pairs + replay, sm.layer)
        sm.mask = lm.mask
        sm.continuing = False
        start = mem.delta.detach().clone()
        delta = start.clone().requires_grad_(True)
        bound = hp.norm_constraint
        opt = torch.optim.Adam([delta], lr=hp.lr)
        info: dict[str, Any] = {"case_id": req.case_id}
        step = 0
        try:
            with lm.session():
                for step in range(hp.steps + 1):
                    sm.training = Memory(delta, mem.mask)
                    sm.mask = lm.mask
                    logits = lm.logits()
                    nll = lm.row_nll(logits).mean()
                    s_in = sm.train_scores
                    s_out = sm.scores(a_out, y_out, delta, m_out)[1]
                    act = (torch.relu(s_out - hp.alpha).mean() + torch.relu(hp.beta - s_in).mean()
                           + torch.relu(s_out.max() - s_in + hp.gamma).mean())
                    loss = nll + act
                    ok = bool(lm.row_correct(logits).all()) and float(nll.detach()) < hp.early_stop_nll
                    # (``alpha`` only regularises: the router needs the edit above ``beta`` and
                    # ``gamma`` above every unrelated row, not the unrelated rows near zero.)
                    lo = float(s_in.detach().min())
                    routed = lo >= hp.beta and lo - float(s_out.detach().max()) >= hp.gamma
                    if step == hp.steps or (ok and routed):
                        break
                    opt.zero_grad()
                    loss.backward()
                    delta.grad.mul_(mem.mask)
                    opt.step()
                    with torch.no_grad():
                        delta.clamp_(-bound, bound)
                        delta[~mem.mask] = start[~mem.mask]  # (Adam moves entries with zero gradient too)
        finally:
            sm.training = None
            sm.mask = None
        with torch.no_grad():
            mem.delta = delta.detach()
            # The threshold follows the bare prompts' scores under the shard as it now is: training
            # this edit moves the scores of the earlier (replayed) edits too.
            bare = torch.cat([s_in.detach()[:1], s_in.detach()[len(edit_pairs):]])
            s_in_min = float(bare.min())
        mem.min_act = s_in_min if len(replay) == mem.count else min(mem.min_act, s_in_min)
        mem.count += 1
        keys = self._subject_keys(handle, sm, req, hp)
        if keys is not None:
            mem.keys = keys if mem.keys is None else torch.cat([mem.keys, keys])
        mem.replay = mem.replay + [edit_pairs[0]]
        if hp.replay_negatives:  # the last ones: the pool's subjects when there is a pool
            mem.replay_neg = mem.replay_neg + [swapped[-hp.replay_negatives:]]
        sm.total += 1
        info.update(steps=step, nll=float(nll.detach()), score_in=s_in_min, score_out=float(s_out.detach().max()))
        if mem.count >= hp.save_freq:
            sm.closed.append(mem)
            sm.current = None
        if sm.total % hp.merge_freq == 0:
            shards = [m for m in sm.closed if m.mask is not None]
            if len(shards) > 1:
                # (a shard without keys was never gated, so neither is a merge that holds it)
                keys = None if any(m.keys is None for m in shards) else torch.cat([m.keys for m in shards])  # type: ignore[misc]
                merged = Memory(ties_merge([m.delta for m in shards], hp.density), None,
                                min(m.min_act for m in shards), sum(m.count for m in shards), keys)
                sm.closed = [m for m in sm.closed if m.mask is None] + [merged]
                info["merged"] = len(shards)
        return info
