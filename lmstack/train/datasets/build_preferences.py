"""Builds the preference set ``pref-train.jsonl`` / ``pref-val.jsonl`` and the unpaired
``kto-train.jsonl`` / ``kto-val.jsonl`` from the shipped instruction prompts.

Every prompt of ``instruct-train`` (400) gives two training pairs; every prompt of
``instruct-val`` (60) plus 40 fresh prompts from ``build_instruct``'s task generators (another
seed, none seen in either instruct file) give two held-out pairs. No prompt is in both files.

``chosen`` is always the reference answer, which follows the prompt's format instruction
exactly. ``rejected`` is an answer that fails the reference check (exact match after
stripping whitespace), one of:

- ``model``: the default SmolLM2-135M-Instruct's own answer (at most 40 tokens), greedy, or,
  when greedy happens to be right, a seeded sample at temperature 1 (each prompt's seed is
  its index, so the draw does not depend on batching);
- ``wrong_value``: the right shape with a wrong value (day and month swapped, the second
  largest number, two words out of order, the names of an address swapped, one word left in
  lower case, ...);
- ``truncated``: the reference cut short;
- ``format``: the right value wrapped in chatter the prompt asked not to write;
- ``other_prompt``: the reference answer of another prompt of the same task.

The first pair of a prompt takes the model's answer (a rule-made one when both of the
model's answers are right); the second draws a rule-made kind, favouring (3:1) the kinds
whose length moves the running count of "chosen longer" against "chosen shorter" back
towards zero. Model answers are mostly longer than the terse references, so without that
a reward model could score "shorter is better" and look good; ``main`` prints the length
statistics and the accuracy of that length-only rule on each file.

The KTO files are the same answers unpaired: each prompt's reference once as desirable
(``label: true``) and each of its two rejected answers as undesirable (``label: false``),
so there are twice as many undesirable examples as desirable ones.

Lines use TRL's conversational formats (``prompt`` a list of messages; ``chosen``,
``rejected`` and ``completion`` one assistant message each) plus two informational columns,
``task`` and ``kind`` (the rejected answer's kind), which loaders ignore.

    python -m lmstack.train.datasets.build_preferences    # rewrites the four files (minutes on 2 threads)

Rerunning reproduces the files as long as the model's greedy and seeded decoding do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from statistics import mean, median

from lmstack.train.datasets.build_instruct import build

KINDS_RULE = ["wrong_value", "truncated", "format", "other_prompt"]
CHATTER = ["The answer is {a}.", "Sure! Here it is: {a}", "{a}\n\nLet me know if you need anything else.",
           "Answer: {a}", "Here you go:\n{a}", "Of course. {a} is the answer."]


def _wrong_value(task: str, question: str, ref: str, r: random.Random) -> str:
    """An answer with the reference's shape and a wrong value (never equal to ``ref``)."""
    data = question.split("\n")[-1]
    for _ in range(50):
        if task == "date":
            y, m, d = (int(x) for x in ref.split("-"))
            out = r.choice([f"{y:04d}-{d:02d}-{m:02d}", f"{y:04d}-{m:02d}-{d + r.choice([-1, 1]):02d}",
                            f"{y + r.randint(1, 9) * r.choice([-1, 1]):04d}-{m:02d}-{d:02d}",
                            f"{y:04d}-{(m % 12) + 1:02d}-{d:02d}", f"{y}-{m}-{d}", f"{y % 100:02d}-{m:02d}-{d:02d}"])
        elif task == "sort":
            ws = ref.split(", ")
            i = r.randrange(len(ws) - 1)
            swapped = ws[:i] + [ws[i + 1], ws[i]] + ws[i + 2:]
            out = ", ".join(r.choice([swapped, data.split(", "), ws[::-1], ws[:i] + ws[i + 1:]]))
        elif task == "email":
            user, domain = ref.split("@")
            a, b = user.split(".")
            out = r.choice([f"{b}.{a}@{domain}", f"{a}@{domain}", f"{a}.{b}@{domain.split('.')[0]}",
                            f"{a}.{b[:-1]}@{domain}", f"{b}@{domain}", user])
        elif task == "upper":
            ws = ref.split(" ")
            i = r.randrange(len(ws))
            out = " ".join(w.lower() if j == i else w for j, w in enumerate(ws))
            out = r.choice([out, " ".join(reversed(ws)), ref.capitalize(), ref.title(), " ".join(ws[:i] + ws[i + 1:])])
        elif task == "largest":
            nums = sorted(int(x) for x in data.split(", "))
            out = str(r.choice([nums[-2], nums[0], nums[-1] + r.randint(1, 20), nums[-1] - r.randint(1, 5),
                                nums[-1] // 10]))
        else:
            raise ValueError(f"unknown task {task!r}")
        if out != ref:
            return out
    raise ValueError(f"no wrong value found for {ref!r}")


def _truncated(ref: str, r: random.Random) -> str:
    cut = r.randint(max(1, round(0.3 * len(ref))), max(1, round(0.8 * len(ref))))
    return ref[:min(cut, len(ref) - 1)].rstrip(" ,-")


def _rule(kind: str, row: dict, same_task: list[str], r: random.Random, shorter: bool = False) -> str:
    """A rejected answer of ``kind``; with ``shorter``, one shorter than the reference where the
    kind can make one (``format`` cannot), drawing again up to 20 times."""
    q, ref = row["messages"][0]["content"], row["messages"][1]["content"]
    for _ in range(20):
        if kind == "wrong_value":
            out = _wrong_value(row["task"], q, ref, r)
        elif kind == "truncated":
            out = _truncated(ref, r)
        elif kind == "format":
            return r.choice(CHATTER).format(a=ref)
        elif kind == "other_prompt":
            out = r.choice([a for a in same_task if a != ref])
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if not shorter or len(out) < len(ref):
            return out
    return out


def _model_answers(rows: list[dict], max_new_tokens: int = 40) -> list[tuple[str, str]]:
    """(greedy, sampled) answers of the default model to each prompt; the sample (temperature 1,
    seeded by the prompt's index) is drawn only where the greedy answer is right, else ""."""
    import torch

    from lmstack.infer.generate import stream_generate
    from lmstack.infer.llm import LLM
    from lmstack.infer.sampling import SamplingParams

    torch.set_num_threads(2)
    llm = LLM.load(None)

    def answer(idx: list[int], params: SamplingParams, seeded: bool) -> dict[int, str]:
        out = {}
        for s in range(0, len(idx), 64):
            chunk = idx[s:s + 64]
            texts = [""] * len(chunk)
            prompts = [llm.chat_ids(rows[i]["messages"][:1]) for i in chunk]
            for ev in stream_generate(llm.model, llm.tokenizer, prompts, params, seeds=chunk if seeded else None):
                texts[ev.row] += ev.text
            out.update({i: t.strip() for i, t in zip(chunk, texts)})
        return out

    greedy = answer(list(range(len(rows))), SamplingParams(max_new_tokens=max_new_tokens), False)
    right = [i for i, row in enumerate(rows) if greedy[i] == row["messages"][1]["content"]]
    sampled = answer(right, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0), True)
    return [(greedy[i], sampled.get(i, "")) for i in range(len(rows))]


def make_pairs(rows: list[dict], answers: list[tuple[str, str]], seed: int) -> list[dict]:
    """Two preference pairs per prompt (see the module docstring for the kinds and the balancing)."""
    r = random.Random(seed)
    by_task: dict[str, list[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["messages"][1]["content"])
    balance = 0  # pairs with the chosen answer longer minus pairs with it shorter
    pairs = []
    for row, (greedy, sampled) in zip(rows, answers):
        ref = row["messages"][1]["content"]
        same = by_task[row["task"]]
        wrong = [a for a in (greedy, sampled) if a and a != ref.strip()]
        first = (wrong[0], "model") if wrong else (_rule("wrong_value", row, same, r), "wrong_value")
        balance += (len(ref) > len(first[0])) - (len(ref) < len(first[0]))
        # the second pair: a rule-made kind, made shorter than the reference while more pairs
        # have the chosen answer shorter, and drawn 3:1 towards kinds that restore the balance
        kinds = [k for k in KINDS_RULE if k != first[1]]
        cands = [(_rule(k, row, same, r, shorter=balance < 0), k) for k in kinds]
        cands = [(a, k) for a, k in cands if a and a != ref and a != first[0]]
        weights = [3 if (len(ref) > len(a)) == (balance < 0) and len(ref) != len(a) else 1 for a, _ in cands]
        second = r.choices(cands, weights)[0]
        balance += (len(ref) > len(second[0])) - (len(ref) < len(second[0]))
        for rejected, kind in (first, second):
            pairs.append({"prompt": row["messages"][:1], "chosen": [{"role": "assistant", "content": ref}],
                          "rejected": [{"role": "assistant", "content": rejected}],
                          "task": row["task"], "kind": kind})
    return pairs


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO examples: each prompt's chosen answer once (desirable), every rejected one (undesirable)."""
    out, seen = [], set()
    for p in pairs:
        q = p["prompt"][0]["content"]
        if q not in seen:
            seen.add(q)
            out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, "task": p["task"]})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False, "task": p["task"],
                    "kind": p["kind"]})
    return out


