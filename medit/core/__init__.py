"""medit's contracts and the small services every layer shares.

Contracts: :mod:`~medit.core.method` (Method, hparams resolution), :mod:`~medit.core.edit` (Edit,
WeightEdit, patch kinds), :mod:`~medit.core.hparams`, :mod:`~medit.core.requests`,
:mod:`~medit.core.queries` (scoring queries, no torch), :mod:`~medit.core.metric`,
:mod:`~medit.core.adapter` (ModelAdapter), :mod:`~medit.core.dataset` (DatasetFormat, loading and
selection; :mod:`~medit.core.records` and :mod:`~medit.core.hfdata` read files and `datasets`
folders), :mod:`~medit.core.chat` (chat wrapping), :mod:`~medit.core.state` (typed run state) and
:mod:`~medit.core.patchfile` (the patch folder format). Services with no model in them: atomic I/O
(:mod:`~medit.core.io`), progress lines, timing of one-time setup, and the torchrun process group
(:mod:`~medit.core.distributed`). Core imports no plugin and nothing above it.
"""
