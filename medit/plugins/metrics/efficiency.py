"""Efficiency: wall time of each edit (the edit alone), the one-time setup it triggered
(statistics ``stats_s``, context templates ``template_s``, retrieval pools ``pool_s``), the process's peak memory so far, and
its resident memory right after the case's edit (in sequential mode that shows whether memory
grows along the run)."""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.core.timing import SETUP_FIELDS
from medit.core.metric import Metric, Results, Values
from medit.core.requests import EditRequest


class Efficiency(Metric):
    name = "efficiency"
    description = "seconds per edit and peak memory (RSS, and GPU when used)"
    protocols = ()

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        out: Values = {"edit_s": {"pre": None, "post": ctx.get("edit_s")},
                       "peak_rss_mb": {"pre": None, "post": ctx.get("peak_rss_mb")}}
        if ctx.get("rss_mb") is not None:
            out["rss_mb"] = {"pre": None, "post": ctx["rss_mb"]}
        for setup in SETUP_FIELDS.values():  # one-time setup, never inside edit_s
            if ctx.get(setup) is not None:
                out[setup] = {"pre": None, "post": ctx[setup]}
        if ctx.get("peak_gpu_mb") is not None:
            out["peak_gpu_mb"] = {"pre": None, "post": ctx["peak_gpu_mb"]}
        return out


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Efficiency())
