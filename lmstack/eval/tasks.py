"""Task declarations (typed dataclasses, loaded from YAML) and the loop that runs them.

A suite YAML is a saved ``SuiteConfig``::

    name: smoke
    tasks:
      - {name: qa, kind: generative, dataset: qa, metrics: [exact_match, token_f1]}
      - {name: mc, kind: multiple_choice, dataset: multiple_choice, choices_as: text}
      - {name: code, kind: code, dataset: code, n_samples: 1, ks: [1]}
      - {name: ppl, kind: perplexity, dataset: passages, window: 256}
    gates: ["qa.token_f1 >= 0.3", "mc.accuracy must not drop by more than 0.02 vs baseline"]

A task's ``kind`` names an entry of ``lmstack.eval.kinds.KINDS``: the function that runs it, the
dataset types it reads, whether it needs a judge and the check of its own options, all applied
here. ``run_task`` loads the items, calls the kind, and keeps the worst examples and the item ids
of its result.

The model is a ``lmstack.eval.models`` model (batched ``generate_batch`` /
``loglikelihood_batch``) or anything with the per-item ``generate`` / ``chat`` /
``loglikelihood`` methods. With an ``OutputCache`` every model output is stored as soon as its
batch is done, keyed by the model identity, prompt and sampling parameters: a re-run after a
kill recomputes nothing already cached. Instruct models usually need ``chat: true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, get_args

from lmstack.errors import ConfigError
from lmstack.eval.cache import OutputCache
from lmstack.eval.calls import CachedJudge
from lmstack.eval.items import SHIPPED, DatasetType, item_id, load_items
from lmstack.eval.judges import DAG, GEvalConfig, JudgeMode
from lmstack.eval.kinds import JUDGE_KINDS, KINDS
from lmstack.eval.scoring import MetricValue, Stats


@dataclass
class TaskConfig:
    name: str
    kind: str  # a key of lmstack.eval.kinds.KINDS
    dataset: str  # a shipped set (see SHIPPED) or a path
    dataset_type: Optional[DatasetType] = None  # needed when `dataset` is a path
    metrics: list[str] = field(default_factory=list)  # generative: text metrics; rag: judge metrics (empty: defaults)
    prompt: Optional[str] = None  # str.format template over the item's fields
    limit: Optional[int] = None  # first N items only
    max_new_tokens: int = 64
    temperature: float = 0.0
    chat: bool = False  # send prompts (the model's and the judge's) as a user chat message (instruct models)
    n_samples: int = 1  # code: completions per problem; selfcheck: sampled answers to compare with (>= 2)
    ks: list[int] = field(default_factory=lambda: [1])  # code: pass@k; rag: cut-offs of hit@k, recall@k, nDCG@k
    seed: int = 0  # sampling seed (temperature > 0); each row's seed derives from it and the row
    choices_as: Literal["letters", "text"] = "letters"  # multiple_choice: score " A".. or " <choice text>"
    judge_rubric: Optional[str] = None  # judge: the grading rubric (default: correctness vs the reference)
    judge_seeds: list[int] = field(default_factory=lambda: [0])  # judge kinds: one run per seed, spread reported
    judge_temperature: float = 0.0  # judge kinds: the judge's sampling temperature (retries use >= 0.7)
    # judge kinds: parse the judge's generated reply, or take the most likely allowed answer (local judges)
    judge_mode: JudgeMode = "generate"
    judge_low_margin: float = 0.2  # likelihood judges: a verdict won by fewer nats than this is low confidence
    window: Optional[int] = None  # perplexity: tokens per window (default: the model's context)
    stride: Optional[int] = None  # perplexity: window start step (default: window // 2)
    g_eval: Optional[GEvalConfig] = None  # g_eval: criterion, criteria, steps, source_kind, output_kind
    dag: Optional[DAG] = None  # dag: {root, nodes: [{id, question, if_yes, if_no}]}; a branch: node id or score
    variant: Literal["ngram", "bertscore"] = "ngram"  # selfcheck: SelfCheckGPT's unigram or BERTScore variant
    sample_temperature: float = 1.0  # selfcheck: temperature of the sampled answers
    answer_source: Literal["model", "dataset"] = "model"  # rag: generate the answer, or score the item's `answer`

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        kind = KINDS.get(self.kind)
        if kind is None:
            raise ConfigError(f"{where}: kind {self.kind!r} is not a task kind; expected one of {list(KINDS)}")
        if self.dataset_type is None:
            if self.dataset not in SHIPPED:
                raise ConfigError(f"{where}: dataset {self.dataset!r} is not a shipped set ({sorted(SHIPPED)}), "
                                  f"so it is a path; set dataset_type to one of {list(get_args(DatasetType))}")
            self.dataset_type = SHIPPED[self.dataset]  # type: ignore[assignment]
        if self.dataset_type not in kind.reads:
            raise ConfigError(f"{where}: kind {self.kind!r} needs a dataset of type {list(kind.reads)}, "
                              f"got {self.dataset_type!r}")
        for block in ("g_eval", "dag"):
            if getattr(self, block) is not None and self.kind != block:
                raise ConfigError(f"{where}: '{block}' applies to kind '{block}' only; this task's kind is "
                                  f"{self.kind!r}")
        if kind.judge and not self.judge_seeds:
            raise ConfigError(f"{where}: judge_seeds is empty; expected at least one seed, e.g. [0]")
        if self.judge_mode == "likelihood" and not kind.judge:
            raise ConfigError(f"{where}: judge_mode 'likelihood' applies to the judge kinds {JUDGE_KINDS}; "
                              f"this task's kind is {self.kind!r}")
        if self.judge_low_margin < 0:
            raise ConfigError(f"{where}: judge_low_margin={self.judge_low_margin}, expected a log-probability "
                              "gap >= 0, e.g. 0.2")
        kind.check(self)


@dataclass
class SuiteConfig:
    name: str
    tasks: list[TaskConfig]
    gates: list[str] = field(default_factory=list)
    baseline: Optional[str] = None  # a previous report JSON, for regression gates
    bootstrap_resamples: int = 1000
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"suite {self.name!r}: task names must be unique, repeated: {dup}")
        if not self.tasks:
            raise ConfigError(f"suite {self.name!r}: no tasks")


@dataclass
class TaskResult:
    name: str
    kind: str
    n: int
    metrics: dict[str, MetricValue]
    notes: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # the worst few items, for reading
    item_ids: list[str] = field(default_factory=list)
    item_scores: dict[str, list[float]] = field(default_factory=dict)  # per-item metric -> scores, item order


class Model(Protocol):
    """The per-item minimum; ``lmstack.eval.models`` models add batched forms the harness prefers."""

    def generate(self, prompt: str, max_new_tokens: int, temperature: float) -> str: ...

    def chat(self, prompt: str, max_new_tokens: int, temperature: float) -> str: ...

    def loglikelihood(self, context: str, continuation: str) -> float: ...


def _worst(records: list[dict], key: Optional[str], k: int = 5, higher_is_better: bool = True) -> list[dict]:
    """The ``k`` worst records by ``key``; records without that score (judge errors) come first."""
    if key is None:
        return records[:k]
    sign = 1.0 if higher_is_better else -1.0
    return sorted(records, key=lambda r: (key in r["scores"], sign * r["scores"].get(key, 0.0)))[:k]


def check_judge(task: TaskConfig, judge: Optional[Model]) -> None:
    """A judge kind needs a judge, and ``judge_mode: likelihood`` one that exposes log-likelihoods
    of its answers (a local model; an endpoint's chat API gives none). Checked for every task of
    a suite before any runs."""
    if KINDS[task.kind].judge and judge is None:
        raise ConfigError(f"task {task.name!r}: kind {task.kind!r} needs a judge model")
    if task.judge_mode == "likelihood" and not hasattr(judge, "option_loglikelihoods"):
        name = getattr(judge, "name", type(judge).__name__)
        raise ConfigError(f"task {task.name!r}: judge_mode 'likelihood' needs a judge that exposes log-likelihoods "
                          f"of its answers (a local model); the judge {name} does not. Use judge_mode: generate, "
                          "or a local judge (--judge PATH)")


def run_task(task: TaskConfig, model: Model, judge: Optional[Model] = None, n_resamples: int = 1000,
             alpha: float = 0.05, seed: int = 0, progress: bool = True,
             cache: Optional[OutputCache] = None) -> TaskResult:
    cache = cache if cache is not None else OutputCache(None)
    kind = KINDS[task.kind]
    check_judge(task, judge)
    items = load_items(task)
    ids = [item_id(it) for it in items]
    judge = CachedJudge(judge, cache) if kind.judge else None
    out = kind.run(task, model, judge, items, cache, progress, Stats(n_resamples, alpha, seed))
    notes = list(out.notes)
    if getattr(model, "truncated", 0):
        notes.append(f"{model.truncated} prompts so far were cut from the left to fit the model's context")
    return TaskResult(task.name, task.kind, len(items), out.metrics, notes,
                      _worst(out.records, out.key, higher_is_better=out.higher_is_better),
                      ids if all(len(v) == len(ids) for v in out.per_item.values()) else [], out.per_item)
