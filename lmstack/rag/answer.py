"""Answers from retrieved chunks: numbered sources under a token budget, ``[n]`` citations mapped
to chunk spans and checked after generation, and "I don't know." when retrieval is too weak.

The steps, each a function of its own:

* ``build_context``: the hits in rank order become numbered sources ``[1] Title > Section``
  followed by the chunk text. Whole chunks are added while the assembled context fits the
  budget; the first chunk that does not fit is cut after its last sentence that does, and
  nothing follows it. The budget is checked on the assembled string (tokens of a
  concatenation are not always the sum of the parts), so it is never exceeded.
* ``messages``: a system message (``SYSTEM_PROMPT``), two worked examples (``FEW_SHOT``) and the
  user message (``USER_TEMPLATE``). Small instruction models (SmolLM2-135M) ignore a citation
  rule stated only in the system message; the two examples are what makes them write ``[n]``
  at all (in about half of the answers), and they still cite loosely: ``[1, 2]``, ``[1-2]``,
  ``(1)``, ``Source: [3]``, a number that names no source, or often the wrong source.
* ``parse_citations``: the answer is split into sentences (``judges.split_sentences``); every
  citation form above is read, a fragment made only of markers ("... in 1889. [1]") belongs to
  the sentence before it, and numbers that name no source are dropped.
* ``check_citations``: each (sentence, cited passage) pair gets a support score in [0, 1] from a
  checker in ``CHECKERS``; a citation is ``supported`` when the score reaches the checker's
  threshold. Sentences with no supported citation are counted; with ``attribute`` on (the
  default) such a sentence gets the source that supports it best, if any passes the threshold,
  as a citation with ``origin="attributed"`` (post-hoc attribution as in Gao et al. 2023,
  "RARR: Researching and Revising What Language Models Say", sec. 3, without the revision
  step). A citation the model wrote keeps ``origin="model"``.
* ``retrieval_support`` and abstention: a score over the hits from a signal in ``SIGNALS`` (best
  rerank score, best dense cosine, or the share of the question's content words found in one
  of the top chunks), compared with ``AnswerConfig.abstain_threshold``; below it the answer is
  ``ABSTAIN_TEXT`` and the LLM is not called. ``calibrate_threshold`` fits that threshold on
  answerable and unanswerable questions (maximum balanced accuracy). A generated refusal
  ("I don't know", "The sources do not mention ...") also counts as abstained.

Checkers (``CHECKERS``, name -> function over (sentence, passage) pairs):

* ``lexical`` (default, no model): the recall of the sentence's content terms (stopwords out,
  light suffix stripping, a shared prefix of 5+ letters counts: German / Germany) in the
  passage, times the share of its numbers and the share of its names (capitalised words) that
  the passage contains, since a wrong number or name is the commonest wrong fact and plain
  recall forgives one in a long sentence. Threshold 0.6: on the 36 labelled pairs of
  ``tests/test_rag_answer.py`` (extractive and paraphrased sentences against changed numbers,
  swapped names, added claims and off-topic sentences), supported pairs score 0.75-1.0 and
  unsupported ones 0-0.44; ``calibrate_threshold`` puts the cut between them at 0.597. It
  cannot see negation ("was not completed in 1889" scores as supported): the ``llm`` checker
  is the one for that.
* ``embedding``: the largest cosine similarity between the sentence and the passage's
  sentences, with an ``Embedder`` (``lmstack.rag.embed``). Threshold 0.73, fitted on the same
  pairs with all-MiniLM-L6-v2 (balanced accuracy 0.89 there, 0.69 at 0.6): a sentence about the
  passage's subject scores high even when its fact is wrong ("Its elevation is 9,100 metres."
  against "Its elevation is 8,849 metres." scores 0.83), so it is weaker than ``lexical`` on
  wrong numbers and names, and better on paraphrases that share few words.
* ``llm``: the judge's probability of "yes" to "can the statement be inferred from the
  context?" (the Ragas faithfulness prompt, ``rag_metrics.SUPPORT_PROMPT``) by likelihood
  (``judges.choose``); threshold 0.5. It needs a judge better than the default SmolLM2-135M,
  which answers "no" to nearly everything (p(yes) 0.06-0.14 on the labelled pairs, supported
  or not; balanced accuracy 0.5).

Deliberately left out: rewriting unsupported sentences (RARR's revision step), quoting exact
passages in the answer, and multi-turn conversations (the history is the caller's).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmstack.errors import ConfigError
from lmstack.eval.judges import YES_NO_OPTIONS, choose, split_sentences
from lmstack.eval.rag_metrics import SUPPORT_PROMPT
from lmstack.rag.types import ChunkRecord, Hit

ABSTAIN_TEXT = "I don't know."

SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. Write one or two short sentences. End each "
    "sentence with the number of the source it comes from in square brackets, like [1] or [1][3]. If the "
    "sources do not contain the answer, reply exactly: I don't know.")
USER_TEMPLATE = "Sources:\n{sources}\n\nQuestion: {question}"
# Two worked examples (user turn, assistant turn): without them the default model never cites.
FEW_SHOT: tuple[tuple[str, str], ...] = (
    (("Sources:\n[1] Paris\nParis is the capital and largest city of France.\n\n[2] Berlin\nBerlin is the "
      "capital of Germany. It has 3.7 million inhabitants.\n\nQuestion: How many people live in Berlin?"),
     "Berlin has 3.7 million inhabitants [2]."),
    (("Sources:\n[1] Nile\nThe Nile is a river in Africa. It is about 6,650 km long.\n\n[2] Amazon\nThe Amazon "
      "is a river in South America.\n\nQuestion: How long is the Nile?"),
     "The Nile is about 6,650 km long [1]."),
)


@dataclass
class AnswerConfig:
    """How an answer is made. ``abstain_threshold`` is on the scale of ``abstain_signal``; fit it
    with ``calibrate_threshold`` (the defaults are starting points, not fitted values)."""

    budget_tokens: int = field(default=1024, metadata={"help": "tokens for the numbered sources, headers included"})
    max_new_tokens: int = field(default=160, metadata={"help": "longest answer, in tokens"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    few_shot: bool = field(default=True, metadata={"help": "show the model two worked examples of citing"})
    checker: str = field(default="lexical", metadata={"help": "citation checker: lexical, embedding or llm"})
    support_threshold: float | None = field(
        default=None, metadata={"help": "support a citation needs (default: the checker's own)"})
    attribute: bool = field(default=True, metadata={
        "help": "give a sentence without a supported citation the source that supports it best"})
    abstain: bool = field(default=True, metadata={"help": "answer \"I don't know.\" when retrieval support is weak"})
    abstain_signal: str = field(default="auto", metadata={
        "help": "retrieval support: rerank, dense, overlap, or auto (the first of them the hits carry)"})
    abstain_threshold: float | None = field(default=None, metadata={
        "help": "abstain below this support (default: the store's fitted one for the signal, else per signal)"})
    # Fitted thresholds per signal (``lmstack rag eval`` saves them in the store; ``RAG`` loads
    # them): used when ``abstain_threshold`` is not given.
    fitted_thresholds: dict | None = field(default=None, metadata={"help": "fitted threshold per signal"})

    def __post_init__(self) -> None:
        if self.checker not in CHECKERS:
            raise ConfigError(f"answer checker: got {self.checker!r}, expected one of {sorted(CHECKERS)}")
        if self.abstain_signal != "auto" and self.abstain_signal not in SIGNALS:
            raise ConfigError(f"answer abstain_signal: got {self.abstain_signal!r}, expected 'auto' or one of "
                              f"{sorted(SIGNALS)}")
        if self.budget_tokens < 1:
            raise ConfigError(f"answer budget_tokens: got {self.budget_tokens}, expected a positive number")
        if self.max_new_tokens < 1:
            raise ConfigError(f"answer max_new_tokens: got {self.max_new_tokens}, expected a positive number")


# -- context -------------------------------------------------------------------------------------

@dataclass
class Context:
    """The numbered sources as the model sees them. ``sources[n]`` is the hit behind ``[n]``;
    ``passages[n]`` the text shown (a prefix of the chunk when it was cut) and ``spans[n]`` its
    character span in the document."""

    text: str
    sources: dict[int, Hit]
    passages: dict[int, str]
    spans: dict[int, tuple[int, int]]
    n_tokens: int
    dropped: int = 0  # hits left out for the budget (a cut chunk is not counted)
    cut: bool = False  # the last source is a prefix of its chunk


def source_header(n: int, chunk: ChunkRecord) -> str:
    """``[n] Title > Section`` (or the document key when the chunk has no title), ``(page p)`` when known."""
    meta = chunk.meta or {}
    head = str(meta.get("title") or chunk.doc_key)
    section = meta.get("section")
    if section and str(section) != head:
        head += f" > {section}"
    if meta.get("page") is not None:
        head += f" (page {meta['page']})"
    return f"[{n}] {head}"


def _sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence of ``text`` (the split ``judges.split_sentences`` makes), last first."""
    ends = [m.start() for m in re.finditer(r"(?<=[.!?])\s+|\n+", text)]
    return sorted({e for e in ends if text[:e].strip()}, reverse=True)


