"""Prefix tuning (Li & Liang 2021): trainable key/value vectors prepended in every layer.

Each attention layer gets ``n_prefix`` learned keys and values per kv head that every query
can attend to; the model's own weights stay frozen. ``PrefixAttention`` replaces an
``Attention`` module and adopts its ``q/k/v/o_proj`` children under the same names, so the
checkpoint keys do not change; ``prefix_k``/``prefix_v`` are new. The prefix keys are learned
directly in the rotated space (rotary positions are applied to the model's own keys only):
a learned vector absorbs any fixed rotation. Deliberately left out: the paper's MLP
reparameterisation of the prefix during training (plain parameters train stably at this size)
and sliding-window attention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UnsupportedError
from lmstack.model.kv_cache import KVCache
from lmstack.model.model import Attention, project_qkv


class PrefixAttention(nn.Module):
    peft_params = ("prefix_k", "prefix_v")

    def __init__(self, attn: Attention, n_prefix: int):
        super().__init__()
        if attn.sliding_window is not None:
            raise UnsupportedError("prefix tuning does not support sliding-window attention")
        self.layer = attn.layer
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.sliding_window = None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        p = attn.o_proj.weight
        self.n_prefix = n_prefix
        # Drawn on the CPU, then moved: one seed gives the same prefix on every device.
        self.prefix_k = nn.Parameter((torch.randn(self.n_kv_head, n_prefix, self.head_dim, dtype=p.dtype) * 0.02)
                                     .to(p.device))
        self.prefix_v = nn.Parameter(torch.zeros(self.n_kv_head, n_prefix, self.head_dim, device=p.device,
                                                 dtype=p.dtype))
        self.disabled = False

    def forward(self, x: torch.Tensor, rope, cache: Optional[KVCache],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, rope)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
            S = k.shape[2]
            mask, _ = cache.attention_mask()  # (B, 1, T, S), or None: every query sees the keys up to its own
            if mask is None:  # uniform rows: T new queries at positions S-T..S-1
                i = torch.arange(S - T, S, device=x.device)[:, None]
                mask = (torch.arange(S, device=x.device)[None, :] <= i)[None, None]  # (1, 1, T, S)
        elif mask is None:
            i = torch.arange(T, device=x.device)
            mask = (i[None, :] <= i[:, None])[None, None]  # (1, 1, T, T)
        if not self.disabled:
            P = self.n_prefix
            pk = self.prefix_k.to(k.dtype)[None].expand(B, -1, -1, -1)  # (B, nkv, P, hd)
            pv = self.prefix_v.to(v.dtype)[None].expand(B, -1, -1, -1)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nkv, P+S, hd)
            ones = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=x.device)
            mask = torch.cat([ones, mask], dim=-1)  # (B|1, 1, T, P+S)
        rep = self.n_head // self.n_kv_head
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
