"""Next-token distributions kept in a file instead of in memory.

A pre-edit distribution is 98 KB (float16 over SmolLM2's 49k vocabulary) and a run keeps one per
locality prompt until its cases are scored after the edits: 10,000 CounterFact cases with ten
neighbourhood prompts each would hold 10 GB. :class:`DistFile` stores them as rows of a file, a
:class:`~medit.core.queries.NextToken` names its row, and a row is read (``pread``, not a memory
map, so the file never counts as the process's memory) when a metric asks for it.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO

import torch

from medit.core.queries import NextToken

#: bytes per stored value (float16)
ITEM = 2


class DistFile:
    """Rows of float16 log-probabilities in a file, from byte ``offset`` on, ``width`` values each.

    :meth:`temporary` appends to an anonymous file (gone when the last reference is); made on an
    open file with its rows' ``offset``, ``width`` and count, it reads them, e.g. a score-cache
    entry. The file stays open as long as this object lives, so replacing or deleting the path
    meanwhile does not change what it reads.
    """

    def __init__(self, handle: IO[bytes], offset: int = 0, width: int | None = None, rows: int = 0) -> None:
        self._file = handle
        self.offset = offset
        self.width = width
        self.rows = rows

    @classmethod
    def temporary(cls) -> "DistFile":
        from medit.core.io import cache_dir
        return cls(tempfile.TemporaryFile(dir=cache_dir("tmp"), buffering=0))

    def append(self, logprobs: torch.Tensor) -> NextToken:
        """Store one distribution [vocab] (as float16) and return the NextToken that reads it back."""
        row = logprobs.detach().reshape(-1).to("cpu", torch.float16).contiguous()
        if self.width is None:
            self.width = row.numel()
        if row.numel() != self.width:
            raise ValueError(f"a distribution over {row.numel()} tokens cannot join rows of {self.width}")
        data = row.numpy().tobytes()
        at = self.offset + self.rows * self.width * ITEM
        if hasattr(os, "pwrite"):
            written = os.pwrite(self._file.fileno(), data, at)
        else:  # pragma: no cover - Windows has no pwrite
            self._file.seek(at)
            written = self._file.write(data) or 0
        if written != len(data):
            raise OSError(f"short write to the distributions file ({written} of {len(data)} bytes)")
        self.rows += 1
        return NextToken(source=self, row=self.rows - 1)

    def row(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.rows or self.width is None:
            raise IndexError(f"row {i} of {self.rows}")
        size = self.width * ITEM
        if hasattr(os, "pread"):
            data = os.pread(self._file.fileno(), size, self.offset + i * size)
        else:  # pragma: no cover - Windows has no pread
            self._file.seek(self.offset + i * size)
            data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"the distributions file ended inside row {i}")
        return torch.frombuffer(bytearray(data), dtype=torch.float16)
