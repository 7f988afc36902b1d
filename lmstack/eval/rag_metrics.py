"""RAG metrics on the judge interface (``lmstack.eval.judges.ask``), after Ragas (Es et al. 2023,
"RAGAS: Automated Evaluation of Retrieval Augmented Generation", sec. 3):

* ``faithfulness``: the answer is split into statements; each is checked against the retrieved
  context; ``F = |supported| / |statements|``.
* ``context_recall``: each sentence of the reference answer is checked for attribution to the
  context; the share attributed.
* ``context_precision``: each retrieved chunk (in rank order) is judged useful or not for the
  reference; ``sum_k precision@k * v_k / (number of useful chunks)`` (average precision).
* ``answer_relevance``: the judge writes ``n`` questions the answer would answer; the score is
  the mean cosine similarity between the encoder embeddings of those questions and of the
  real question (``AR = 1/n sum_i cos(E(q_i), E(q))``).

Each metric has a ``*_scores`` twin over lists of items that asks the judge in one batch per
metric (the harness's ``rag`` task uses those). Verdicts that stay unparseable after retries
are left out of the ratio and counted in ``errors``; a metric with no parseable verdict at all
is ``None``, never 0. Statements come from a sentence splitter, not from an LLM rewrite as
Ragas does (deliberately: the small judges this runs on rewrite unreliably).

With ``mode="likelihood"`` the yes/no checks of the first three metrics are the likelier of
"yes" and "no" (``judges.choose``: never unparseable, each with its margin);
``answer_relevance`` writes questions, which only generation can do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar

from lmstack.eval.judges import YES_NO_OPTIONS, JudgeCall, JudgeMode, ask, parse_yes_no, split_sentences, verdicts

T = TypeVar("T")

SUPPORT_PROMPT = ("Context:\n{context}\n\nStatement: {statement}\n\nCan the statement be inferred from the "
                  "context? Answer yes or no.\nAnswer:")
USEFUL_PROMPT = ("Question: {question}\nReference answer: {reference}\n\nRetrieved text:\n{chunk}\n\n"
                 "Is the retrieved text useful for arriving at the reference answer? Answer yes or no.\nAnswer:")
QUESTION_PROMPT = ("Write one question that the following answer answers. Reply with the question only.\n\n"
                   "Answer: {answer}\n\nQuestion:")


@dataclass
class RAGScore:
    value: Optional[float]  # None when no verdict parsed
    verdicts: list[Optional[bool]] = field(default_factory=list)  # None: unparseable after retries
    errors: int = 0
    margins: list[float] = field(default_factory=list)  # likelihood mode: one per verdict


def _ratio(calls: list[JudgeCall]) -> RAGScore:
    found = [c.value for c in calls]
    ok = [v for v in found if v is not None]
    return RAGScore(sum(ok) / len(ok) if ok else None, found, len(found) - len(ok), _margins(calls))


def _margins(calls: list[JudgeCall]) -> list[float]:
    return [c.margin for c in calls if c.margin is not None]


def _group(flat: list[T], sizes: list[int]) -> list[list[T]]:
    out, start = [], 0
    for n in sizes:
        out.append(flat[start: start + n])
        start += n
    return out


def _yes_no_groups(model, groups: list[list[str]], seed: int, chat: bool, temperature: float,
                   mode: JudgeMode) -> list[list[JudgeCall]]:
    """One batched yes/no question per prompt, regrouped per item."""
    flat = [p for g in groups for p in g]
    calls = verdicts(model, flat, parse_yes_no, YES_NO_OPTIONS, mode, seed, 2, chat, 4, temperature)
    return _group(calls, [len(g) for g in groups])


def _supported_scores(model, texts: Sequence[str], contexts: Sequence[Sequence[str]], seed: int, chat: bool,
                      temperature: float, mode: JudgeMode) -> list[RAGScore]:
    groups = [[SUPPORT_PROMPT.format(context="\n\n".join(ctx), statement=s) for s in split_sentences(t)]
              for t, ctx in zip(texts, contexts)]
    return [_ratio(calls) for calls in _yes_no_groups(model, groups, seed, chat, temperature, mode)]


def faithfulness_scores(model, answers: Sequence[str], contexts: Sequence[Sequence[str]], seed: int = 0,
                        chat: bool = True, temperature: float = 0.0, mode: JudgeMode = "generate") -> list[RAGScore]:
    """Per item: the share of the answer's sentences that its retrieved contexts support."""
    return _supported_scores(model, answers, contexts, seed, chat, temperature, mode)