def build_context(hits: Sequence[Hit], budget_tokens: int, count_tokens: Callable[[str], int]) -> Context:
    """Numbered sources in rank order whose assembled text has at most ``budget_tokens`` tokens
    (``count_tokens(text)``): whole chunks first, then the first one that does not fit cut after
    its last sentence that does (dropped if none does); the hits after it are dropped."""
    if budget_tokens < 1:
        raise ConfigError(f"build_context: budget_tokens must be positive, got {budget_tokens}")
    blocks: list[str] = []
    sources: dict[int, Hit] = {}
    passages: dict[int, str] = {}
    spans: dict[int, tuple[int, int]] = {}
    cut = False

    def assembled(extra: str) -> str:
        return "\n\n".join(blocks + [extra])

    for hit in hits:
        n = len(blocks) + 1
        c = hit.chunk
        head = source_header(n, c)
        body = c.text.strip()
        lead = len(c.text) - len(c.text.lstrip())
        if count_tokens(assembled(f"{head}\n{body}")) <= budget_tokens:
            shown = body
        else:
            shown = next((body[:e].rstrip() for e in _sentence_ends(body)
                          if count_tokens(assembled(f"{head}\n{body[:e].rstrip()}")) <= budget_tokens), "")
            cut = bool(shown)
        if not shown:
            break
        blocks.append(f"{head}\n{shown}")
        sources[n], passages[n] = hit, shown
        verbatim = c.end - c.start == len(c.text)  # the span can be narrowed only for verbatim chunk text
        spans[n] = (c.start + lead, c.start + lead + len(shown)) if verbatim else (c.start, c.end)
        if cut:
            break
    text = "\n\n".join(blocks)
    return Context(text, sources, passages, spans, count_tokens(text) if blocks else 0,
                   dropped=len(hits) - len(sources), cut=cut)


