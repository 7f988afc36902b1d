"""Task kinds: the ``KINDS`` table, and the four kinds scored from the model's outputs alone.

A kind is a function ``run(task, model, judge, items, cache, progress, stats) -> KindResult``:
``task`` is the ``TaskConfig`` (``lmstack.eval.tasks``, which validates against this table and
so is never imported here), ``items`` the task's loaded items, ``judge`` a ``CachedJudge`` for
the kinds that need one (else None), ``cache`` the ``OutputCache`` every model call goes
through, ``progress`` whether to show a bar, ``stats`` the bootstrap settings. ``run_task``
turns the ``KindResult`` into the report's ``TaskResult`` (worst examples, item ids). A
``Kind`` entry adds what the config checks before anything runs: the dataset types the kind
reads, whether it needs a judge, and a ``check(task)`` of its own options (which may fill
their defaults). Adding a kind is one function and one line in ``KINDS``.

Here: ``multiple_choice`` (the choice with the highest log-likelihood: ``accuracy``, and with
``choices_as: text`` also ``accuracy_norm``, the log-likelihood divided by the choice's UTF-8
byte length, as lm-evaluation-harness's acc / acc_norm), ``generative`` (generate, then text
metrics against references), ``code`` (sample completions, run them in the sandbox,
``pass@k``) and ``perplexity`` (``perplexity`` and ``bits_per_byte`` of a text set with a
sliding window). The kinds scored by a judge or by the model's own probabilities live in
``lmstack.eval.judge_tasks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval import judge_tasks as J
from lmstack.eval.calls import batch_size, generate_all, generate_answers, loglikelihood_all, progress_bar
from lmstack.eval.items import TEXT_TYPES, item_id, references, render_prompt, text_of
from lmstack.eval.reward_judge import run_reward_model
from lmstack.eval.scoring import KindResult, MetricValue, check_metric_names, score

DEFAULT_METRICS = {
    "qa": ["exact_match", "token_f1"],
    "summarization": ["rouge1", "rouge2", "rougeL"],
    "translation": ["bleu", "chrf"],
}


def no_check(task) -> None:
    """A kind without options of its own."""


@dataclass(frozen=True)
class Kind:
    run: Callable[..., KindResult]
    reads: tuple[str, ...]  # the dataset types it reads
    judge: bool = False  # needs a judge model
    check: Callable[..., None] = no_check  # check(task): its own options, raising ConfigError


def mc_scores(lls: Sequence[float], choices: Sequence[str], answer: int) -> tuple[float, float]:
    """(acc, acc_norm) of one item: argmax of the log-likelihoods, and of the log-likelihoods divided
    by each choice's UTF-8 byte length (lm-evaluation-harness; ties go to the first choice)."""
    pick = max(range(len(lls)), key=lambda i: (lls[i], -i))
    norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, choices)]
    pick_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return float(pick == answer), float(pick_norm == answer)


def run_multiple_choice(task, model, judge, items, cache, progress, stats) -> KindResult:
    default = "Question: {question}\nAnswer:" if task.choices_as == "text" else None
    reqs, spans, item_of = [], [], []
    for i, it in enumerate(items):
        ctx = render_prompt(task, it, default)
        conts = ([f" {chr(65 + c)}" for c in range(len(it.choices))] if task.choices_as == "letters"
                 else [f" {c}" for c in it.choices])
        spans.append((len(reqs), len(conts)))
        reqs += [(ctx, c) for c in conts]
        item_of += [i] * len(conts)
    with progress_bar(len(items), task.name, progress) as bar:
        lls = loglikelihood_all(model, reqs, cache, bar, item_of)
    acc, acc_norm, records = [], [], []
    for it, (s, n) in zip(items, spans):
        a, an = mc_scores(lls[s: s + n], it.choices if task.choices_as == "text" else ["A"] * n, it.answer)
        acc.append(a)
        acc_norm.append(an)
        records.append({"id": item_id(it), "prompt": reqs[s][0], "loglikelihoods": lls[s: s + n],
                        "answer": it.answer, "scores": {"accuracy": a, "accuracy_norm": an}})
    per_item = {"accuracy": acc}
    metrics = {"accuracy": stats.value(acc)}
    if task.choices_as == "text":
        per_item["accuracy_norm"] = acc_norm
        metrics["accuracy_norm"] = stats.value(acc_norm)
    return KindResult(metrics, per_item, records, "accuracy")


def check_generative(task) -> None:
    task.metrics = task.metrics or list(DEFAULT_METRICS[task.dataset_type])
    check_metric_names(task.metrics, f"task {task.name!r}")


def run_generative(task, model, judge, items, cache, progress, stats) -> KindResult:
    prompts, preds = generate_answers(task, model, items, cache, progress)
    refs = [references(it) for it in items]
    metrics, per_item = score(task.metrics, preds, refs, stats.n_resamples, stats.alpha, stats.seed)
    notes = []
    if "meteor" in task.metrics:
        from lmstack.eval.meteor import synonym_stage_note

        notes.append(synonym_stage_note())
    records = [{"id": item_id(it), "prompt": p, "prediction": y, "references": r,
                "scores": {m: v[i] for m, v in per_item.items() if len(v) == len(items)}}
               for i, (it, p, y, r) in enumerate(zip(items, prompts, preds, refs))]
    return KindResult(metrics, per_item, records, next(iter(per_item), None), notes)


