"""LoRA: a low-rank update beside a frozen linear layer (Hu et al. 2021, eq. 3).

    h = W0 x + (alpha / r) * B A x,   A: (r, in), B: (out, r), B initialised to zero

``LoRALinear`` replaces an ``nn.Linear`` (or a ``lmstack.quant.QuantLinear``: QLoRA,
Dettmers et al. 2023) in place. It adopts the base layer's own tensors under their own
names, so ``blocks.0.attn.q_proj.weight`` stays the key of the frozen weight and a base
checkpoint loads unchanged; only ``lora_A`` and ``lora_B`` are new. ``merge`` folds the update
into ``W0`` and ``unmerge`` takes it out again (exactly when ``keep_base_copy``, else up to
float rounding).

Training on the CPU (gradients on, no autocast, no active dropout), the frozen product and the
update run as one autograd node, ``_LoRAFunction``, instead of the four or five nodes the
plain expression records. Its backward computes the rank-r products in the layouts in which
CPU BLAS is fast (``B^T g^T`` and ``a^T g`` instead of ``g B`` and ``g^T a``: several times
faster for r = 8, ``bench/train.py`` shows the step) and adds the update's input gradient
into the base's in place instead of summing two ``(M, in)`` tensors. The values are those of
the plain expression up to float rounding (tested). Deliberately left out: DoRA / rsLoRA
scaling variants and LoRA on embeddings.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UnsupportedError


class _LoRAFunction(torch.autograd.Function):
    """``base(x) + scaling * (x A^T) B^T`` for a frozen base weight (dense, or quantised and
    dequantised on the fly in both passes); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, scales, bias, lora_A, lora_B, scaling: float, bits: Optional[str],
                group_size: int):
        if bits is None:
            y = F.linear(x, weight, bias)
        else:
            from lmstack.quant.linear import dequantize

            y = x @ dequantize(weight, scales, bits, group_size, x.dtype).t()
            y = y if bias is None else y + bias.to(y.dtype)
        r, out_features = lora_A.shape[0], lora_B.shape[0]
        a = F.linear(x, lora_A).reshape(-1, r)  # (M, r)
        y.view(-1, out_features).addmm_(a, lora_B.t(), alpha=scaling)  # y is this node's own: in place
        ctx.save_for_backward(x, a, weight, scales, lora_A, lora_B)
        ctx.meta = (scaling, bits, group_size)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, a, weight, scales, lora_A, lora_B = ctx.saved_tensors
        scaling, bits, group_size = ctx.meta
        want_x, want_bias, want_A, want_B = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        g = grad.reshape(-1, lora_B.shape[0])  # (M, out)
        ga_t = torch.mm(lora_B.t(), g.t()).mul_(scaling)  # (r, M): d loss / d a, transposed
        grad_x = grad_bias = grad_A = grad_B = None
        if want_A:
            grad_A = torch.mm(ga_t, x.reshape(-1, lora_A.shape[1]))  # (r, in)
        if want_B:
            grad_B = torch.mm(a.t(), g).mul_(scaling).t().contiguous()  # (out, r)
        if want_x:
            if bits is None:
                w = weight
            else:
                from lmstack.quant.linear import dequantize

                w = dequantize(weight, scales, bits, group_size, g.dtype)
            grad_x = torch.mm(g, w).addmm_(ga_t.t(), lora_A).view(x.shape)
        if want_bias:
            grad_bias = g.sum(0)
        return grad_x, None, None, grad_bias, grad_A, grad_B, None, None, None


class LoRALinear(nn.Module):
    peft_params = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 keep_base_copy: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.bits: Optional[str] = getattr(base, "bits", None)
        self.group_size: int = getattr(base, "group_size", 0)
        if self.bits is None:
            self.weight = base.weight  # the same Parameter object: the key and storage are unchanged
            self.weight.requires_grad_(False)
            dtype = self.weight.dtype
        else:
            self.register_buffer("weight", base.weight)
            self.register_buffer("scales", base.scales)
            dtype = torch.float32
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        # Drawn on the CPU, then moved: one seed gives the same adapter on every device.
        a = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.keep_base_copy = keep_base_copy
        self._base_copy: Optional[torch.Tensor] = None
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) * B A``, shape ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return F.linear(x, self.weight, self.bias)
        from lmstack.quant.linear import quantized_linear

        return quantized_linear(x, self.weight, self.scales, self.bias, self.bits, self.group_size)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this call trains through ``_LoRAFunction`` (see the module docstring)."""
        return (x.device.type == "cpu" and torch.is_grad_enabled() and not self.disabled and not self.merged
                and not torch.is_autocast_enabled("cpu") and (self.bits is not None or not self.weight.requires_grad)
                and (isinstance(self.dropout, nn.Identity) or not self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return _LoRAFunction.apply(x, self.weight, getattr(self, "scales", None), self.bias, self.lora_A,
                                       self.lora_B, self.scaling, self.bits, self.group_size)
        y = self.base_forward(x)
        if self.disabled:
            return y - F.linear(x, self.delta_weight().to(x.dtype)) if self.merged else y
        if self.merged:
            return y
        a = F.linear(self.dropout(x), self.lora_A)  # (B, T, r)
        # y + scaling * a B^T as one GEMM that accumulates into y: no separate (B, T, out)
        # multiply and add, forward or backward.
        out = torch.addmm(y.reshape(-1, self.out_features), a.reshape(-1, self.r), self.lora_B.t(),
                          alpha=self.scaling)
        return out.view(y.shape)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.bits is not None:
            raise UnsupportedError("cannot merge LoRA into a quantised base in place; use "
                                   "merge_and_unload(), which dequantises first")
        if self.keep_base_copy:
            self._base_copy = self.weight.detach().clone()
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._base_copy is not None:
            self.weight.copy_(self._base_copy)
            self._base_copy = None
        else:
            self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W0 + (alpha / r) B A`` (dequantised for QLoRA)."""
        if self.bits is None:
            w = self.weight.detach().clone()
        else:
            from lmstack.quant.linear import dequantize

            w = dequantize(self.weight, self.scales, self.bits, self.group_size, self.lora_A.dtype)
        if not self.merged:
            w = w + self.delta_weight().to(w.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, " \
               f"alpha={self.alpha}, base={'float' if self.bits is None else self.bits}"
