"""Builds ``tasks-train.jsonl`` and ``tasks-val.jsonl``: prompts with verifiable answers for GRPO.

Each line is TRL's prompt-only conversational format (``{"prompt": [{"role": "user", ...}]}``)
plus the columns the built-in rewards read (``lmstack.train.rewards``):

* ``arithmetic``: "What is 23 + 45?"; ``answer`` is checked against the last number of the
  completion (``exact_match``);
* ``format``: the same kind of question, answered as a JSON object ``{"answer": <integer>}``;
  ``schema`` is checked by ``json_schema`` and ``answer`` by ``exact_match`` (the last number);
* ``code``: a one-line Python function; ``tests`` (assert statements) run against the completion's
  code in the sandbox of ``lmstack.eval.code_exec`` (``unit_tests``).

Operands stay small (two-digit sums and differences, one-digit products) so the default
SmolLM2-135M-Instruct is right some of the time: a group of samples then holds both rewards,
which is what GRPO learns from. Train and validation draw from disjoint random streams, and no
validation prompt appears in the training file.

    python -m lmstack.train.datasets.build_tasks    # rewrites the two files in place
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}

# (function name, description, body of f(x), inputs the tests use)
CODE = [
    ("add_{k}", "returns x plus {k}", "x + {k}", [0, 3, -5, 10]),
    ("times_{k}", "returns x multiplied by {k}", "x * {k}", [0, 2, -3, 7]),
    ("minus_{k}", "returns x minus {k}", "x - {k}", [0, 4, 11, -2]),
    ("square_plus_{k}", "returns the square of x plus {k}", "x * x + {k}", [0, 2, -3, 5]),
    ("is_above_{k}", "returns True if x is greater than {k}, else False", "x > {k}", [0, 5, 20, -1]),
    ("double_minus_{k}", "returns twice x minus {k}", "2 * x - {k}", [0, 1, 6, -4]),
]


def _question(r: random.Random) -> tuple[str, int]:
    op = r.choice("+-*")
    if op == "*":
        a, b = r.randint(2, 9), r.randint(2, 9)
        return f"What is {a} * {b}?", a * b
    a, b = r.randint(10, 60), r.randint(10, 40)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    return f"What is {a} + {b}?", a + b


def _arithmetic(r: random.Random) -> dict:
    q, ans = _question(r)
    return {"prompt": [{"role": "user", "content": q}], "kind": "arithmetic", "answer": str(ans)}


def _format(r: random.Random) -> dict:
    q, ans = _question(r)
    text = f'{q} Reply only with a JSON object of the form {{"answer": <integer>}}.'
    return {"prompt": [{"role": "user", "content": text}], "kind": "format", "answer": str(ans),
            "schema": ANSWER_SCHEMA}


def _code(r: random.Random) -> dict:
    name, desc, body, xs = r.choice(CODE)
    k = r.randint(2, 30)
    name, desc, body = name.format(k=k), desc.format(k=k), body.format(k=k)
    text = f"Write a Python function `{name}(x)` that {desc}. Reply with the code only."
    tests = "\n".join(f"assert {name}({x}) == {eval(body, {'x': x})!r}" for x in xs)  # noqa: S307 (our own strings)
    return {"prompt": [{"role": "user", "content": text}], "kind": "code", "tests": tests}


KINDS = {"arithmetic": (_arithmetic, 0.5), "format": (_format, 0.3), "code": (_code, 0.2)}


def build(n: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    """``n`` rows in the mix of ``KINDS``, none whose prompt text is in ``exclude``."""
    r = random.Random(seed)
    rows: list[dict] = []
    seen = set(exclude)
    for kind, (make, share) in KINDS.items():
        want, made = round(n * share), 0
        while made < want:
            row = make(r)
            text = row["prompt"][0]["content"]
            if text in seen:
                continue
            seen.add(text)
            rows.append(row)
            made += 1
    r.shuffle(rows)
    return rows


def main() -> None:
    here = Path(__file__).parent
    val = build(60, seed=2)
    train = build(400, seed=1, exclude=frozenset(row["prompt"][0]["content"] for row in val))
    for name, rows in (("tasks-train", train), ("tasks-val", val)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"{name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