def check_code(task) -> None:
    if max(task.ks) > task.n_samples:
        raise ConfigError(f"task {task.name!r}: ks={task.ks} needs n_samples >= {max(task.ks)}, "
                          f"got {task.n_samples}")


def run_code(task, model, judge, items, cache, progress, stats) -> KindResult:
    from lmstack.eval.code_exec import evaluate_completions, pass_at_k

    n = task.n_samples
    prompts = [p.prompt for p in items for _ in range(n)]
    with progress_bar(len(items), task.name, progress) as bar:
        outs = generate_all(model, prompts, task.max_new_tokens, task.temperature, False, cache, task.seed,
                            [k for _ in items for k in range(n)], bar, [i for i in range(len(items)) for _ in range(n)])
    completions = {p.task_id: outs[i * n: (i + 1) * n] for i, p in enumerate(items)}
    res = evaluate_completions([p.to_dict() for p in items], completions, task.ks, progress=progress)
    metrics, per_item = {}, {}
    for k in task.ks:
        per = [pass_at_k(len(st), st.count("passed"), k) for st in (res.per_task[p.task_id] for p in items)]
        per_item[f"pass@{k}"] = per
        metrics[f"pass@{k}"] = stats.value(per)
    records = [{"id": p.task_id, "prompt": p.prompt, "prediction": completions[p.task_id][0],
                "statuses": res.per_task[p.task_id], "scores": {m: per_item[m][i] for m in per_item}}
               for i, p in enumerate(items)]
    return KindResult(metrics, per_item, records, f"pass@{task.ks[0]}", [f"sandbox: {res.isolation}"])


def run_perplexity(task, model, judge, items, cache, progress, stats) -> KindResult:
    from lmstack.eval.lm_metrics import perplexity
    from lmstack.eval.stats import bootstrap_corpus_ci

    llm = getattr(model, "llm", None)
    if llm is None:
        raise UnsupportedError(f"task {task.name!r}: perplexity needs a local model (an endpoint gives no "
                               "prompt log-probabilities through the chat API)")
    texts = [text_of(it) for it in items]
    r = perplexity(llm, texts, task.window, task.stride, batch_size(model))
    pairs = list(zip(r.per_text_nll, r.per_text_tokens))
    nbytes = [len(t.encode("utf-8")) for t in texts]

    def ppl(ps, _):
        return math.exp(sum(a for a, _ in ps) / max(1, sum(b for _, b in ps)))

    def bpb(ps, bs):
        return sum(a for a, _ in ps) / (math.log(2) * max(1, sum(bs)))

    n = min(stats.n_resamples, 200)
    ppl_ci = bootstrap_corpus_ci(ppl, pairs, nbytes, n, stats.alpha, stats.seed) if n else (None, None)
    bpb_ci = bootstrap_corpus_ci(bpb, pairs, nbytes, n, stats.alpha, stats.seed) if n else (None, None)
    metrics = {"perplexity": MetricValue(r.perplexity, *ppl_ci, len(texts)),
               "bits_per_byte": MetricValue(r.bits_per_byte, *bpb_ci, len(texts))}
    per_item = {"neg_bits_per_byte": [-a / (math.log(2) * b) for (a, _), b in zip(pairs, nbytes)]}
    records = [{"id": item_id(it), "prompt": t[:200], "scores": {"neg_bits_per_byte": v}}
               for it, t, v in zip(items, texts, per_item["neg_bits_per_byte"])]
    return KindResult(metrics, per_item, records, "neg_bits_per_byte")


KINDS: dict[str, Kind] = {
    "multiple_choice": Kind(run_multiple_choice, ("multiple_choice",)),
    "generative": Kind(run_generative, TEXT_TYPES, check=check_generative),
    "code": Kind(run_code, ("code",), check=check_code),
    "perplexity": Kind(run_perplexity, ("text", "summarization", "qa")),
    "judge": Kind(J.run_judge, TEXT_TYPES, judge=True),
    "pairwise": Kind(J.run_pairwise, ("pairwise",) + TEXT_TYPES, judge=True),
    "g_eval": Kind(J.run_g_eval, TEXT_TYPES, judge=True, check=J.check_g_eval),
    "dag": Kind(J.run_dag, TEXT_TYPES, judge=True, check=J.check_dag),
    "selfcheck": Kind(J.run_selfcheck, TEXT_TYPES, check=J.check_selfcheck),
    "rag": Kind(J.run_rag, ("rag",), judge=True, check=J.check_rag),
    "gpt_score": Kind(J.run_gpt_score, TEXT_TYPES),
    "reward_model": Kind(run_reward_model, TEXT_TYPES, judge=True),
}
JUDGE_KINDS = [name for name, kind in KINDS.items() if kind.judge]
