"""Layer selection shared by methods: ``layers: auto`` rules and range checks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from medit.errors import HParamsError, MethodError

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle


def resolve_layers(handle: "ModelHandle", layers: Sequence[int] | str, auto: Sequence[float],
                   what: str = "layers") -> list[int]:
    """Explicit layer indices (negative counts from the end) or ``auto``: the given fractions of
    the depth, rounded (e.g. ``auto=(0.7,)`` on a 30-layer model gives [20])."""
    n = handle.n_layers
    if isinstance(layers, str):
        if layers != "auto":
            raise HParamsError(f"hparam {what!r}: {layers!r} is neither 'auto' nor a list of layer indices")
        picked = sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in auto})
        return picked
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise MethodError(f"hparam {what!r}: layer {layer} is out of range for {handle.model_id} "
                              f"({n} layers: use 0..{n - 1}, or -1..-{n} counting from the end)")
        out.append(layer + n if layer < 0 else layer)
    return out


#: MEMIT's ``layers: auto``: a block of SPREAD_COUNT consecutive layers ending a quarter of the way up.
SPREAD_LAST = 0.25
SPREAD_COUNT = 5


def spread_layers(handle: "ModelHandle", layers: Sequence[int] | str) -> list[int]:
    """Layers a multi-layer edit spreads over (ascending): the given ones, or for ``auto`` the
    block MEMIT uses (the SPREAD_COUNT layers ending at SPREAD_LAST of the depth)."""
    if layers == "auto":
        n = handle.n_layers
        last = max(0, min(n - 1, round(SPREAD_LAST * (n - 1))))
        return list(range(max(0, last - SPREAD_COUNT + 1), last + 1))
    return sorted(resolve_layers(handle, layers, auto=()))
