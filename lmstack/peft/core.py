"""One entry point for every PEFT method: apply, count, disable, merge, save and load adapters.

``apply_peft(model, PEFTConfig(method="lora", ...))`` freezes the base and swaps modules in
place; everything else in this file works on whichever PEFT modules the model holds. An
adapter folder reloads onto a freshly loaded base with ``load_adapter``.

Two folder formats (``save_adapter(..., format=...)``; ``load_adapter`` reads both):

* ``peft``, the default for LoRA and QLoRA on a base that ``transformers`` has: Hugging Face
  PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (``peft_format``), which
  ``peft.PeftModel.from_pretrained`` loads onto the exported base and lmstack reads back;
* ``lmstack``, for prefix tuning and bottleneck adapters (no PEFT equivalent) and any base
  without a ``transformers`` counterpart: ``adapter.safetensors`` (only the PEFT tensors, under
  their full model keys) and ``adapter_config.json`` (the ``PEFTConfig`` and the base model's
  shape).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from lmstack.config import config_from_dict
from lmstack.errors import ConfigError, LMStackError, UnsupportedError
from lmstack.files import atomic_dir
from lmstack.peft.adapter import AdapterLinear
from lmstack.peft.config import PEFTConfig
from lmstack.peft.lora import LoRALinear
from lmstack.peft.prefix import PrefixAttention

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_MODULES = (LoRALinear, AdapterLinear, PrefixAttention)


def _swap(model: nn.Module, names: list[str], make) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names:
                setattr(parent, name, make(child))
                n += 1
    return n


def apply_peft(model: nn.Module, cfg: PEFTConfig) -> nn.Module:
    """Freeze the base and attach the method's trainable modules, in place (``full``: no-op)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if any(isinstance(m, PEFT_MODULES) for m in model.modules()):
        raise LMStackError("the model already has PEFT modules; load a fresh base model first")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method in ("lora", "qlora"):
        quantize_base(model, cfg)
        n = _swap(model, cfg.targets, lambda m: LoRALinear(m, cfg.r, cfg.alpha, cfg.dropout, cfg.keep_base_copy))
    elif cfg.method == "prefix":
        n = _swap(model, ["attn"], lambda m: PrefixAttention(m, cfg.n_prefix))
    elif cfg.method == "adapter":
        n = _swap(model, ["o_proj", "down_proj"], lambda m: AdapterLinear(m, cfg.adapter_size))
    else:
        raise ConfigError(f"PEFTConfig.method: got {cfg.method!r}, expected full, lora, qlora, prefix or adapter")
    if n == 0:
        raise ConfigError(f"PEFT {cfg.method}: no target module found (targets {cfg.targets})")
    model.peft_config = cfg
    return model


def quantize_base(model: nn.Module, cfg: PEFTConfig) -> None:
    """QLoRA: quantise the targeted linears (and the embeddings) of the frozen base, in place."""
    if cfg.method != "qlora":
        return
    from lmstack.quant.linear import quantize_embeddings, quantize_model

    quantize_model(model, cfg.quant_bits, cfg.group_size, targets=cfg.targets)
    if cfg.quant_embedding:
        quantize_embeddings(model, cfg.quant_bits, cfg.group_size)
    _own_memory(model)


def base_loader(cfg: PEFTConfig):
    """The ``convert`` to load a base for ``cfg`` with (``LLM.load(..., convert=...)``), or None.

    For QLoRA it quantises each targeted weight as the checkpoint is read, so the full-precision
    base is never in memory as a whole; ``apply_peft`` then finds those modules done.
    """
    if cfg.method != "qlora":
        return None
    from lmstack.quant.linear import quantizing_loader

    return quantizing_loader(cfg.quant_bits, cfg.group_size, cfg.targets, embeddings=cfg.quant_embedding)


