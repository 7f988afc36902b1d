"""Sampling parameters and the pure functions that turn next-token logits into a token.

Order of operations (the same as Hugging Face's default logits processors): repetition
penalty, temperature, top-k, top-p, min-p, then a draw. ``temperature == 0`` is greedy.
Each row draws from its own seeded ``torch.Generator``, so a row's samples depend only on
its own seed and logits: batched sampling equals one-by-one sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lmstack.errors import ConfigError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Keskar et al. 2019 (CTRL), sec. 4.1
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        def bad(name, expected):
            raise ConfigError(f"sampling.{name}: got {getattr(self, name)!r}, expected {expected}")

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "a number in [0, 100]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a number in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            bad("min_p", "a number in [0, 1)")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "a number > 0 (1 disables it)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by ``penalty``.

    logits: (B, V); seen[b]: 1-D LongTensor of token ids of row b (prompt and generated).
    """
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for b, ids in enumerate(seen):
        if ids.numel() == 0:
            continue
        vals = logits[b, ids]
        logits[b, ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set with mass >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the top token always stays (even when p underflows in fp32)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens with prob < min_p * max prob."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    thresh = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < thresh, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: list[torch.Tensor]) -> torch.Tensor:
    """All logit transforms for a (B, V) fp32 tensor; returns the filtered logits."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def make_generators(seeds: list[Optional[int]], device) -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        if s is None:
            g.seed()
        else:
            g.manual_seed(int(s))
        gens.append(g)
    return gens


def draw(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token ids (B,) from processed logits (B, V)."""
    if params.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
