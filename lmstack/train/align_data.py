"""Data of the alignment stages: preference pairs (DPO family, reward models), unpaired
labelled completions (KTO) and prompts (GRPO, PPO), read from JSONL and checked line by line.

The formats are TRL's. Each text field is either plain text (a string) or conversational (a
list of ``{"role", "content"}`` messages, rendered later with the model's chat template)::

    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    {"prompt": [{"role": "user", "content": "Sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Green."}]}
    {"chosen": [user, assistant], "rejected": [user, other assistant]}   # implicit prompt
    {"prompt": ..., "completion": ..., "label": true}                     # unpaired (KTO)
    {"prompt": ..., "answer": "42"}                                       # prompts (+ any columns)

An implicit prompt is the longest common prefix of ``chosen`` and ``rejected``: whole
messages in the conversational format; in plain text, the common characters cut back to the
last whitespace, so that a word shared by halves ("cat"/"car") stays whole in both
completions. Every line is checked before a model loads; an error names the file, the line
and the field. Deliberately left out: TRL's stepwise and vision formats, tool calls, and
the ``from``/``value`` (ShareGPT) message keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

from lmstack.errors import ConfigError, LMStackError
from lmstack.train.chat_data import numbered_jsonl

Text = Union[str, list]  # plain text, or a list of {"role", "content"} messages


class DataError(LMStackError):
    """A line of an alignment data file is malformed (the message names file, line and field)."""


@dataclass
class PrefExample:
    prompt: Text
    chosen: Text
    rejected: Text
    line: int


@dataclass
class UnpairedExample:
    prompt: Text
    completion: Text
    label: bool  # True: desirable
    line: int


@dataclass
class PromptExample:
    prompt: Text
    extra: dict[str, Any] = field(default_factory=dict)  # the line's other columns (answers, tests, ...)
    line: int = 0


def is_conversational(x: Text) -> bool:
    return isinstance(x, list)


# -- reading ----------------------------------------------------------------------------------


def _rows(source: str, name: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSONL file or ``builtin:<name>``."""
    rows = numbered_jsonl(source, name, "a JSONL file or builtin:<name>", error=DataError)
    if not rows:
        raise ConfigError(f"{name}: {source} has no examples")
    return rows


def _text(row: dict, key: str, where: str, completion: bool = False) -> Text:
    """The field ``key`` checked as plain text or messages; a completion must not be empty."""
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    v = row[key]
    if isinstance(v, str):
        if completion and not v.strip():
            raise DataError(f"{where}: field {key!r} is empty, expected a non-empty completion")
        return v
    if not isinstance(v, list):
        raise DataError(f"{where}: field {key!r} is a {type(v).__name__}, expected a string or a list of "
                        "{'role', 'content'} messages")
    for j, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field {key!r}, message {j}: got {json.dumps(m)[:80]}, expected "
                            "{'role': str, 'content': str}")
    if completion:
        if not v or v[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {key!r} must end with an assistant message (got roles "
                            f"{[m['role'] for m in v]})")
        if not any(m["content"].strip() for m in v if m["role"] == "assistant"):
            raise DataError(f"{where}: field {key!r} has only empty assistant messages, expected a completion")
    return v


def _same_kind(where: str, **fields: Text) -> None:
    kinds = {k: "messages" if is_conversational(v) else "text" for k, v in fields.items()}
    if len(set(kinds.values())) > 1:
        raise DataError(f"{where}: fields mix plain text and messages ({kinds}); expected one format for all")


def split_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """``(prompt, chosen, rejected)`` from a pair whose prompt is their longest common prefix."""
    if is_conversational(chosen):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k < min(len(chosen), len(rejected)):  # cut back to a word boundary, so no word is split
        while k > 0 and not chosen[k - 1].isspace():
            k -= 1
    while k > 0 and chosen[k - 1].isspace():  # the space before the completion stays with it
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def read_preference(path: str, name: str = "data") -> list[PrefExample]:
    """Preference pairs: ``prompt`` (optional: implicit), ``chosen``, ``rejected``."""
    out = []
    for i, row in _rows(path, name):
        where = f"{name}: {path}:{i}"
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        _same_kind(where, chosen=chosen, rejected=rejected)
        if "prompt" in row:
            prompt = _text(row, "prompt", where)
            _same_kind(where, prompt=prompt, chosen=chosen)
        else:
            prompt, chosen, rejected = split_prompt(chosen, rejected)
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same, expected two different completions")
        fixed = {**row, "chosen": chosen, "rejected": rejected}
        chosen, rejected = _text(fixed, "chosen", where, True), _text(fixed, "rejected", where, True)
        if is_conversational(prompt) and not prompt:
            raise DataError(f"{where}: the prompt is empty (chosen and rejected share no messages and no "
                            "'prompt' is given)")
        out.append(PrefExample(prompt, chosen, rejected, i))
    return out


def read_unpaired(path: str, name: str = "data") -> list[UnpairedExample]:
    """Unpaired completions: ``prompt``, ``completion``, ``label`` (true = desirable)."""
    out = []
    for i, row in _rows(path, name):
        where = f"{name}: {path}:{i}"
        prompt, completion = _text(row, "prompt", where), _text(row, "completion", where, True)
        _same_kind(where, prompt=prompt, completion=completion)
        if "label" not in row:
            raise DataError(f"{where}: missing field 'label' (has {sorted(row)})")
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: field 'label' is {json.dumps(row['label'])[:40]}, expected true or false")
        out.append(UnpairedExample(prompt, completion, row["label"], i))
    return out


def read_prompts(path: str, name: str = "data") -> list[PromptExample]:
    """Prompts to complete, each with the line's other columns in ``extra``."""
    out = []
    for i, row in _rows(path, name):
        where = f"{name}: {path}:{i}"
        prompt = _text(row, "prompt", where)
        if not (prompt.strip() if isinstance(prompt, str) else prompt):
            raise DataError(f"{where}: field 'prompt' is empty, expected a prompt")
        out.append(PromptExample(prompt, {k: v for k, v in row.items() if k != "prompt"}, i))
    return out