def messages(question: str, context: Context, few_shot: bool = True) -> list[dict[str, str]]:
    """The chat messages for one answer: system, the worked examples, then the sources and the question."""
    out = [{"role": "system", "content": SYSTEM_PROMPT}]
    if few_shot:
        for user, assistant in FEW_SHOT:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    out.append({"role": "user", "content": USER_TEMPLATE.format(sources=context.text, question=question)})
    return out


def token_counter(llm) -> Callable[[str], int]:
    """``count_tokens`` for ``build_context`` with the LLM's tokenizer (no special tokens)."""
    tok = llm.tokenizer
    if tok is None:
        raise ConfigError("answer: the LLM has no tokenizer, so the context budget cannot be counted")
    return lambda text: len(tok.encode(text, add_special_tokens=False))


# -- citation parsing ----------------------------------------------------------------------------

_NUM_LIST = r"\d+(?:\s*(?:,|;|-|–|and|&)\s*\d+)*"
_MARKER = re.compile(
    r"(?:\bsources?\s*:?\s*)?\[\s*(?:sources?\s*:?\s*)?(?P<b>" + _NUM_LIST + r")\s*\]"  # [1] [1, 2] [1-3] [Source 2]
    r"|(?:\bsources?\s*:?\s*)?\(\s*(?:sources?\s*:?\s*)?(?P<p>" + _NUM_LIST + r")\s*\)"  # (1) (1, 2) Source: (1)
    r"|\bsources?\s*:?\s*(?P<w>" + _NUM_LIST + r")\b",  # Source 1, Sources 1 and 2, Source: 3
    re.IGNORECASE)
