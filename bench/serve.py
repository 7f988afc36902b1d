"""Serving benchmark: the lmstack server under 1..64 concurrent streaming clients.

    .venv/bin/python bench/serve.py                       # SmolLM2-135M, 2 threads, 1/4/16/64 clients
    .venv/bin/python bench/serve.py --clients 1 4 --max-tokens 32 --no-baseline

For each concurrency: aggregate output tokens/s, time to first token and inter-token
latency (p50/p95), measured by the clients over real HTTP/SSE. Then the same load with a
JSON-schema ``response_format`` (the cost of constrained decoding), and a naive baseline:
one request at a time through transformers ``generate`` on the same GGUF weights.
Prints a Markdown table for docs/benchmarks.md.

Constrained answers are shorter than free ones (a JSON object ends itself), and a short
answer pays the same prompt prefill for fewer output tokens. So the cost of the grammar is
measured against an unconstrained run whose client i asks for exactly as many tokens as
constrained client i got (``max_tokens`` = that count, ``ignore_eos``): the same prompts,
the same output lengths, the only difference the grammar. The free-length run is printed
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                                       "maxItems": 5}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
PROMPTS = ["Describe a person you admire.", "Write a short story about a robot.", "Explain how rain forms.",
           "List some facts about the Moon.", "What makes a good breakfast?", "Tell me about the ocean."]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_client(port: int, i: int, max_tokens: int, schema: bool, ignore_eos: bool = False) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": ignore_eos}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    times: list[float] = []
    n_tokens = 0
    while line := await reader.readline():
        if line.startswith(b"data: {"):
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n_tokens = ev["usage"]["completion_tokens"]
            if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": [b - a for a, b in zip(times, times[1:])],
            "end": time.perf_counter(), "completion_tokens": n_tokens}


async def load(port: int, n: int, max_tokens, schema: bool, metrics_url: str, ignore_eos: bool = False) -> dict:
    """``n`` concurrent clients; ``max_tokens`` is one number or one per client."""
    from lmstack.serve.metrics import parse_metrics
    import urllib.request

    before = parse_metrics(urllib.request.urlopen(metrics_url).read().decode())["lmstack_generation_tokens_total"]
    t0 = time.perf_counter()
    per_client = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    rs = await asyncio.gather(*(one_client(port, i, per_client[i], schema, ignore_eos) for i in range(n)))
    wall = time.perf_counter() - t0
    after = parse_metrics(urllib.request.urlopen(metrics_url).read().decode())["lmstack_generation_tokens_total"]
    itl = [x for r in rs for x in r["itl"]]
    ttft = [r["ttft"] for r in rs]
    return {"clients": n, "tokens": int(after - before), "wall": wall, "tok_s": (after - before) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
            "completion_tokens": [r["completion_tokens"] for r in rs]}


def naive_baseline(n_requests: int, max_tokens: int) -> float:
    """Requests one at a time through transformers generate: output tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.infer.llm import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    n_out, t0 = 0, time.perf_counter()
    for i in range(n_requests):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=True, temperature=0.7, top_p=1.0)
        n_out += out.shape[1] - ids.shape[1]
    return n_out / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--schema-clients", type=int, default=16, help="concurrency of the constrained-decoding run")
    ap.add_argument("--baseline-requests", type=int, default=4)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json-line", action="store_true",
                    help="end with one JSON line of the figures per client count (for bench/ab.py)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from lmstack.serve.config import ServeConfig
    from lmstack.serve.server import ServerThread, build_backend

    cfg = ServeConfig(model=a.model, max_slots=max(a.clients), max_seq_len=512, max_queue=256, token_budget=512,
                      keepalive_s=60)
    backend = build_backend(cfg)
    rows, schema_row = [], None
    with ServerThread(backend, cfg) as s:
        asyncio.run(load(cfg.port, 1, 4, False, s.url + "/metrics"))  # warm-up
        if a.schema_clients:  # builds the grammar engine's view of the vocabulary once (~1 s)
            asyncio.run(load(cfg.port, 1, 4, True, s.url + "/metrics"))
        for n in a.clients:
            rows.append(asyncio.run(load(cfg.port, n, a.max_tokens, False, s.url + "/metrics")))
            print(rows[-1], file=sys.stderr)
        if a.schema_clients:
            plain = next((r for r in rows if r["clients"] == a.schema_clients), None)
            schema_row = asyncio.run(load(cfg.port, a.schema_clients, a.max_tokens, True, s.url + "/metrics"))
            matched = asyncio.run(load(cfg.port, a.schema_clients, [max(1, n) for n in schema_row["completion_tokens"]],
                                       False, s.url + "/metrics", ignore_eos=True))
            schema_row["matched"] = matched
            schema_row["free_tok_s"] = plain["tok_s"] if plain else float("nan")
            print(schema_row, file=sys.stderr)
    backend.engine.shutdown()
    base = None if a.no_baseline else naive_baseline(a.baseline_requests, a.max_tokens)

    print(f"\nServing benchmark, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {a.threads} threads, max_tokens {a.max_tokens}\n")
    print("| clients | output tok/s | TTFT p50 (s) | TTFT p95 (s) | ITL p50 (ms) | ITL p95 (ms) |" +
          (" vs naive |" if base else ""))
    print("|---|---|---|---|---|---|" + ("---|" if base else ""))
    for r in rows:
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
              f"{1000 * r['itl_p50']:.0f} | {1000 * r['itl_p95']:.0f} |" + (f" {r['tok_s'] / base:.1f}x |" if base else ""))
    if base:
        print(f"\nNaive baseline (transformers generate, one request at a time): {base:.1f} output tok/s")
    if schema_row:
        m, n = schema_row["matched"], schema_row["clients"]
        cost = 1 - schema_row["tok_s"] / m["tok_s"]
        mean_len = statistics.mean(schema_row["completion_tokens"])
        print(f"\nJSON-schema constrained decoding at {n} clients (answers of {mean_len:.0f} tokens on average):\n")
        print("| run | output tok/s | TTFT p50 (s) | ITL p50 (ms) | ITL p95 (ms) |\n|---|---|---|---|---|")
        for name, r in (("JSON schema", schema_row), ("unconstrained, same lengths", m)):
            print(f"| {name} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {1000 * r['itl_p50']:.0f} | {1000 * r['itl_p95']:.0f} |")
        print(f"\nCost of the grammar (same prompts and output lengths): {100 * cost:.1f}% throughput. "
              f"Unconstrained with free lengths ({a.max_tokens} max tokens): {schema_row['free_tok_s']:.1f} tok/s.")
    if a.json_line:
        keep = ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")
        print(json.dumps({f"clients_{r['clients']}": {k: r[k] for k in keep} for r in rows}))


if __name__ == "__main__":
    main()
