"""What the commands that run a model share: the ``--model`` help, ``--threads``, and loading a
model (with an optional PEFT adapter, through ``LLM.load`` as every command does).

Nothing here imports torch at module level: ``lmstack --help`` builds every parser and must
stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

MODEL_HELP = ("'default' (the embedded SmolLM2-135M-Instruct; also when omitted), a model folder "
              "(native or Hugging Face), a .gguf file, or a preset name (random weights, e.g. tiny-llama)")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= 1")
    return n


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for the model (default: torch's choice, usually one per core)")


def set_threads(n: Optional[int]) -> None:
    """``torch.set_num_threads(n)``; the CPU decoding kernels read the same count on every call."""
    if n:
        import torch

        torch.set_num_threads(n)


def note_model(name) -> None:
    """Say on stderr when ``name`` loads random weights (a preset), so nobody mistakes its babble
    for the trained model."""
    from lmstack.infer.llm import random_preset_note

    note = random_preset_note(name)
    if note:
        print(note, file=sys.stderr)


def load_llm(model: Optional[str], adapter: Optional[str] = None, dtype: Optional[str] = None,
             threads: Optional[int] = None):
    """The ``LLM`` for ``--model`` (None: the embedded default) with ``--adapter`` attached."""
    set_threads(threads)
    note_model(model)
    from lmstack.infer.llm import LLM

    return LLM.load(model, dtype=dtype, adapter=adapter)
