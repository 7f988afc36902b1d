"""Weight-only quantised linear layers for a frozen base (QLoRA's storage side).

Two formats, both symmetric absmax (no zero point):

* ``int8``: one scale per output row. ``weight`` is ``int8 (out, in)``, ``scales`` is
  ``(out, 1)``; ``W ~= weight * scales``.
* ``int4``: one scale per group of ``group_size`` consecutive input columns, codes in
  [-7, 7] stored two per byte: ``weight`` is ``uint8 (out, in/2)`` (low nibble = even column),
  ``scales`` is ``(out, in/group_size)``. This is the group-wise round-to-nearest scheme of
  GPTQ's baseline (Frantar et al. 2022, sec. 2); QLoRA (Dettmers et al. 2023) uses the same
  layout with a normal-float code book instead of uniform levels.

``QuantLinear`` keeps the ``weight`` key of the ``nn.Linear`` it replaces, so the module tree
and checkpoint keys are unchanged; ``scales`` is added beside it. The forward dequantises on
the fly and the backward recomputes the dequantised weight instead of saving it, so the
full-precision weight never outlives one layer's matmul (that is where the memory saving of
QLoRA comes from).

``QuantEmbedding`` stores a frozen embedding table the same way, one quantised row per token.
A lookup dequantises only the rows it returns; ``rows(start, end)`` dequantises a slice, which
is how the training loss reads a tied output projection chunk by chunk
(``lmstack.train.loss``). Its ``weight`` is the whole table dequantised on each access, a
temporary for code that wants the dense matrix (the model's own logits, generation).
Deliberately left out: quantised matmul kernels (the product runs in the activation dtype),
activation quantisation, and training the quantised weight itself.
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional

import torch
import torch.nn as nn

from lmstack.errors import ConfigError

Bits = Literal["int8", "int4"]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax int8: returns ``(q int8 (out, in), scales (out, 1))``."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise absmax int4: returns ``(packed uint8 (out, in/2), scales (out, in/group_size))``."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ConfigError(f"int4 quantisation: rows of {in_f} values (a layer's in_features or an embedding's "
                          f"width) are not a multiple of group_size={group_size} (expected an even group size "
                          "that divides every quantised row)")
    g = w.detach().float().view(out_f, in_f // group_size, group_size)
    scales = g.abs().amax(dim=2).clamp(min=1e-12) / 7.0  # (out, n_groups)
    q = torch.round(g / scales[..., None]).clamp(-7, 7).to(torch.int16).view(out_f, in_f) + 8  # codes 1..15
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (out, in/2)
    return packed, scales


def dequantize(weight: torch.Tensor, scales: torch.Tensor, bits: str, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision ``(out, in)`` weight that ``weight``/``scales`` encode.

    The temporaries are bytes (the unpacked int4 codes) and the result is scaled in place, so
    dequantising a large table costs little more than the table itself.
    """
    if bits == "int8":
        return weight.to(dtype).mul_(scales.to(dtype))
    out_f = weight.shape[0]
    q = torch.stack([weight & 0x0F, weight >> 4], dim=-1).view(out_f, -1)  # (out, in) uint8 codes 1..15
    w = q.to(dtype).sub_(8).view(out_f, -1, group_size).mul_(scales.to(dtype)[..., None])
    return w.view(out_f, -1)


class _DequantMatmul(torch.autograd.Function):
    """``x @ dequant(W).T`` that saves the quantised weight, not the dequantised one."""

    @staticmethod
    def forward(ctx, x, weight, scales, bits, group_size):
        w = dequantize(weight, scales, bits, group_size, x.dtype)
        ctx.save_for_backward(weight, scales)
        ctx.meta = (bits, group_size, x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        weight, scales = ctx.saved_tensors
        bits, group_size, dt = ctx.meta
        w = dequantize(weight, scales, bits, group_size, grad_out.dtype)
        return grad_out @ w, None, None, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                     bias: Optional[torch.Tensor], bits: str, group_size: int) -> torch.Tensor:
    y = _DequantMatmul.apply(x, weight, scales, bits, group_size)
    return y if bias is None else y + bias.to(y.dtype)


class QuantLinear(nn.Module):
    """A frozen linear layer stored as int8 or packed int4 (see the module docstring)."""

    def __init__(self, linear: nn.Linear, bits: Bits = "int4", group_size: int = 64):
        super().__init__()
        if bits not in ("int8", "int4"):
            raise ConfigError(f"quantisation bits: got {bits!r}, expected 'int8' or 'int4'")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        q, s = quantize_int8(linear.weight) if bits == "int8" else quantize_int4(linear.weight, group_size)
        self.register_buffer("weight", q)
        self.register_buffer("scales", s)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.scales, self.bits, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.scales, self.bias, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size if self.bits == 'int4' else None}"


def quantize_model(model: nn.Module, bits: Bits = "int4", group_size: int = 64,
                   targets: Optional[Iterable[str]] = None) -> list[str]:
    """Replace the ``nn.Linear`` children whose name is in ``targets`` (default: all) in place.

    Returns the qualified names replaced. Embeddings are left alone (``quantize_embeddings``).
    """
    wanted = set(targets) if targets is not None else None
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (wanted is None or name in wanted):
                setattr(parent, name, QuantLinear(child, bits, group_size))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    if not replaced:
        raise ConfigError(f"quantize_model: no nn.Linear named {sorted(wanted or [])} in the model")
    return replaced


class QuantEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` stored as int8 or packed int4 rows (see the module docstring).

    The codes and scales are the buffers ``qweight`` and ``scales``: the attribute ``weight``
    is taken by the dequantised table, which a tied output projection reads as
    ``model.output_weight``.
    """

    def __init__(self, emb: nn.Embedding, bits: Bits = "int4", group_size: int = 64):
        super().__init__()
        if bits not in ("int8", "int4"):
            raise ConfigError(f"quantisation bits: got {bits!r}, expected 'int8' or 'int4'")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.bits, self.group_size = bits, group_size
        q, s = quantize_int8(emb.weight) if bits == "int8" else quantize_int4(emb.weight, group_size)
        self.register_buffer("qweight", q)  # (num_embeddings, dim) int8 or (num_embeddings, dim/2) uint8
        self.register_buffer("scales", s)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(0, self.num_embeddings)

    def rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:end`` of the table, dequantised: ``(end - start, embedding_dim)``."""
        return dequantize(self.qweight[start:end], self.scales[start:end], self.bits, self.group_size, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        out = dequantize(self.qweight[flat], self.scales[flat], self.bits, self.group_size, self.scales.dtype)
        return out.view(*idx.shape, self.embedding_dim)

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the dequantised table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.scales.device,
                           dtype=self.scales.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, " \
               f"group_size={self.group_size if self.bits == 'int4' else None}"


def quantize_embeddings(model: nn.Module, bits: Bits = "int4", group_size: int = 64) -> list[str]:
    """Replace every ``nn.Embedding`` child by a ``QuantEmbedding``, in place; returns their names.

    With tied embeddings this also quantises the output projection, which is the same table.
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                setattr(parent, name, QuantEmbedding(child, bits, group_size))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a quantised base saves)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