def context_recall_scores(model, references: Sequence[str], contexts: Sequence[Sequence[str]], seed: int = 0,
                          chat: bool = True, temperature: float = 0.0,
                          mode: JudgeMode = "generate") -> list[RAGScore]:
    """Per item: the share of the reference's sentences attributable to its retrieved contexts."""
    return _supported_scores(model, references, contexts, seed, chat, temperature, mode)


def faithfulness(model, answer: str, contexts: Sequence[str], seed: int = 0, chat: bool = True,
                 mode: JudgeMode = "generate") -> RAGScore:
    return faithfulness_scores(model, [answer], [contexts], seed, chat, mode=mode)[0]


def context_recall(model, reference: str, contexts: Sequence[str], seed: int = 0, chat: bool = True,
                   mode: JudgeMode = "generate") -> RAGScore:
    return context_recall_scores(model, [reference], [contexts], seed, chat, mode=mode)[0]


def average_precision(useful: Sequence[bool]) -> float:
    """``sum_k precision@k * v_k / sum_k v_k`` over a ranked list of relevance verdicts (0 if none)."""
    hits, total = 0, 0.0
    for k, v in enumerate(useful, 1):
        if v:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def context_precision_scores(model, questions: Sequence[str], references: Sequence[str],
                             contexts: Sequence[Sequence[str]], seed: int = 0, chat: bool = True,
                             temperature: float = 0.0, mode: JudgeMode = "generate") -> list[RAGScore]:
    """Per item: average precision of the chunks judged useful for the reference, in rank order."""
    groups = [[USEFUL_PROMPT.format(question=q, reference=r, chunk=c) for c in ctx]
              for q, r, ctx in zip(questions, references, contexts)]
    out = []
    for calls in _yes_no_groups(model, groups, seed, chat, temperature, mode):
        found = [c.value for c in calls]
        ok = [v for v in found if v is not None]
        # an unparseable chunk is dropped from the ranking (its rank is unknown), and counted
        out.append(RAGScore(average_precision(ok) if ok else None, found, len(found) - len(ok), _margins(calls)))
    return out


def context_precision(model, question: str, reference: str, contexts: Sequence[str], seed: int = 0,
                      chat: bool = True, mode: JudgeMode = "generate") -> RAGScore:
    return context_precision_scores(model, [question], [reference], [contexts], seed, chat, mode=mode)[0]


def default_embed() -> Callable[[list[str]], object]:
    """Sentence embeddings with the default encoder (all-MiniLM-L6-v2), loaded once."""
    from lmstack.model.encoder import Encoder

    enc = Encoder.load()
    return enc.encode


def answer_relevance_scores(model, questions: Sequence[str], answers: Sequence[str],
                            embed: Optional[Callable[[list[str]], object]] = None, n: int = 3, seed: int = 0,
                            chat: bool = True) -> list[RAGScore]:
    """Per item: mean cosine similarity between the question and ``n`` questions generated from
    the answer (seeds ``seed .. seed + n - 1``, temperature 0.7 so they differ). ``verdicts`` has
    one entry per generated question: True, or None when the judge wrote nothing usable."""
    import torch

    embed = embed or default_embed()
    generated: list[list[Optional[str]]] = [[] for _ in answers]
    for k in range(n):
        calls = ask(model, [QUESTION_PROMPT.format(answer=a) for a in answers],
                    lambda t: t.strip().split("\n")[0] or None, seed + k, 2, chat, 48, temperature=0.7)
        for gen, c in zip(generated, calls):
            gen.append(c.value)
    out = []
    for question, gen in zip(questions, generated):
        ok = [q for q in gen if q]
        verdicts = [True if q else None for q in gen]
        if not ok:
            out.append(RAGScore(None, verdicts, n))
            continue
        e = torch.as_tensor(embed([question] + ok), dtype=torch.float32)
        e = torch.nn.functional.normalize(e, dim=-1)
        out.append(RAGScore(float((e[1:] @ e[0]).mean()), verdicts, n - len(ok)))
    return out


def answer_relevance(model, question: str, answer: str, embed: Optional[Callable[[list[str]], object]] = None,
                     n: int = 3, seed: int = 0, chat: bool = True) -> RAGScore:
    return answer_relevance_scores(model, [question], [answer], embed, n, seed, chat)[0]
