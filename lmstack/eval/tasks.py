"""Task declarations (typed dataclasses, loaded from YAML) and the loop that runs them.

A suite YAML is a saved ``SuiteConfig``::

    name: smoke
    tasks:
      - {name: qa, kind: generative, dataset: qa, metrics: [exact_match, token_f1]}
      - {name: mc, kind: multiple_choice, dataset: multiple_choice, choices_as: text}
      - {name: code, kind: code, dataset: code, n_samples: 1, ks: [1]}
      - {name: ppl, kind: perplexity, dataset: passages, window: 256}
    gates: ["qa.token_f1 >= 0.3", "mc.accuracy must not drop by more than 0.02 vs baseline"]

Kinds: ``multiple_choice`` (the choice with the highest log-likelihood: ``accuracy``, and with
``choices_as: text`` also ``accuracy_norm``, the log-likelihood divided by the choice's UTF-8
byte length, as lm-evaluation-harness's acc / acc_norm), ``generative`` (generate, then text
metrics against references), ``code`` (sample completions, run them in the sandbox,
``pass@k``) and ``perplexity`` (``perplexity`` and ``bits_per_byte`` of a text set with a
sliding window). The kinds scored by a judge or by the model's own probabilities (``judge``,
``pairwise``, ``g_eval``, ``dag``, ``selfcheck``, ``rag``, ``gpt_score``) live in
``lmstack.eval.judge_tasks``.

The model is a ``lmstack.eval.models`` model (batched ``generate_batch`` /
``loglikelihood_batch``) or anything with the per-item ``generate`` / ``chat`` /
``loglikelihood`` methods. With an ``OutputCache`` every model output is stored as soon as its
batch is done, keyed by the model identity, prompt and sampling parameters: a re-run after a
kill recomputes nothing already cached. Instruct models usually need ``chat: true``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, Sequence, get_args

from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval import datasets as D
from lmstack.eval.cache import OutputCache, cache_key, cached_map
from lmstack.eval.judges import DAG, GEvalConfig, JudgeMode
from lmstack.eval.models import LLMModel  # noqa: F401  (re-exported: the harness's local model)
from lmstack.eval.scoring import MetricValue, check_metric_names, from_item_scores, score

Kind = Literal["multiple_choice", "generative", "code", "judge", "perplexity", "pairwise", "g_eval", "dag",
               "selfcheck", "rag", "gpt_score"]
DatasetType = Literal["qa", "summarization", "translation", "multiple_choice", "code", "text", "pairwise", "rag"]
TEXT_TYPES = ("qa", "summarization", "translation")
# the dataset types each kind reads
KIND_DATASETS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("multiple_choice",), "code": ("code",), "generative": TEXT_TYPES, "judge": TEXT_TYPES,
    "perplexity": ("text", "summarization", "qa"), "pairwise": ("pairwise",) + TEXT_TYPES, "g_eval": TEXT_TYPES,
    "dag": TEXT_TYPES, "selfcheck": TEXT_TYPES, "rag": ("rag",), "gpt_score": TEXT_TYPES,
}
JUDGE_KINDS = ("judge", "pairwise", "g_eval", "dag", "rag")  # the kinds that need a judge model
RAG_METRICS = ("context_precision", "context_recall", "faithfulness", "answer_relevance")
# shipped set name -> its dataset type
SHIPPED = {"qa": "qa", "summarization": "summarization", "translation": "translation",
           "multiple_choice": "multiple_choice", "code": "code", "humaneval": "code", "passages": "text",
           "pairwise": "pairwise", "rag": "rag"}

DEFAULT_PROMPTS = {
    "qa": "Answer the question using the passage. Reply with a short answer only.\n\n"
          "Passage: {context}\nQuestion: {question}\nAnswer:",
    "summarization": "Summarise the following text in one or two sentences.\n\n{document}\n\nSummary:",
    "translation": "Translate from {source_lang} to {target_lang}.\n\n{source}\n\nTranslation:",
    "multiple_choice": "Question: {question}\n{lettered_choices}\nAnswer:",
    "rag": "Answer the question using the retrieved passages. Reply with a short answer only.\n\n"
           "{passages}\n\nQuestion: {question}\nAnswer:",
}
DEFAULT_METRICS = {
    "qa": ["exact_match", "token_f1"],
    "summarization": ["rouge1", "rouge2", "rougeL"],
    "translation": ["bleu", "chrf"],
}


@dataclass
class TaskConfig:
    name: str
    kind: Kind
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
        if self.dataset_type is None:
            if self.dataset not in SHIPPED:
                raise ConfigError(f"{where}: dataset {self.dataset!r} is not a shipped set ({sorted(SHIPPED)}), "
                                  f"so it is a path; set dataset_type to one of {list(get_args(DatasetType))}")
            self.dataset_type = SHIPPED[self.dataset]  # type: ignore[assignment]
        expected = KIND_DATASETS[self.kind]
        if self.dataset_type not in expected:
            raise ConfigError(f"{where}: kind {self.kind!r} needs a dataset of type {list(expected)}, "
                              f"got {self.dataset_type!r}")
        for block in ("g_eval", "dag"):
            if getattr(self, block) is not None and self.kind != block:
                raise ConfigError(f"{where}: '{block}' applies to kind '{block}' only; this task's kind is "
                                  f"{self.kind!r}")
        if self.kind in JUDGE_KINDS and not self.judge_seeds:
            raise ConfigError(f"{where}: judge_seeds is empty; expected at least one seed, e.g. [0]")
        if self.judge_mode == "likelihood" and self.kind not in JUDGE_KINDS:
            raise ConfigError(f"{where}: judge_mode 'likelihood' applies to the judge kinds {list(JUDGE_KINDS)}; "
                              f"this task's kind is {self.kind!r}")
        if self.judge_low_margin < 0:
            raise ConfigError(f"{where}: judge_low_margin={self.judge_low_margin}, expected a log-probability "
                              "gap >= 0, e.g. 0.2")
        if self.kind == "generative":
            self.metrics = self.metrics or list(DEFAULT_METRICS[self.dataset_type])
            check_metric_names(self.metrics, where)
        if self.kind == "code" and max(self.ks) > self.n_samples:
            raise ConfigError(f"{where}: ks={self.ks} needs n_samples >= {max(self.ks)}, got {self.n_samples}")
        if self.kind == "g_eval" and self.g_eval is None and self.dataset_type != "summarization":
            raise ConfigError(f"{where}: kind 'g_eval' on a {self.dataset_type!r} set needs a 'g_eval' block "
                              "(criterion, criteria, steps, source_kind, output_kind); the default one rates "
                              "the coherence of summaries")
        if self.kind == "dag" and self.dag is None:
            raise ConfigError(f"{where}: kind 'dag' needs a 'dag' block: {{root: <node id>, nodes: "
                              "[{id, question, if_yes, if_no}, ...]}")
        if self.kind == "selfcheck" and self.n_samples < 2:
            raise ConfigError(f"{where}: kind 'selfcheck' needs n_samples >= 2 sampled answers to check the "
                              f"answer against, got {self.n_samples}")
        if self.kind == "selfcheck" and self.sample_temperature <= 0:
            raise ConfigError(f"{where}: sample_temperature={self.sample_temperature}, expected > 0 (greedy "
                              "samples would all repeat the answer)")
        if self.kind == "rag":
            self.metrics = self.metrics or list(RAG_METRICS)
            unknown = [m for m in self.metrics if m not in RAG_METRICS]
            if unknown:
                raise ConfigError(f"{where}: metrics {unknown} are not RAG metrics; expected some of "
                                  f"{list(RAG_METRICS)} (retrieval metrics are always reported)")
            if not self.ks or any(k < 1 for k in self.ks):
                raise ConfigError(f"{where}: ks={self.ks}, expected retrieval cut-offs >= 1, e.g. [1, 3]")


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


def _items(task: TaskConfig) -> list:
    if task.dataset == "humaneval":
        items = D.load_humaneval()
    elif task.dataset_type == "text":
        items = _load_texts(None if task.dataset == "passages" else task.dataset)
    else:
        path = None if task.dataset in SHIPPED else task.dataset
        loader = {"qa": D.load_qa, "summarization": D.load_summarization, "translation": D.load_translation,
                  "multiple_choice": D.load_multiple_choice, "code": D.load_code_problems,
                  "pairwise": D.load_pairwise, "rag": D.load_rag}[task.dataset_type]
        items = loader(path)
    return items[: task.limit] if task.limit else items


def _load_texts(path) -> list:
    """A text set: the shipped passages, or a JSONL file whose rows have ``text`` (and maybe ``id``)."""
    if path is None:
        return D.load_passages()
    rows = D.read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str):
            raise ConfigError(f"{path}:{n}: a text set row needs a string field 'text'")
    return [D.Passage(str(r.get("id", n)), r["text"]) for n, r in enumerate(rows, 1)]


def _item_id(item) -> str:
    return str(getattr(item, "id", None) or getattr(item, "task_id", ""))


def _text_of(item) -> str:
    if isinstance(item, D.Passage):
        return item.text
    if isinstance(item, D.SummarizationItem):
        return item.document
    return item.context


def _fields(item) -> dict:
    f = dataclasses.asdict(item)
    if "choices" in f:
        f["lettered_choices"] = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(f["choices"]))
    if isinstance(item, D.RAGItem):
        f["passages"] = "\n\n".join(f"[{c['id']}] {c['text']}" for c in item.contexts)
    return f


def _references(item) -> list[str]:
    if isinstance(item, D.QAItem):
        return item.answers
    if isinstance(item, D.SummarizationItem):
        return [item.summary]
    if isinstance(item, D.RAGItem):
        return [item.reference]
    return item.references


def _prompt(task: TaskConfig, item) -> str:
    template = task.prompt or DEFAULT_PROMPTS[task.dataset_type]
    if task.kind == "multiple_choice" and task.choices_as == "text" and task.prompt is None:
        template = "Question: {question}\nAnswer:"
    try:
        return template.format(**_fields(item))
    except KeyError as e:
        raise ConfigError(f"task {task.name!r}: prompt uses {{{e.args[0]}}}, but items have fields "
                          f"{sorted(_fields(item))}") from None


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req")

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _model_id(model, cache: OutputCache) -> str:
    ident = getattr(model, "identity", None)
    if ident is None and cache.path is not None:
        raise ConfigError(f"{type(model).__name__} has no 'identity'; an output cache needs one to key outputs")
    return ident or f"uncached:{id(model)}"


def _batch_size(model) -> int:
    return getattr(model, "batch_size", 8)


def row_seed(seed: int, payload: dict) -> int:
    """A sampled row's seed: a function of the run seed and the request only (not the batch)."""
    return int(cache_key(str(seed), "seed", payload)[:8], 16)


