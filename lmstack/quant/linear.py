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
(``lmstack.train.loss``); ``project(x)`` gives a tied output projection's logits. Its
``weight`` is the whole table dequantised on each access, a temporary for code that wants the
dense matrix.

Decoding on the CPU (a few rows, fp32, no gradient) sends int4 products to a C kernel that
reads the codes and scales directly (``cpu_kernels.int4_linear``); everything else, training
included, dequantises one weight at a time and runs torch's matmul in the activation dtype.
Deliberately left out: int8 and GPU kernels, activation quantisation, and training the
quantised weight itself.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import ConfigError
from lmstack.model import cpu_kernels

Bits = Literal["int8", "int4"]


# Rows are quantised in blocks of about this many values, so the float temporaries of a large
# table (an embedding of 28M values is 113 MiB in fp32) stay a few MiB whatever its size.
_BLOCK_VALUES = 1 << 20


def _row_blocks(n_rows: int, row_len: int) -> Iterator[slice]:
    step = max(1, _BLOCK_VALUES // max(1, row_len))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax int8: returns ``(q int8 (out, in), scales (out, 1))``."""
    out_f, in_f = w.shape
    q = torch.empty(out_f, in_f, dtype=torch.int8, device=w.device)
    scales = torch.empty(out_f, 1, dtype=torch.float32, device=w.device)
    for rows in _row_blocks(out_f, in_f):
        b = w[rows].detach().float()
        s = b.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        q[rows] = torch.round(b / s).clamp_(-127, 127)
        scales[rows] = s
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise absmax int4: returns ``(packed uint8 (out, in/2), scales (out, in/group_size))``."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ConfigError(f"int4 quantisation: rows of {in_f} values (a layer's in_features or an embedding's "
                          f"width) are not a multiple of group_size={group_size} (expected an even group size "
                          "that divides every quantised row)")
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, in_f // group_size, dtype=torch.float32, device=w.device)
    for rows in _row_blocks(out_f, in_f):
        g = w[rows].detach().float().view(-1, in_f // group_size, group_size)
        s = g.abs().amax(dim=2).clamp(min=1e-12) / 7.0  # (rows, n_groups)
        q = torch.round(g / s[..., None]).clamp_(-7, 7).add_(8).to(torch.uint8).view(-1, in_f)  # codes 1..15
        packed[rows] = q[:, 0::2] | (q[:, 1::2] << 4)  # low nibble = even column
        scales[rows] = s
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
    if bits == "int4":  # decoding on the CPU: int4 codes straight into the product, no fp32 weight
        y = cpu_kernels.int4_linear(x, weight, scales, bias, group_size)
        if y is not None:
            return y
    y = _DequantMatmul.apply(x, weight, scales, bits, group_size)
    return y if bias is None else y + bias.to(y.dtype)


class QuantLinear(nn.Module):
    """A frozen linear layer stored as int8 or packed int4 (see the module docstring)."""

    def __init__(self, linear: Union[nn.Linear, torch.Tensor], bits: Bits = "int4", group_size: int = 64,
                 bias: Optional[torch.Tensor] = None):
        """From an ``nn.Linear``, or from its ``(out, in)`` weight tensor and optional ``bias``."""
        super().__init__()
        _check_bits(bits)
        weight = linear if isinstance(linear, torch.Tensor) else linear.weight
        bias = bias if isinstance(linear, torch.Tensor) else linear.bias
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = bits, group_size
        q, s = quantize_int8(weight) if bits == "int8" else quantize_int4(weight, group_size)
        self.register_buffer("weight", q)
        self.register_buffer("scales", s)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.scales, self.bits, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.scales, self.bias, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size if self.bits == 'int4' else None}"


def _check_bits(bits: str) -> None:
    if bits not in ("int8", "int4"):
        raise ConfigError(f"quantisation bits: got {bits!r}, expected 'int8' or 'int4'")


def _already(child: nn.Module, bits: str, group_size: int, where: str) -> bool:
    """True for a module quantised the same way already (a base quantised while it loaded)."""
    if not isinstance(child, (QuantLinear, QuantEmbedding)):
        return False
    if child.bits != bits or (bits == "int4" and child.group_size != group_size):
        raise ConfigError(f"{where} is already quantised as {child.bits} (group_size {child.group_size}); "
                          f"asked for {bits} (group_size {group_size}): load the base again")
    return True


def quantize_model(model: nn.Module, bits: Bits = "int4", group_size: int = 64,
                   targets: Optional[Iterable[str]] = None) -> list[str]:
    """Replace the ``nn.Linear`` children whose name is in ``targets`` (default: all) in place.

    Returns the qualified names quantised (those already quantised the same way included).
    Embeddings are left alone (``quantize_embeddings``).
    """
    _check_bits(bits)
    wanted = set(targets) if targets is not None else None
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            qual = f"{parent_name}.{name}" if parent_name else name
            if wanted is not None and name not in wanted:
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear(child, bits, group_size))
                replaced.append(qual)
            elif isinstance(child, QuantLinear) and _already(child, bits, group_size, qual):
                replaced.append(qual)
    if not replaced:
        raise ConfigError(f"quantize_model: no nn.Linear named {sorted(wanted or [])} in the model")
    return replaced


class QuantEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` stored as int8 or packed int4 rows (see the module docstring).

    The codes and scales are the buffers ``qweight`` and ``scales``: the attribute ``weight``
    is taken by the dequantised table, which a tied output projection reads as
    ``model.output_weight``.
    """

    def __init__(self, emb: Union[nn.Embedding, torch.Tensor], bits: Bits = "int4", group_size: int = 64):
        """From an ``nn.Embedding`` or its ``(num_embeddings, dim)`` table."""
        super().__init__()
        _check_bits(bits)
        weight = emb if isinstance(emb, torch.Tensor) else emb.weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.bits, self.group_size = bits, group_size
        q, s = quantize_int8(weight) if bits == "int8" else quantize_int4(weight, group_size)
        self.register_buffer("qweight", q)  # (num_embeddings, dim) int8 or (num_embeddings, dim/2) uint8
        self.register_buffer("scales", s)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(0, self.num_embeddings)

    def rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:end`` of the table, dequantised: ``(end - start, embedding_dim)``."""
        return dequantize(self.qweight[start:end], self.scales[start:end], self.bits, self.group_size, dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ table.T``: the logits of a tied output projection. On the CPU, for a few rows
        of int4 and no gradient, the codes go straight into the product; otherwise the table
        is dequantised for it."""
        if self.bits == "int4":
            y = cpu_kernels.int4_linear(x, self.qweight, self.scales, None, self.group_size)
            if y is not None:
                return y
        return F.linear(x, self.rows(0, self.num_embeddings, x.dtype))

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
    _check_bits(bits)
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            qual = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Embedding):
                setattr(parent, name, QuantEmbedding(child, bits, group_size))
                replaced.append(qual)
            elif _already(child, bits, group_size, qual):
                replaced.append(qual)
    return replaced


def quantizing_loader(bits: Bits = "int4", group_size: int = 64, targets: Optional[Iterable[str]] = None,
                      embeddings: bool = False) -> Callable[[nn.Module, str, torch.Tensor], bool]:
    """A ``convert`` for ``load_checkpoint``: quantise each targeted weight as it is read.

    The ``nn.Linear`` children named in ``targets`` (default: all) and, with ``embeddings``,
    every ``nn.Embedding`` become ``QuantLinear`` / ``QuantEmbedding`` as soon as their weight
    arrives; the full-precision tensor is dropped at once. The result is what
    ``quantize_model`` (and ``quantize_embeddings``) would give after a full load, code for
    code, without the whole full-precision model in memory at any moment.
    """
    _check_bits(bits)
    wanted = set(targets) if targets is not None else None

    def convert(model: nn.Module, key: str, t: torch.Tensor) -> bool:
        prefix, _, kind = key.rpartition(".")
        if kind != "weight" or not prefix:
            return False
        parent_name, _, name = prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, name)
        if isinstance(child, nn.Linear) and (wanted is None or name in wanted):
            bias = child.bias
            setattr(parent, name, QuantLinear(t, bits, group_size, bias=bias))
            return True
        if embeddings and isinstance(child, nn.Embedding):
            setattr(parent, name, QuantEmbedding(t, bits, group_size))
            return True
        return False

    return convert


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a quantised base saves)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
