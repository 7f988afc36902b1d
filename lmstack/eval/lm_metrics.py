"""Model-based metrics: batched continuation log-likelihoods, perplexity / bits-per-byte with a
sliding window, and GPTScore.

Everything scores token ids with one forward per batch of right-padded rows: attention is
causal, so padding after a row's last token never changes the logits at its earlier positions.

* ``sliding_windows(n_tokens, window, stride)`` is the schedule of the Hugging Face
  perplexity guide ("Perplexity of fixed-length models"): windows of up to ``window`` tokens
  start every ``stride`` tokens, and each window scores only the tokens the previous windows
  have not scored, so with ``stride < window`` every token (after the first) is scored exactly
  once, with up to ``window - 1`` tokens of context. ``stride == window`` gives disjoint chunks
  whose first tokens go unscored (nothing in the chunk predicts them), as in the guide.
* perplexity ``PPL = exp(NLL / N)`` over the scored tokens of all texts (a corpus value);
  bits per byte ``BPB = NLL / (ln 2 * bytes)`` over the UTF-8 bytes of the texts (Gao et al.
  2020, "The Pile", sec. 4.1), which does not depend on the tokenizer. Without
  ``prefix_token`` the first token of each text has no context and is not scored, as in the
  guide; with it (e.g. BOS) every token is scored.
* GPTScore (Fu et al. 2023, eq. 2): ``GPTScore(h | d, a, S) = sum_t w_t log p(h_t | h_<t,
  T(d, a, S))`` with uniform weights ``w_t = 1 / |h|``: the mean token log-probability of the
  output ``h`` given a prompt built from the source ``d``.

Deliberately left out: KV-cache reuse across windows (each window is one fresh forward, as in
the guide, so results equal a reference model's loss on the same windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from lmstack.errors import ConfigError


@dataclass
class Scored:
    """Log-likelihood of one continuation: its sum, per-token values, and whether greedy decoding
    would have produced exactly these tokens (lm-evaluation-harness's ``is_greedy``)."""

    logprob: float
    token_logprobs: list[float]
    is_greedy: bool


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_target)`` per window: feed ``ids[begin:end]``, score its last ``n_target``
    tokens. Position 0 is never a target (nothing predicts it)."""
    if window < 2:
        raise ConfigError(f"perplexity: window={window}, expected >= 2 tokens")
    if not 1 <= stride <= window:
        raise ConfigError(f"perplexity: stride={stride}, expected 1 <= stride <= window ({window})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # tokens not scored before; a window's first token has no context inside it, so it is
        # never a target (with stride == window it goes unscored, as in the guide)
        n_target = min(end - prev_end, end - begin - 1)
        if n_target > 0:
            out.append((begin, end, n_target))
        prev_end = end
        if end == n_tokens:
            break
    return out


def score_token_rows(model, rows: Sequence[Sequence[int]], n_targets: Sequence[int], batch_size: int = 8,
                     pad_id: int = 0) -> list[Scored]:
    """Score the last ``n_targets[i]`` tokens of each row given the tokens before them.

    ``model(idx)`` must return logits ``(B, T, V)`` (``lmstack.model.Transformer`` does). Rows are
    sorted longest first so a batch pads little; results come back in input order.
    """
    import torch

    for r, n in zip(rows, n_targets):
        if not 1 <= n <= len(r) - 1:
            raise ConfigError(f"score: a row of {len(r)} tokens cannot score {n} target tokens "
                              "(needs at least one context token before them)")
    block = model.config.block_size
    if rows and max(len(r) for r in rows) > block:
        raise ConfigError(f"score: a row of {max(len(r) for r in rows)} tokens is longer than the model's "
                          f"context of {block}; use a sliding window")
    device = model.device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[Optional[Scored]] = [None] * len(rows)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            T = len(rows[chunk[0]])
            idx = torch.full((len(chunk), T), pad_id, dtype=torch.long, device=device)
            for b, i in enumerate(chunk):
                idx[b, : len(rows[i])] = torch.tensor(list(rows[i]), dtype=torch.long)
            logits = model(idx).float()  # (B, T, V)
            for b, i in enumerate(chunk):
                L, n = len(rows[i]), n_targets[i]
                pred = logits[b, L - n - 1: L - 1]  # (n, V): positions that predict the targets
                target = idx[b, L - n: L]  # (n,)
                logp = torch.log_softmax(pred, dim=-1)
                tok_lp = logp.gather(-1, target[:, None])[:, 0]
                out[i] = Scored(float(tok_lp.sum()), tok_lp.tolist(), bool((pred.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, split the way
    lm-evaluation-harness does: trailing spaces of the context move to the continuation, the
    whole string is encoded once, and the continuation is what follows the context's tokens."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return whole[: len(ctx)], whole[len(ctx):]


def _prefix_id(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return tid
    raise ConfigError("loglikelihood: the context is empty and the tokenizer has no BOS/EOS token to start from")


def loglikelihoods(llm, requests: Sequence[tuple[str, str]], batch_size: int = 8) -> list[Scored]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` pair, batched.

    An empty context is replaced by the tokenizer's BOS (else EOS) token, as lm-evaluation-harness
    does. Rows longer than the context window keep their last ``block_size`` tokens.
    """
    tok = llm.tokenizer
    rows, n_targets = [], []
    for ctx, cont in requests:
        c_ids, t_ids = encode_pair(tok, ctx, cont)
        if not t_ids:
            raise ConfigError(f"loglikelihood: continuation {cont!r} encodes to no tokens")
        if not c_ids:
            c_ids = [_prefix_id(tok)]
        row = (c_ids + t_ids)[-(llm.config.block_size):]
        rows.append(row)
        n_targets.append(min(len(t_ids), len(row) - 1))
    return score_token_rows(llm.model, rows, n_targets, batch_size)


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll: float  # summed negative log-likelihood in nats
    n_tokens: int  # tokens scored
    n_bytes: int  # UTF-8 bytes of the texts
    per_text_nll: list[float]
    per_text_tokens: list[int]