def generate_all(model, prompts: Sequence[str], max_new_tokens: int, temperature: float, chat: bool,
                 cache: OutputCache, seed: int = 0, sample_ids: Optional[Sequence[int]] = None,
                 progress=None) -> list[str]:
    """Completions for every prompt through the cache (batched when the model supports it)."""
    sample_ids = sample_ids or [0] * len(prompts)
    payloads = [{"prompt": p, "chat": chat, "max_new_tokens": max_new_tokens, "temperature": temperature,
                 "seed": seed if temperature > 0 else None, "sample": k if temperature > 0 else 0}
                for p, k in zip(prompts, sample_ids)]

    def compute(batch: list[dict]) -> list[str]:
        ps = [b["prompt"] for b in batch]
        if hasattr(model, "generate_batch"):
            seeds = [row_seed(seed, b) if temperature > 0 else None for b in batch]
            return model.generate_batch(ps, max_new_tokens, temperature, seeds=seeds, chat=chat)
        ask = model.chat if chat else model.generate
        return [ask(p, max_new_tokens, temperature) for p in ps]

    return cached_map(cache, _model_id(model, cache), "generate", payloads, compute, _batch_size(model), progress)


def loglikelihood_all(model, requests: Sequence[tuple[str, str]], cache: OutputCache, progress=None) -> list[float]:
    payloads = [{"context": c, "continuation": t} for c, t in requests]

    def compute(batch: list[dict]) -> list[float]:
        reqs = [(b["context"], b["continuation"]) for b in batch]
        if hasattr(model, "loglikelihood_batch"):
            return model.loglikelihood_batch(reqs)
        return [model.loglikelihood(c, t) for c, t in reqs]

    return cached_map(cache, _model_id(model, cache), "loglikelihood", payloads, compute,
                      max(_batch_size(model), 16), progress)


