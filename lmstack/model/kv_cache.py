"""An explicit key/value cache, passed to ``Transformer.forward``.

Layout: one preallocated ``(B, n_kv_head, max_len, head_dim)`` tensor per layer for keys and
one for values, plus ``lengths[b]``: how many positions of row ``b`` are valid. Rows advance
independently, so a batch of prompts of different lengths needs no left padding: row ``b``
writes its next tokens at ``lengths[b]`` and its rotary/learned positions start there, which
is exactly what it would see alone. ``rollback(n)`` forgets the last ``n`` positions (for
speculative decoding: drop rejected draft tokens); stale entries beyond ``lengths`` are
never attended to and are overwritten by later writes.

A forward uses it as ``begin`` (positions of the new tokens), then per layer ``update``
(write k/v, read every visible key) and ``attention_mask`` (what the queries may see), then
``end`` (or ``abort`` if it failed).

Deliberately left out: paging / block tables (the serving engine manages slots on top of
this), cache quantisation, and eviction policies.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lmstack.errors import LMStackError


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sliding_window: Optional[int] = None,
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.sliding_window = sliding_window
        self.lengths: list[int] = [0] * batch_size  # valid positions per row
        self._step: Optional[dict] = None  # per-forward scratch: positions, mask, write slots

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def rollback(self, n: int | Sequence[int]) -> None:
        """Forget the last ``n`` positions (an int for every row, or one count per row)."""
        ns = [n] * self.batch_size if isinstance(n, int) else list(n)
        if len(ns) != self.batch_size:
            raise ValueError(f"rollback: got {len(ns)} counts for a batch of {self.batch_size}")
        for b, k in enumerate(ns):
            if k < 0 or k > self.lengths[b]:
                raise ValueError(f"rollback: row {b} has {self.lengths[b]} positions, cannot drop {k}")
            self.lengths[b] -= k

    def rows(self, n: int) -> "KVCache":
        """A cache over rows ``0..n-1`` that shares storage with this one (writes go through).

        Its ``lengths`` list is its own: copy it back after a forward
        (``cache.lengths[:n] = view.lengths``). A serving engine uses this to run only the
        occupied prefix of its slots.
        """
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.max_len, view.batch_size, view.sliding_window = self.max_len, n, self.sliding_window
        view.lengths, view._step = self.lengths[:n], None
        return view

    def reorder(self, src: Sequence[int]) -> None:
        """Row ``b`` becomes a copy of row ``src[b]`` (beam search keeps the surviving beams)."""
        index = torch.tensor(list(src), device=self.device)
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, index)
            self.v[layer] = self.v[layer].index_select(0, index)
        self.lengths = [self.lengths[i] for i in src]

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        for b in rows if rows is not None else range(self.batch_size):
            self.lengths[b] = 0

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- used by the model's forward --------------------------------------------------------
    def begin(self, T: int, input_lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Prepare a forward of ``T`` new tokens per row; returns positions ``(B, T)``.

        ``input_lengths[b]`` (default ``T``) says how many of row b's T tokens are real; the
        rest are right padding, written but not counted, so the next write overwrites them.
        """
        B = self.batch_size
        lens = self.lengths
        if max(lens) + T > self.max_len:
            raise LMStackError(
                f"context length exceeded: {max(lens)} cached + {T} new tokens > cache size {self.max_len}"
            )
        dev = self.device
        start = torch.tensor(lens, device=dev)
        pos = start[:, None] + torch.arange(T, device=dev)[None, :]  # (B, T)
        uniform = all(x == lens[0] for x in lens)
        S = max(lens) + T  # keys visible to this forward
        mask = None
        window = self.sliding_window
        if not (uniform and T == 1 and (window is None or S <= window)) and not (
            uniform and lens[0] == 0 and (window is None or S <= window)
        ):
            key = torch.arange(S, device=dev)[None, None, :]  # (1, 1, S)
            q = pos[:, :, None]  # (B, T, 1)
            mask = key <= q
            if window is not None:
                mask = mask & (key > q - window)
            mask = mask[:, None, :, :]  # (B, 1, T, S)
        self._step = {
            "uniform": uniform,
            "start": lens[0] if uniform else None,
            "index": None if uniform else pos[:, None, :, None],  # (B, 1, T, 1)
            "S": S,
            "T": T,
            "causal": uniform and lens[0] == 0 and T > 1 and mask is None,
            "mask": mask,
            "input_lengths": list(input_lengths) if input_lengths is not None else [T] * B,
        }
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k/v ``(B, n_kv_head, T, head_dim)`` and return all visible keys."""
        st = self._step
        kc, vc = self.k[layer], self.v[layer]
        if st["uniform"]:
            s0 = st["start"]
            kc[:, :, s0 : s0 + st["T"]] = k
            vc[:, :, s0 : s0 + st["T"]] = v
        else:
            idx = st["index"].expand(-1, k.shape[1], -1, k.shape[3])
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
        return kc[:, :, : st["S"]], vc[:, :, : st["S"]]

    def attention_mask(self) -> tuple[Optional[torch.Tensor], bool]:
        """How this forward's queries see the keys ``update`` returns: ``(mask, causal)``.

        ``mask`` is ``(B, 1, T, S)`` bool (True = visible), or None when every query sees every
        key up to its own position without one: one new token per row over equal lengths, or a
        first forward from empty rows, where ``causal`` says to let SDPA mask causally itself.
        """
        st = self._step
        return st["mask"], st["causal"]

    def end(self) -> None:
        """Count this forward's real tokens (``input_lengths``) into ``lengths``."""
        for b, n in enumerate(self._step["input_lengths"]):
            self.lengths[b] += n
        self._step = None

    def abort(self) -> None:
        """Drop a forward that failed after ``begin``: ``lengths`` stay as they were, and the
        positions it may have written are beyond them, so later writes overwrite them."""
        self._step = None
