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

Verdicts that stay unparseable after retries are left out of the ratio and counted in
``errors``; a metric with no parseable verdict at all is ``None``, never 0. Statements come from
a sentence splitter, not from an LLM rewrite as Ragas does (deliberately: the small judges this
runs on rewrite unreliably).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from lmstack.eval.judges import ask, parse_yes_no, split_sentences

SUPPORT_PROMPT = ("Context:\n{context}\n\nStatement: {statement}\n\nCan the statement be inferred from the "
                  "context? Answer yes or no.\nAnswer:")
USEFUL_PROMPT = ("Question: {question}\nReference answer: {reference}\n\nRetrieved text:\n{chunk}\n\n"
                 "Is the retrieved text useful for arriving at the reference answer? Answer yes or no.\nAnswer:")
QUESTION_PROMPT = ("Write one question that the following answer answers. Reply with the question only.\n\n"
                   "Answer: {answer}\n\nQuestion:")


@dataclass
class RAGScore:
    value: Optional[float]  # None when no verdict parsed
    verdicts: list[Optional[bool]] = field(default_factory=list)
    errors: int = 0


def _ratio(verdicts: list[Optional[bool]]) -> RAGScore:
    ok = [v for v in verdicts if v is not None]
    return RAGScore(sum(ok) / len(ok) if ok else None, verdicts, len(verdicts) - len(ok))


def _yes_no(model, prompts: list[str], seed: int, chat: bool) -> list[Optional[bool]]:
    return [c.value for c in ask(model, prompts, parse_yes_no, seed, 2, chat, 4)]


def faithfulness(model, answer: str, contexts: Sequence[str], seed: int = 0, chat: bool = True) -> RAGScore:
    statements = split_sentences(answer)
    ctx = "\n\n".join(contexts)
    return _ratio(_yes_no(model, [SUPPORT_PROMPT.format(context=ctx, statement=s) for s in statements], seed, chat))


def context_recall(model, reference: str, contexts: Sequence[str], seed: int = 0, chat: bool = True) -> RAGScore:
    sentences = split_sentences(reference)
    ctx = "\n\n".join(contexts)
    return _ratio(_yes_no(model, [SUPPORT_PROMPT.format(context=ctx, statement=s) for s in sentences], seed, chat))


def average_precision(useful: Sequence[bool]) -> float:
    """``sum_k precision@k * v_k / sum_k v_k`` over a ranked list of relevance verdicts (0 if none)."""
    hits, total = 0, 0.0
    for k, v in enumerate(useful, 1):
        if v:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def context_precision(model, question: str, reference: str, contexts: Sequence[str], seed: int = 0,
                      chat: bool = True) -> RAGScore:
    verdicts = _yes_no(model, [USEFUL_PROMPT.format(question=question, reference=reference, chunk=c)
                               for c in contexts], seed, chat)
    ok = [v for v in verdicts if v is not None]
    # an unparseable chunk is dropped from the ranking (its rank is unknown), and counted
    return RAGScore(average_precision(ok) if ok else None, verdicts, len(verdicts) - len(ok))


def answer_relevance(model, question: str, answer: str, embed: Optional[Callable[[list[str]], object]] = None,
                     n: int = 3, seed: int = 0, chat: bool = True) -> RAGScore:
    """Mean cosine similarity between the question and ``n`` questions generated from the answer
    (seeds ``seed .. seed + n - 1``, temperature 0.7 so they differ)."""
    import torch

    if embed is None:
        from lmstack.model.encoder import Encoder

        enc = Encoder.load()

        def embed(texts):
            return enc.encode(texts)

    gen = []
    for k in range(n):
        calls = ask(model, [QUESTION_PROMPT.format(answer=answer)], lambda t: t.strip().split("\n")[0] or None,
                    seed + k, 2, chat, 48, temperature=0.7)
        gen.append(calls[0].value)
    ok = [q for q in gen if q]
    if not ok:
        return RAGScore(None, [], n)
    e = torch.as_tensor(embed([question] + ok), dtype=torch.float32)
    e = torch.nn.functional.normalize(e, dim=-1)
    return RAGScore(float((e[1:] @ e[0]).mean()), [True] * len(ok), n - len(ok))
