"""torchrun ranks: who am I, the process group, and how work is split across ranks.

medit is launched as several processes by ``torchrun`` (``torchrun --nproc-per-node N -m medit --
eval ...``), which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT``) for each. This module reads them, starts the process group (``nccl`` on CUDA,
``gloo`` on CPU) and gives the rest of medit a few small helpers:

* :func:`world` / :func:`rank` / :func:`is_main`: where this process stands (reading the
  environment only; nothing is imported until the group is started).
* :func:`shard`: a deterministic split of a list over the ranks (round robin).
* :func:`shared`: a scope in which every rank runs the same work together, so code inside it may
  split that work and combine it with collectives (:func:`collective_world`): the statistics pass
  (:mod:`medit.toolkit.stats`) and a MEMIT/AlphaEdit batch's target vectors
  (:mod:`medit.toolkit.target_vectors`). Outside it (sharded evaluation: each rank edits its own
  cases) ranks never wait for each other inside a method.

Without ``WORLD_SIZE`` (or with 1) everything here is a no-op and ``torch.distributed`` is never
imported.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")

_SHARED = [0]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        from medit.errors import MeditError
        raise MeditError(f"{name}={value!r} is not an integer; launch with torchrun, which sets it") from None


def world() -> int:
    """The number of ranks (``WORLD_SIZE``; 1 when unset)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (``RANK``; 0 when unset)."""
    return _env_int("RANK", 0) if world() > 1 else 0


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; the device index on CUDA)."""
    return _env_int("LOCAL_RANK", rank()) if world() > 1 else 0


def is_main() -> bool:
    """Whether this process prints and writes the run's shared results (rank 0)."""
    return rank() == 0


def started() -> bool:
    """Whether the process group of several ranks is up."""
    if world() <= 1:
        return False
    import torch.distributed as dist
    return bool(dist.is_available() and dist.is_initialized())


def start(device: str | None = None) -> str:
    """Start the process group if this is one of several ranks; returns the device this rank
    uses: ``cuda:LOCAL_RANK`` on CUDA (when ``device`` is None or names CUDA), else ``device``
    (default ``cpu``). Backend: ``nccl`` with CUDA, ``gloo`` otherwise."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    chosen = f"cuda:{local_rank()}" if cuda else (device or "cpu")
    if world() > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank(), world_size=world())
    return chosen


def stop() -> None:
    """Tear the process group down (a no-op without one)."""
    if started():
        import torch.distributed as dist
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if started():
        import torch.distributed as dist
        dist.barrier()


def shard(items: Sequence[T], ranks: int | None = None, which: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``ranks``-th item from position ``which`` (round
    robin, so shares differ by at most one item and the split depends only on the order)."""
    n = world() if ranks is None else ranks
    r = rank() if which is None else which
    return list(items[r::n])


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """A scope in which every rank runs the same work together (see the module docstring)."""
    _SHARED[0] += 1
    try:
        yield
    finally:
        _SHARED[0] -= 1


def in_shared() -> bool:
    """Whether the caller is inside :func:`shared`."""
    return bool(_SHARED[0])


def collective_world() -> int:
    """The ranks that share the current work: :func:`world` inside :func:`shared` with the group
    started, else 1 (each process works alone)."""
    return world() if _SHARED[0] and started() else 1


def all_reduce_sum(tensor: Any) -> Any:
    """Sum ``tensor`` over the ranks sharing the work, in place (returns it)."""
    if collective_world() > 1:
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: T, ranks: int | None = None) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, over the ranks sharing the work
    (:func:`collective_world`) or, given ``ranks``, that many (``[obj]`` for one)."""
    n = collective_world() if ranks is None else ranks
    if n <= 1:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out
