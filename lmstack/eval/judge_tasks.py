"""Harness task kinds scored by a judge model or by the evaluated model's own probabilities:
``run_<kind>`` functions (and ``check_<kind>`` for their options) that ``lmstack.eval.kinds``
lists in ``KINDS``, with the signature and result type described there.

* ``judge``: the judge grades the model's answer 1-5 against the reference (``judge_score`` in
  [0, 1]).
* ``pairwise``: two answers per item, judged in both orders (``judges.pairwise``): the
  dataset's ``answer_1`` / ``answer_2`` (a ``pairwise`` set), or the model's answer against the
  reference. ``win_rate`` of answer 1 (a tie counts one half), ``position_bias`` (share of
  items whose preferred answer changes when the order is swapped), ``agreement`` with the
  set's human label where there is one.
* ``g_eval``: G-Eval on the model's answer (``g_eval`` on the paper's 1-5 scale), weighted by
  the judge's next-token probabilities when it exposes them, else the parsed integer; a note
  says which was used.
* ``dag``: the YAML's decision graph of yes/no checks (``dag_score``, the leaf reached).
* ``rag``: retrieval metrics of the ranked context ids against the gold ids (``hit@k``,
  ``recall@k``, ``ndcg@k``, ``mrr``) and the judge's ``context_precision``,
  ``context_recall``, ``faithfulness`` and ``answer_relevance`` of the item's or the model's
  answer.
* ``selfcheck``: SelfCheckGPT on the model's answer against ``n_samples`` answers sampled at
  ``sample_temperature`` (``selfcheck_ngram`` or ``selfcheck_bertscore``, the mean over the
  answer's sentences; higher means less supported by the samples). No judge.
* ``gpt_score``: the mean token log-probability of the reference given the task's prompt under
  the evaluated model (GPTScore, ``lm_metrics.gpt_score``); local models only. No judge.

Every judge request goes through ``CachedJudge`` (``lmstack.eval.calls``): replies (and
G-Eval's option probabilities) are stored in the output cache, keyed by the judge's identity,
the prompt, the sampling parameters and the seed, so a re-run after a kill asks the judge
nothing it already answered. The model's answers and samples go through ``generate_all`` and
the same cache.

Judge kinds run once per entry of ``judge_seeds``. An item's score is the mean over the seeds
whose verdict parsed; an item no seed could score is left out of the task score (never scored
as 0). ``judge_errors`` counts the verdicts that stayed unparseable after retries (its ``n``
is the number of verdicts asked; ``judge_error_rate`` is their share) and, with several
seeds, ``judge_seed_std`` is the standard deviation of the task score across seeds.

With ``judge_mode: likelihood`` every verdict is the judge's most likely allowed answer
(``judges.choose``), cached like a reply (``option_loglikelihoods``). Such a verdict does not
depend on the seed, so the task runs once, with the first of ``judge_seeds``, and a note says so
instead of a spread of zero. ``judge_low_confidence`` is the share of verdicts whose margin
(the log-probability gap to the runner-up) is below ``judge_low_margin``: the verdicts where
the judge is close to guessing. Each record keeps its verdicts' margins. ``judge`` adds
``judge_score_weighted``, the expected grade ``sum_g p(g) (g - 1) / 4``; ``g_eval`` is weighted by
the likelihoods of "1".."5" on every item; the ``rag`` yes/no checks are likelihood verdicts
while ``answer_relevance`` still generates its questions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval import rag_metrics as R
from lmstack.eval import retrieval
from lmstack.eval.cache import cached_map
from lmstack.eval.calls import batch_size, generate_all, generate_answers, items_done, model_id, progress_bar
from lmstack.eval.items import item_fields, item_id, references, render_prompt, source_of
from lmstack.eval.judges import (DEFAULT_RUBRIC, GEvalConfig, JudgeCall, dag_judge, g_eval, pairwise, pointwise,
                                 seed_spread, selfcheck_bertscore, selfcheck_ngram, split_sentences, weighted_score)
from lmstack.eval.lm_metrics import gpt_score
from lmstack.eval.scoring import KindResult, MetricValue, Stats

RAG_METRICS = ("context_precision", "context_recall", "faithfulness", "answer_relevance")
# a judged item: metric -> value (None: not applicable to this item); None for the whole item
# when its verdict stayed unparseable
Row = Optional[dict[str, Optional[float]]]


# -- judges over seeds -----------------------------------------------------------------------

@dataclass
class SeedRun:
    """One judge pass over the items (one seed)."""

    rows: list[Row]
    details: list[dict]  # per item: replies, verdicts, paths, margins
    errors: int  # verdicts that stayed unparseable
    asked: int  # verdicts asked
    margins: list[float] = field(default_factory=list)  # likelihood mode: one per verdict


@dataclass
class Judged:
    """What ``over_seeds`` collects: per metric and item, the values of the seeds that scored it."""

    scores: dict[str, list[list[float]]]
    details: list[list[dict]]  # per item, one record per seed (replies, verdicts, paths)
    errors: int
    asked: int
    per_seed: list[float]  # the primary metric's mean per seed (over the items it scored)
    margins: list[float] = field(default_factory=list)  # likelihood mode: every verdict's margin


def judge_seeds(task) -> list[int]:
    """The seeds the judge runs with: all of ``judge_seeds``, or the first alone for likelihood
    verdicts, which no seed changes."""
    return task.judge_seeds[:1] if task.judge_mode == "likelihood" else list(task.judge_seeds)


def over_seeds(task, n_items: int, names: Sequence[str], primary: str,
               run_one: Callable[[int], SeedRun]) -> Judged:
    """``run_one(seed)`` once per judge seed (see ``judge_seeds``)."""
    out = Judged({m: [[] for _ in range(n_items)] for m in names}, [[] for _ in range(n_items)], 0, 0, [])
    for seed in judge_seeds(task):
        run = run_one(seed)
        out.errors += run.errors
        out.asked += run.asked
        out.margins += run.margins
        for i, (row, d) in enumerate(zip(run.rows, run.details)):
            out.details[i].append({"seed": seed, **d})
            for m, v in (row or {}).items():
                if v is not None:
                    out.scores[m][i].append(float(v))
        ok = [row[primary] for row in run.rows if row and row.get(primary) is not None]
        if ok:
            out.per_seed.append(sum(ok) / len(ok))
    return out


def judged_metrics(task, judged: Judged, primary: str,
                   stats: Stats) -> tuple[dict[str, MetricValue], dict[str, list[float]], list[str]]:
    """Task metrics from per-item means over seeds, the error count and the spread across seeds."""
    metrics: dict[str, MetricValue] = {}
    per_item: dict[str, list[float]] = {}
    for m, per in judged.scores.items():
        means = [sum(v) / len(v) for v in per if v]
        if not means and m != primary:  # e.g. agreement on a set without labels
            continue
        metrics[m] = stats.value(means)
        if len(means) == len(per):
            per_item[m] = means
    e, n = judged.errors, judged.asked
    metrics["judge_errors"] = MetricValue(float(e), None, None, n)
    metrics["judge_error_rate"] = MetricValue(e / n if n else 0.0, None, None, n)
    notes = []
    if e:
        notes.append(f"judge: {e} of {n} verdicts stayed unparseable after retries; recorded as errors and "
                     "left out of the scores")
    if task.judge_mode == "likelihood":
        low, k = sum(m < task.judge_low_margin for m in judged.margins), len(judged.margins)
        metrics["judge_low_confidence"] = MetricValue(low / k if k else 0.0, None, None, k)
        notes.append(f"judge: likelihood verdicts (the judge's most likely allowed answer); {low} of {k} were "
                     f"decided by a margin below {task.judge_low_margin} nats (low confidence)")
        notes.append(f"judge: a likelihood verdict does not depend on the seed, so the judge ran once, with seed "
                     f"{task.judge_seeds[0]} (judge_seeds {task.judge_seeds}); no spread across seeds is reported")
    elif len(task.judge_seeds) > 1 and judged.per_seed:
        mean, std = seed_spread(judged.per_seed)
        metrics["judge_seed_std"] = MetricValue(std, None, None, len(judged.per_seed))
        notes.append(f"judge: {primary} across seeds {task.judge_seeds}: mean {mean:.4f}, std {std:.4f}")
    return metrics, per_item, notes


def _call_detail(c: JudgeCall) -> dict:
    """A judge call for the records: its replies and error, or for a likelihood verdict the
    probabilities of the allowed values and the margin."""
    if c.margin is None:
        return {"replies": c.replies, "error": c.error}
    return {"probs": c.probs, "margin": c.margin}


def _margins(calls: Sequence[JudgeCall]) -> list[float]:
    return [c.margin for c in calls if c.margin is not None]


def _item_scores(judged: Judged, i: int) -> dict[str, float]:
    return {m: sum(v[i]) / len(v[i]) for m, v in judged.scores.items() if v[i]}


def _answered(task, model, items: list, cache, progress: bool):
    """(prompts, the model's answers, the first reference) per item."""
    prompts, preds = generate_answers(task, model, items, cache, progress)
    return prompts, preds, [references(it)[0] for it in items]


def _answer_records(items: list, prompts: Sequence[str], preds: Sequence[str]) -> list[dict]:
    return [{"id": item_id(it), "prompt": p, "prediction": y, "references": references(it)}
            for it, p, y in zip(items, prompts, preds)]


def _judged_result(task, judged: Judged, primary: str, stats: Stats, records: list[dict],
                   notes: Sequence[str] = ()) -> KindResult:
    metrics, per_item, judge_notes = judged_metrics(task, judged, primary, stats)
    for i, r in enumerate(records):
        r["scores"] = _item_scores(judged, i)
        r["judge"] = judged.details[i]
    return KindResult(metrics, per_item, records, primary, list(notes) + judge_notes)


# -- the kinds -------------------------------------------------------------------------------

def run_judge(task, model, judge, items, cache, progress, stats) -> KindResult:
    prompts, preds, refs = _answered(task, model, items, cache, progress)

    def one(seed):
        calls = pointwise(judge, prompts, preds, refs, task.judge_rubric or DEFAULT_RUBRIC, seed=seed,
                          chat=task.chat, temperature=task.judge_temperature, mode=task.judge_mode)
        rows: list[Row] = []
        for c in calls:
            row = None if c.value is None else {"judge_score": c.value}
            if row is not None and c.margin is not None:  # the expected grade, as G-Eval weights it
                row["judge_score_weighted"] = (weighted_score(c.probs) - 1) / 4  # type: ignore[arg-type]
            rows.append(row)
        return SeedRun(rows, [_call_detail(c) for c in calls], sum(c.value is None for c in calls), len(calls),
                       _margins(calls))

    judged = over_seeds(task, len(items), ["judge_score", "judge_score_weighted"], "judge_score", one)
    records = _answer_records(items, prompts, preds)
    return _judged_result(task, judged, "judge_score", stats, records)


_WIN = {"1": 1.0, "2": 0.0, "tie": 0.5}


def run_pairwise(task, model, judge, items, cache, progress, stats) -> KindResult:
    if task.dataset_type == "pairwise":
        questions = [it.question for it in items]
        first, second, labels = [it.answer_1 for it in items], [it.answer_2 for it in items], [it.label for it in items]
    else:  # the model's answer (1) against the reference (2)
        questions, first, second = _answered(task, model, items, cache, progress)
        labels = [None] * len(items)

    def one(seed):
        s = pairwise(judge, questions, first, second, labels, seed=seed, chat=task.chat,
                     temperature=task.judge_temperature, mode=task.judge_mode)
        rows: list[Row] = []
        for v, label in zip(s.verdicts, labels):
            rows.append(None if v.error else {
                "win_rate": _WIN[v.winner], "position_bias": float(v.flipped),
                "agreement": None if label is None else float(v.winner == label)})
        details = [{"first_order": v.first_order, "swapped_order": v.swapped_order, "winner": v.winner,
                    "error": v.error, **({} if v.margins is None else {"margins": list(v.margins)})}
                   for v in s.verdicts]
        return SeedRun(rows, details, s.n_errors, s.n, [m for v in s.verdicts for m in v.margins or ()])

    judged = over_seeds(task, len(items), ["win_rate", "agreement", "position_bias"], "win_rate", one)
    records = [{"id": item_id(it), "prompt": q, "prediction": a, "references": [b], "label": lab}
               for it, q, a, b, lab in zip(items, questions, first, second, labels)]
    return _judged_result(task, judged, "win_rate", stats, records)


def check_g_eval(task) -> None:
    if task.g_eval is None and task.dataset_type != "summarization":
        raise ConfigError(f"task {task.name!r}: kind 'g_eval' on a {task.dataset_type!r} set needs a 'g_eval' "
                          "block (criterion, criteria, steps, source_kind, output_kind); the default one rates "
                          "the coherence of summaries")


def run_g_eval(task, model, judge, items, cache, progress, stats) -> KindResult:
    prompts, preds, _ = _answered(task, model, items, cache, progress)
    cfg = task.g_eval or GEvalConfig()
    sources = [source_of(it) for it in items]

    def one(seed):
        calls = g_eval(judge, sources, preds, cfg, seed=seed, chat=task.chat, temperature=task.judge_temperature,
                       mode=task.judge_mode)
        rows = [None if c.value is None else {"g_eval": float(c.value)} for c in calls]
        details = [{"mode": _g_eval_mode(c), "probs": c.probs, "replies": c.replies, "error": c.error,
                    **({} if c.margin is None else {"margin": c.margin})} for c in calls]
        return SeedRun(rows, details, sum(c.value is None for c in calls), len(calls), _margins(calls))

    judged = over_seeds(task, len(items), ["g_eval"], "g_eval", one)
    modes = [d["mode"] for per in judged.details for d in per]
    if task.judge_mode == "likelihood":
        note = f"g_eval: all {len(modes)} scores weighted by the judge's likelihoods of the answers 1-5"
    else:
        weighted = modes.count("probabilities")
        note = (f"g_eval: {weighted} of {len(modes)} scores weighted by the judge's next-token probabilities of "
                f"1-5, {len(modes) - weighted} parsed from its reply")
    records = _answer_records(items, prompts, preds)
    return _judged_result(task, judged, "g_eval", stats, records, [note])


def _g_eval_mode(c: JudgeCall) -> str:
    if c.margin is not None:
        return "likelihood"
    return "parsed" if c.probs is None else "probabilities"


def check_dag(task) -> None:
    if task.dag is None:
        raise ConfigError(f"task {task.name!r}: kind 'dag' needs a 'dag' block: {{root: <node id>, nodes: "
                          "[{id, question, if_yes, if_no}, ...]}")


def run_dag(task, model, judge, items, cache, progress, stats) -> KindResult:
    prompts, preds, refs = _answered(task, model, items, cache, progress)
    fields = [{**item_fields(it), "prompt": p, "answer": y, "reference": r}
              for it, p, y, r in zip(items, prompts, preds, refs)]
    for node in task.dag.nodes if fields else []:
        try:
            node.question.format(**fields[0])
        except (KeyError, IndexError) as e:
            raise ConfigError(f"task {task.name!r}: dag node {node.id!r} asks {node.question!r}, which uses "
                              f"{{{e.args[0]}}}; the fields are {sorted(fields[0])}") from None

    def one(seed):
        out = dag_judge(judge, task.dag, fields, seed=seed, chat=task.chat, temperature=task.judge_temperature,
                        mode=task.judge_mode)
        rows: list[Row] = [None if o.score is None else {"dag_score": o.score} for o in out]
        details = [{"path": [[node, answer] for node, answer in o.path], "error": o.error,
                    **({"margins": o.margins} if task.judge_mode == "likelihood" else {})} for o in out]
        return SeedRun(rows, details, sum(o.score is None for o in out), len(out),
                       [m for o in out for m in o.margins])

    judged = over_seeds(task, len(items), ["dag_score"], "dag_score", one)
    records = _answer_records(items, prompts, preds)
    return _judged_result(task, judged, "dag_score", stats, records)


def check_rag(task) -> None:
    task.metrics = task.metrics or list(RAG_METRICS)
    unknown = [m for m in task.metrics if m not in RAG_METRICS]
    if unknown:
        raise ConfigError(f"task {task.name!r}: metrics {unknown} are not RAG metrics; expected some of "
                          f"{list(RAG_METRICS)} (retrieval metrics are always reported)")
    if not task.ks or any(k < 1 for k in task.ks):
        raise ConfigError(f"task {task.name!r}: ks={task.ks}, expected retrieval cut-offs >= 1, e.g. [1, 3]")


def run_rag(task, model, judge, items, cache, progress, stats) -> KindResult:
    if task.answer_source == "dataset":
        missing = [it.id for it in items if not it.answer]
        if missing:
            raise ConfigError(f"task {task.name!r}: answer_source 'dataset' needs an 'answer' on every item; "
                              f"missing on {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        prompts, answers = [it.question for it in items], [it.answer for it in items]
    else:
        prompts, answers = generate_answers(task, model, items, cache, progress)
    questions, refs = [it.question for it in items], [it.reference for it in items]
    contexts = [it.context_texts for it in items]
    ranked, gold = [it.context_ids for it in items], [it.gold_ids for it in items]

    retrieval_scores = {"mrr": retrieval.reciprocal_rank_scores(ranked, gold)}
    for k in task.ks:
        retrieval_scores[f"hit@{k}"] = retrieval.hit_at_k_scores(ranked, gold, k)
        retrieval_scores[f"recall@{k}"] = retrieval.recall_at_k_scores(ranked, gold, k)
        retrieval_scores[f"ndcg@{k}"] = retrieval.ndcg_at_k_scores(ranked, gold, k)
    embed = R.default_embed() if "answer_relevance" in task.metrics else None
    chat, temp, mode = task.chat, task.judge_temperature, task.judge_mode
    metric_fns = {  # seed -> a RAGScore per item
        "faithfulness": lambda seed: R.faithfulness_scores(judge, answers, contexts, seed, chat, temp, mode),
        "context_recall": lambda seed: R.context_recall_scores(judge, refs, contexts, seed, chat, temp, mode),
        "context_precision": lambda seed: R.context_precision_scores(judge, questions, refs, contexts, seed,
                                                                     chat, temp, mode),
        "answer_relevance": lambda seed: R.answer_relevance_scores(judge, questions, answers, embed, seed=seed,
                                                                   chat=chat),
    }

    def one(seed):
        scores = {m: metric_fns[m](seed) for m in task.metrics}
        rows = [{m: scores[m][i].value for m in task.metrics} for i in range(len(items))]
        details = [{m: _rag_detail(scores[m][i]) for m in task.metrics} for i in range(len(items))]
        errors = sum(s.errors for per in scores.values() for s in per)
        return SeedRun(rows, details, errors, sum(len(s.verdicts) for per in scores.values() for s in per),
                       [m for per in scores.values() for s in per for m in s.margins])

    primary = "faithfulness" if "faithfulness" in task.metrics else task.metrics[0]
    judged = over_seeds(task, len(items), task.metrics, primary, one)
    records = [{"id": item_id(it), "prompt": p, "prediction": a, "references": [it.reference],
                "retrieved": it.context_ids, "gold_ids": it.gold_ids} for it, p, a in zip(items, prompts, answers)]
    empty = sum(not split_sentences(a) for a in answers)
    notes = [f"rag: {empty} answers have no sentence to check; left out of faithfulness"] \
        if empty and "faithfulness" in task.metrics else []
    if mode == "likelihood" and "answer_relevance" in task.metrics:
        notes.append("rag: answer_relevance still generates its questions (sampled at temperature 0.7); only the "
                     "yes/no checks are likelihood verdicts")
    out = _judged_result(task, judged, primary, stats, records, notes)
    out.metrics = {**{m: stats.value(per) for m, per in retrieval_scores.items()}, **out.metrics}
    out.per_item.update(retrieval_scores)
    for i, r in enumerate(out.records):
        r["scores"].update({m: per[i] for m, per in retrieval_scores.items()})
    return out


def _rag_detail(score: R.RAGScore) -> dict:
    return {"verdicts": score.verdicts, "errors": score.errors, **({"margins": score.margins} if score.margins else {})}


def check_selfcheck(task) -> None:
    if task.n_samples < 2:
        raise ConfigError(f"task {task.name!r}: kind 'selfcheck' needs n_samples >= 2 sampled answers to check "
                          f"the answer against, got {task.n_samples}")
    if task.sample_temperature <= 0:
        raise ConfigError(f"task {task.name!r}: sample_temperature={task.sample_temperature}, expected > 0 "
                          "(greedy samples would all repeat the answer)")


def run_selfcheck(task, model, judge, items, cache, progress, stats) -> KindResult:
    prompts, preds = generate_answers(task, model, items, cache, progress)
    n = task.n_samples
    with progress_bar(len(items), f"{task.name} samples", progress) as bar:
        flat = generate_all(model, [p for p in prompts for _ in range(n)], task.max_new_tokens,
                            task.sample_temperature, task.chat, cache, task.seed,
                            [k for _ in prompts for k in range(n)], bar, [i for i in range(len(prompts)) for _ in range(n)])
    samples = [[s.strip() for s in flat[i * n: (i + 1) * n]] for i in range(len(prompts))]
    sentences = [split_sentences(y) for y in preds]
    if task.variant == "ngram":
        per_sentence = [[avg for avg, _ in selfcheck_ngram(s, smp)] for s, smp in zip(sentences, samples)]
    else:
        f1 = _bertscore_f1()
        per_sentence = [selfcheck_bertscore(s, smp, f1) for s, smp in zip(sentences, samples)]
    name = f"selfcheck_{task.variant}"
    scored = [sum(v) / len(v) if v else None for v in per_sentence]
    ok = [v for v in scored if v is not None]
    notes = [f"selfcheck: {len(prompts) - len(ok)} empty answers have no sentence to check; left out"] \
        if len(ok) < len(prompts) else []
    records = [{"id": item_id(it), "prompt": p, "prediction": y, "references": references(it), "samples": smp,
                "sentence_scores": v, "scores": {} if sc is None else {name: sc}}
               for it, p, y, smp, v, sc in zip(items, prompts, preds, samples, per_sentence, scored)]
    return KindResult({name: stats.value(ok)}, {name: ok} if len(ok) == len(prompts) else {}, records, name, notes,
                      higher_is_better=False)


def _bertscore_f1() -> Callable[[list[str], list[str]], list[float]]:
    """BERTScore F1 with the default encoder, loaded once for the whole task."""
    from lmstack.eval.bertscore import bertscore_scores
    from lmstack.model.encoder import Encoder

    encoder = Encoder.load()
    return lambda preds, refs: bertscore_scores(preds, refs, encoder)["f1"]


def run_gpt_score(task, model, judge, items, cache, progress, stats) -> KindResult:
    llm = getattr(model, "llm", None)
    if llm is None:
        raise UnsupportedError(f"task {task.name!r}: gpt_score needs a local model (an endpoint gives no "
                               "prompt log-probabilities through the chat API)")
    prompts = [render_prompt(task, it) for it in items]
    outputs = [references(it)[0] for it in items]
    # the output follows the prompt after a space, as an answer would be generated
    payloads = [{"context": p, "continuation": o if p.endswith((" ", "\n")) else " " + o}
                for p, o in zip(prompts, outputs)]

    def compute(batch: list[dict]) -> list[float]:
        return gpt_score(llm, [b["context"] for b in batch], [b["continuation"] for b in batch], "{source}",
                         batch_size(model))

    with progress_bar(len(items), task.name, progress) as bar:
        values = cached_map(cache, model_id(model, cache), "gpt_score", payloads, compute,
                            max(batch_size(model), 16), items_done(bar, range(len(payloads))))
    records = [{"id": item_id(it), "prompt": p, "references": [o], "scores": {"gpt_score": v}}
               for it, p, o, v in zip(items, prompts, outputs, values)]
    return KindResult({"gpt_score": stats.value(values)}, {"gpt_score": values}, records, "gpt_score")
