"""The one generation loop: prefill, then decode, as a Python generator of token events.

``stream_generate`` takes a batch of prompts (token ids, any lengths) and yields a
``TokenEvent`` per row per step: the token, its text delta (never a broken UTF-8
character), and a finish reason on the row's last event. The CLI, the ``LLM`` API, the
evaluators and the server all consume it. Rows of different lengths share one ``KVCache``
with per-row lengths, so no left padding changes positions: batched greedy output equals
one-by-one output.

Stop strings are matched on the decoded text: text that could be the start of a stop
string is held back until it is known not to be one, and the stop string itself is never
emitted (OpenAI semantics). ``beam_search`` is the non-streaming alternative.
Deliberately left out here: continuous batching (the serving engine), speculative decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from lmstack.errors import LMStackError
from lmstack.infer.sampling import SamplingParams, draw, make_generators, process_logits


@dataclass
class TokenEvent:
    row: int
    token_id: Optional[int]  # None on a final event that only carries flushed text
    text: str  # the text delta for this row ("" while held back)
    finish_reason: Optional[str] = None  # "stop" | "length" on the row's last event
    logprob: Optional[float] = None


class StopMatcher:
    """Holds back text that may begin a stop string; finds the earliest full stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stop_ids(tokenizer, params: SamplingParams) -> set[int]:
    """Token ids that end a row: the request's own, plus the tokenizer's unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if tokenizer is not None and not params.ignore_eos:
        ids |= set(tokenizer.stop_token_ids)
    return ids


@torch.inference_mode()
def stream_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Optional[Sequence[Optional[int]]] = None,
) -> Iterator[TokenEvent]:
    """Yield ``TokenEvent`` s for a batch of prompts until every row has finished."""
    B = len(prompts)
    if B == 0:
        return
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise LMStackError("cannot generate from an empty prompt (0 tokens); give at least one token")
    block = model.config.block_size
    if max(lens) >= block:
        raise LMStackError(f"prompt of {max(lens)} tokens leaves no room in the context of {block} tokens")
    max_new = min(params.max_new_tokens, block - max(lens))
    if params.max_new_tokens == 0:
        for b in range(B):
            yield TokenEvent(b, None, "", "length")
        return
    device = model.device
    if seeds is None:
        seeds = [None if params.seed is None else params.seed + b for b in range(B)]
    gens = make_generators(list(seeds), device)
    stops = stop_ids(tokenizer, params)
    decoders = [tokenizer.decoder() if tokenizer is not None else None for _ in range(B)]
    matchers = [StopMatcher(params.stop) for _ in range(B)]
    seen = [torch.tensor(list(p), dtype=torch.long, device=device) for p in prompts]
    track_seen = params.repetition_penalty != 1.0

    cache = model.new_cache(B, max(lens) + max_new)
    idx = torch.zeros(B, max(lens), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    # Models often pad their vocabulary past the tokenizer's: never sample an undecodable id.
    n_valid = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
    logits = model(idx, cache=cache, input_lengths=lens, last_only=True)[:, -1].float()  # (B, V)
    active = [True] * B
    n_new = 0
    while True:
        if n_valid < logits.shape[-1]:
            logits[:, n_valid:] = float("-inf")
        logp = torch.log_softmax(logits, -1) if params.logprobs else None
        nxt = draw(process_logits(logits, params, seen), params, gens)  # (B,)
        n_new += 1
        toks = nxt.tolist()
        for b in range(B):
            if not active[b]:
                continue
            tok = toks[b]
            lp = float(logp[b, tok]) if logp is not None else None
            if tok in stops:
                active[b] = False
                tail, _ = matchers[b].feed(decoders[b].flush() if decoders[b] else "")
                yield TokenEvent(b, tok, tail + matchers[b].finish(), "stop", lp)
                continue
            if track_seen:
                seen[b] = torch.cat([seen[b], nxt[b : b + 1]])
            delta = decoders[b].push(tok) if decoders[b] else ""
            text, stopped = matchers[b].feed(delta)
            if stopped:
                active[b] = False
                yield TokenEvent(b, tok, text, "stop", lp)
            elif n_new >= max_new:
                active[b] = False
                tail, stopped = matchers[b].feed(decoders[b].flush() if decoders[b] else "")
                text += tail + ("" if stopped else matchers[b].finish())
                yield TokenEvent(b, tok, text, "stop" if stopped else "length", lp)
            else:
                yield TokenEvent(b, tok, text, None, lp)
        if not any(active):
            return
        step_lens = [1 if a else 0 for a in active]  # finished rows are fed but never advance
        logits = model(nxt[:, None], cache=cache, input_lengths=step_lens, last_only=True)[:, -1].float()


def generate_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams, tokenizer=None) -> list[list[int]]:
    """Generated token ids per prompt (the stop token, if any, included)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ev in stream_generate(model, tokenizer, prompts, params):
        if ev.token_id is not None:
            out[ev.row].append(ev.token_id)
    return out


@torch.inference_mode()
def beam_search(
    model,
    prompt: Sequence[int],
    num_beams: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    early_stopping: bool = False,
) -> list[tuple[list[int], float]]:
    """Beam search; returns up to ``num_beams`` (generated ids, score), best first.

    A hypothesis's score is its summed log-probability divided by
    ``generated_length ** length_penalty``. Without ``early_stopping`` the search ends when
    ``num_beams`` hypotheses are finished and no running beam can beat the worst of them.
    """
    if num_beams < 1:
        raise LMStackError(f"num_beams: got {num_beams}, expected >= 1")
    device = model.device
    eos = set(eos_token_ids)
    max_new_tokens = min(max_new_tokens, model.config.block_size - len(prompt))
    cache = model.new_cache(num_beams, len(prompt) + max_new_tokens)
    idx = torch.tensor([list(prompt)] * num_beams, dtype=torch.long, device=device)
    logits = model(idx, cache=cache, last_only=True)[:, -1].float()
    beam_scores = torch.full((num_beams,), float("-inf"), device=device)
    beam_scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[list[int], float]] = []

    def worst_finished() -> float:
        return min(s for _, s in finished) if len(finished) >= num_beams else float("-inf")

    for step in range(1, max_new_tokens + 1):
        V = logits.shape[-1]
        cand = (beam_scores[:, None] + torch.log_softmax(logits, -1)).view(-1)  # (num_beams * V,)
        top_scores, top_idx = torch.topk(cand, 2 * num_beams)
        new_src, new_tok, new_scores = [], [], []
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            src, tok = divmod(flat, V)
            if tok in eos:
                if rank < num_beams:
                    finished.append((beams[src] + [tok], score / (step ** length_penalty)))
                    finished.sort(key=lambda h: -h[1])
                    del finished[num_beams:]
                continue
            new_src.append(src)
            new_tok.append(tok)
            new_scores.append(score)
            if len(new_src) == num_beams:
                break
        beams = [beams[s] + [t] for s, t in zip(new_src, new_tok)]
        beam_scores = torch.tensor(new_scores, device=device)
        if len(finished) >= num_beams:
            best_running = max(new_scores) / (step ** length_penalty)
            if early_stopping or best_running <= worst_finished():
                break
        if step == max_new_tokens:
            break
        cache.reorder(new_src)
        logits = model(torch.tensor(new_tok, device=device)[:, None], cache=cache, last_only=True)[:, -1].float()
    for b, s in zip(beams, beam_scores.tolist()):
        finished.append((b, s / (len(b) ** length_penalty)))
    finished.sort(key=lambda h: -h[1])
    return finished[:num_beams]