def perplexity(llm, texts: Sequence[str], window: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = 8, prefix_token: Optional[int] = None) -> PerplexityResult:
    """Corpus perplexity and bits per byte of ``texts`` under ``llm`` (see the module docstring).

    ``window`` defaults to the model's context, ``stride`` to ``window // 2``.
    """
    window = window or llm.config.block_size
    if window > llm.config.block_size:
        raise ConfigError(f"perplexity: window={window} exceeds the model's context of {llm.config.block_size}")
    stride = stride or max(1, window // 2)
    if not texts:
        raise ConfigError("perplexity: no texts")
    rows, n_targets, owner = [], [], []
    per_tokens = []
    for i, text in enumerate(texts):
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        if prefix_token is not None:
            ids = [prefix_token] + ids
        spans = sliding_windows(len(ids), window, stride)
        per_tokens.append(sum(n for _, _, n in spans))
        for begin, end, n in spans:
            rows.append(ids[begin:end])
            n_targets.append(n)
            owner.append(i)
    scored = score_token_rows(llm.model, rows, n_targets, batch_size)
    per_nll = [0.0] * len(texts)
    for i, s in zip(owner, scored):
        per_nll[i] -= s.logprob
    nll, n_tok = sum(per_nll), sum(per_tokens)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_tok == 0:
        raise ConfigError("perplexity: the texts have no token to score (each needs at least 2 tokens, "
                          "or pass prefix_token)")
    return PerplexityResult(math.exp(nll / n_tok), nll / (math.log(2) * n_bytes), nll, n_tok, n_bytes,
                            per_nll, per_tokens)


GPTSCORE_TEMPLATE = "{source}\n"


def gpt_score(llm, sources: Sequence[str], outputs: Sequence[str], template: str = GPTSCORE_TEMPLATE,
              batch_size: int = 8) -> list[float]:
    """GPTScore per item: mean token log-probability of ``outputs[i]`` given
    ``template.format(source=sources[i])`` (Fu et al. 2023, eq. 2, uniform weights). Higher is
    better; values are <= 0."""
    if len(sources) != len(outputs):
        raise ConfigError(f"gpt_score: {len(sources)} sources but {len(outputs)} outputs")
    scored = loglikelihoods(llm, [(template.format(source=s), o) for s, o in zip(sources, outputs)], batch_size)
    return [s.logprob / len(s.token_logprobs) for s in scored]
