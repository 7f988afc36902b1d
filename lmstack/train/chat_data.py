"""Chat data for SFT: read JSONL, render with the chat template, assistant-only masks,
padding/packing, and the before/after measurement of a fine-tune on held-out examples."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from lmstack.errors import ConfigError, LMStackError
from lmstack.train.common import IGNORE


def read_jsonl(source: str, field: str = "data") -> list[dict]:
    """Examples of a JSONL file, or of a dataset shipped in ``lmstack/train/datasets``.

    Checks what needs no tokenizer (the file exists, every line is a JSON object, there is at
    least one), so a stage can call it before it loads a model; ``field`` names the config
    field in the errors.
    """
    expected = "a JSONL file with one chat or prompt/completion example per line"
    rows = [row for _, row in numbered_jsonl(source, field, expected,
                                             "an object with 'messages' or 'prompt'/'completion'")]
    if not rows:
        raise ConfigError(f"{field}: {source} is empty (expected {expected})")
    return rows


def numbered_jsonl(source: str, field: str, expected: str, obj: str = "an object",
                   error: type[LMStackError] = LMStackError) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSONL file or of ``builtin:<name>`` (a
    file in ``lmstack/train/datasets``). Errors name ``field``, the file and the line; a bad line
    raises ``error``, ``expected`` says what the file should be and ``obj`` what each line should hold."""
    if source.startswith("builtin:"):
        name = source[len("builtin:"):]
        f = resources.files("lmstack.train.datasets") / f"{name}.jsonl"
        if not f.is_file():
            have = sorted(p.name[:-6] for p in resources.files("lmstack.train.datasets").iterdir()
                          if p.name.endswith(".jsonl"))
            raise ConfigError(f"{field}: no builtin dataset {name!r}; builtin datasets are {have}")
        text = f.read_text(encoding="utf-8")
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"{field}: {p} not found (expected {expected})")
        text = p.read_text(encoding="utf-8")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # e.msg alone stops mid-phrase ("Unterminated string starting at")
            raise error(f"{field}: {source}:{i}: not valid JSON ({e.msg}: column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{field}: {source}:{i}: got a JSON {type(row).__name__}, expected {obj}")
        rows.append((i, row))
    return rows


def encode_example(tok, ex: dict, max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids and a per-token "counts in the loss" mask for one example."""
    if "messages" in ex:
        msgs = ex["messages"]
        if not any(m.get("role") == "assistant" for m in msgs):
            raise LMStackError(f"example has no assistant message: {json.dumps(ex)[:120]}")
        text = tok.apply_chat_template(msgs, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True) if i else ""
            through = tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise LMStackError("the chat template does not render conversations as growing prefixes; "
                                   "assistant-only loss masks need such a template")
            spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
        enc = tok.hf.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    elif "prompt" in ex and "completion" in ex:
        p = tok.encode(ex["prompt"], add_special_tokens=True)
        c = tok.encode(ex["completion"]) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        ids, mask = p + c, [False] * len(p) + [True] * len(c)
    else:
        raise LMStackError(f"example has neither 'messages' nor 'prompt'/'completion': {json.dumps(ex)[:120]}")
    return ids[:max_len + 1], mask[:max_len + 1]


def encode_dataset(tok, rows: list[dict], max_len: int) -> list[tuple[list[int], list[bool]]]:
    out = [encode_example(tok, r, max_len) for r in rows]
    out = [(i, m) for i, m in out if any(m[1:])]  # an example truncated before its answer teaches nothing
    if not out:
        raise LMStackError("no example keeps an assistant token within max_len")
    return out


def collate(examples: list[tuple[list[int], list[bool]]], pad_id: int, packing: bool = False,
            max_len: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded (or packed) ``inputs``/``targets`` (B, T); targets are IGNORE off the mask.

    Packed rows also get ``doc_ids`` (B, T): the block-diagonal attention mask and the
    restarting positions come from it.
    """
    if packing:
        rows, row, cur = [], [], 0
        for ex in examples:
            if row and cur + len(ex[0]) > max_len + 1:
                rows.append(row)
                row, cur = [], 0
            row.append(ex)
            cur += len(ex[0])
        rows.append(row)
    else:
        rows = [[ex] for ex in examples]
    T = max(sum(len(ids) for ids, _ in r) for r in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        ids = [t for x, _ in r for t in x]
        mask = [m for _, ms in r for m in ms]
        doc = [d for d, (x, _) in enumerate(r) for _ in x]
        n = len(ids) - 1
        inputs[b, :n] = torch.tensor(ids[:-1])
        doc_ids[b, :n] = torch.tensor(doc[:-1])
        tgt = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:]) & (torch.tensor(doc[1:]) == torch.tensor(doc[:-1]))
        targets[b, :n] = torch.where(keep, tgt, torch.full_like(tgt, IGNORE))
    out = {"inputs": inputs, "targets": targets}
    if packing:
        out["doc_ids"] = doc_ids
    return out


