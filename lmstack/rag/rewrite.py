"""Query rewriters: turn one user question into the queries a retrieval searches with.

One interface, ``rewrite(query) -> list[str]``: the texts to search, the original query first
and always present, so a rewriter that fails to parse its model's reply degrades to plain
search. ``REWRITERS`` maps a name to a factory ``(llm, arg) -> Rewriter``;
``get_rewriter("multi-query:3", llm)`` splits a spec at the first colon.

- ``multi-query``: ``n`` paraphrases of the question, each searched, the hit lists fused (the
  "multi-query retriever" of LangChain; fusion by reciprocal rank, Cormack et al. 2009).
- ``hyde``: Hypothetical Document Embeddings (Gao et al. 2022, "Precise Zero-Shot Dense
  Retrieval without Relevance Labels"): the model writes a passage that would answer the
  question, and that passage's embedding is searched, since it sits nearer the answers'
  embeddings than the question's does. Its ``dense_only`` is True: the caller's search uses the
  extra texts for the dense side only and the original query for the lexical side (an invented
  passage's words would pull BM25 towards its made-up facts).
- ``step-back``: step-back prompting (Zheng et al. 2023, "Take a Step Back: Evoking Reasoning
  via Abstraction in Large Language Models"): a more general question about the same topic,
  searched next to the original to fetch background passages.
- ``none``: the query alone.

Each asks the LLM once, greedy (temperature 0, so a rewrite is reproducible) and short:
multi-query and step-back as few-shot completions (read up to the first blank line), HyDE as
a chat turn. A small model's replies are messy, so parsing is forgiving: numbering, bullets,
quotes and labels ("Query 2:") are stripped, preamble lines ending in a colon, empty lines and
duplicates (of each other or of the original, case and spacing ignored) are dropped, and the
count is capped.

Deliberately left out: query decomposition into sub-questions, conversational rewriting with
a chat history, and rewrites by an external endpoint (pass an ``LLM``-like object instead).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from lmstack.errors import ConfigError

# Multi-query and step-back are few-shot completions, not chat turns: asked in a chat turn,
# SmolLM2-135M-Instruct answers the question instead of rewriting it, while a completion after
# worked examples keeps their one-query-per-line form. The reply is read up to its first blank
# line (the model goes on to invent the next worked example).
MULTI_QUERY_PROMPT = (
    "Write {n} different search queries that ask for the same information as the question. "
    "Put each query on its own line.\n\n"
    "Question: What is the boiling point of water?\n"
    "Queries:\nwater boiling temperature\nat what temperature does water boil\n"
    "boiling point of H2O at sea level\n\n"
    "Question: {query}\n"
    "Queries:\n")

STEP_BACK_PROMPT = (
    "Rewrite the question as a more general question about the same topic.\n\n"
    "Question: Which team did Thierry Henry play for in 2005?\n"
    "General question: Which teams did Thierry Henry play for in his career?\n\n"
    "Question: What is the boiling point of water at the top of Mount Everest?\n"
    "General question: How does air pressure change the boiling point of water?\n\n"
    "Question: {query}\n"
    "General question:")

# HyDE is a chat turn: the instruction-tuned model writes a fluent passage when asked for one.
HYDE_PROMPT = (
    "Write a short encyclopedia paragraph that answers the question below. "
    "Write only the paragraph.\n\n"
    "Question: {query}")


class Rewriter(Protocol):
    name: str
    dense_only: bool  # True: the extra queries are for dense search only (HyDE)

    def rewrite(self, query: str) -> list[str]: ...


# a list marker at the start of a line: "1.", "2)", "(3)", "-", "*", "•", "Query 2:", "Q1:"
_MARKER = re.compile(r"^\s*(?:[-*•·]+|\(?\d+[.):]|(?:query|question|q)\s*\d*\s*[:.)])(?=\s|$)\s*",
                     re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:general question|step-back question|passage|paragraph|answer)\s*:\s*",
                    re.IGNORECASE)
_QUOTES = "\"'“”‘’`*"


def _key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?.! ")


def clean_line(line: str) -> str:
    """One query line without list markers, labels, surrounding quotes or extra spacing."""
    prev = None
    while prev != line:  # "1. Query: ..." has two layers
        prev = line
        line = _LABEL.sub("", _MARKER.sub("", line)).strip().strip(_QUOTES).strip()
    return " ".join(line.split())


def parse_queries(reply: str, query: str, limit: int) -> list[str]:
    """The original query, then up to ``limit`` distinct new queries from the reply's lines."""
    if limit < 0:
        raise ConfigError(f"rewrite: limit={limit}; expected 0 or more")
    out, seen = [query], {_key(query)}
    for raw in reply.splitlines():
        if len(out) > limit:
            break
        line = clean_line(raw)
        if not re.search(r"\w", line) or raw.rstrip().endswith(":") or _key(line) in seen:
            continue
        seen.add(_key(line))
        out.append(line)
    return out


