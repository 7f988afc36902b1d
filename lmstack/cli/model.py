"""Model commands: ``chat``, ``generate``, ``convert``, ``info``.

``chat`` without a prompt is an interactive session, as in ``ollama run``: Ctrl-C stops the
answer being written and keeps the session (the partial answer stays in the history, as the
user saw it); Ctrl-C twice at the prompt, Ctrl-D, ``/exit`` or ``/bye`` quit; ``/help`` lists
the commands. While an answer streams from a terminal, keys typed are not echoed into it, and
they are dropped before the next prompt (termios), so a half-typed line never mixes into the
answer or becomes the next question by accident.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from lmstack.cli._common import MODEL_HELP, add_threads_arg, load_llm, note_model
from lmstack.errors import LMStackError

CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (the --system prompt stays); also /clear",
    "/exit": "quit; also /bye, /quit, Ctrl-D, or Ctrl-C twice at the prompt",
}
_ALIASES = {"/clear": "/reset", "/bye": "/exit", "/quit": "/exit", "/?": "/help"}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults are left to SamplingParams (only the flags typed are passed), so they live in one place.
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="most tokens in the answer (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min_p x the top probability (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default 1.0: off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="write max-new-tokens tokens even past the end of the answer")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a fine-tuned PEFT adapter folder (e.g. RUN/adapter from `lmstack sft`) on top of --model")
    p.add_argument("--stats", action="store_true",
                   help="after the answer, print tokens, tokens/s and time to the first token (stderr)")
    add_threads_arg(p)


def _sampling(a) -> dict:
    """The sampling flags typed, checked now (before a slow model load) by building SamplingParams."""
    from lmstack.infer.sampling import SamplingParams

    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop,
              ignore_eos=a.ignore_eos)
    kw = {k: v for k, v in kw.items() if v is not None}
    SamplingParams(**kw)
    return kw


@contextlib.contextmanager
def _keys_held(tty: bool):
    """While an answer streams: no echo of typed keys, and whatever was typed is dropped at the
    end. Ctrl-C still interrupts (ISIG is left on)."""
    if not tty:
        yield
        return
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _answer(llm, prompt, sampling: dict, stats: bool) -> tuple[str, bool]:
    """Stream one answer to stdout; returns (text, stopped by Ctrl-C). ``prompt`` is text (raw
    completion) or token ids (a rendered chat)."""
    events = llm.stream_events([prompt], **sampling)
    t0 = time.perf_counter()
    t_first, n, text, stopped = None, 0, "", False
    try:
        with _keys_held(sys.stdin.isatty()):
            for ev in events:
                if ev.token_id is not None:
                    n += 1
                    t_first = t_first or time.perf_counter()
                if ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    text += ev.text
    except KeyboardInterrupt:
        stopped = True
    finally:
        events.close()
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stopped:
        print("[stopped]", file=sys.stderr)
    if stats:
        print(_stats_line(n, t0, t_first, t_end), file=sys.stderr)
    return text, stopped


def _stats_line(n: int, t0: float, t_first, t_end: float) -> str:
    """``[24 tokens, 31.2 tok/s, first token after 0.21 s]``: the rate is the decoding rate,
    after the first token (whose wait, the prompt's prefill, is shown apart)."""
    if not n:
        return "[0 tokens]"
    decode = t_end - t_first
    rate = (n - 1) / decode if n > 1 and decode > 0 else n / max(t_end - t0, 1e-9)
    return f"[{n} tokens, {rate:.1f} tok/s, first token after {t_first - t0:.2f} s]"


def _chat_help() -> str:
    lines = [f"  {c:<7} {h}" for c, h in CHAT_COMMANDS.items()]
    lines.append("  Ctrl-C while an answer is written stops it; the part written stays in the conversation.")
    return "\n".join(lines)


def _interactive(llm, a, sampling: dict) -> int:
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print("lmstack chat: type a message; /help lists the commands, Ctrl-D quits.", file=sys.stderr)
    interrupted = False  # the previous key at the prompt was Ctrl-C
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print(file=sys.stderr)
                return 0
            interrupted = True
            print("\n(Ctrl-C again, Ctrl-D or /exit to quit)", file=sys.stderr)
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            cmd = _ALIASES.get(cmd, cmd)
            if cmd == "/exit":
                return 0
            if cmd == "/reset":
                messages = list(system)
                print("history cleared", file=sys.stderr)
            elif cmd == "/help":
                print(_chat_help(), file=sys.stderr)
            else:
                print(f"unknown command {text.split()[0]}; /help lists them", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply, _ = _answer(llm, llm.chat_ids(messages), sampling, a.stats)
        except LMStackError as e:  # e.g. the conversation outgrew the context: the session goes on
            print(f"error: {e} (/reset starts over)", file=sys.stderr)
            reply = ""
        if reply:
            messages.append({"role": "assistant", "content": reply})
        else:  # stopped before a word: as if the question had not been asked
            messages.pop()


def cmd_chat(a) -> int:
    sampling = _sampling(a)
    llm = load_llm(a.model, a.adapter, a.dtype, a.threads)
    if not a.prompt:
        return _interactive(llm, a, sampling)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    messages.append({"role": "user", "content": " ".join(a.prompt)})
    _, stopped = _answer(llm, llm.chat_ids(messages), sampling, a.stats)
    return 130 if stopped else 0


def cmd_generate(a) -> int:
    sampling = _sampling(a)
    llm = load_llm(a.model, a.adapter, a.dtype, a.threads)
    _, stopped = _answer(llm, a.prompt, sampling, a.stats)
    return 130 if stopped else 0


def cmd_convert(a) -> int:
    from lmstack.infer.llm import LLM

    note_model(a.src)
    out = LLM.load(a.src).save(a.dst, format=a.to, dtype=a.dtype)
    print(f"wrote {a.to} checkpoint to {out}")
    return 0


def cmd_info(a) -> int:
    from lmstack.infer.llm import LLM

    note_model(a.model)
    info = LLM.load(a.model, dtype=a.dtype).info()
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
    p = sub.add_parser("chat", help="chat with a model (interactive when no prompt is given)",
                       description="Chat with a model. Without a prompt: an interactive session "
                                   "(/help lists its commands, Ctrl-C stops an answer, Ctrl-D quits).")
    p.add_argument("prompt", nargs="*", help="a question; omit for an interactive session")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    _sampling_args(p)
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
