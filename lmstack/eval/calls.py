"""The evaluated model's and the judge's calls, all through the output cache, and the progress
bar of a task.

``generate_all`` and ``loglikelihood_all`` send a task's requests in batches (the model's
``batch_size``) and store each batch's outputs as soon as it is done; ``CachedJudge`` puts a
judge model behind the same cache. A sampled row (temperature > 0) gets its own seed derived
from the run seed and the request (``row_seed``), so its text never depends on which rows
share its batch.

A task's bar (``progress_bar``, tqdm) counts items, not requests: a multiple-choice item asks
one log-likelihood per choice and a code problem ``n_samples`` completions, and the item
counts as done when its last request is. The bar is off when asked (``progress=False``) and
when stderr is not a terminal.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

from lmstack.errors import ConfigError
from lmstack.eval.cache import OutputCache, cache_key, cached_map
from lmstack.eval.items import render_prompt
from lmstack.eval.models import generate_texts


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` items; ``disable=None`` turns it off where stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=None if enabled else True)


def items_done(bar, item_of: Sequence[int]) -> Callable[[list[int]], None]:
    """A ``cached_map`` callback that advances ``bar`` by the items whose last request is done;
    request ``i`` serves item ``item_of[i]``."""
    left = Counter(item_of)

    def done(indices: list[int]) -> None:
        finished = 0
        for i in indices:
            left[item_of[i]] -= 1
            finished += left[item_of[i]] == 0
        bar.update(finished)

    return done


def _done(bar, item_of: Optional[Sequence[int]], n: int) -> Optional[Callable[[list[int]], None]]:
    return None if bar is None else items_done(bar, item_of if item_of is not None else range(n))


def model_id(model, cache: OutputCache) -> str:
    ident = getattr(model, "identity", None)
    if ident is None and cache.path is not None:
        raise ConfigError(f"{type(model).__name__} has no 'identity'; an output cache needs one to key outputs")
    return ident or f"uncached:{id(model)}"


def batch_size(model) -> int:
    return getattr(model, "batch_size", 8)


def row_seed(seed: int, payload: dict) -> int:
    """A sampled row's seed: a function of the run seed and the request only (not the batch)."""
    return int(cache_key(str(seed), "seed", payload)[:8], 16)


def generate_all(model, prompts: Sequence[str], max_new_tokens: int, temperature: float, chat: bool,
                 cache: OutputCache, seed: int = 0, sample_ids: Optional[Sequence[int]] = None,
                 bar=None, item_of: Optional[Sequence[int]] = None) -> list[str]:
    """Completions for every prompt through the cache (batched when the model supports it).
    ``bar`` counts items; prompt ``i`` serves item ``item_of[i]`` (default: item ``i``)."""
    sample_ids = sample_ids or [0] * len(prompts)
    payloads = [{"prompt": p, "chat": chat, "max_new_tokens": max_new_tokens, "temperature": temperature,
                 "seed": seed if temperature > 0 else None, "sample": k if temperature > 0 else 0}
                for p, k in zip(prompts, sample_ids)]

    def compute(batch: list[dict]) -> list[str]:
        seeds = [row_seed(seed, b) if temperature > 0 else None for b in batch]
        return generate_texts(model, [b["prompt"] for b in batch], max_new_tokens, temperature, seeds, chat)

    return cached_map(cache, model_id(model, cache), "generate", payloads, compute, batch_size(model),
                      _done(bar, item_of, len(prompts)))


def loglikelihood_all(model, requests: Sequence[tuple[str, str]], cache: OutputCache, bar=None,
                      item_of: Optional[Sequence[int]] = None) -> list[float]:
    """``log p(continuation | context)`` for every request through the cache; ``bar`` as ``generate_all``."""
    payloads = [{"context": c, "continuation": t} for c, t in requests]

    def compute(batch: list[dict]) -> list[float]:
        reqs = [(b["context"], b["continuation"]) for b in batch]
        if hasattr(model, "loglikelihood_batch"):
            return model.loglikelihood_batch(reqs)
        return [model.loglikelihood(c, t) for c, t in reqs]

    return cached_map(cache, model_id(model, cache), "loglikelihood", payloads, compute,
                      max(batch_size(model), 16), _done(bar, item_of, len(requests)))


def generate_answers(task, model, items: list, cache: OutputCache, progress: bool) -> tuple[list[str], list[str]]:
    """The task's prompt for each item and the model's answer (stripped), through the cache."""
    prompts = [render_prompt(task, it) for it in items]
    with progress_bar(len(items), task.name, progress) as bar:
        preds = generate_all(model, prompts, task.max_new_tokens, task.temperature, task.chat, cache, task.seed,
                             bar=bar)
    return prompts, [y.strip() for y in preds]


class CachedJudge:
    """A judge model behind the output cache: ``generate_batch``, ``option_probs`` and
    ``option_loglikelihoods`` answer from the cache when they can and store what the model
    computes, batch by batch."""

    def __init__(self, model, cache: OutputCache) -> None:
        self.model, self.cache = model, cache
        self.identity = model_id(model, cache)

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                       seeds: Optional[Sequence[Optional[int]]] = None, chat: bool = False) -> list[str]:
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        payloads = [{"prompt": p, "chat": chat, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "seed": s} for p, s in zip(prompts, seeds)]

        def compute(batch: list[dict]) -> list[str]:
            return generate_texts(self.model, [b["prompt"] for b in batch], max_new_tokens, temperature,
                                  [b["seed"] for b in batch], chat)

        return cached_map(self.cache, self.identity, "judge", payloads, compute, batch_size(self.model))

    def option_probs(self, prompt: str, options: Sequence[str], chat: bool = True) -> Optional[list[float]]:
        if not hasattr(self.model, "option_probs"):
            return None
        payload = {"prompt": prompt, "options": list(options), "chat": chat}
        return cached_map(self.cache, self.identity, "option_probs", [payload],
                          lambda batch: [self.model.option_probs(prompt, options, chat)], 1)[0]

    def option_loglikelihoods(self, prompts: Sequence[str], options: Sequence[str],
                              chat: bool = True) -> list[list[float]]:
        payloads = [{"prompt": p, "options": list(options), "chat": chat} for p in prompts]

        def compute(batch: list[dict]) -> list[list[float]]:
            return self.model.option_loglikelihoods([b["prompt"] for b in batch], options, chat)

        return cached_map(self.cache, self.identity, "option_loglikelihoods", payloads, compute,
                          batch_size(self.model))