def _own_memory(model: nn.Module) -> None:
    """Copy the remaining full-precision tensors into memory of their own.

    A model loaded from a memory-mapped checkpoint keeps the whole mapping alive while any
    tensor of it lives, so the pages of the replaced full-precision weights (read once to
    quantise them) would stay resident; after this copy the mapping is released.
    """
    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                p.data = p.data.clone()
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point():
                    m._buffers[name] = b.clone()


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantised weights count their logical size."""
    from lmstack.quant.linear import QuantEmbedding

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            total += m.num_embeddings * m.embedding_dim
        elif getattr(m, "bits", None) is not None:
            total += m.in_features * m.out_features
    return trainable, total


def describe_params(model: nn.Module) -> str:
    t, n = param_counts(model)
    return f"trainable params: {t:,} of {n:,} ({100.0 * t / max(n, 1):.3f}%)"


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the PEFT tensors, under their full model keys."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PEFT_MODULES):
            for pname in m.peft_params:
                sub = getattr(m, pname)
                tensors = sub.state_dict() if isinstance(sub, nn.Module) else {"": sub}
                for k, t in tensors.items():
                    out[".".join(x for x in (name, pname, k) if x)] = t
    return out


@contextlib.contextmanager
def peft_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every PEFT module passes its input through the frozen path."""
    mods = [m for m in model.modules() if isinstance(m, PEFT_MODULES)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def _loras(model: nn.Module) -> list[LoRALinear]:
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not mods:
        raise LMStackError("the model has no LoRA modules")
    return mods


def merge_lora(model: nn.Module) -> None:
    for m in _loras(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in _loras(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA module by a plain ``nn.Linear`` holding the merged weight, in place.

    The result is an ordinary model (QLoRA bases, quantised embeddings included, are
    dequantised) that ``save_native`` and ``export_hf`` write with the base's keys.
    """
    from lmstack.model import fast
    from lmstack.quant.linear import QuantEmbedding

    if any(isinstance(m, (AdapterLinear, PrefixAttention)) for m in model.modules()):
        raise UnsupportedError("adapters and prefixes cannot be merged into the base weights; "
                               "save them with save_adapter")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.to_linear())
            elif isinstance(child, QuantEmbedding):
                setattr(parent, name, child.to_embedding())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if fast.installed(model):  # the merged plain layers get the decode kernels the base had
        fast.install(model)
    return model


def _exports_to_hf(model: nn.Module) -> bool:
    from lmstack.model.checkpoint import config_to_hf

    try:
        config_to_hf(model.config)
    except (UnsupportedError, AttributeError):
        return False
    return True


def _write_lmstack(model: nn.Module, cfg: PEFTConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in peft_state_dict(model).items()}
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise LMStackError(f"refusing to save the adapter: tensor {k} has non-finite values")
    save_file(sd, str(folder / ADAPTER_FILE))
    meta = {"peft": asdict(cfg), "base_model": model.config.to_dict() if hasattr(model, "config") else None}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))


def _write_peft(model: nn.Module, cfg: PEFTConfig, folder: Path) -> None:
    from lmstack.peft.peft_format import write_peft

    if cfg.method not in ("lora", "qlora"):
        raise UnsupportedError(f"save_adapter: format 'peft' holds LoRA adapters; method {cfg.method!r} "
                               "is saved with format='lmstack'")
    write_peft(model, cfg, folder)


ADAPTER_WRITERS = {"peft": _write_peft, "lmstack": _write_lmstack}


def save_adapter(model: nn.Module, folder: str | os.PathLike, format: Optional[str] = None) -> Path:
    """Write the PEFT tensors and config (atomically, as one folder).

    ``format`` (see the module docstring): ``"peft"`` or ``"lmstack"``; None picks ``peft`` for
    LoRA / QLoRA on a base ``transformers`` has, else ``lmstack``.
    """
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        raise LMStackError("the model has no PEFT modules to save (method 'full' saves whole checkpoints)")
    if format is None:
        format = "peft" if cfg.method in ("lora", "qlora") and _exports_to_hf(model) else "lmstack"
    if format not in ADAPTER_WRITERS:
        raise ConfigError(f"save_adapter format: got {format!r}, expected one of {sorted(ADAPTER_WRITERS)}")
    with atomic_dir(folder) as tmp:
        ADAPTER_WRITERS[format](model, cfg, tmp)
    return Path(folder)


def _attach_lora(model: nn.Module, cfg: PEFTConfig, plan: dict) -> None:
    """Freeze the base and put a LoRA layer holding ``plan[name] = (A, B, alpha)`` at each named
    module (each with its own rank), after QLoRA's quantisation."""
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_base(model, cfg)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b, alpha) in plan.items():
            parent, leaf = name.rsplit(".", 1)
            lora = LoRALinear(modules[name], a.shape[0], alpha, cfg.dropout, cfg.keep_base_copy)
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
            setattr(modules[parent], leaf, lora)
    model.peft_config = cfg


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Attach the saved PEFT modules to a base model and load their tensors (strict).

    Reads both formats: a PEFT folder (``adapter_model.safetensors``, from ``save_adapter`` or
    from PEFT itself) and lmstack's own (``adapter.safetensors``).
    """
    from safetensors.torch import load_file

    from lmstack.peft.peft_format import PEFT_WEIGHTS, read_peft

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise LMStackError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    if (folder / PEFT_WEIGHTS).is_file():
        if any(isinstance(m, PEFT_MODULES) for m in model.modules()):
            raise LMStackError(f"{folder}: the model already has PEFT modules; load the adapter onto a fresh base")
        cfg, plan = read_peft(model, folder)
        _attach_lora(model, cfg, plan)
        return model
    if not (folder / ADAPTER_FILE).is_file():
        raise LMStackError(f"{folder}: not an adapter folder (expected {PEFT_WEIGHTS} or {ADAPTER_FILE} "
                           f"beside {ADAPTER_CONFIG})")
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = meta.get("base_model")
    if base is not None and hasattr(model, "config") and model.config.to_dict() != base:
        diff = sorted(k for k in base if base[k] != model.config.to_dict().get(k))
        raise LMStackError(f"{folder}: the adapter was trained on a different base model (differs in {diff})")
    cfg = config_from_dict(PEFTConfig, meta["peft"])
    if getattr(model, "peft_config", None) is None:
        apply_peft(model, cfg)
    sd = load_file(str(folder / ADAPTER_FILE))
    own = peft_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise LMStackError(f"{folder}: adapter tensors do not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k])
    return model
