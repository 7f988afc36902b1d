"""Rollouts for online RL (GRPO, PPO): sample ``G`` completions per prompt with the serving
engine, over the weights that are being trained.

    roll = sample(model, tok, prompt_ids, num_generations=8,
                  params=SamplingParams(max_new_tokens=96, temperature=1.0), seed=step_seed)
    roll.completion_ids[k]   # completion k belongs to prompt k // 8

The policy's own module object runs inside ``lmstack.infer.engine.Engine`` (continuous
batching over a slot KV cache): no weight copy, no export, so a sample always reflects the
last optimizer step. The engine works without gradients (``inference_mode``) and the model
is put in eval mode for the call and restored after it. PEFT modules keep their own forward
under the engine: ``lmstack.model.fast`` only swaps modules whose type is exactly the plain
one, and a ``LoRALinear`` without gradients takes its unfused ``W0 x + s B A x`` path, so
every sampled token sees the current adapter.

Completion ``k`` draws from its own generator seeded ``seed + k`` (the engine's per-request
seeds), which is the seed ``LLM.generate`` gives row ``k`` of a batch: the same seed on the
same weights gives the same tokens, and a resumed run that derives ``seed`` from the step
samples what the uninterrupted run sampled. A completion keeps its stop token (its
probability is trained like any other token's). Deliberately left out: prefix sharing
between the ``G`` copies of a prompt (each prefills it) and sampling in a second process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmstack.errors import LMStackError
from lmstack.infer.sampling import SamplingParams


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # (P,) prompts
    completion_ids: list[list[int]]  # (P * G,) completions; k belongs to prompt k // G
    texts: list[str]  # the decoded completions (without the stop token's text)
    finish_reasons: list[str]  # stop | length
    num_generations: int
    seconds: float  # wall time of the sampling call

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sample(model, tokenizer, prompt_ids: list[list[int]], num_generations: int, params: SamplingParams,
           seed: int = 0, max_slots: int = 64) -> Rollout:
    """``num_generations`` completions of every prompt, through a fresh ``Engine`` over
    ``model`` (the live weights); completion ``k`` is seeded ``seed + k``."""
    from lmstack.infer.engine import Engine, EngineConfig, EngineRequest

    if num_generations < 1:
        raise LMStackError(f"num_generations: got {num_generations}, expected >= 1")
    if not prompt_ids:
        raise LMStackError("rollout: no prompts to sample from")
    block = model.config.block_size
    n = len(prompt_ids) * num_generations
    longest = max(len(p) for p in prompt_ids)
    if longest + 1 > block:
        raise LMStackError(f"rollout: a prompt of {longest} tokens leaves no room in the context of {block} tokens")
    cfg = EngineConfig(max_slots=min(n, max_slots), max_seq_len=min(block, longest + max(1, params.max_new_tokens)),
                       token_budget=max(256, min(n, max_slots) * 2), prefill_chunk=max(1, min(128, longest)),
                       max_queue=n)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    engine = Engine(model, tokenizer, cfg).start()
    try:
        handles = []
        for k in range(n):
            p = SamplingParams(**{**params.__dict__, "seed": seed + k})
            handles.append(engine.submit(EngineRequest(list(prompt_ids[k // num_generations]), p)))
        ids, texts, reasons = [], [], []
        for h in handles:
            toks, text, reason = [], "", "length"
            for out in h:
                if out.token_id is not None:
                    toks.append(out.token_id)
                text += out.text
                if out.finish_reason is not None:
                    reason = out.finish_reason
            if reason not in ("stop", "length"):
                raise LMStackError(f"rollout: sampling ended with {reason!r}"
                                   + (f" ({engine.error})" if engine.error is not None else ""))
            ids.append(toks)
            texts.append(text)
            reasons.append(reason)
    finally:
        engine.shutdown()
        model.train(was_training)
    return Rollout([list(p) for p in prompt_ids], ids, texts, reasons, num_generations, time.perf_counter() - t0)