def first_block(reply: str) -> str:
    """The reply's first block of text: up to the first blank line after some text, or up to a
    new "Question:" line (a preamble line ending in a colon does not start the block)."""
    lines: list[str] = []
    for line in reply.splitlines():
        if lines and (not line.strip() or line.lstrip().lower().startswith("question:")):
            break
        if line.strip() and (lines or not line.rstrip().endswith(":")):
            lines.append(line)
    return "\n".join(lines)


def _chat(llm, prompt: str, max_new_tokens: int) -> str:
    return llm.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, temperature=0.0)


def _complete(llm, prompt: str, max_new_tokens: int) -> str:
    return first_block(llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n\n"]))


class NoRewriter:
    name = "none"
    dense_only = False

    def rewrite(self, query: str) -> list[str]:
        return [query]


class MultiQuery:
    """The query and up to ``n`` paraphrases."""

    name = "multi-query"
    dense_only = False

    def __init__(self, llm, n: int = 3, max_new_tokens: int = 96, prompt: str = MULTI_QUERY_PROMPT) -> None:
        if n < 1:
            raise ConfigError(f"rewriter multi-query: n={n}; expected at least 1")
        self.llm, self.n, self.max_new_tokens, self.prompt = llm, n, max_new_tokens, prompt

    def rewrite(self, query: str) -> list[str]:
        reply = _complete(self.llm, self.prompt.format(n=self.n, query=query), self.max_new_tokens)
        return parse_queries(reply, query, self.n)


class HyDE:
    """The query and one hypothetical answer passage (searched densely by the caller)."""

    name = "hyde"
    dense_only = True

    def __init__(self, llm, max_new_tokens: int = 128, prompt: str = HYDE_PROMPT) -> None:
        self.llm, self.max_new_tokens, self.prompt = llm, max_new_tokens, prompt

    def rewrite(self, query: str) -> list[str]:
        reply = _chat(self.llm, self.prompt.format(query=query), self.max_new_tokens)
        # labels, list markers and the question echoed back are dropped; the rest is one passage
        lines = [clean_line(line) for line in reply.splitlines() if not line.rstrip().endswith(":")]
        passage = " ".join(" ".join(ln for ln in lines if _key(ln) != _key(query)).split())
        return [query, passage] if re.search(r"\w", passage) else [query]


class StepBack:
    """The query and one more general question."""

    name = "step-back"
    dense_only = False

    def __init__(self, llm, max_new_tokens: int = 48, prompt: str = STEP_BACK_PROMPT) -> None:
        self.llm, self.max_new_tokens, self.prompt = llm, max_new_tokens, prompt

    def rewrite(self, query: str) -> list[str]:
        reply = _complete(self.llm, self.prompt.format(query=query), self.max_new_tokens)
        return parse_queries(reply, query, 1)


def _need_llm(name: str, llm):
    if llm is None:
        raise ConfigError(f"rewriter {name!r} needs an LLM (the default model: LLM.load(None))")
    return llm


def _int_arg(name: str, arg: str | None, default: int) -> int:
    if not arg:
        return default
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"rewriter {name!r}: argument {arg!r}; expected a positive integer ({name}:3)")
    return int(arg)


REWRITERS: dict[str, Callable[..., Rewriter]] = {
    "multi-query": lambda llm, arg=None: MultiQuery(_need_llm("multi-query", llm), _int_arg("multi-query", arg, 3)),
    "hyde": lambda llm, arg=None: HyDE(_need_llm("hyde", llm)),
    "step-back": lambda llm, arg=None: StepBack(_need_llm("step-back", llm)),
    "none": lambda llm=None, arg=None: NoRewriter(),
}


def get_rewriter(spec: str, llm=None) -> Rewriter:
    """``"none"``, ``"multi-query"`` / ``"multi-query:N"``, ``"hyde"`` or ``"step-back"`` over ``llm``."""
    name, _, arg = (spec or "none").partition(":")
    if name not in REWRITERS:
        raise ConfigError(f"rewriter {spec!r}: unknown name {name!r}; expected one of {', '.join(REWRITERS)}")
    return REWRITERS[name](llm, arg or None)


__all__ = [
    "HYDE_PROMPT",
    "MULTI_QUERY_PROMPT",
    "REWRITERS",
    "STEP_BACK_PROMPT",
    "HyDE",
    "MultiQuery",
    "NoRewriter",
    "Rewriter",
    "StepBack",
    "clean_line",
    "first_block",
    "get_rewriter",
    "parse_queries",
]
