"""Running and reading evaluations: the engine and its modes (:mod:`~medit.evaluation.engine`,
:mod:`~medit.evaluation.config`), run folders and resume (:mod:`~medit.evaluation.rundir`),
torchrun sharding, summaries with bootstrap intervals, the health monitor of long sequential runs,
memory readings, and ``medit report`` (tables, paired comparisons, charts, misses)."""