_RANGE_MAX = 20  # [1-1000] is not a citation of a thousand sources


def _numbers(spec: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"\s*(?:,|;|and|&)\s*", spec, flags=re.IGNORECASE):
        m = re.fullmatch(r"(\d+)\s*[-–]\s*(\d+)", part.strip())
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a <= b and b - a < _RANGE_MAX:
                out += range(a, b + 1)
        elif part.strip().isdigit():
            out.append(int(part))
    return out


def find_markers(text: str) -> list[tuple[int, int, list[int]]]:
    """Every citation marker in ``text``: (start, end, the numbers it names), in order. ``[1][3]``
    is two markers; numbers are not checked against any source here."""
    out = []
    for m in _MARKER.finditer(text):
        spec = m.group("b") or m.group("p") or m.group("w")
        out.append((m.start(), m.end(), _numbers(spec)))
    return out


def strip_markers(text: str) -> str:
    """The text without its citation markers (and the space before each)."""
    return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s*(?:" + _MARKER.pattern + ")", "", text,
                                                  flags=re.IGNORECASE)).strip()


def parse_citations(text: str, n_sources: int) -> list[tuple[str, list[int]]]:
    """(sentence without markers, cited source numbers) per sentence of the answer, sentences
    without markers included (with an empty list). Markers that open a sentence, or make up all
    of it, belong to the sentence before ("... in 1889. [1]"); numbers outside 1..n_sources are
    dropped."""
    out: list[tuple[str, list[int]]] = []

    def add_to_last(nums: list[int]) -> None:
        sentence, have = out[-1]
        out[-1] = (sentence, have + [n for n in nums if n not in have])

    for sent in split_sentences(text):
        leading: list[int] = []
        own: list[int] = []
        opened = False  # a word came before this marker
        at = 0
        for start, end, nums in find_markers(sent):
            opened = opened or bool(re.search(r"\w", sent[at:start]))
            (own if opened else leading).extend(nums)
            at = end
        if leading and out:
            add_to_last(leading)
        elif leading:
            own = leading + own
        body = strip_markers(sent)
        if re.search(r"\w", body):
            out.append((body, list(dict.fromkeys(own))))
        elif own and out:
            add_to_last(own)
    return [(s, [n for n in ns if 1 <= n <= n_sources]) for s, ns in out]


# -- support checkers ----------------------------------------------------------------------------

_STOPWORDS = frozenset("""a an the and or but if then than so of to in on at by for from with without into onto
upon about above below over under between among through during before after since until while as is are was
were be been being am do does did done have has had having it its it's this that these those there here
which who whom whose what when where why how i me my we our you your he him his she her they them their
not no nor also too very can could may might must shall should will would just only own same such both each
few more most other some any all one s t""".split())


