"""Task declarations (typed dataclasses, loaded from YAML) and the loop that runs them.

A suite YAML is a saved ``SuiteConfig``::

    name: smoke
    tasks:
      - {name: qa, kind: generative, dataset: qa, metrics: [exact_match, token_f1]}
      - {name: mc, kind: multiple_choice, dataset: multiple_choice}
      - {name: code, kind: code, dataset: code, n_samples: 1, ks: [1]}
    gates: ["qa.token_f1 >= 0.3", "mc.accuracy must not drop by more than 0.02 vs baseline"]

Kinds: ``multiple_choice`` (the choice with the highest log-likelihood, ``accuracy``),
``generative`` (generate, then text metrics against references), ``code`` (sample
completions, run them in the sandbox, ``pass@k``) and ``judge`` (generate, then a judge model
grades each answer 1-5 against the reference; ``judge_score`` in [0, 1]).

The model is anything with ``generate(prompt, max_new_tokens, temperature) -> str``, ``chat``
(same arguments; the prompt becomes one user message) and ``loglikelihood(context,
continuation) -> float``; ``LLMModel`` adapts ``lmstack.infer.LLM``. Instruct models usually
need ``chat: true`` on generative tasks.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, Sequence

from lmstack.errors import ConfigError
from lmstack.eval import datasets as D
from lmstack.eval.scoring import MetricValue, check_metric_names, from_item_scores, score

Kind = Literal["multiple_choice", "generative", "code", "judge"]
DatasetType = Literal["qa", "summarization", "translation", "multiple_choice", "code"]

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
JUDGE_PROMPT = ("You are grading an answer against a reference. Reply with one integer from 1 (wrong) "
                "to 5 (fully correct and faithful), then a short reason.\n\nTask input: {input}\n"
                "Reference: {reference}\nAnswer: {answer}\n\nScore:")


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

    def __post_init__(self) -> None:
        shipped = {"qa": "qa", "summarization": "summarization", "translation": "translation",
                   "multiple_choice": "multiple_choice", "code": "code", "humaneval": "code"}
        if self.dataset_type is None:
            if self.dataset not in shipped:
                raise ConfigError(f"task {self.name!r}: dataset {self.dataset!r} is a path; set dataset_type "
                                  f"to one of {list(DEFAULT_PROMPTS) + ['code']}")
            self.dataset_type = shipped[self.dataset]  # type: ignore[assignment]
        expected = {"multiple_choice": ("multiple_choice",), "code": ("code",),
                    "generative": ("qa", "summarization", "translation"),
                    "judge": ("qa", "summarization", "translation")}[self.kind]
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
    examples: list[dict] = field(default_factory=list)  # the first few inputs/outputs, for reading


class Model(Protocol):
    def generate(self, prompt: str, max_new_tokens: int, temperature: float) -> str: ...

    def chat(self, prompt: str, max_new_tokens: int, temperature: float) -> str: ...

    def loglikelihood(self, context: str, continuation: str) -> float: ...


class LLMModel:
    """Adapts ``lmstack.infer.LLM`` (``generate``, ``logits``, ``tokenizer``) to ``Model``."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def generate(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        return self.llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature)

    def chat(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        return self.llm.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                             temperature=temperature)

    def loglikelihood(self, context: str, continuation: str) -> float:
        import torch

        tok = self.llm.tokenizer
        encode = getattr(self.llm, "encode", tok.encode)  # LLM.encode adds the model's BOS, if any
        ctx = encode(context)
        full = encode(context + continuation)
        if full[: len(ctx)] != ctx:  # the boundary merged into one token: score pieces separately
            full = ctx + tok.encode(continuation)
        if len(full) == len(ctx):
            raise ConfigError(f"loglikelihood: continuation {continuation!r} encodes to no tokens")
        ids = torch.tensor([full])
        logp = torch.log_softmax(self.llm.logits(ids)[0].float(), dim=-1)  # (T, vocab)
        return float(sum(logp[t - 1, full[t]] for t in range(len(ctx), len(full))))


