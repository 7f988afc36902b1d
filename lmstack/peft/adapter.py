"""Bottleneck adapters (Houlsby et al. 2019, sec. 2.1): a small residual MLP after a sublayer.

    y = W x + b;   y' = y + W_up f(W_down y)

``AdapterLinear`` replaces the output projection of a sublayer (``o_proj`` of attention and
``down_proj`` of the MLP, the two places of the paper's figure 2). It adopts the frozen
``weight``/``bias`` under their own keys and adds ``adapter_down``/``adapter_up``; ``W_up``
starts at zero so the adapted model starts as the base model. Deliberately left out: adapter
fusion and the parallel-adapter variant.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterLinear(nn.Module):
    peft_params = ("adapter_down", "adapter_up")

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Drawn on the CPU, then moved: one seed gives the same adapter on every device.
        self.adapter_down = nn.Linear(self.out_features, size, dtype=base.weight.dtype)
        self.adapter_up = nn.Linear(size, self.out_features, dtype=base.weight.dtype)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.adapter_down.to(base.weight.device)
        self.adapter_up.to(base.weight.device)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (B, T, out)
        if self.disabled:
            return y
        return y + self.adapter_up(F.gelu(self.adapter_down(y)))