def _stem(w: str) -> str:
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def _terms(text: str) -> dict[str, str]:
    """Content term -> its kind ("number": has a digit, "name": capitalised, else "word"), with
    stopwords and citation markers left out and numbers kept whole ("6,650" -> "6650")."""
    text = re.sub(r"(?<=\d)[,.](?=\d{3}\b)", "", strip_markers(text)).replace("'s ", " ")
    out: dict[str, str] = {}
    for w in re.findall(r"\w+", text):
        low = w.lower()
        if low in _STOPWORDS:
            continue
        kind = "number" if any(ch.isdigit() for ch in w) else "name" if w[0].isupper() else "word"
        out.setdefault(_stem(low), kind)
    return out


def content_words(text: str) -> list[str]:
    """The distinct content terms of ``text`` (lower-cased, lightly stemmed, numbers whole)."""
    return list(_terms(text))


def _found(term: str, have: set[str]) -> bool:
    # equal, or one a prefix of the other with at least 5 letters shared: german / germany,
    # construct(ed) / construction; numbers must match exactly
    if term in have:
        return True
    if term.isdigit() or len(term) < 5:
        return False
    return any(len(h) >= 5 and (h.startswith(term) or term.startswith(h)) for h in have)


def lexical_recall(claim: str, passage: str) -> float:
    """Share of ``claim``'s content terms found in ``passage`` (1.0 for a claim with none)."""
    terms = _terms(claim)
    if not terms:
        return 1.0
    have = set(_terms(passage))
    return sum(_found(t, have) for t in terms) / len(terms)


def lexical_support(claim: str, passage: str) -> float:
    """``lexical_recall`` times the share of the claim's numbers and the share of its names
    (capitalised words) that the passage contains: a wrong number or name, the facts a small
    model most often gets wrong, costs more than a missing common word."""
    terms = _terms(claim)
    if not terms:
        return 1.0
    have = set(_terms(passage))
    score = sum(_found(t, have) for t in terms) / len(terms)
    for kind in ("number", "name"):
        key = [t for t, k in terms.items() if k == kind]
        if key:
            score *= sum(_found(t, have) for t in key) / len(key)
    return score


@dataclass
class CheckTools:
    """What the checkers may need besides the text: an ``Embedder`` and a judge model."""

    embedder: Any = None
    judge: Any = None  # a harness model with option_loglikelihoods (lmstack.eval.models.LLMModel)


def check_lexical(pairs: Sequence[tuple[str, str]], tools: CheckTools) -> list[float]:
    return [lexical_support(s, p) for s, p in pairs]


def check_embedding(pairs: Sequence[tuple[str, str]], tools: CheckTools) -> list[float]:
    if tools.embedder is None:
        raise ConfigError("answer checker 'embedding' needs an embedder (pass embedder=get_embedder(...))")
    if not pairs:
        return []
    claims = [s for s, _ in pairs]
    parts = [split_sentences(p) or [p] for _, p in pairs]
    flat = [x for ps in parts for x in ps]
    vecs = tools.embedder.embed(claims + flat)  # (N, dim), L2-normalised rows
    c, rest = vecs[: len(claims)], vecs[len(claims):]
    out, at = [], 0
    for i, ps in enumerate(parts):
        sims = rest[at: at + len(ps)] @ c[i]
        out.append(max(0.0, float(sims.max())))
        at += len(ps)
    return out


def check_llm(pairs: Sequence[tuple[str, str]], tools: CheckTools) -> list[float]:
    if tools.judge is None:
        raise ConfigError("answer checker 'llm' needs a judge model")
    if not pairs:
        return []
    prompts = [SUPPORT_PROMPT.format(context=p, statement=s) for s, p in pairs]
    return [c.probs[0] for c in choose(tools.judge, prompts, YES_NO_OPTIONS)]  # probs: [p(yes), p(no)]


CHECKERS: dict[str, Callable[[Sequence[tuple[str, str]], CheckTools], list[float]]] = {
    "lexical": check_lexical,
    "embedding": check_embedding,
    "llm": check_llm,
}
CHECKER_THRESHOLDS: dict[str, float] = {"lexical": 0.6, "embedding": 0.73, "llm": 0.5}


