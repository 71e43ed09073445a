"""Scoring queries against a model: the full engine (:mod:`~medit.scoring.engine`), the cached
engine that reuses pre-edit prefixes (:mod:`~medit.scoring.cached`), the pre-edit score cache and
next-token distributions kept on disk for locality."""