def length_stats(pairs: list[dict]) -> dict:
    """Characters of chosen and rejected answers, and how often a length-only rule is right."""
    c = [len(p["chosen"][0]["content"]) for p in pairs]
    j = [len(p["rejected"][0]["content"]) for p in pairs]
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return {"pairs": len(pairs), "chosen_chars_mean": round(mean(c), 1), "chosen_chars_median": median(c),
            "rejected_chars_mean": round(mean(j), 1), "rejected_chars_median": median(j),
            "chosen_longer": sum(a > b for a, b in zip(c, j)), "chosen_shorter": sum(a < b for a, b in zip(c, j)),
            "same_length": sum(a == b for a, b in zip(c, j)),
            "shorter_wins_accuracy": round(sum((a < b) + 0.5 * (a == b) for a, b in zip(c, j)) / len(pairs), 3),
            "kinds": dict(sorted(kinds.items()))}


def _answers_in(path: Path, rows: list[dict]) -> list[tuple[str, str]]:
    """The model answers an earlier build put in ``path`` (its ``model`` pairs), per row; ""
    where both of the model's answers were right. ``make_pairs`` then builds the same pairs."""
    found = {}
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if p["kind"] == "model":
            found[p["prompt"][0]["content"]] = p["rejected"][0]["content"]
    return [(found.get(row["messages"][0]["content"], ""), "") for row in rows]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="rebuild the preference and KTO files")
    ap.add_argument("--reuse-model-answers", action="store_true",
                    help="take the model's answers from the current pref files instead of sampling them again")
    args = ap.parse_args(argv)
    here = Path(__file__).parent
    read = lambda name: [json.loads(x) for x in (here / f"{name}.jsonl").read_text().splitlines() if x.strip()]
    train_rows, val_rows = read("instruct-train"), read("instruct-val")
    seen = {row["messages"][0]["content"] for row in train_rows + val_rows}
    val_rows = val_rows + build(8, seed=2, exclude=seen)
    if args.reuse_model_answers:
        answers = _answers_in(here / "pref-train.jsonl", train_rows) + _answers_in(here / "pref-val.jsonl", val_rows)
    else:
        answers = _model_answers(train_rows + val_rows)
    splits = {"train": make_pairs(train_rows, answers[:len(train_rows)], seed=0),
              "val": make_pairs(val_rows, answers[len(train_rows):], seed=1)}
    assert not ({p["prompt"][0]["content"] for p in splits["train"]}
                & {p["prompt"][0]["content"] for p in splits["val"]})
    for split, pairs in splits.items():
        for name, lines in ((f"pref-{split}", pairs), (f"kto-{split}", unpaired(pairs))):
            (here / f"{name}.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
        print(split, json.dumps(length_stats(pairs)))


if __name__ == "__main__":
    main()