# -- retrieval support ---------------------------------------------------------------------------

def _best(key: str) -> Callable[[str, Sequence[Hit]], float | None]:
    def best(question: str, hits: Sequence[Hit]) -> float | None:
        vals = [h.scores[key] for h in hits if key in h.scores]
        return max(vals) if vals else None
    best.__doc__ = f"The best {key} score among the hits (None when no hit has one)."
    return best


def overlap_support(question: str, hits: Sequence[Hit], top: int = 3) -> float | None:
    """The largest share of the question's content words found in one of the top chunks (None without hits)."""
    if not hits:
        return None
    return max(lexical_recall(question, h.chunk.text) for h in hits[:top])


SIGNALS: dict[str, Callable[[str, Sequence[Hit]], float | None]] = {
    "rerank": _best("rerank"),
    "dense": _best("dense"),
    "overlap": overlap_support,
}
DEFAULT_ABSTAIN: dict[str, float] = {"rerank": 0.0, "dense": 0.3, "overlap": 0.5}


def retrieval_support(question: str, hits: Sequence[Hit], signal: str = "auto") -> tuple[str, float]:
    """(the signal used, its score) for these hits; "auto" takes the first of rerank, dense and
    overlap that the hits carry. No hits score ``-inf``."""
    if not hits:
        return (signal if signal != "auto" else "overlap"), float("-inf")
    names = ("rerank", "dense", "overlap") if signal == "auto" else (signal,)
    if signal != "auto" and signal not in SIGNALS:
        raise ConfigError(f"abstain signal: got {signal!r}, expected 'auto' or one of {sorted(SIGNALS)}")
    for name in names:
        value = SIGNALS[name](question, hits)
        if value is not None:
            return name, float(value)
    raise ConfigError(f"abstain signal {signal!r}: no hit has a {signal!r} score (scores present: "
                      f"{sorted({k for h in hits for k in h.scores})})")


def abstain_threshold(cfg: AnswerConfig, signal: str) -> float:
    """The threshold in force for ``signal``: the one given, else the fitted one, else the default."""
    if cfg.abstain_threshold is not None:
        return cfg.abstain_threshold
    return float((cfg.fitted_thresholds or {}).get(signal, DEFAULT_ABSTAIN[signal]))