def _items(task: TaskConfig) -> list:
    path = None if task.dataset in ("qa", "summarization", "translation", "multiple_choice", "code") else task.dataset
    if task.dataset == "humaneval":
        items = D.load_humaneval()
    else:
        loader = {"qa": D.load_qa, "summarization": D.load_summarization, "translation": D.load_translation,
                  "multiple_choice": D.load_multiple_choice, "code": D.load_code_problems}[task.dataset_type]
        items = loader(path)
    return items[: task.limit] if task.limit else items


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
    try:
        return template.format(**_fields(item))
    except KeyError as e:
        raise ConfigError(f"task {task.name!r}: prompt uses {{{e.args[0]}}}, but items have fields "
                          f"{sorted(_fields(item))}") from None


def _progress(seq, desc: str, enabled: bool):
    if not enabled:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=desc, unit="item")


def parse_judge_score(text: str) -> Optional[float]:
    """The first integer 1-5 in the judge's reply, mapped to [0, 1]; None when there is none."""
    m = re.search(r"\b([1-5])\b", text)
    return (int(m.group(1)) - 1) / 4 if m else None


def run_task(task: TaskConfig, model: Model, judge: Optional[Model] = None, n_resamples: int = 1000,
             alpha: float = 0.05, seed: int = 0, progress: bool = True) -> TaskResult:
    items = _items(task)
    notes: list[str] = []
    if task.kind == "multiple_choice":
        correct = []
        for it in _progress(items, task.name, progress):
            ctx = _prompt(task, it)
            lls = [model.loglikelihood(ctx, f" {chr(65 + i)}") for i in range(len(it.choices))]
            correct.append(float(max(range(len(lls)), key=lls.__getitem__) == it.answer))
        metrics = {"accuracy": from_item_scores(correct, n_resamples, alpha, seed)}
        examples = [{"id": it.id, "correct": c} for it, c in zip(items[:3], correct)]
    elif task.kind == "code":
        from lmstack.eval.code_exec import evaluate_completions

        completions = {p.task_id: [model.generate(p.prompt, task.max_new_tokens, task.temperature)
                                   for _ in range(task.n_samples)]
                       for p in _progress(items, task.name, progress)}
        res = evaluate_completions([p.to_dict() for p in items], completions, task.ks, progress=progress)
        metrics = {}
        for k in task.ks:
            per = [_pass_k(st, k) for st in res.per_task.values()]
            metrics[f"pass@{k}"] = from_item_scores(per, n_resamples, alpha, seed)
        notes.append(f"sandbox: {res.isolation}")
        examples = [{"task_id": t, "statuses": s} for t, s in list(res.per_task.items())[:3]]
    else:
        prompts = [_prompt(task, it) for it in items]
        ask = model.chat if task.chat else model.generate
        preds = [ask(p, task.max_new_tokens, task.temperature).strip() for p in _progress(prompts, task.name, progress)]
        refs = [_references(it) for it in items]
        if task.kind == "generative":
            metrics, _ = score(task.metrics, preds, refs, n_resamples, alpha, seed)
            if "meteor" in task.metrics:
                from lmstack.eval.meteor import synonym_stage_note

                notes.append(synonym_stage_note())
        else:
            if judge is None:
                raise ConfigError(f"task {task.name!r}: kind 'judge' needs a judge model")
            scores, unparsed = [], 0
            for p, pred, r in zip(prompts, preds, refs):
                judge_ask = judge.chat if task.chat else judge.generate
                reply = judge_ask(JUDGE_PROMPT.format(input=p, reference=r[0], answer=pred), 16, 0.0)
                s = parse_judge_score(reply)
                unparsed += s is None
                scores.append(s or 0.0)
            metrics = {"judge_score": from_item_scores(scores, n_resamples, alpha, seed)}
            if unparsed:
                notes.append(f"judge: {unparsed} replies had no 1-5 score and count as 0")
        examples = [{"prompt": p, "prediction": y, "references": r} for p, y, r in zip(prompts[:3], preds, refs)]
    return TaskResult(task.name, task.kind, len(items), metrics, notes, examples)


def _pass_k(statuses: Sequence[str], k: int) -> float:
    from lmstack.eval.code_exec import pass_at_k

    return pass_at_k(len(statuses), statuses.count("passed"), k)
