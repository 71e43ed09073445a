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