def calibrate_threshold(scores_answerable: Sequence[float], scores_unanswerable: Sequence[float]) -> float:
    """The abstention threshold (abstain when support < threshold) with the highest balanced
    accuracy, ``(share of answerable >= t + share of unanswerable < t) / 2``. Candidates are the
    midpoints between neighbouring distinct finite scores and one step beyond each end; among
    equally good candidates the middle one is taken. A question with no hits scores ``-inf``."""
    a, u = [float(x) for x in scores_answerable], [float(x) for x in scores_unanswerable]
    if not a or not u:
        raise ConfigError(f"calibrate_threshold: needs answerable and unanswerable scores, got {len(a)} and "
                          f"{len(u)}")
    if any(math.isnan(x) for x in a + u):
        raise ConfigError("calibrate_threshold: scores contain NaN")
    vals = sorted({x for x in a + u if math.isfinite(x)})  # -inf (nothing retrieved) sits below every candidate
    if not vals:
        vals = [0.0]
    step = (vals[-1] - vals[0]) or 1.0
    # a midpoint of two neighbouring floats may round down onto the lower one; the upper then separates them
    mids = [m if x < m else y for x, y in itertools.pairwise(vals) for m in [(x + y) / 2]]
    cands = [vals[0] - step] + mids + [vals[-1] + step]

    def balanced(t: float) -> float:
        return (sum(x >= t for x in a) / len(a) + sum(x < t for x in u) / len(u)) / 2

    accs = [balanced(t) for t in cands]
    top = max(accs)
    best = [t for t, acc in zip(cands, accs) if acc == top]
    return best[(len(best) - 1) // 2]


_REFUSAL = re.compile(
    r"\b(?:i\s+(?:do\s*n[o']?t|don['’]?t|cannot|can['’]?t|am\s+not\s+able\s+to)\s+"
    r"(?:know|answer|say|tell|find|determine)"
    r"|i['’]?m\s+(?:not\s+sure|unable)"
    r"|(?:the\s+)?(?:sources?|context|passages?|texts?)\s+(?:do(?:es)?\s*n[o']?t|don['’]?t)\s+"
    r"(?:contain|mention|provide|say|include|answer|give|specify)"
    r"|(?:is|are)\s+not\s+(?:mentioned|provided|given|stated)\s+in\s+the\s+(?:sources?|context)"
    r"|no\s+information\s+(?:about|on|in)|not\s+enough\s+information|there\s+is\s+no\s+mention)",
    re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """Whether a generated answer declines: it opens with a refusal ("I don't know", "I do not
    know", "The sources do not mention ..."), or is short (at most 25 words) and contains one."""
    t = strip_markers(text).strip()
    if not t:
        return True
    first = split_sentences(t)[0]
    return bool(_REFUSAL.search(first)) or (len(t.split()) <= 25 and bool(_REFUSAL.search(t)))


# -- the answer ----------------------------------------------------------------------------------

@dataclass
class Citation:
    n: int
    chunk_id: str
    source: str
    doc_key: str
    start: int
    end: int
    sentence: str
    supported: bool
    support: float
    origin: str = "model"  # "model": written by the model; "attributed": added after the check

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in ("n", "source", "chunk_id", "start", "end", "doc_key", "sentence", "supported",
                                  "support", "origin")}


@dataclass
class Answer:
    text: str
    citations: list[Citation] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    abstained: bool = False
    reason: str = ""  # why it abstained ("weak retrieval support ...", "the model declined"), else ""
    support: float | None = None  # the retrieval support score
    signal: str | None = None  # the signal it came from
    uncited: list[str] = field(default_factory=list)  # sentences left without a supported citation
    unsupported: int = 0  # citations the model wrote that the checker did not confirm

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.text, "citations": [c.to_json() for c in self.citations], "contexts": self.contexts,
                "abstained": self.abstained, "reason": self.reason, "support": self.support, "signal": self.signal,
                "uncited": self.uncited, "unsupported": self.unsupported}


def _citation(n: int, context: Context, sentence: str, score: float, threshold: float, origin: str) -> Citation:
    c = context.sources[n].chunk
    start, end = context.spans[n]
    return Citation(n, c.id, str((c.meta or {}).get("source") or c.doc_key), c.doc_key, start, end, sentence,
                    score >= threshold, float(score), origin)


def check_citations(text: str, context: Context, checker: str = "lexical", threshold: float | None = None,
                    attribute: bool = True, tools: CheckTools | None = None) -> tuple[list[Citation], list[str]]:
    """(citations, sentences left without a supported citation) for a generated answer."""
    if checker not in CHECKERS:
        raise ConfigError(f"answer checker: got {checker!r}, expected one of {sorted(CHECKERS)}")
    thr = CHECKER_THRESHOLDS[checker] if threshold is None else threshold
    tools = tools or CheckTools()
    parsed = parse_citations(text, len(context.sources))
    pairs = [(s, context.passages[n]) for s, ns in parsed for n in ns]
    scores = iter(CHECKERS[checker](pairs, tools))
    cites: list[Citation] = []
    bare: list[str] = []
    for sentence, ns in parsed:
        mine = [_citation(n, context, sentence, next(scores), thr, "model") for n in ns]
        cites += mine
        if not any(c.supported for c in mine):
            bare.append(sentence)
    uncited = []
    if attribute and bare and context.sources:
        nums = sorted(context.sources)
        all_pairs = [(s, context.passages[n]) for s in bare for n in nums]
        flat = CHECKERS[checker](all_pairs, tools)
        for i, sentence in enumerate(bare):
            row = flat[i * len(nums): (i + 1) * len(nums)]
            k = max(range(len(nums)), key=lambda j: row[j])
            if row[k] >= thr:
                cites.append(_citation(nums[k], context, sentence, row[k], thr, "attributed"))
            else:
                uncited.append(sentence)
    else:
        uncited = bare
    order = {s: i for i, (s, _) in enumerate(parsed)}
    cites.sort(key=lambda c: (order.get(c.sentence, 0), c.origin != "model", c.n))
    return cites, uncited


