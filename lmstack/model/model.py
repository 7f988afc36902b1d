"""The decoder-only transformer every lmstack stage shares.

One module, driven by ``ModelConfig`` switches: positions (learned / rotary / sinusoidal /
none), norm (LayerNorm / RMSNorm), MLP (GELU / SwiGLU), ``n_kv_head`` (MHA / GQA / MQA),
biases, tied embeddings, sliding-window attention. Attention goes through
``F.scaled_dot_product_attention`` so fused kernels are used where the device has them.

The model is stateless: a ``KVCache`` is passed to ``forward`` by the caller (generation,
serving, speculative decoding). Parameter names are the native checkpoint keys:

    tok_emb.weight, pos_emb.weight (learned positions only)
    blocks.{i}.attn_norm.{weight,bias}, blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias}
    blocks.{i}.mlp_norm.{weight,bias}, blocks.{i}.mlp.{gate,up,down}_proj.{weight,bias}
    norm.{weight,bias}, lm_head.weight (untied embeddings only)

Rotary embeddings use the "rotate half" layout of Hugging Face Llama; GGUF's interleaved
q/k rows are permuted back on load (see ``gguf_loader``).

This file is the plain torch reference. The CPU decoding kernels are not called from here:
loading a checkpoint swaps modules for kernel-backed subclasses (``lmstack.model.fast``),
which override ``forward`` of the norms, linears and MLPs and the ``project``/``attend`` steps
of attention, and fall back to the code below wherever a kernel does not apply.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.model.config import ModelConfig
from lmstack.model.kv_cache import KVCache

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
_FUSED_RMS = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and _FUSED_RMS:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel instead of six
        # Normalise in fp32 whatever the compute dtype, as the reference implementations do.
        if _FUSED_RMS:
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, n_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables ``(n_pos, head_dim)`` for rotate-half RoPE (Su et al. 2021,
    eq. 34). The first half of the sin table is negated, so ``apply_rope`` rotates with a
    ``roll`` instead of a slice, a negation and a concatenation (the same values, bit for bit)."""
    # Always computed on the CPU (the caller moves them): under a meta-device context this math
    # would go through torch's reference implementations and import its compiler stack.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    t = torch.arange(n_pos, dtype=torch.int64, device="cpu").float()
    freqs = torch.outer(t, inv_freq)  # (n_pos, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_head, T, head_dim); cos/sin: (B, 1, T, head_dim), sin signed as in rope_tables.
    # rotate_half(x) * sin == roll(x, half) * signed_sin: [-x2, x1] * [s, s] == [x2, x1] * [-s, s].
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def sinusoidal_embedding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos position embedding (Vaswani et al. 2017, sec. 3.5); pos: (B, T)."""
    inv = torch.exp(torch.arange(0, dim, 2, device=pos.device).float() * (-math.log(10000.0) / dim))
    ang = pos.float()[..., None] * inv  # (B, T, dim/2)
    out = torch.zeros(*pos.shape, dim, device=pos.device)
    out[..., 0::2] = ang.sin()
    out[..., 1::2] = ang.cos()[..., : dim // 2]
    return out


def shared_input(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``[m(x) for m in layers]``, computed together where the first layer knows how for all of
    them (a ``forward_group(layers, x)`` method that may decline with None: LoRA layers
    training on the CPU share one autograd node, ``lmstack.peft.lora``; kernel-backed linears
    decoding on the CPU read the input once, ``lmstack.model.fast``)."""
    group = getattr(layers[0], "forward_group", None)
    out = group(layers, x) if group is not None else None
    return out if out is not None else [m(x) for m in layers]


