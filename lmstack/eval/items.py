"""What every task kind does with an evaluation item: load the task's set, name the item, fill
the prompt template with its fields, and read its references, its text or its source.

``task`` below is a ``lmstack.eval.tasks.TaskConfig``; this module reads its ``name``,
``dataset``, ``dataset_type``, ``limit`` and ``prompt``. It knows the item types of
``lmstack.eval.datasets`` and nothing of task kinds: a kind that needs another default
template passes it to ``render_prompt``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from lmstack.errors import ConfigError
from lmstack.eval import datasets as D

DatasetType = Literal["qa", "summarization", "translation", "multiple_choice", "code", "text", "pairwise", "rag"]
TEXT_TYPES = ("qa", "summarization", "translation")
# shipped set name -> its dataset type
SHIPPED = {"qa": "qa", "summarization": "summarization", "translation": "translation",
           "multiple_choice": "multiple_choice", "code": "code", "humaneval": "code", "passages": "text",
           "pairwise": "pairwise", "rag": "rag"}

DEFAULT_PROMPTS = {
    "qa": "Answer the question using the passage. Reply with a short answer only.\n\n"
          "Passage: {context}\nQuestion: {question}\nAnswer:",
    "summarization": "Summarise the following text in one or two sentences.\n\n{document}\n\nSummary:",
    "translation": "Translate from {source_lang} to {target_lang}.\n\n{source}\n\nTranslation:",
    "multiple_choice": "Question: {question}\n{lettered_choices}\nAnswer:",
    "rag": "Answer the question using the retrieved passages. Reply with a short answer only.\n\n"
           "{passages}\n\nQuestion: {question}\nAnswer:",
}


def load_texts(path) -> list:
    """A text set: the shipped passages, or a JSONL file whose rows have ``text`` (and maybe ``id``)."""
    if path is None:
        return D.load_passages()
    rows = D.read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str):
            raise ConfigError(f"{path}:{n}: a text set row needs a string field 'text'")
    return [D.Passage(str(r.get("id", n)), r["text"]) for n, r in enumerate(rows, 1)]


# dataset type -> loader(path or None for the shipped set)
LOADERS = {"qa": D.load_qa, "summarization": D.load_summarization, "translation": D.load_translation,
           "multiple_choice": D.load_multiple_choice, "code": D.load_code_problems, "text": load_texts,
           "pairwise": D.load_pairwise, "rag": D.load_rag}


def load_items(task) -> list:
    """The task's items: a shipped set or the file at ``task.dataset``, the first ``limit`` only."""
    if task.dataset == "humaneval":
        items = D.load_humaneval()
    else:
        items = LOADERS[task.dataset_type](None if task.dataset in SHIPPED else task.dataset)
    return items[: task.limit] if task.limit else items


def item_id(item) -> str:
    return str(getattr(item, "id", None) or getattr(item, "task_id", ""))


def item_fields(item) -> dict:
    """The fields a prompt template (or a DAG question) formats over: the item's own, plus
    ``lettered_choices`` for multiple choice and ``passages`` for RAG items."""
    f = dataclasses.asdict(item)
    if "choices" in f:
        f["lettered_choices"] = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(f["choices"]))
    if isinstance(item, D.RAGItem):
        f["passages"] = "\n\n".join(f"[{c['id']}] {c['text']}" for c in item.contexts)
    return f


def references(item) -> list[str]:
    if isinstance(item, D.QAItem):
        return item.answers
    if isinstance(item, D.SummarizationItem):
        return [item.summary]
    if isinstance(item, D.RAGItem):
        return [item.reference]
    return item.references


def text_of(item) -> str:
    """The text a perplexity task scores."""
    if isinstance(item, D.Passage):
        return item.text
    if isinstance(item, D.SummarizationItem):
        return item.document
    return item.context


def source_of(item) -> str:
    """What a judge is shown as the source: the document, the source sentence, or the question
    with its passage."""
    if isinstance(item, D.SummarizationItem):
        return item.document
    if isinstance(item, D.TranslationItem):
        return item.source
    return f"{item.context}\n\nQuestion: {item.question}" if item.context else item.question


def render_prompt(task, item, default: Optional[str] = None) -> str:
    """``task.prompt`` (else ``default``, else the dataset type's default) formatted over the item's fields."""
    template = task.prompt or default or DEFAULT_PROMPTS[task.dataset_type]
    try:
        return template.format(**item_fields(item))
    except KeyError as e:
        raise ConfigError(f"task {task.name!r}: prompt uses {{{e.args[0]}}}, but items have fields "
                          f"{sorted(item_fields(item))}") from None