def _tools(llm, cfg: AnswerConfig, embedder) -> CheckTools:
    judge = None
    if cfg.checker == "llm":
        judge = llm
        if not hasattr(llm, "option_loglikelihoods"):
            from lmstack.eval.models import LLMModel

            judge = LLMModel(llm)
    return CheckTools(embedder=embedder, judge=judge)


def _budget(llm, cfg: AnswerConfig, question: str, count: Callable[[str], int]) -> int:
    """The context budget, shrunk so the whole prompt plus the reply fits the model's context."""
    block = getattr(getattr(llm, "config", None), "block_size", None)
    if not block:
        return cfg.budget_tokens
    frame = messages(question, Context("", {}, {}, {}, 0), cfg.few_shot)
    if hasattr(llm, "chat_ids"):
        used = len(llm.chat_ids(frame))
    else:  # a rough allowance for the chat template around each message
        used = count("\n".join(m["content"] for m in frame)) + 8 * len(frame)
    room = block - cfg.max_new_tokens - used - 8  # 8: the separator tokens around the sources
    if room < 1:
        raise ConfigError(f"answer: the prompt and max_new_tokens={cfg.max_new_tokens} leave no room for sources "
                          f"in the model's {block}-token context")
    return min(cfg.budget_tokens, room)


def answer_stream(llm, question: str, hits: Sequence[Hit], cfg: AnswerConfig | None = None,
                  embedder=None, count_tokens: Callable[[str], int] | None = None) -> Iterator[str | Answer]:
    """Text pieces of the answer as they are generated, then the final ``Answer``. Below the
    abstention threshold the only piece is ``ABSTAIN_TEXT`` and the LLM is not called."""
    cfg = cfg or AnswerConfig()
    signal, support = retrieval_support(question, hits, cfg.abstain_signal)
    threshold = abstain_threshold(cfg, signal)
    if cfg.abstain and support < threshold:
        yield ABSTAIN_TEXT
        yield Answer(ABSTAIN_TEXT, abstained=True, support=support, signal=signal,
                     reason=f"weak retrieval support: {signal} {support:.3f} < {threshold:.3f}")
        return
    count = count_tokens or token_counter(llm)
    context = build_context(hits, _budget(llm, cfg, question, count), count)
    contexts = [context.passages[n] for n in sorted(context.passages)]
    pieces = []
    for piece in llm.chat_stream(messages(question, context, cfg.few_shot), max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature):
        pieces.append(piece)
        yield piece
    text = "".join(pieces)
    if is_refusal(text):
        yield Answer(text, contexts=contexts, abstained=True, reason="the model declined", support=support,
                     signal=signal)
        return
    citations, uncited = check_citations(text, context, cfg.checker, cfg.support_threshold, cfg.attribute,
                                         _tools(llm, cfg, embedder))
    yield Answer(text, citations, contexts, support=support, signal=signal, uncited=uncited,
                 unsupported=sum(c.origin == "model" and not c.supported for c in citations))


def answer(llm, question: str, hits: Sequence[Hit], cfg: AnswerConfig | None = None, embedder=None,
           count_tokens: Callable[[str], int] | None = None) -> Answer:
    """The final ``Answer`` of ``answer_stream`` (the same text, citations and checks)."""
    final = None
    for item in answer_stream(llm, question, hits, cfg, embedder, count_tokens):
        if isinstance(item, Answer):
            final = item
    assert final is not None
    return final
