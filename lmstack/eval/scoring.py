"""Metric names used by tasks, gates and reports, and scoring with confidence intervals.

A metric is either *per item* (the task score is the mean of item scores: EM, F1, ROUGE,
METEOR, BERTScore, accuracy, pass@1 with one sample) or *corpus* (recomputed from all items:
BLEU, chrF). ``score(names, predictions, references)`` returns a ``MetricValue`` per name,
with a percentile bootstrap interval. ``KindResult`` is what every task kind returns
(``lmstack.eval.kinds``), ``Stats`` the interval settings it scores with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from lmstack.errors import ConfigError
from lmstack.eval import metrics as M
from lmstack.eval.stats import bootstrap_corpus_ci, bootstrap_mean_ci


@dataclass
class MetricValue:
    value: float
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    n: int = 0


def _rouge_key(key: str) -> Callable:
    return lambda p, r: M.rouge_scores(p, r)[key]


def _meteor(p, r):
    from lmstack.eval.meteor import meteor_scores

    return meteor_scores(p, r)


def _bertscore(key: str) -> Callable:
    def fn(p, r):
        from lmstack.eval.bertscore import bertscore_scores

        return bertscore_scores(p, r)[key]

    return fn


def _levenshtein(p, r):
    return [M.levenshtein_similarity([x], [y]) for x, y in zip(p, r)]


# name -> function(predictions, references) -> per-item scores
PER_ITEM: dict[str, Callable[[Sequence[str], Sequence], list[float]]] = {
    "exact_match": M.exact_match_scores,
    "token_f1": M.token_f1_scores,
    "levenshtein_similarity": _levenshtein,
    "rouge1": _rouge_key("rouge1"),
    "rouge2": _rouge_key("rouge2"),
    "rougeL": _rouge_key("rougeL"),
    "rougeLsum": _rouge_key("rougeLsum"),
    "meteor": _meteor,
    "bertscore_precision": _bertscore("precision"),
    "bertscore_recall": _bertscore("recall"),
    "bertscore_f1": _bertscore("f1"),
}
# name -> function(predictions, references) -> corpus score
CORPUS: dict[str, Callable[[Sequence[str], Sequence], float]] = {
    "bleu": M.bleu,
    "chrf": M.chrf,
}
KNOWN = sorted(set(PER_ITEM) | set(CORPUS))


def check_metric_names(names: Sequence[str], where: str) -> None:
    unknown = [n for n in names if n not in PER_ITEM and n not in CORPUS]
    if unknown:
        raise ConfigError(f"{where}: unknown metric(s) {unknown}; known metrics are {KNOWN}")


def from_item_scores(scores: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> MetricValue:
    """Mean of per-item scores with its bootstrap interval."""
    mean = sum(scores) / len(scores) if scores else 0.0
    lo, hi = bootstrap_mean_ci(scores, n_resamples, alpha, seed) if n_resamples else (None, None)
    return MetricValue(mean, lo, hi, len(scores))


@dataclass
class Stats:
    """A run's bootstrap settings: ``value(scores)`` is the mean of per-item scores with its interval."""

    n_resamples: int = 1000
    alpha: float = 0.05
    seed: int = 0

    def value(self, scores: Sequence[float]) -> MetricValue:
        return from_item_scores(scores, self.n_resamples, self.alpha, self.seed)


@dataclass
class KindResult:
    """What a task kind scored; ``run_task`` turns it into the report's ``TaskResult``."""

    metrics: dict[str, MetricValue]
    per_item: dict[str, list[float]]  # only metrics with a score for every item (what `compare` pairs)
    records: list[dict]  # one per item: id, prompt, prediction, references, "scores", ...
    key: Optional[str]  # the metric that picks the worst examples
    notes: list[str] = field(default_factory=list)
    higher_is_better: bool = True


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence, n_resamples: int = 1000,
          alpha: float = 0.05, seed: int = 0) -> tuple[dict[str, MetricValue], dict[str, list[float]]]:
    """Metric values (with intervals) and the per-item scores of the per-item metrics."""
    check_metric_names(names, "score")
    values: dict[str, MetricValue] = {}
    items: dict[str, list[float]] = {}
    for name in names:
        if name in PER_ITEM:
            items[name] = list(PER_ITEM[name](predictions, references))
            values[name] = from_item_scores(items[name], n_resamples, alpha, seed)
        else:
            fn = CORPUS[name]
            value = fn(predictions, references)
            lo, hi = (bootstrap_corpus_ci(fn, list(predictions), list(references), min(n_resamples, 200), alpha, seed)
                      if n_resamples else (None, None))
            values[name] = MetricValue(value, lo, hi, len(predictions))
    return values, items