def project_qkv(attn: nn.Module, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(B, nh, T, hd)`` and k, v ``(B, nkv, T, hd)`` of ``x`` through ``attn``'s projections,
    with rotary positions applied to q and k. Shared by every attention variant (prefix tuning)."""
    B, T, _ = x.shape
    q, k, v = shared_input([attn.q_proj, attn.k_proj, attn.v_proj], x)
    q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = k.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = v.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.sliding_window = cfg.sliding_window

    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``x`` with rotary positions applied (``project_qkv``)."""
        return project_qkv(self, x, rope)

    def forward(self, x, rope, cache: Optional[KVCache], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd)
            mask, causal = cache.attention_mask()
        elif mask is not None:  # packed rows: (B, 1, T, T) block-diagonal causal mask
            causal = False
            if self.sliding_window is not None and T > self.sliding_window:
                i = torch.arange(T, device=x.device)
                mask = mask & (i[None, :] > i[:, None] - self.sliding_window)
        else:
            mask, causal = None, T > 1
            if self.sliding_window is not None and T > self.sliding_window:
                i = torch.arange(T, device=x.device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.sliding_window)
                causal = False
        return self.o_proj(self.attend(q, k, v, mask, causal))  # (B, T, C)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               causal: bool) -> torch.Tensor:
        """Softmax attention of q ``(B, nh, T, hd)`` over k, v ``(B, nkv, S, hd)``, where ``mask``
        (True = visible) or ``causal`` says which keys each query sees: ``(B, T, nh*hd)``."""
        B, _, T, _ = q.shape
        rep = self.n_head // self.n_kv_head
        if rep > 1 and T == 1:
            # One query per row: fold the query heads of a kv group into that group's "queries"
            # (B, nkv, rep, hd), so k/v are used in place, with no copy and no GQA kernel.
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_head, rep, self.head_dim), k, v,
                                               attn_mask=mask)
            return y.reshape(B, T, self.n_head * self.head_dim)  # (B, 1, nh*hd)
        kw = {}
        if rep > 1:
            if _SDPA_GQA and q.is_cuda:
                kw["enable_gqa"] = True
            else:  # torch's CPU GQA path is far slower than repeating k/v (seen on torch 2.13)
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kw)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:  # Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU
            g, u = shared_input([self.gate_proj, self.up_proj], x)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache, mask=None, keep: Optional[torch.Tensor] = None):
        x = x + self.attn(self.attn_norm(x), rope, cache, mask)
        if keep is not None:  # the last block, only these positions read further: (1, N, C)
            x = x[keep][None]
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            dev = self.tok_emb.weight.device
            self.register_buffer("rope_cos", cos.to(dev), persistent=False)
            self.register_buffer("rope_sin", sin.to(dev), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init: normal(0, init_std), zero biases; GPT-2's 1/sqrt(2 * n_layer) residual scaling."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=self.config.init_std / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (read from the final norm, never from the output
        projection, which a quantised tied table would dequantise whole to answer)."""
        return next(self.norm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the final norm like ``device``."""
        return next(self.norm.parameters()).dtype

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        cfg = self.config
        p = self.tok_emb.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       dtype=p.dtype, device=p.device, sliding_window=cfg.sliding_window)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        cache: Optional[KVCache] = None,
        input_lengths: Optional[Sequence[int]] = None,
        last_only: bool = False,
        return_hidden: bool = False,
        doc_ids: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``.

        With a ``cache``, the tokens continue each row at ``cache.lengths[b]``; rows may be
        right-padded, with ``input_lengths[b]`` real tokens. ``last_only`` returns the logits
        of the last real token of each row only, ``(B, 1, vocab_size)`` (saves the vocab
        projection during prefill). ``return_hidden`` returns the final normed hidden states
        ``(B, T, n_embd)`` instead of logits. ``doc_ids`` ``(B, T)`` (training on packed rows,
        no cache) restricts attention to tokens of the same document and restarts positions
        at each document. ``keep`` ``(B, T)`` bool (no cache) returns the positions it marks
        only, as ``(1, N, ...)`` in row-major order (``out[0] == full[keep]``): the last block
        runs its MLP on those rows only, since nothing after it reads the others (training
        losses that cover a few target positions).
        """
        cfg = self.config
        B, T = idx.shape
        if keep is not None and (cache is not None or last_only or keep.shape != idx.shape):
            raise ValueError(f"keep: expected a (B, T) = {tuple(idx.shape)} mask without a cache or last_only, "
                             f"got shape {tuple(keep.shape)}")
        if cache is not None:
            pos = cache.begin(T, input_lengths)  # (B, T)
        else:
            if T > cfg.block_size:
                from lmstack.errors import LMStackError

                raise LMStackError(f"sequence of {T} tokens is longer than block_size {cfg.block_size}")
            pos = torch.arange(T, device=idx.device)[None, :].expand(B, T)
        mask = None
        if doc_ids is not None and cache is None:
            t = torch.arange(T, device=idx.device)
            new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = t - torch.where(new_doc, t, 0).cummax(dim=1).values  # (B, T) position within its document
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same & (t[None, :] <= t[:, None]))[:, None]  # (B, 1, T, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.pos == "learned":
            x = x + self.pos_emb(pos)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_embedding(pos, cfg.n_embd).to(x.dtype)
        rope = None
        if cfg.pos == "rope":
            dt = x.dtype
            rope = (self.rope_cos[pos][:, None].to(dt), self.rope_sin[pos][:, None].to(dt))  # (B, 1, T, hd)
        last = len(self.blocks) - 1
        try:
            for i, block in enumerate(self.blocks):
                kw = {"keep": keep} if keep is not None and i == last else {}
                if self.gradient_checkpointing and self.training and cache is None:
                    from torch.utils.checkpoint import checkpoint

                    x = checkpoint(block, x, rope, None, mask, use_reentrant=False, **kw)
                else:
                    x = block(x, rope, cache, mask, **kw)
        except BaseException:
            if cache is not None:
                cache.abort()  # a failed forward leaves the cache lengths unchanged
            raise
        if cache is not None:
            cache.end()
        x = self.norm(x)
        if last_only:
            if input_lengths is None:
                x = x[:, -1:, :]
            else:
                last = torch.tensor([n - 1 for n in input_lengths], device=x.device)
                x = x[torch.arange(B, device=x.device), last][:, None, :]  # (B, 1, C)
        if return_hidden:
            return x
        if not cfg.tie_embeddings:
            return self.lm_head(x)
        # A quantised table (lmstack.quant) projects without a dense copy; a kernel-backed one
        # (lmstack.model.fast) through the CPU decoding kernel.
        project = getattr(self.tok_emb, "project", None)
        return project(x) if project is not None else F.linear(x, self.tok_emb.weight)
