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
CPU BLAS handles thin products well (``B^T g^T`` and ``a^T g`` instead of autograd's ``g B``
and ``g^T a``; ``bench/train.py`` measures the step) and adds the update's input gradient
into the base's in place instead of summing two ``(M, in)`` tensors. Layers that read the
same input (q/k/v, gate/up: the model asks through ``forward_group``) share one node, so
their ``A`` products are one matmul each way and their input gradients accumulate in one
buffer. The values are those of the plain expression up to float rounding (tested). The
layouts are chosen for CPU BLAS; a GPU keeps the per-op path (the one
``bench/train_cuda.py`` measured). Deliberately left out: DoRA / rsLoRA scaling variants and
LoRA on embeddings.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import UnsupportedError


def _base(x: torch.Tensor, weight, scales, bias, bits: Optional[str], group_size: int) -> torch.Tensor:
    """The frozen layer's own product: dense, or quantised (``lmstack.quant``)."""
    if bits is None:
        return F.linear(x, weight, bias)
    from lmstack.quant.linear import quantized_linear

    return quantized_linear(x, weight, scales, bias, bits, group_size)


def _dense(weight, scales, bits: Optional[str], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    if bits is None:
        return weight
    from lmstack.quant.linear import dequantize

    return dequantize(weight, scales, bits, group_size, dtype)


class _LoRAFunction(torch.autograd.Function):
    """``base_i(x) + scaling_i * (x A_i^T) B_i^T`` for one or more LoRA layers that read the same
    ``x`` (q/k/v, gate/up), their frozen bases dense or quantised (dequantised on the fly in both
    passes); see the module docstring.

    ``layers`` holds ``(scaling, bits, group_size)`` per layer and ``tensors`` its ``weight,
    scales, bias, lora_A, lora_B``. The layers' ``A`` are stacked, so ``x A^T``, the gradient of
    ``A`` and the update's input gradient are one product each for the whole group.
    """

    @staticmethod
    def forward(ctx, x, layers: tuple, *tensors):
        per = [tensors[i:i + 5] for i in range(0, len(tensors), 5)]
        lora_a = per[0][3] if len(per) == 1 else torch.cat([t[3] for t in per])  # (R, in), R = sum of ranks
        a = F.linear(x, lora_a).reshape(-1, lora_a.shape[0])  # (M, R)
        outs, off = [], 0
        for (scaling, bits, group_size), (weight, scales, bias, lora_A, lora_B) in zip(layers, per):
            y = _base(x, weight, scales, bias, bits, group_size)  # no autograd in here: nothing saved
            r = lora_A.shape[0]
            y.view(-1, lora_B.shape[0]).addmm_(a[:, off:off + r], lora_B.t(), alpha=scaling)  # y is ours: in place
            outs.append(y)
            off += r
        ctx.save_for_backward(x, a, lora_a, *tensors)
        ctx.layers = layers
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, a, lora_a, *tensors = ctx.saved_tensors
        per = [tensors[i:i + 5] for i in range(0, len(tensors), 5)]
        want = ctx.needs_input_grad[2:]  # per layer: weight, scales, bias, lora_A, lora_B
        # (R, M): d loss / d a, transposed
        ga_t = torch.empty(lora_a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
        out: list[Optional[torch.Tensor]] = [None] * len(tensors)
        grad_x, off = None, 0
        for i, ((scaling, bits, group_size), (weight, scales, bias, lora_A, lora_B), grad) in enumerate(
                zip(ctx.layers, per, grads)):
            r = lora_A.shape[0]
            g = grad.reshape(-1, lora_B.shape[0])  # (M, out)
            torch.mm(lora_B.t(), g.t(), out=ga_t[off:off + r]).mul_(scaling)
            if want[5 * i + 4]:
                out[5 * i + 4] = torch.mm(a[:, off:off + r].t(), g).mul_(scaling).t().contiguous()  # (out, r)
            if want[5 * i + 2]:
                out[5 * i + 2] = g.sum(0)
            if ctx.needs_input_grad[0]:  # the frozen products, accumulated into one buffer
                w = _dense(weight, scales, bits, group_size, g.dtype)
                grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
            off += r
        if any(want[5 * i + 3] for i in range(len(per))):
            grad_a = torch.mm(ga_t, x.reshape(-1, lora_a.shape[1]))  # (R, in)
            off = 0
            for i, t in enumerate(per):
                r = t[3].shape[0]
                out[5 * i + 3] = grad_a[off:off + r] if want[5 * i + 3] else None
                off += r
        if grad_x is not None:
            grad_x = grad_x.addmm_(ga_t.t(), lora_a).view(x.shape)
        return (grad_x, None, *out)


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
        return _base(x, self.weight, getattr(self, "scales", None), self.bias, self.bits, self.group_size)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this call trains through ``_LoRAFunction`` (see the module docstring)."""
        return (x.device.type == "cpu" and torch.is_grad_enabled() and not self.disabled and not self.merged
                and not torch.is_autocast_enabled("cpu") and (self.bits is not None or not self.weight.requires_grad)
                and (isinstance(self.dropout, nn.Identity) or not self.training))

    def _tensors(self) -> tuple:
        return self.weight, getattr(self, "scales", None), self.bias, self.lora_A, self.lora_B

    def forward_group(self, layers: list[nn.Module], x: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """The outputs of ``layers`` (this one first), which all read ``x``, from one
        ``_LoRAFunction`` node; None unless every one is a LoRA layer training through it."""
        if not all(isinstance(m, LoRALinear) and m._fused(x) and m.lora_A.dtype == self.lora_A.dtype
                   for m in layers):
            return None
        return list(_LoRAFunction.apply(x, tuple((m.scaling, m.bits, m.group_size) for m in layers),
                                        *[t for m in layers for t in m._tensors()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return _LoRAFunction.apply(x, ((self.scaling, self.bits, self.group_size),), *self._tensors())[0]
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