def parse_judge_score(text: str) -> Optional[float]:
    """The first integer 1-5 in the judge's reply, mapped to [0, 1]; None when there is none."""
    m = re.search(r"\b([1-5])\b", text)
    return (int(m.group(1)) - 1) / 4 if m else None


def mc_scores(lls: Sequence[float], choices: Sequence[str], answer: int) -> tuple[float, float]:
    """(acc, acc_norm) of one item: argmax of the log-likelihoods, and of the log-likelihoods divided
    by each choice's UTF-8 byte length (lm-evaluation-harness; ties go to the first choice)."""
    pick = max(range(len(lls)), key=lambda i: (lls[i], -i))
    norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, choices)]
    pick_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return float(pick == answer), float(pick_norm == answer)


def _worst(records: list[dict], key: Optional[str], k: int = 5, higher_is_better: bool = True) -> list[dict]:
    """The ``k`` worst records by ``key``; records without that score (judge errors) come first."""
    if key is None:
        return records[:k]
    sign = 1.0 if higher_is_better else -1.0
    return sorted(records, key=lambda r: (key in r["scores"], sign * r["scores"].get(key, 0.0)))[:k]


def generate_answers(task: TaskConfig, model, items: list, cache: OutputCache,
                     progress: bool) -> tuple[list[str], list[str]]:
    """The task's prompt for each item and the model's answer (stripped), through the cache."""
    prompts = [_prompt(task, it) for it in items]
    bar = _Progress(len(prompts), task.name, progress)
    preds = [y.strip() for y in generate_all(model, prompts, task.max_new_tokens, task.temperature, task.chat,
                                             cache, task.seed, None, bar)]
    bar.close()
    return prompts, preds


