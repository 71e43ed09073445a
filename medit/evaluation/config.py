"""How an evaluation runs: :class:`EvalConfig`, checked when it is made (before any model loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medit.core.chat import DEFAULT_CHAT_PROMPT
from medit.core.method import MODES
from medit.core.metric import ANSWER_TOKENS, DEFAULT_PROTOCOLS, PROTOCOLS, Metric
from medit.errors import MeditError, UnknownNameError
from medit.evaluation.monitor import MonitorConfig
from medit.plugin.manager import get_plugins

DEFAULT_METRICS = ("reliability", "generalization", "locality", "portability", "efficiency")


@dataclass
class EvalConfig:
    """How to run an evaluation. ``batch_size`` is edits per batch: in batch mode each batch is
    applied to the unedited model (0: all at once); in sequential mode the batches are applied one
    after another (0 or 1: one edit at a time). ``score_batch_size`` is sequences per forward pass
    when scoring."""

    mode: str = "single"
    #: None: :data:`~medit.core.metric.DEFAULT_PROTOCOLS`, plus ``answer`` with ``chat``.
    protocols: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    batch_size: int = 0
    score_batch_size: int = 64
    gen_tokens: int = 8
    out_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    dataset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    #: keep the edits applied after the run (``medit edit``): available in sequential mode and in
    #: batch mode with a single batch; the edit is then in ``Evaluator.final_edit``.
    keep_edit: bool = False
    #: sequential mode: also score each case right after its own edit (stage ``immediate``).
    also_immediate: bool = False
    #: reuse pre-edit scores cached on disk under ``$MEDIT_CACHE/scores`` (and store new ones).
    score_cache: bool = True
    #: options of metrics that take some, by metric name (e.g. ``{"other_task": {"text": FILE}}``);
    #: see :meth:`medit.core.metric.Metric.configure`.
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: wrap every prompt as a user turn of the tokenizer's chat template (:mod:`medit.core.chat`);
    #: ``chat_prompt`` turns a cloze prompt into the user message.
    chat: bool = False
    chat_prompt: str = DEFAULT_CHAT_PROMPT
    #: the ``answer`` protocol's most new tokens.
    answer_tokens: int = ANSWER_TOKENS
    #: sequential mode: every this many edits, a health row in ``monitor.jsonl`` (0: off; see
    #: :mod:`medit.evaluation.monitor`).
    monitor_every: int = 0
    #: end a monitored run with RunCollapsed when probe locality or retained reliability falls
    #: below ``collapse_threshold``.
    stop_on_collapse: bool = False
    collapse_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.protocols is None:
            self.protocols = DEFAULT_PROTOCOLS + (("answer",) if self.chat else ())
        self.protocols = tuple(self.protocols)
        if self.answer_tokens < 1:
            raise MeditError(f"answer tokens {self.answer_tokens!r} must be at least 1; pass e.g. --answer-tokens "
                             f"{ANSWER_TOKENS}")
        if "{prompt}" not in self.chat_prompt:
            raise MeditError(f"--chat-prompt {self.chat_prompt!r} has no {{prompt}} placeholder; write e.g. "
                             f"--chat-prompt {DEFAULT_CHAT_PROMPT!r}")
        if self.mode not in MODES:
            raise UnknownNameError("mode", self.mode, MODES)
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise UnknownNameError("protocol", bad[0], PROTOCOLS, hint="pass a comma list to --protocol")
        if not self.protocols:
            raise MeditError(f"no protocol selected; pass --protocol with some of {', '.join(PROTOCOLS)}")
        if self.also_immediate and self.mode != "sequential":
            raise MeditError(f"--also-immediate scores each case right after its own edit, which only differs "
                             f"from the final scores in sequential mode, not {self.mode!r}; add --mode "
                             "sequential or drop --also-immediate")
        if self.monitor_every and self.mode != "sequential":
            raise MeditError(f"--monitor-every {self.monitor_every} tracks a sequential run's health, not a "
                             f"{self.mode!r} one; add --mode sequential or drop --monitor-every")
        if self.stop_on_collapse and not self.monitor_every:
            raise MeditError("--stop-on-collapse needs the health monitor; add e.g. --monitor-every 50")
        if self.monitor_every:
            MonitorConfig(self.monitor_every, self.collapse_threshold)  # checks both values
        if self.batch_size < 0:
            raise MeditError(f"batch size {self.batch_size!r} must be at least 0; pass e.g. --batch-size 10 "
                             "(0: all at once in batch mode, one at a time in sequential mode)")
        if self.batch_size > 1 and self.mode == "single":
            raise MeditError(f"--batch-size {self.batch_size} groups edits, but single mode applies each "
                             "edit alone; add --mode batch or --mode sequential, or drop --batch-size")
        if self.score_batch_size < 1:
            raise MeditError(f"score batch size {self.score_batch_size!r} must be at least 1; pass e.g. "
                             "--score-batch-size 32")
        unused = sorted(set(self.metric_options) - set(self.metrics))
        if unused:
            raise MeditError(f"options are given for metric {unused[0]!r}, which this run does not evaluate; add "
                             f"{unused[0]} to the metrics (--metrics) or drop its options")

    def configured_metrics(self) -> list[Metric]:
        """The run's metrics, each configured with its options (files are read and checked here)."""
        import copy
        registry = get_plugins().metrics
        out = []
        for name in self.metrics:
            metric = registry.get(name).configure(**self.metric_options.get(name, {}))
            if metric.answer_tokens != self.answer_tokens:
                metric = copy.copy(metric)  # the registry's object is shared by every run
                metric.answer_tokens = self.answer_tokens
            out.append(metric)
        return out
