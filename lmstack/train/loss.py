"""The output projection and cross-entropy fused, in vocabulary chunks.

``linear_cross_entropy(h, weight, targets)`` is ``F.cross_entropy(h @ weight.T, targets,
reduction="sum")`` without the ``(N, vocab)`` logits ever existing: the forward walks the
vocabulary ``chunk`` rows at a time and keeps a running log-sum-exp per token (the online
softmax normaliser of Milakov & Gimelshein 2018), and the backward walks it again,
recomputing each chunk of logits to form its slice of ``softmax - onehot``. Memory is one
``(N, chunk)`` block instead of the logits, their log-softmax and their gradient; the price
is one more ``(N, C) x (C, vocab)`` matmul per step. A quantised table (``QuantEmbedding``,
a tied QLoRA output projection) is read the same way, one dequantised chunk at a time.

When the table is frozen (LoRA, QLoRA, any PEFT method) the gradient of ``h`` is the only
one wanted, and it is formed in the forward's single walk instead: ``d loss / d h =
softmax(z) W - W[target]``, and ``softmax(z) W`` accumulates chunk by chunk with the same
running rescaling as the normaliser (the output accumulation of flash attention, Dao et al.
2022, with the table in the role of the values). Two matmuls per chunk instead of three, and
the backward only scales the saved ``(N, C)`` gradient.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, like
``F.linear`` followed by ``logits.float()``. Deliberately left out: label smoothing, z-loss
and token chunking (the loss only sees target positions, so N stays small).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Rows = Callable[[int, int, torch.dtype], torch.Tensor]  # (start, end, dtype) -> (end - start, C)


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype under autocast, else ``h``'s."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _chunk(weight: Optional[torch.Tensor], rows: Optional[Rows], a: int, b: int, dt: torch.dtype) -> torch.Tensor:
    return weight[a:b].to(dt) if weight is not None else rows(a, b, dt)


def vocab_walk(h: torch.Tensor, weight: Optional[torch.Tensor], rows: Optional[Rows], targets: torch.Tensor,
               vocab_size: int, chunk: int, dt: torch.dtype, accumulate: bool):
    """One walk over the vocabulary, ``chunk`` rows at a time: ``(lse (N,), target_logit (N,),
    acc, w_target)`` with ``lse`` the log-sum-exp of each token's logits (online rescaling).
    With ``accumulate``, ``acc = softmax(z) W`` and ``w_target = W[target]`` (both ``(N, C)``,
    fp32) come out of the same walk; otherwise both are None."""
    hc = h.to(dt)
    n = h.shape[0]
    m = torch.full((n,), float("-inf"), device=h.device)  # running max of each token's logits
    s = torch.zeros(n, device=h.device)  # running sum of exp(logit - m)
    target_logit = torch.zeros(n, device=h.device)
    acc = torch.zeros(h.shape, device=h.device) if accumulate else None  # sum_j exp(z_j - m) W_j
    w_target = torch.zeros(h.shape, device=h.device) if accumulate else None
    for a in range(0, vocab_size, chunk):
        b = min(vocab_size, a + chunk)
        w = _chunk(weight, rows, a, b, dt)  # (b - a, C)
        z = (hc @ w.t()).float()  # (N, b - a)
        m_new = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * rescale + e.sum(dim=1)
        m = m_new
        inside = (targets >= a) & (targets < b)
        picked = z.gather(1, (targets - a).clamp(0, b - a - 1)[:, None])[:, 0]
        target_logit = torch.where(inside, picked, target_logit)
        if accumulate:
            acc.mul_(rescale[:, None]).add_((e.to(dt) @ w).float())
            w_target[inside] = w[targets[inside] - a].float()
    if accumulate:
        acc.div_(s[:, None])
    return m + s.log(), target_logit, acc, w_target


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows: Optional[Rows], vocab_size: int, chunk: int, dt: torch.dtype):
        # Frozen table, gradient wanted for h only: d loss / d h = softmax(z) W - W[target] from the one walk.
        one_pass = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        lse, target_logit, acc, w_target = vocab_walk(h, weight, rows, targets, vocab_size, chunk, dt, one_pass)
        if one_pass:
            ctx.save_for_backward(acc.sub_(w_target))  # d loss / d h, (N, C)
        else:
            ctx.save_for_backward(h, weight, targets, lse)
        ctx.one_pass, ctx.h_dtype = one_pass, h.dtype
        ctx.rows, ctx.vocab_size, ctx.chunk, ctx.dt = rows, vocab_size, chunk, dt
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad):
        if ctx.one_pass:
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad).to(ctx.h_dtype), None, None, None, None, None, None
        h, weight, targets, lse = ctx.saved_tensors
        rows, vocab_size, chunk, dt = ctx.rows, ctx.vocab_size, ctx.chunk, ctx.dt
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hc = h.to(dt)
        grad_h = torch.zeros(h.shape, device=h.device) if want_h else None
        grad_w = torch.empty_like(weight) if want_w else None
        tokens = torch.arange(h.shape[0], device=h.device)
        for a in range(0, vocab_size, chunk):
            b = min(vocab_size, a + chunk)
            w = _chunk(weight, rows, a, b, dt)  # (b - a, C)
            p = torch.exp((hc @ w.t()).float() - lse[:, None])  # softmax, (N, b - a)
            inside = (targets >= a) & (targets < b)
            p[tokens[inside], targets[inside] - a] -= 1.0
            g = (p * grad).to(dt)  # d loss / d logits
            if want_h:
                grad_h += (g @ w).float()
            if want_w:
                grad_w[a:b] = (g.t() @ hc).to(weight.dtype)
        return (grad_h.to(h.dtype) if want_h else None), grad_w, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor,
                         chunk: int = 4096, rows: Optional[Rows] = None,
                         vocab_size: Optional[int] = None) -> torch.Tensor:
    """Sum over the N tokens of ``-log softmax(h @ weight.T)[target]``.

    ``h`` is ``(N, C)``, ``targets`` ``(N,)`` (no ignored positions: select them first).
    Pass a dense ``weight`` ``(vocab, C)`` (it gets a gradient when it requires one), or
    ``weight=None`` with ``rows(start, end, dtype)`` and ``vocab_size`` for a frozen table
    read in slices (``QuantEmbedding.rows``).
    """
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be positive, got {chunk}")
    if weight is not None:
        vocab_size = weight.shape[0]
    elif rows is None or vocab_size is None:
        raise ValueError("linear_cross_entropy: pass a weight, or rows and vocab_size")
    return _LinearCrossEntropy.apply(h, weight, targets, rows, vocab_size, chunk, compute_dtype(h))
