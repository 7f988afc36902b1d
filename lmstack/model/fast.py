"""The CPU decoding kernels, attached to a model by swapping its modules.

``install(model)`` walks the model and gives every plain ``nn.Linear``, ``nn.Embedding``,
``RMSNorm``, ``Attention`` and ``MLP`` a kernel-backed subclass of its own class, the way
``lmstack.quant`` swaps linears for quantised ones. The subclasses add no parameters, buffers
or attributes, so each module's class is swapped in place: the module tree, the checkpoint
keys and every tensor stay the same objects. ``uninstall`` puts the plain classes back.

Each override calls into ``cpu_kernels`` and falls back to the plain code of ``model.py``
wherever the kernel does not apply (it takes a few rows on the CPU, fp32 or bf16, with no
gradient needed; see ``cpu_kernels``):

* ``FastLinear``: one weight matrix, and through ``forward_group`` q/k/v in one pass;
* ``FastEmbedding.project``: a tied output projection;
* ``FastRMSNorm``: RMSNorm of a few rows;
* ``FastMLP``: gate/up with the SwiGLU fused, in one pass over both matrices;
* ``FastAttention``: RoPE in place on q and k for one new token per row, and that token's
  attention over the cache when every row sees all its keys.

Only modules whose type is exactly the plain one are swapped, so LoRA, adapter, prefix and
quantised modules (``lmstack.peft``, ``lmstack.quant``) keep their own forward; swapped in
later, they replace kernel-backed modules as they replace plain ones, and a fused group
(q/k/v, gate/up) stays fused only while every member is a ``FastLinear``. Deliberately left
out: GPUs (a model elsewhere is left as it is) and training (a call that needs gradients
takes the plain path).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lmstack.model import cpu_kernels
from lmstack.model.model import MLP, Attention, RMSNorm, apply_rope, project_qkv


class FastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias)

    def forward_group(self, layers: list[nn.Module], x: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """The outputs of ``layers`` (this one first), which all read ``x``, from one threaded
        pass over their weights; None unless every one is a ``FastLinear`` and the kernel applies."""
        if not all(type(m) is FastLinear for m in layers):
            return None
        return cpu_kernels.linear_group(x, [m.weight for m in layers], [m.bias for m in layers])


class FastEmbedding(nn.Embedding):
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T``: the logits of a tied output projection (``Transformer.forward``)."""
        return cpu_kernels.linear(x, self.weight)


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.rms_norm(x, self.weight, self.eps)
        return y if y is not None else super().forward(x)


class FastMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu and type(self.gate_proj) is FastLinear and type(self.up_proj) is FastLinear:
            g, u = self.gate_proj, self.up_proj
            h = cpu_kernels.swiglu(x, g.weight, u.weight, g.bias, u.bias)  # silu(x W_g^T) * (x W_u^T)
            if h is not None:
                return self.down_proj(h)
        return super().forward(x)


class FastAttention(Attention):
    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rope is None or x.shape[1] != 1:
            return super().project(x, rope)
        q, k, v = project_qkv(self, x, None)  # (B, nh, 1, hd), (B, nkv, 1, hd) x 2, not yet rotated
        if not cpu_kernels.rope_(*rope, q, k):  # in place, both or neither
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               causal: bool) -> torch.Tensor:
        B, nh, T, hd = q.shape
        if T == 1 and mask is None:  # one query per row, every row seeing all its keys
            y = cpu_kernels.decode_attention(q.view(B, self.n_kv_head, nh // self.n_kv_head, hd), k, v)
            if y is not None:
                return y.view(B, T, nh * hd)
        return super().attend(q, k, v, mask, causal)


_FAST = {nn.Linear: FastLinear, nn.Embedding: FastEmbedding, RMSNorm: FastRMSNorm, MLP: FastMLP,
         Attention: FastAttention}
_PLAIN = {fast: plain for plain, fast in _FAST.items()}


def install(model: nn.Module) -> nn.Module:
    """Swap the kernel-backed classes in, in place, and return ``model``. A no-op where the
    kernel is unavailable (no C compiler, ``LMSTACK_CPU_KERNELS=0``) or the model is not on the
    CPU; calling it again changes nothing."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not cpu_kernels.available():
        return model
    for m in model.modules():
        fast = _FAST.get(type(m))
        if fast is not None:
            m.__class__ = fast
    return model


def installed(model: nn.Module) -> bool:
    """Whether ``install`` has swapped any module of ``model``."""
    return any(type(m) in _PLAIN for m in model.modules())


def uninstall(model: nn.Module) -> nn.Module:
    """Put the plain classes back, in place (the reference path, whatever the device)."""
    for m in model.modules():
        plain = _PLAIN.get(type(m))
        if plain is not None:
            m.__class__ = plain
    return model