# -- before/after measurement ---------------------------------------------------------------


@torch.no_grad()
def measure(model, tok, rows: list[dict], max_len: int, max_new_tokens: int, batch_size: int = 8,
            n_show: int = 5, progress: bool = False, desc: str = "measure") -> dict:
    """Held-out answer loss (nats/token) and exact match of greedy answers.

    Exact match is computed by teacher forcing, which is exact for greedy decoding: greedy
    decoding reproduces the reference answer and its end-of-turn token if and only if the
    argmax at every answer position is the reference token. ``n_show`` examples are also
    decoded for people to read. ``progress``: a bar over the examples (scored, then decoded)
    on stderr, shown only where stderr is a terminal.
    """
    from tqdm import tqdm

    from lmstack.infer.generate import stream_generate
    from lmstack.infer.sampling import SamplingParams
    from lmstack.peft.lora import LoRALinear

    was = model.training
    model.eval()
    enc = encode_dataset(tok, rows, max_len)
    n_shown = min(n_show, len(rows))
    bar = tqdm(total=len(enc) + n_shown, desc=desc, unit="example", dynamic_ncols=True,
               disable=None if progress else True)
    total, count, hits = 0.0, 0, 0
    by_task: dict[str, list[int]] = {}
    tasks = [r.get("task", "") for r in rows] if len(enc) == len(rows) else [""] * len(enc)
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], tok.pad_token_id or 0)
        hidden = model(b["inputs"], return_hidden=True)  # (B, T, C)
        logits = torch.nn.functional.linear(hidden, model.output_weight).float()  # (B, T, vocab)
        keep = b["targets"] != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[keep], b["targets"][keep], reduction="sum"))
        count += int(keep.sum())
        right = (logits.argmax(-1) == b["targets"]) | ~keep
        ok = right.all(dim=1).tolist()
        hits += sum(ok)
        for t, k in zip(tasks[i:i + batch_size], ok):
            by_task.setdefault(t, []).append(int(k))
        bar.update(len(ok))
    shown = []
    loras = [m for m in model.modules() if isinstance(m, LoRALinear) and m.bits is None and not m.merged]
    for m in loras:  # decoding with merged weights is the same function, without the extra matmuls
        m.merge()
    try:
        prompts, refs = [], []
        for r in rows[:n_show]:
            if "messages" in r:
                k = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
                prompts.append(tok.encode_chat(r["messages"][:k], add_generation_prompt=True))
                refs.append(r["messages"][k]["content"])
            else:
                prompts.append(tok.encode(r["prompt"], add_special_tokens=True))
                refs.append(r["completion"])
        outs = [""] * len(prompts)
        if prompts:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
            for ev in stream_generate(model, tok, prompts, params):
                outs[ev.row] += ev.text
                if ev.finish_reason is not None:
                    bar.update(1)
        shown = [{"prompt": tok.decode(p), "reference": r, "output": o} for p, r, o in zip(prompts, refs, outs)]
    finally:
        for m in loras:
            m.unmerge()
        bar.close()
    model.train(was)
    out = {"loss": total / max(count, 1), "exact_match": hits / len(enc), "n": len(enc), "examples": shown}
    if len(by_task) > 1:
        out["exact_match_by_task"] = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    return out
