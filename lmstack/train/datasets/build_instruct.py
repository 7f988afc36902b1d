"""Builds ``instruct-train.jsonl`` and ``instruct-val.jsonl``: short, answer-only instructions.

Five task kinds with exactly checkable answers: ISO dates, alphabetical sorting, e-mail
extraction, upper-casing, and the largest of a few numbers. Each user message ends with a
format instruction ("Reply with ... only"); the reference answer follows it exactly, so exact
match measures instruction following. Train and validation draw from disjoint random streams
and no validation prompt appears in the training file.

    python -m lmstack.train.datasets.build_instruct    # rewrites the two files in place
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WORDS = ["apple", "river", "candle", "garden", "pencil", "mountain", "window", "basket", "thunder", "violin",
         "harbor", "lantern", "meadow", "orange", "planet", "quilt", "rocket", "saddle", "tiger", "umbrella",
         "valley", "wagon", "yellow", "zebra", "anchor", "bridge", "castle", "dolphin", "engine", "forest",
         "glacier", "hammer", "island", "jacket", "kettle", "ladder", "mirror", "needle", "oyster", "pepper",
         "rabbit", "silver", "tunnel", "velvet", "walnut", "bottle", "copper", "desert", "feather", "ginger"]
NAMES = ["alice", "bruno", "chen", "dana", "emeka", "fatima", "greta", "hiro", "ines", "jonas", "kira",
         "luis", "maya", "nikos", "olga", "priya", "quinn", "rosa", "sami", "tomas"]
DOMAINS = ["example.com", "mail.org", "company.net", "school.edu", "startup.io"]
TEMPLATES = ["Please write to {e} before Friday.", "For questions, contact {e} any time.",
             "The report was sent by {e} this morning.", "You can reach the team lead at {e}.",
             "Send the signed form to {e} and keep a copy."]


def _date(r: random.Random) -> tuple[str, str]:
    y, m, d = r.randint(1950, 2030), r.randint(1, 12), r.randint(1, 28)
    q = f"Convert the date to ISO format (YYYY-MM-DD). Reply with the date only.\n{MONTHS[m - 1]} {d}, {y}"
    return q, f"{y:04d}-{m:02d}-{d:02d}"


def _sort(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(3, 5))
    q = "Sort these words alphabetically. Reply with the sorted words only, separated by commas.\n" + ", ".join(ws)
    return q, ", ".join(sorted(ws))


def _email(r: random.Random) -> tuple[str, str]:
    e = f"{r.choice(NAMES)}.{r.choice(NAMES)}@{r.choice(DOMAINS)}"
    q = "Extract the email address from the text. Reply with the address only.\n" + r.choice(TEMPLATES).format(e=e)
    return q, e


def _upper(r: random.Random) -> tuple[str, str]:
    text = " ".join(r.sample(WORDS, r.randint(2, 4)))
    return f"Rewrite the text in upper case. Reply with the rewritten text only.\n{text}", text.upper()


def _largest(r: random.Random) -> tuple[str, str]:
    nums = r.sample(range(10, 1000), r.randint(3, 5))
    q = "Which number is the largest? Reply with the number only.\n" + ", ".join(map(str, nums))
    return q, str(max(nums))


TASKS = [_date, _sort, _email, _upper, _largest]


def build(n_per_task: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    r = random.Random(seed)
    rows, seen = [], set(exclude)
    for _ in range(n_per_task):
        for task in TASKS:
            while True:
                q, a = task(r)
                if q not in seen:
                    break
            seen.add(q)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "task": task.__name__[1:]})
    return rows


def main() -> None:
    here = Path(__file__).parent
    val = build(12, seed=1)
    train = build(80, seed=0, exclude={row["messages"][0]["content"] for row in val})
    for name, rows in (("instruct-train", train), ("instruct-val", val)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


if __name__ == "__main__":
    main()
