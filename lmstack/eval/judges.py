"""LLM judges on any harness model (a local ``LLMModel`` or an ``OpenAIModel`` endpoint).

* ``ask``: one prompt per item, parse the reply; a reply that does not parse is asked again
  (``retries`` times, with seed + attempt and a temperature of at least ``retry_temperature``,
  since a greedy judge would repeat itself), then recorded as an error: never silently scored.
* ``choose``: the other way for a judge to answer (``mode="likelihood"``, judges that expose
  ``option_loglikelihoods``, i.e. local models): the verdict is the allowed answer ("A" / "B",
  "yes" / "no", "1".."5") with the highest log-likelihood as the judge's reply to the prompt,
  the way lm-evaluation-harness scores a multiple-choice item. Small judges that cannot be
  trusted to write "A" within a few tokens still rank the allowed answers, so a verdict is
  never unparseable (no retries), and it does not depend on the seed or the temperature. Each
  verdict keeps its ``margin``, the log-probability gap between the best and the second-best
  answer: a small margin means the judge is close to guessing.
* ``pointwise``: a rubric grade 1-5 (mapped to [0, 1]).
* ``pairwise``: A-vs-B in both orders (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.4):
  a verdict counts only when it survives the swap, else it is a tie; ``PairwiseSummary``
  reports the consistency, the position-bias rate (the judge picked the same *position* both
  times) and the agreement with human labels.
* ``g_eval``: rubric + evaluation steps + a form to fill (Liu et al. 2023, "G-Eval", eq. 1):
  ``score = sum_i p(s_i) * s_i`` over the judge's next-token probabilities of "1".."5" when it
  exposes them (``option_probs``), else the parsed integer.
* ``DAG``: a graph of small yes/no checks with a declared decision path to a score.
* SelfCheckGPT (Manakul et al. 2023): ``selfcheck_ngram`` (unigram model over the sampled
  answers and the answer itself, eq. 9-10) and ``selfcheck_bertscore`` (eq. 8).
* ``seed_spread``: a judge's mean and standard deviation across seeds.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence, Union, get_args

from lmstack.errors import ConfigError
from lmstack.eval.models import generate_texts


JudgeMode = Literal["generate", "likelihood"]
JUDGE_MODES = get_args(JudgeMode)


@dataclass
class JudgeCall:
    value: Optional[object]  # the parsed (or chosen) value; None when every attempt failed
    replies: list[str]
    error: Optional[str] = None
    # g_eval, and every likelihood verdict: the probabilities of the allowed values (renormalised
    # over them), in the order the values were listed
    probs: Optional[list[float]] = None
    margin: Optional[float] = None  # likelihood verdicts: log p(best value) - log p(second best)


def ask(model, prompts: Sequence[str], parse: Callable[[str], Optional[object]], seed: int = 0, retries: int = 2,
        chat: bool = True, max_new_tokens: int = 64, temperature: float = 0.0,
        retry_temperature: float = 0.7) -> list[JudgeCall]:
    """Ask each prompt, parse each reply, retry the failures; batched per attempt."""
    calls = [JudgeCall(None, []) for _ in prompts]
    todo = list(range(len(prompts)))
    for attempt in range(retries + 1):
        if not todo:
            break
        temp = temperature if attempt == 0 else max(temperature, retry_temperature)
        replies = generate_texts(model, [prompts[i] for i in todo], max_new_tokens, temp, [seed + attempt] * len(todo),
                                 chat)
        still = []
        for i, reply in zip(todo, replies):
            calls[i].replies.append(reply)
            value = parse(reply)
            if value is None:
                still.append(i)
            else:
                calls[i].value = value
        todo = still
    for i in todo:
        calls[i].error = f"unparseable after {retries + 1} attempts: {calls[i].replies[-1][:80]!r}"
    return calls


def choose(model, prompts: Sequence[str], options: dict[str, object], chat: bool = True) -> list[JudgeCall]:
    """Closed-set verdicts by likelihood: per prompt, the value whose answer texts are most likely
    as the judge's reply. ``options`` maps each allowed answer text to its value; several texts
    may share a value ("yes" and "Yes"), whose log-likelihoods are combined by log-sum-exp (the
    value's total probability). Ties go to the value listed first. ``probs`` are the values'
    probabilities renormalised over the set (what a G-Eval weighting needs) and ``margin`` the
    log-probability gap between the best and the second-best value."""
    if not hasattr(model, "option_loglikelihoods"):
        raise ConfigError(f"judge_mode 'likelihood' needs a judge that exposes log-likelihoods of its answers "
                          f"(option_loglikelihoods: a local model); {type(model).__name__} does not")
    texts = list(options)
    values = list(dict.fromkeys(options.values()))
    if len(values) < 2:
        raise ConfigError(f"choose: options {texts} have {len(values)} distinct value; expected at least 2")
    calls = []
    for lls in model.option_loglikelihoods(list(prompts), texts, chat):
        per_value = [_logsumexp([ll for t, ll in zip(texts, lls) if options[t] == v]) for v in values]
        order = sorted(range(len(values)), key=lambda k: (-per_value[k], k))
        top = per_value[order[0]]
        weights = [math.exp(ll - top) for ll in per_value]
        calls.append(JudgeCall(values[order[0]], [], probs=[w / sum(weights) for w in weights],
                               margin=top - per_value[order[1]]))
    return calls


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _likelihood(mode: str) -> bool:
    if mode not in JUDGE_MODES:
        raise ConfigError(f"judge mode {mode!r}; expected one of {list(JUDGE_MODES)}")
    return mode == "likelihood"


def verdicts(model, prompts: Sequence[str], parse: Callable[[str], Optional[object]], options: dict[str, object],
             mode: JudgeMode = "generate", seed: int = 0, retries: int = 2, chat: bool = True,
             max_new_tokens: int = 64, temperature: float = 0.0) -> list[JudgeCall]:
    """One verdict per prompt: a generated reply parsed by ``parse`` (``ask``), or with
    ``mode="likelihood"`` the most likely of ``options`` (``choose``)."""
    if _likelihood(mode):
        return choose(model, prompts, options, chat)
    return ask(model, prompts, parse, seed, retries, chat, max_new_tokens, temperature)


def parse_score(text: str, low: int = 1, high: int = 5) -> Optional[int]:
    """The first integer in [low, high] in the reply (a bare digit or 'Score: 4'); None if none."""
    m = re.search(rf"\b([{low}-{high}])\b", text)
    return int(m.group(1)) if m else None


def parse_judge_score(text: str) -> Optional[float]:
    """The first grade 1-5 in the judge's reply, mapped to [0, 1] as ``pointwise`` maps it; None when there is none."""
    grade = parse_score(text)
    return None if grade is None else (grade - 1) / 4


def parse_choice(text: str) -> Optional[str]:
    """'A', 'B' or 'tie' from a pairwise verdict; None when the reply names neither clearly."""
    t = text.strip()
    m = re.match(r"^\W*(?:response|answer|assistant)?\s*\[?\(?([AB])\b", t, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    m = re.search(r"\[\[(A|B|C)\]\]", t)
    if m:
        return {"A": "A", "B": "B", "C": "tie"}[m.group(1)]
    if re.match(r"^\W*tie\b", t, re.IGNORECASE):
        return "tie"
    return None


def parse_yes_no(text: str) -> Optional[bool]:
    m = re.match(r"^\W*(yes|no)\b", text.strip(), re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


# the allowed answers of likelihood verdicts, mirroring what the parsers accept; a chat judge
# starts a sentence with "Yes", so both cases count
SCORE_OPTIONS: dict[str, object] = {str(s): s for s in range(1, 6)}
YES_NO_OPTIONS: dict[str, object] = {"yes": True, "Yes": True, "no": False, "No": False}
# the pairwise prompt asks for A or B only; a tie is what the swap gives when the orders disagree
CHOICE_OPTIONS: dict[str, object] = {"A": "A", "B": "B"}


# -- pointwise -------------------------------------------------------------------------------

POINTWISE_PROMPT = (
    "You are grading an answer. Rubric: {rubric}\n\nQuestion: {input}\n{reference_line}Answer: {answer}\n\n"
    "Reply with one integer from 1 (worst) to 5 (best), then a short reason.\nScore:")
DEFAULT_RUBRIC = "5 = fully correct and faithful to the reference; 3 = partly correct; 1 = wrong or off-topic."


def pointwise(model, inputs: Sequence[str], answers: Sequence[str], references: Optional[Sequence[str]] = None,
              rubric: str = DEFAULT_RUBRIC, seed: int = 0, chat: bool = True, temperature: float = 0.0,
              retries: int = 2, mode: JudgeMode = "generate") -> list[JudgeCall]:
    """A 1-5 grade per answer; ``value`` is mapped to [0, 1] as (grade - 1) / 4. In likelihood
    mode ``probs`` holds p("1") .. p("5"), for the expected grade (``weighted_score``)."""
    refs = references if references is not None else [None] * len(answers)
    prompts = [POINTWISE_PROMPT.format(rubric=rubric, input=q, answer=a,
                                       reference_line=f"Reference answer: {r}\n" if r else "")
               for q, a, r in zip(inputs, answers, refs)]
    calls = verdicts(model, prompts, parse_score, SCORE_OPTIONS, mode, seed, retries, chat, 24, temperature)
    for c in calls:
        if c.value is not None:
            c.value = (c.value - 1) / 4
    return calls


# -- pairwise --------------------------------------------------------------------------------

PAIRWISE_PROMPT = (
    "Which response answers the question better? Reply with A or B only.\n\nQuestion: {question}\n\n"
    "Response A: {a}\n\nResponse B: {b}\n\nBetter response:")


@dataclass
class PairwiseVerdict:
    winner: Optional[str]  # "1", "2" or "tie" (inconsistent across the swap); None on error
    first_order: Optional[str]  # raw "A"/"B"/"tie" with answer 1 shown first
    swapped_order: Optional[str]  # raw verdict with answer 2 shown first
    error: Optional[str] = None
    margins: Optional[tuple[float, float]] = None  # likelihood mode: the margin of each order's verdict

    @property
    def flipped(self) -> bool:
        """The preferred answer changed when the order was swapped (False for an error)."""
        if self.error is not None:
            return False
        return _FIRST[self.first_order] != _SWAPPED[self.swapped_order]


@dataclass
class PairwiseSummary:
    n: int
    n_errors: int
    consistency: float  # share of verdicts that survive the swap
    position_bias: float  # share where the judge picked the same position in both orders
    first_position_rate: float  # share of raw verdicts that picked the first-shown response
    agreement: Optional[float] = None  # winner == human label, over labelled items
    verdicts: list[PairwiseVerdict] = field(default_factory=list)


_FIRST = {"A": "1", "B": "2", "tie": "tie"}
_SWAPPED = {"A": "2", "B": "1", "tie": "tie"}  # in the swapped order, A shows answer 2


def _combine(first: Optional[str], swapped: Optional[str]) -> Optional[str]:
    if first is None or swapped is None:
        return None
    return _FIRST[first] if _FIRST[first] == _SWAPPED[swapped] else "tie"


def pairwise(model, questions: Sequence[str], answers_1: Sequence[str], answers_2: Sequence[str],
             labels: Optional[Sequence[Optional[str]]] = None, seed: int = 0, chat: bool = True,
             retries: int = 2, prompt: str = PAIRWISE_PROMPT, temperature: float = 0.0,
             mode: JudgeMode = "generate") -> PairwiseSummary:
    """Judge each pair in both orders; ``labels[i]`` is the human winner "1", "2" or "tie". In
    likelihood mode each order's verdict is the likelier of "A" and "B"."""
    n = len(questions)
    first = verdicts(model, [prompt.format(question=q, a=a, b=b) for q, a, b in zip(questions, answers_1, answers_2)],
                     parse_choice, CHOICE_OPTIONS, mode, seed, retries, chat, 8, temperature)
    swapped = verdicts(model, [prompt.format(question=q, a=b, b=a) for q, a, b in zip(questions, answers_1, answers_2)],
                       parse_choice, CHOICE_OPTIONS, mode, seed, retries, chat, 8, temperature)
    judged = []
    for f, s in zip(first, swapped):
        margins = None if f.margin is None or s.margin is None else (f.margin, s.margin)
        judged.append(PairwiseVerdict(_combine(f.value, s.value), f.value, s.value, f.error or s.error, margins))
    ok = [v for v in judged if v.error is None]
    raw = [x for v in ok for x in (v.first_order, v.swapped_order) if x != "tie"]
    decided = [v for v in ok if v.first_order != "tie" and v.swapped_order != "tie"]
    same_pos = sum(v.first_order == v.swapped_order for v in decided)
    agreement = None
    if labels is not None:
        pairs = [(v.winner, lab) for v, lab in zip(judged, labels) if lab is not None and v.error is None]
        agreement = sum(w == lab for w, lab in pairs) / len(pairs) if pairs else None
    return PairwiseSummary(
        n=n, n_errors=n - len(ok),
        consistency=sum(not v.flipped for v in ok) / len(ok) if ok else 0.0,
        position_bias=same_pos / len(decided) if decided else 0.0,
        first_position_rate=sum(x == "A" for x in raw) / len(raw) if raw else 0.0,
        agreement=agreement, verdicts=judged)


# -- G-Eval ----------------------------------------------------------------------------------

G_EVAL_PROMPT = (
    "You will be given one {output_kind} written for a {source_kind}. Your task is to rate the "
    "{output_kind} on one metric.\n\nEvaluation criteria:\n{criterion}: {criteria}\n\n"
    "Evaluation steps:\n{steps}\n\n{source_kind_title}:\n{source}\n\n{output_kind_title}:\n{output}\n\n"
    "Evaluation form (scores ONLY):\n- {criterion} (1-5):")


@dataclass
class GEvalConfig:
    criterion: str = "Coherence"
    criteria: str = "the collective quality of all sentences: well-structured, well-organised, on topic."
    steps: list[str] = field(default_factory=lambda: [
        "Read the source carefully and identify its main points.",
        "Read the output and check that it covers them in a clear, logical order.",
        "Assign a score from 1 to 5."])
    source_kind: str = "source text"
    output_kind: str = "summary"


def g_eval(model, sources: Sequence[str], outputs: Sequence[str], cfg: GEvalConfig = GEvalConfig(),
           seed: int = 0, chat: bool = True, retries: int = 2, temperature: float = 0.0,
           mode: JudgeMode = "generate") -> list[JudgeCall]:
    """G-Eval score in [1, 5] per item: probability-weighted when the judge exposes next-token
    probabilities (``option_probs``; ``JudgeCall.probs`` keeps them), else the parsed integer
    (with retries, sampled at ``temperature``). In likelihood mode it is always weighted, by the
    likelihoods of the answers "1".."5" (``choose``), which need not be single tokens."""
    prompts = [G_EVAL_PROMPT.format(
        output_kind=cfg.output_kind, source_kind=cfg.source_kind, criterion=cfg.criterion, criteria=cfg.criteria,
        steps="\n".join(f"{i}. {s}" for i, s in enumerate(cfg.steps, 1)),
        source_kind_title=cfg.source_kind.capitalize(), output_kind_title=cfg.output_kind.capitalize(),
        source=s, output=o) for s, o in zip(sources, outputs)]
    if _likelihood(mode):
        calls = choose(model, prompts, SCORE_OPTIONS, chat)
        for c in calls:
            c.value = weighted_score(c.probs)  # type: ignore[arg-type]
        return calls
    options = ["1", "2", "3", "4", "5"]
    calls: list[Optional[JudgeCall]] = [None] * len(prompts)
    rest = []
    for i, p in enumerate(prompts):
        probs = model.option_probs(p, options, chat) if hasattr(model, "option_probs") else None
        if probs is None:
            rest.append(i)
        else:
            calls[i] = JudgeCall(weighted_score(probs), [], probs=list(probs))
    for i, c in zip(rest, ask(model, [prompts[i] for i in rest], parse_score, seed, retries, chat, 8, temperature)):
        calls[i] = c
    return calls  # type: ignore[return-value]


def weighted_score(probs: Sequence[float], scores: Sequence[float] = (1, 2, 3, 4, 5)) -> float:
    """G-Eval eq. 1: ``sum_i p(s_i) s_i`` with the probabilities renormalised over the scores."""
    z = sum(probs)
    if z <= 0:
        raise ConfigError("g_eval: the score probabilities sum to 0")
    return sum(p * s for p, s in zip(probs, scores)) / z


# -- DAG judge -------------------------------------------------------------------------------

@dataclass
class DAGNode:
    id: str
    question: str  # a yes/no check, a str.format template over the item's fields
    # the next node's id, or a terminal score (not `yes` / `no`: YAML reads those keys as booleans)
    if_yes: Union[str, float]
    if_no: Union[str, float]


@dataclass
class DAG:
    nodes: list[DAGNode]
    root: str

    def __post_init__(self) -> None:
        ids = {n.id for n in self.nodes}
        if len(ids) != len(self.nodes):
            raise ConfigError("dag: node ids must be unique")
        if self.root not in ids:
            raise ConfigError(f"dag: root {self.root!r} is not a node; nodes are {sorted(ids)}")
        for n in self.nodes:
            for name, branch in (("if_yes", n.if_yes), ("if_no", n.if_no)):
                if isinstance(branch, bool) or not isinstance(branch, (str, int, float)):
                    raise ConfigError(f"dag: node {n.id!r} has {name}={branch!r}; expected a node id or a "
                                      "terminal score (a number)")
                if isinstance(branch, str) and branch not in ids:
                    raise ConfigError(f"dag: node {n.id!r} points to {branch!r}, which is not a node")
        by_id = {n.id: n for n in self.nodes}

        def visit(i: str, stack: tuple) -> None:  # a cycle would never reach a score
            if i in stack:
                raise ConfigError(f"dag: cycle {' -> '.join(stack + (i,))}")
            for b in (by_id[i].if_yes, by_id[i].if_no):
                if isinstance(b, str):
                    visit(b, stack + (i,))

        visit(self.root, ())


YES_NO_PROMPT = "{question}\nAnswer yes or no.\nAnswer:"


@dataclass
class DAGOutcome:
    score: Optional[float]  # the terminal score reached; None when a check stayed unparseable
    path: list[tuple[str, bool]]  # the decisions taken: (node id, answer)
    error: Optional[str] = None
    margins: list[float] = field(default_factory=list)  # likelihood mode: one per decision of the path


def dag_judge(model, dag: DAG, items: Sequence[dict], seed: int = 0, chat: bool = True, retries: int = 2,
              temperature: float = 0.0, mode: JudgeMode = "generate") -> list[DAGOutcome]:
    """Walk ``dag`` for each item, one batched yes/no check per step."""
    by_id = {n.id: n for n in dag.nodes}
    state = [dag.root for _ in items]  # the node each item is at
    walked = [DAGOutcome(None, []) for _ in items]
    live = list(range(len(items)))
    while live:
        prompts = [YES_NO_PROMPT.format(question=by_id[state[i]].question.format(**items[i])) for i in live]
        still = []
        for i, call in zip(live, verdicts(model, prompts, parse_yes_no, YES_NO_OPTIONS, mode, seed, retries, chat,
                                          4, temperature)):
            node_id, w = state[i], walked[i]
            if call.value is None:
                w.error = f"node {node_id!r}: {call.error}"
                continue
            w.path.append((node_id, bool(call.value)))
            if call.margin is not None:
                w.margins.append(call.margin)
            nxt = by_id[node_id].if_yes if call.value else by_id[node_id].if_no
            if isinstance(nxt, str):
                state[i] = nxt
                still.append(i)
            else:
                w.score = float(nxt)
        live = still
    return walked


# -- SelfCheckGPT ----------------------------------------------------------------------------

def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def selfcheck_ngram(sentences: Sequence[str], samples: Sequence[str]) -> list[tuple[float, float]]:
    """Per sentence ``(avg, max)`` of ``-log p~(w)`` under a unigram model with add-one smoothing,
    fitted on the sampled answers and the checked sentences (SelfCheckGPT eq. 9-10). Higher
    means less supported by the samples (more likely hallucinated)."""
    counts = Counter(w for t in list(samples) + list(sentences) for w in _words(t))
    total, vocab = sum(counts.values()), len(counts) + 1
    out = []
    for s in sentences:
        nll = [-math.log((counts[w] + 1) / (total + vocab)) for w in _words(s)]
        out.append((sum(nll) / len(nll), max(nll)) if nll else (0.0, 0.0))
    return out


def selfcheck_bertscore(sentences: Sequence[str], samples: Sequence[str],
                        bertscore_f1: Optional[Callable[[list[str], list[str]], list[float]]] = None) -> list[float]:
    """Per sentence ``1 - mean_n max_k BERTScore-F1(r_i, s_k^n)`` (SelfCheckGPT eq. 8): 0 when
    every sample contains a matching sentence, towards 1 when none does."""
    if bertscore_f1 is None:
        from lmstack.eval.bertscore import bertscore_scores

        def bertscore_f1(p, r):
            return bertscore_scores(p, r)["f1"]

    sample_sents = [split_sentences(s) or [s] for s in samples]
    preds, refs, where = [], [], []
    for i, r in enumerate(sentences):
        for n, ss in enumerate(sample_sents):
            for s in ss:
                preds.append(r)
                refs.append(s)
                where.append((i, n))
    f1 = bertscore_f1(preds, refs) if preds else []
    best: dict[tuple[int, int], float] = {}
    for key, v in zip(where, f1):
        best[key] = max(best.get(key, -1.0), v)
    N = len(samples)
    return [1 - sum(best[(i, n)] for n in range(N)) / N for i in range(len(sentences))]


def selfcheck(model, prompt: str, answer: str, n_samples: int = 5, temperature: float = 1.0, seed: int = 0,
              chat: bool = True, max_new_tokens: int = 128, variant: str = "ngram") -> list[float]:
    """Sample ``n_samples`` answers to ``prompt`` and score each sentence of ``answer`` against
    them: ``variant`` "ngram" (avg -log p) or "bertscore"."""
    samples = []
    for k in range(n_samples):
        samples += generate_texts(model, [prompt], max_new_tokens, temperature, [seed + k], chat)
    sentences = split_sentences(answer)
    if variant == "ngram":
        return [avg for avg, _ in selfcheck_ngram(sentences, samples)]
    if variant == "bertscore":
        return selfcheck_bertscore(sentences, samples)
    raise ConfigError(f"selfcheck: variant={variant!r}, expected 'ngram' or 'bertscore'")


def seed_spread(per_seed: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of a judge's score across seeds (0 std for one seed)."""
    if not per_seed:
        raise ConfigError("seed_spread: no seeds")
    return statistics.fmean(per_seed), statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
