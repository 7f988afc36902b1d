"""Model commands: ``chat``, ``generate``, ``convert``, ``info``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmstack.infer.sampling import SamplingParams

MODEL_HELP = "preset name, model folder (native or Hugging Face) or .gguf file; default: the embedded SmolLM2-135M-Instruct"


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    d = SamplingParams()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--min-p", type=float, default=d.min_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])


def _sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _load(a):
    from lmstack.infer.llm import LLM

    return LLM.load(a.model, dtype=a.dtype)


def _stream_to_stdout(chunks, stats: bool) -> str:
    t0, n, text = time.perf_counter(), 0, ""
    for delta in chunks:
        sys.stdout.write(delta)
        sys.stdout.flush()
        text += delta
        n += 1
    sys.stdout.write("\n")
    if stats:
        dt = time.perf_counter() - t0
        print(f"[{n} chunks in {dt:.2f}s]", file=sys.stderr)
    return text


def cmd_chat(a) -> int:
    llm = _load(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    if a.prompt:
        messages.append({"role": "user", "content": " ".join(a.prompt)})
        _stream_to_stdout(llm.chat_stream(messages, **_sampling(a)), a.stats)
        return 0
    print("lmstack chat: type a message, /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_to_stdout(llm.chat_stream(messages, **_sampling(a)), a.stats)
        messages.append({"role": "assistant", "content": reply})


def cmd_generate(a) -> int:
    llm = _load(a)
    _stream_to_stdout(llm.stream(a.prompt, **_sampling(a)), a.stats)
    return 0


def cmd_convert(a) -> int:
    from lmstack.infer.llm import LLM

    llm = LLM.load(a.src)
    out = llm.save(a.dst, format=a.to, dtype=a.dtype)
    print(f"wrote {a.to} checkpoint to {out}")
    return 0


def cmd_info(a) -> int:
    llm = _load(a)
    info = llm.info()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k.endswith("bytes") or k == "kv_bytes_per_token":
            v = f"{v / 2**20:.1f} MiB" if v > 2**20 else f"{v / 1024:.1f} KiB"
        elif k == "params":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k:>20}: {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (interactive when no prompt is given)")
    p.add_argument("prompt", nargs="*", help="a question; omit for an interactive session")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print timing to stderr")
    _sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stats", action="store_true")
    _sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert a model to the native or Hugging Face format")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--to", choices=["native", "hf"], default="native")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="architecture, parameter count and memory of a model")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_info)
