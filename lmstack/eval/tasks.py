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
``pass@k``), ``judge`` (generate, then a judge grades each answer 1-5 against the reference;
``judge_score`` in [0, 1], unparseable verdicts retried then counted as errors, never scored;
with several ``judge_seeds`` the spread across seeds is reported) and ``perplexity``
(``perplexity`` and ``bits_per_byte`` of a text set with a sliding window).

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
from typing import Literal, Optional, Protocol, Sequence

from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval import datasets as D
from lmstack.eval.cache import OutputCache, cache_key, cached_map
from lmstack.eval.models import LLMModel  # noqa: F401  (re-exported: the harness's local model)
from lmstack.eval.scoring import MetricValue, check_metric_names, from_item_scores, score

Kind = Literal["multiple_choice", "generative", "code", "judge", "perplexity"]
DatasetType = Literal["qa", "summarization", "translation", "multiple_choice", "code", "text"]

DEFAULT_PROMPTS = {
    "qa": "Answer the question using the passage. Reply with a short answer only.\n\n"
          "Passage: {context}\nQuestion: {question}\nAnswer:",
    "summarization": "Summarise the following text in one or two sentences.\n\n{document}\n\nSummary:",
    "translation": "Translate from {source_lang} to {target_lang}.\n\n{source}\n\nTranslation:",
    "multiple_choice": "Question: {question}\n{lettered_choices}\nAnswer:",
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
    dataset: str  # a shipped set (qa, summarization, translation, multiple_choice, code, humaneval) or a path
    dataset_type: Optional[DatasetType] = None  # needed when `dataset` is a path
    metrics: list[str] = field(default_factory=list)  # empty: the dataset type's defaults
    prompt: Optional[str] = None  # str.format template over the item's fields
    limit: Optional[int] = None  # first N items only
    max_new_tokens: int = 64
    temperature: float = 0.0
    chat: bool = False  # generative/judge: send the prompt as a user chat message (instruct models)
    n_samples: int = 1  # code: completions per problem
    ks: list[int] = field(default_factory=lambda: [1])  # code: pass@k
    seed: int = 0  # sampling seed (temperature > 0); each row's seed derives from it and the row
    choices_as: Literal["letters", "text"] = "letters"  # multiple_choice: score " A".. or " <choice text>"
    judge_rubric: Optional[str] = None  # judge: the grading rubric (default: correctness vs the reference)
    judge_seeds: list[int] = field(default_factory=lambda: [0])  # judge: one run per seed, spread reported
    judge_temperature: float = 0.0
    window: Optional[int] = None  # perplexity: tokens per window (default: the model's context)
    stride: Optional[int] = None  # perplexity: window start step (default: window // 2)

    def __post_init__(self) -> None:
        shipped = {"qa": "qa", "summarization": "summarization", "translation": "translation",
                   "multiple_choice": "multiple_choice", "code": "code", "humaneval": "code", "passages": "text"}
        if self.dataset_type is None:
            if self.dataset not in shipped:
                raise ConfigError(f"task {self.name!r}: dataset {self.dataset!r} is a path; set dataset_type "
                                  f"to one of {list(DEFAULT_PROMPTS) + ['code', 'text']}")
            self.dataset_type = shipped[self.dataset]  # type: ignore[assignment]
        expected = {"multiple_choice": ("multiple_choice",), "code": ("code",),
                    "generative": ("qa", "summarization", "translation"),
                    "judge": ("qa", "summarization", "translation"),
                    "perplexity": ("text", "summarization", "qa")}[self.kind]
        if self.dataset_type not in expected:
            raise ConfigError(f"task {self.name!r}: kind {self.kind!r} needs a dataset of type {list(expected)}, "
                              f"got {self.dataset_type!r}")
        if self.kind == "generative":
            self.metrics = self.metrics or list(DEFAULT_METRICS[self.dataset_type])
            check_metric_names(self.metrics, f"task {self.name!r}")
        if self.kind == "code" and max(self.ks) > self.n_samples:
            raise ConfigError(f"task {self.name!r}: ks={self.ks} needs n_samples >= {max(self.ks)}, "
                              f"got {self.n_samples}")


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
        path = None if task.dataset in ("qa", "summarization", "translation", "multiple_choice", "code") else task.dataset
        loader = {"qa": D.load_qa, "summarization": D.load_summarization, "translation": D.load_translation,
                  "multiple_choice": D.load_multiple_choice, "code": D.load_code_problems}[task.dataset_type]
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
    return f


def _references(item) -> list[str]:
    if isinstance(item, D.QAItem):
        return item.answers
    if isinstance(item, D.SummarizationItem):
        return [item.summary]
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


def _worst(records: list[dict], key: Optional[str], k: int = 5) -> list[dict]:
    if key is None:
        return records[:k]
    return sorted(records, key=lambda r: r["scores"].get(key, 0.0))[:k]


def run_task(task: TaskConfig, model: Model, judge: Optional[Model] = None, n_resamples: int = 1000,
             alpha: float = 0.05, seed: int = 0, progress: bool = True,
             cache: Optional[OutputCache] = None) -> TaskResult:
    cache = cache if cache is not None else OutputCache(None)
    items = _items(task)
    ids = [_item_id(it) for it in items]
    notes: list[str] = []
    per_item: dict[str, list[float]] = {}
    records: list[dict] = []
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
    else:
        prompts = [_prompt(task, it) for it in items]
        bar = _Progress(len(prompts), task.name, progress)
        preds = [y.strip() for y in generate_all(model, prompts, task.max_new_tokens, task.temperature, task.chat,
                                                 cache, task.seed, None, bar)]
        bar.close()
        refs = [_references(it) for it in items]
        if task.kind == "generative":
            metrics, per_item = score(task.metrics, preds, refs, n_resamples, alpha, seed)
            if "meteor" in task.metrics:
                from lmstack.eval.meteor import synonym_stage_note

                notes.append(synonym_stage_note())
            key = next(iter(per_item), None)
        else:
            if judge is None:
                raise ConfigError(f"task {task.name!r}: kind 'judge' needs a judge model")
            metrics, per_item, judge_notes = _judge_task(task, judge, prompts, preds, refs, n_resamples, alpha, seed)
            notes += judge_notes
            key = "judge_score"
        for i, (p, y, r) in enumerate(zip(prompts, preds, refs)):
            records.append({"id": ids[i], "prompt": p, "prediction": y, "references": r,
                            "scores": {m: v[i] for m, v in per_item.items() if len(v) == len(items)}})
    if getattr(model, "truncated", 0):
        notes.append(f"{model.truncated} prompts so far were cut from the left to fit the model's context")
    return TaskResult(task.name, task.kind, len(items), metrics, notes, _worst(records, key),
                      ids if all(len(v) == len(ids) for v in per_item.values()) else [], per_item)


def _judge_task(task: TaskConfig, judge, prompts, preds, refs, n_resamples, alpha, seed):
    from lmstack.eval.judges import DEFAULT_RUBRIC, pointwise, seed_spread

    per_seed, per_item_sum, per_item_n, errors = [], [0.0] * len(preds), [0] * len(preds), 0
    for s in task.judge_seeds:
        calls = pointwise(judge, prompts, preds, [r[0] for r in refs], task.judge_rubric or DEFAULT_RUBRIC,
                          seed=s, chat=task.chat, temperature=task.judge_temperature)
        ok = [c.value for c in calls if c.value is not None]
        errors += len(calls) - len(ok)
        if ok:
            per_seed.append(sum(ok) / len(ok))
        for i, c in enumerate(calls):
            if c.value is not None:
                per_item_sum[i] += c.value
                per_item_n[i] += 1
    scored = [per_item_sum[i] / per_item_n[i] for i in range(len(preds)) if per_item_n[i]]
    total = len(preds) * len(task.judge_seeds)
    metrics = {"judge_score": from_item_scores(scored, n_resamples, alpha, seed),
               "judge_error_rate": MetricValue(errors / total if total else 0.0, None, None, total)}
    notes = []
    if errors:
        notes.append(f"judge: {errors} of {total} verdicts stayed unparseable after retries; recorded as errors "
                     "and left out of judge_score")
    if len(task.judge_seeds) > 1 and per_seed:
        mean, std = seed_spread(per_seed)
        metrics["judge_seed_std"] = MetricValue(std, None, None, len(per_seed))
        notes.append(f"judge: score across seeds {task.judge_seeds}: mean {mean:.4f}, std {std:.4f}")
    per_item = {"judge_score": scored} if len(scored) == len(preds) else {}
    return metrics, per_item, notes


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
