"""A deterministic stand-in for a ``Transformer``, for engine and server tests and benchmarks.

``FakeModel`` has the model's serving interface (``config``, ``device``,
``new_cache``, ``forward(idx, cache, input_lengths, last_only)``) and real cache
bookkeeping, but no weights: the next token of a row at position ``p`` is the byte of
``ALPHABET[p % 26]``, so a stream's text is known in advance. ``step_seconds`` makes every
forward take that long (load without a model's cost); ``hang`` (a ``threading.Event``
that is clear) blocks the forward until it is set, which is how a stuck engine is simulated.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lmstack.model.kv_cache import KVCache

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class FakeConfig:
    vocab_size: int = 320
    block_size: int = 4096


class FakeModel:
    def __init__(self, vocab_size: int = 320, block_size: int = 4096, step_seconds: float = 0.0):
        self.config = FakeConfig(vocab_size, block_size)
        self.device = torch.device("cpu")
        self.step_seconds = step_seconds
        self.hang: Optional[threading.Event] = None
        self.calls = 0

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        return KVCache(1, batch_size, 1, max_len or self.config.block_size, 1)

    def __call__(self, idx: torch.Tensor, cache: KVCache, input_lengths: Sequence[int], last_only: bool = True):
        if self.hang is not None:
            self.hang.wait()
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.calls += 1
        B, T = idx.shape
        pos = cache.begin(T, input_lengths)  # (B, T)
        cache.end()
        last = pos[:, 0] + torch.tensor([max(n, 1) - 1 for n in input_lengths])  # position of the last real token
        nxt = torch.tensor([ord(ALPHABET[int(p + 1) % 26]) for p in last])
        logits = torch.full((B, 1, self.config.vocab_size), -10.0)
        logits[torch.arange(B), 0, nxt] = 10.0
        return logits


def expected_text(prompt_len: int, n: int) -> str:
    """The text ``FakeModel`` generates after a prompt of ``prompt_len`` tokens, ``n`` tokens long."""
    return "".join(ALPHABET[(prompt_len + i) % 26] for i in range(n))