def check_judge(task: TaskConfig, judge: Optional[Model]) -> None:
    """A judge kind needs a judge, and ``judge_mode: likelihood`` one that exposes log-likelihoods
    of its answers (a local model; an endpoint's chat API gives none). Checked for every task of
    a suite before any runs."""
    if task.kind in JUDGE_KINDS and judge is None:
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
    items = _items(task)
    ids = [_item_id(it) for it in items]
    notes: list[str] = []
    per_item: dict[str, list[float]] = {}
    records: list[dict] = []
    higher = True  # the direction of the metric that picks the worst examples
    if task.kind == "multiple_choice":
        reqs, spans = [], []
        for it in items:
            ctx = _prompt(task, it)
            conts = ([f" {chr(65 + i)}" for i in range(len(it.choices))] if task.choices_as == "letters"
                     else [f" {c}" for c in it.choices])
            spans.append((len(reqs), len(conts)))
            reqs += [(ctx, c) for c in conts]
        bar = _Progress(len(reqs), task.name, progress)
        lls = loglikelihood_all(model, reqs, cache, bar)
        bar.close()
        acc, acc_norm = [], []
        for it, (s, n) in zip(items, spans):
            a, an = mc_scores(lls[s: s + n], it.choices if task.choices_as == "text" else ["A"] * n, it.answer)
            acc.append(a)
            acc_norm.append(an)
            records.append({"id": _item_id(it), "prompt": reqs[s][0], "loglikelihoods": lls[s: s + n],
                            "answer": it.answer, "scores": {"accuracy": a, "accuracy_norm": an}})
        per_item = {"accuracy": acc}
        metrics = {"accuracy": from_item_scores(acc, n_resamples, alpha, seed)}
        if task.choices_as == "text":
            per_item["accuracy_norm"] = acc_norm
            metrics["accuracy_norm"] = from_item_scores(acc_norm, n_resamples, alpha, seed)
        key = "accuracy"
    elif task.kind == "perplexity":
        metrics, per_item, records, key = _perplexity_task(task, model, items, n_resamples, alpha, seed)
    elif task.kind == "code":
        from lmstack.eval.code_exec import evaluate_completions

        prompts = [p.prompt for p in items for _ in range(task.n_samples)]
        sample_ids = [k for _ in items for k in range(task.n_samples)]
        bar = _Progress(len(prompts), task.name, progress)
        outs = generate_all(model, prompts, task.max_new_tokens, task.temperature, False, cache, task.seed,
                            sample_ids, bar)
        bar.close()
        completions = {p.task_id: outs[i * task.n_samples: (i + 1) * task.n_samples] for i, p in enumerate(items)}
        res = evaluate_completions([p.to_dict() for p in items], completions, task.ks, progress=progress)
        metrics = {}
        for k in task.ks:
            per = [_pass_k(res.per_task[p.task_id], k) for p in items]
            per_item[f"pass@{k}"] = per
            metrics[f"pass@{k}"] = from_item_scores(per, n_resamples, alpha, seed)
        notes.append(f"sandbox: {res.isolation}")
        records = [{"id": p.task_id, "prompt": p.prompt, "prediction": completions[p.task_id][0],
                    "statuses": res.per_task[p.task_id],
                    "scores": {m: per_item[m][i] for m in per_item}} for i, p in enumerate(items)]
        key = f"pass@{task.ks[0]}"
    elif task.kind == "generative":
        prompts, preds = generate_answers(task, model, items, cache, progress)
        refs = [_references(it) for it in items]
        metrics, per_item = score(task.metrics, preds, refs, n_resamples, alpha, seed)
        if "meteor" in task.metrics:
            from lmstack.eval.meteor import synonym_stage_note

            notes.append(synonym_stage_note())
        key = next(iter(per_item), None)
        for i, (p, y, r) in enumerate(zip(prompts, preds, refs)):
            records.append({"id": ids[i], "prompt": p, "prediction": y, "references": r,
                            "scores": {m: v[i] for m, v in per_item.items() if len(v) == len(items)}})
    else:
        from lmstack.eval.judge_tasks import Stats, run_scored_kind

        check_judge(task, judge)
        out = run_scored_kind(task, model, judge, items, cache, progress, Stats(n_resamples, alpha, seed))
        metrics, per_item, records, key, higher = out.metrics, out.per_item, out.records, out.key, out.higher_is_better
        notes += out.notes
    if getattr(model, "truncated", 0):
        notes.append(f"{model.truncated} prompts so far were cut from the left to fit the model's context")
    return TaskResult(task.name, task.kind, len(items), metrics, notes, _worst(records, key, higher_is_better=higher),
                      ids if all(len(v) == len(ids) for v in per_item.values()) else [], per_item)


def _perplexity_task(task: TaskConfig, model, items, n_resamples, alpha, seed):
    from lmstack.eval.lm_metrics import perplexity
    from lmstack.eval.stats import bootstrap_corpus_ci

    llm = getattr(model, "llm", None)
    if llm is None:
        raise UnsupportedError(f"task {task.name!r}: perplexity needs a local model (an endpoint gives no "
                               "prompt log-probabilities through the chat API)")
    texts = [_text_of(it) for it in items]
    r = perplexity(llm, texts, task.window, task.stride, _batch_size(model))
    pairs = list(zip(r.per_text_nll, r.per_text_tokens))
    nbytes = [len(t.encode("utf-8")) for t in texts]

    def ppl(ps, _):
        return math.exp(sum(a for a, _ in ps) / max(1, sum(b for _, b in ps)))

    def bpb(ps, bs):
        return sum(a for a, _ in ps) / (math.log(2) * max(1, sum(bs)))

    n = min(n_resamples, 200)
    ppl_ci = bootstrap_corpus_ci(ppl, pairs, nbytes, n, alpha, seed) if n else (None, None)
    bpb_ci = bootstrap_corpus_ci(bpb, pairs, nbytes, n, alpha, seed) if n else (None, None)
    metrics = {"perplexity": MetricValue(r.perplexity, *ppl_ci, len(texts)),
               "bits_per_byte": MetricValue(r.bits_per_byte, *bpb_ci, len(texts))}
    per_item = {"neg_bits_per_byte": [-a / (math.log(2) * b) for (a, _), b in zip(pairs, nbytes)]}
    records = [{"id": _item_id(it), "prompt": t[:200], "scores": {"neg_bits_per_byte": v}}
               for it, t, v in zip(items, texts, per_item["neg_bits_per_byte"])]
    return metrics, per_item, records, "neg_bits_per_byte"


def _pass_k(statuses: Sequence[str], k: int) -> float:
    from lmstack.eval.code_exec import pass_at_k

    return pass_at_k(len(statuses), statuses.count("passed"), k)
